"""results.json sections merged per checkpoint, the paper summary taken from them, and the report across
checkpoints (tables and plots against tokens seen), on canned results."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from megatron_unix.cli.evaluate import main
from megatron_unix.evaluation.progress import headlines
from megatron_unix.evaluation.results import read_results, update_results

TEXT = {"mmlu": {"acc": 0.25, "acc_stderr": 0.01}, "arc_easy": {"acc": 0.40, "acc_norm": 0.38}}
UNDERSTANDING = {
    "MMBench_DEV_EN": {"overall": 31.5, "scoring": "reference"},
    "POPE": {"overall": {"accuracy": 70.0, "f1": 68.0}},
}


def write_checkpoint(folder, name, tokens, text_acc, vision_loss, source="/ckpt/run", scoring="reference"):
    checkpoint = {"name": name, "checkpoint": source, "source": source, "format": "megatron", "tokens_seen": tokens}
    update_results(folder, "loss", {"text_loss": 3.0 - text_acc, "vision_loss": vision_loss}, checkpoint)
    update_results(folder, "text", {**TEXT, "mmlu": {"acc": text_acc}}, checkpoint)
    mmb = {**UNDERSTANDING["MMBench_DEV_EN"], "scoring": scoring}
    update_results(folder, "understanding", {**UNDERSTANDING, "MMBench_DEV_EN": mmb}, checkpoint)


def test_sections_merge_and_the_summary_is_in_percent(tmp_path):
    write_checkpoint(tmp_path, "a", 1e9, 0.5, 6.0)
    update_results(
        tmp_path, "generation", {"geneval": {"overall": 0.433}, "dpg": {"score": 62.5}}, {"checkpoint": "/ckpt/run"}
    )
    results = read_results(tmp_path)
    assert set(results["sections"]) == {"loss", "text", "understanding", "generation"}
    assert results["summary"] == pytest.approx({"MMLU": 50.0, "MMB": 31.5, "GenEval": 43.3})
    assert results["sources"]["loss"] == {"source": "/ckpt/run", "format": "megatron"}
    scores = headlines(results["sections"])
    assert scores["DPG-Bench"] == 62.5 and scores["GenEval"] == pytest.approx(43.3)
    table = (tmp_path / "results.md").read_text()
    assert "| a | 50.0 | 43.3 | 31.5 | 41.6 |" in table  # the mean of the three, as the paper's avg
    assert "| Uni-X 9:5 (paper) | 50.1 | 43.3 | 31.5 | 41.6 |" in table


def test_results_of_another_checkpoint_are_refused(tmp_path):
    write_checkpoint(tmp_path, "a", 1e9, 0.5, 6.0)
    with pytest.raises(ValueError, match="results of checkpoint='/ckpt/run', not '/ckpt/other'"):
        update_results(tmp_path, "loss", {}, {"checkpoint": "/ckpt/other"})
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a results file"):
        read_results(tmp_path)


def test_report_orders_by_tokens_and_plots_loss_and_scores(tmp_path, capsys):
    for name, tokens, acc, vision in (("late", 3e9, 0.45, 5.0), ("early", 1e9, 0.3, 7.0), ("mid", 2e9, 0.4, 6.0)):
        write_checkpoint(tmp_path / name, name, tokens, acc, vision)
    out = tmp_path / "summary"
    assert main(["report", *(str(tmp_path / n) for n in ("late", "early", "mid")), "--output-dir", str(out)]) == 0
    records = json.loads((out / "report.json").read_text())["checkpoints"]
    assert [r["name"] for r in records] == ["early", "mid", "late"]
    assert records[0]["scores"] == pytest.approx({"mmlu": 30.0, "arc_easy": 40.0, "MMBench_DEV_EN": 31.5, "POPE": 70.0})
    assert records[2]["losses"] == pytest.approx({"validation text": 2.55, "validation vision": 5.0})
    table = (out / "report.md").read_text()
    assert "| early | 30.0 | - | 31.5 | - |" in table
    assert "| mid | 2e+09 | 2.600 | 6.000 | 31.5 | 70.0 | 40.0 | 40.0 |" in table
    for plot in ("loss.png", "scores.png"):
        with Image.open(out / plot) as image:
            assert image.size == (900, 540) and len(image.getcolors(1 << 20)) > 10
    assert "plot " in capsys.readouterr().out


def test_report_says_which_checkpoint_mmb_is_not_read_as_the_paper(tmp_path, capsys):
    write_checkpoint(tmp_path / "ours", "ours", 1e9, 0.3, 7.0, scoring="vlmevalkit")
    write_checkpoint(tmp_path / "theirs", "theirs", 2e9, 0.3, 7.0)
    assert "| ours | 30.0 | - | 31.5 † | - |" in (tmp_path / "ours" / "results.md").read_text()
    out = tmp_path / "summary"
    assert main(["report", str(tmp_path / "ours"), str(tmp_path / "theirs"), "--output-dir", str(out)]) == 0
    table = (out / "report.md").read_text()
    assert "MMB [paper: reference reading; †: vlmevalkit]" in table
    assert "| ours | 30.0 | - | 31.5 † | - |" in table and "| theirs | 30.0 | - | 31.5 | - |" in table
    records = json.loads((out / "report.json").read_text())["checkpoints"]
    assert [r["mmb_reading"] for r in records] == ["vlmevalkit", "reference"]


def test_report_refuses_folders_without_results_or_positions(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "missing: no results.json" in capsys.readouterr().err
    update_results(tmp_path / "export", "text", TEXT, {"checkpoint": "/hf/export"})
    assert main(["report", str(tmp_path / "export"), "--output-dir", str(tmp_path / "out")]) == 2
    assert "no tokens seen or iteration recorded" in capsys.readouterr().err
    for folder in ("run-a", "run-b"):
        write_checkpoint(tmp_path / folder / "eval", "eval", 1e9, 0.5, 6.0, source=f"/ckpt/{folder}")
    alike = [str(tmp_path / folder / "eval") for folder in ("run-a", "run-b")]
    assert main(["report", *alike, "--output-dir", str(tmp_path / "out")]) == 2
    assert "checkpoints named alike (eval:" in capsys.readouterr().err
