"""tools/plot_losses.py: the first -> last summary and the PNG of a run's text and vision losses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from megatron_unix.cli.plot_losses import main
from megatron_unix.training.loss_plot import read_series, summary

ROOT = Path(__file__).resolve().parents[1]


def write_metrics(path: Path) -> None:
    records = [
        {"iteration": it, "loss": 8.5 / it, "text_loss": 8.0 / it, "vision_loss": 9.0 / it if it > 1 else None}
        for it in (1, 5, 10)
    ]
    records.insert(2, {"iteration": 5, "valid_loss": 7.0, "valid_text_loss": 6.5, "valid_vision_loss": 7.5})
    records.append({"iteration": 10, "valid_loss": 2.0, "valid_text_loss": 1.5, "valid_vision_loss": 2.5})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_series_skip_missing_values_and_summary_names_first_and_last(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    series = read_series(tmp_path / "metrics.jsonl")
    assert series == {
        "text_loss": [(1, 8.0), (5, 1.6), (10, 0.8)],
        "vision_loss": [(5, 1.8), (10, 0.9)],
        "valid_text_loss": [(5, 6.5), (10, 1.5)],
        "valid_vision_loss": [(5, 7.5), (10, 2.5)],
    }
    lines = summary(series, codebook_size=8192).splitlines()
    assert lines[1] == "train vision       1.800 (iteration 5) -> 0.900 (iteration 10)"
    assert lines[-1].startswith("uniform vision     9.011")


def test_tool_writes_a_png_and_prints_the_summary(tmp_path):
    write_metrics(tmp_path / "metrics.jsonl")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "plot_losses.py"),
            str(tmp_path / "metrics.jsonl"),
            "--codebook-size",
            "8192",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "validation vision  7.500 (iteration 5) -> 2.500 (iteration 10)" in proc.stdout
    assert f"plot               {tmp_path / 'loss.png'}" in proc.stdout
    with Image.open(tmp_path / "loss.png") as image:
        assert image.format == "PNG" and image.size == (900, 540)
        assert len(image.getcolors(1 << 20)) > 10  # something was drawn


def test_tool_refuses_a_run_without_losses(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iteration": 1, "loss": 3.0}) + "\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plot_losses.py"), str(tmp_path / "metrics.jsonl")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and f"{tmp_path / 'metrics.jsonl'}: no text or vision loss in it" in proc.stderr
    assert not (tmp_path / "loss.png").exists()


def test_several_runs_on_one_plot_with_their_labels(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_metrics(tmp_path / name / "metrics.jsonl")
    files = [str(tmp_path / name / "metrics.jsonl") for name in ("a", "b")]
    tool = [sys.executable, str(ROOT / "tools" / "plot_losses.py"), *files, "--output", str(tmp_path / "both.png")]
    proc = subprocess.run([*tool, "--labels", "shared,unix"], capture_output=True, text=True, check=True)
    assert "== shared\ntrain text         8.000 (iteration 1) -> 0.800 (iteration 10)" in proc.stdout
    assert "== unix\n" in proc.stdout
    with Image.open(tmp_path / "both.png") as image:
        assert image.size == (900, 540)
    wrong = subprocess.run([*tool, "--labels", "one"], capture_output=True, text=True, check=False)
    assert wrong.returncode == 2 and "--labels names 1 runs for 2 metrics files" in wrong.stderr


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"iteration": 7, "text_loss": }', ":3: not a JSON record (Expecting value: line 1 column 31"),
        ('{"text_loss": 2.0}', ':3: not a metrics record (no integer "iteration")'),
        ('{"iteration": 7, "text_loss": "low"}', ":3: text_loss is 'low', not a number"),
    ],
    ids=["not-json", "no-iteration", "not-a-number"],
)
def test_a_bad_metrics_line_is_named_by_file_and_line(tmp_path, capsys, line, message):
    write_metrics(tmp_path / "metrics.jsonl")
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines[2] = line
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main([str(tmp_path / "metrics.jsonl")]) == 2
    assert f"error: {tmp_path / 'metrics.jsonl'}{message}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "metrics.jsonl"]


def test_flag_and_output_errors_name_the_flag_or_the_file(tmp_path, capsys):
    write_metrics(tmp_path / "metrics.jsonl")
    for size in ("0", "-3"):
        with pytest.raises(SystemExit) as exit_:
            main([str(tmp_path / "metrics.jsonl"), "--codebook-size", size])
        assert exit_.value.code == 2 and f"--codebook-size {size} is out of range" in capsys.readouterr().err
    missing = tmp_path / "no" / "loss.png"
    assert main([str(tmp_path / "metrics.jsonl"), "--output", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: cannot write {missing}: its folder {missing.parent} does not exist\n"


def grey_pixels(path: Path) -> int:
    """Neutral mid-grey pixels: the uniform line's colour, lightened where the downsampling blends it."""
    with Image.open(path) as image:
        return sum(n for n, c in image.getcolors(1 << 20) if max(c) - min(c) < 6 and 100 <= c[0] <= 200)


def test_several_runs_draw_and_print_the_uniform_vision_loss(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_metrics(tmp_path / name / "metrics.jsonl")
    files = [str(tmp_path / name / "metrics.jsonl") for name in ("a", "b")]
    assert main([*files, "--output", str(tmp_path / "plain.png")]) == 0
    assert "uniform vision" not in capsys.readouterr().out
    assert main([*files, "--output", str(tmp_path / "uniform.png"), "--codebook-size", "8192"]) == 0
    assert capsys.readouterr().out.count("uniform vision     9.011 (ln 8192: nothing learnt)") == 1
    assert grey_pixels(tmp_path / "uniform.png") > grey_pixels(tmp_path / "plain.png") + 800


def test_non_finite_losses_are_counted_not_drawn(tmp_path, capsys):
    records = [{"iteration": it, "text_loss": value} for it, value in ((1, 5.0), (2, float("nan")), (3, 4.0))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))  # NaN, as json writes it
    assert main([str(tmp_path / "metrics.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "train text         5.000 (iteration 1) -> 4.000 (iteration 3) (1 not finite, not drawn: iteration 2)" in out
    assert (tmp_path / "loss.png").is_file()
