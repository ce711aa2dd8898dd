"""tools/plot_losses.py: the first -> last summary and the PNG of a run's text and vision losses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

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
    assert proc.returncode == 2 and "no loss values to plot" in proc.stderr
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
