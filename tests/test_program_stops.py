"""tools/generate.py and tools/evaluate.py stopped by Ctrl-C mid-run (SIGINT to the whole process group, as
a terminal sends it): one line saying what was kept, exit 130, no traceback, every file left whole and
no temporary left behind (``cli.stops_in_one_line``, which preprocess_data and conditional_entropy use too).

Each child is stopped once its first result is on disk. generate's progress goes to a pipe of four pages
that the test does not read (less than the whole run's progress), so the child cannot finish first;
evaluate has far more items than it answers in the moment the signal takes."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_evaluate_understanding import model_dir, png_b64, vqgan_dir  # noqa: F401  (fixtures)
from test_evaluation_scoring import write_tsv

ROOT = Path(__file__).resolve().parents[1]
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ from Python 3.10 on Linux


def start(tool: str, *argv: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / tool), *argv],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell ignores it
    )
    fcntl.fcntl(proc.stdout.fileno(), F_SETPIPE_SZ, 16384)
    return proc


def wait_for(proc: subprocess.Popen, done, timeout: float = 300) -> None:
    """Until ``done()``; a child that ended first, or never got there, fails the test with its output."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"ended first or stuck ({proc.wait()}):\n{proc.stdout.read()}")
        time.sleep(0.02)


def ctrl_c(proc: subprocess.Popen) -> list[str]:
    """SIGINT to the child's process group; its output lines, once it has ended with 130 and no traceback."""
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in out, out
    return out.splitlines()


def no_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".partial"))]


@pytest.mark.slow
def test_generate_stops_keeping_the_finished_batches(model_dir, tmp_path):  # noqa: F811
    (tmp_path / "prompts.txt").write_text("".join(f"picture number {i}\n" for i in range(40)))
    out = tmp_path / "out"
    proc = start(
        "generate.py",
        *("--hf", str(model_dir), "--mode", "t2i", "--prompts-file", str(tmp_path / "prompts.txt")),
        *("--codes-per-image", "16", "--batch-size", "1", "--device", "cpu", "--output-dir", str(out)),
    )
    samples = out / "samples.jsonl"
    wait_for(proc, samples.exists)  # the first batch's (rewritten whole after each batch)
    lines = ctrl_c(proc)
    assert (
        lines[-1] == f"generate: stopped by SIGINT; {samples} lists the images of the finished batches, each file whole"
    )
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert 1 <= len(records) < 40
    assert [r["prompt_index"] for r in records] == list(range(len(records)))
    assert all(len(r["codes"]) == 16 for r in records)
    assert no_temporaries(out) == [] and sorted(p.name for p in out.iterdir()) == ["samples.jsonl"]


@pytest.mark.slow
def test_evaluate_stops_keeping_the_answers_so_far(model_dir, vqgan_dir, tmp_path):  # noqa: F811
    rows = [[i, png_b64(i), f"Is there a cat number {i} in the image?", "Yes", "random"] for i in range(300)]
    (tmp_path / "bench").mkdir()
    write_tsv(tmp_path / "bench" / "POPE.tsv", ["index", "image", "question", "answer", "category"], rows)
    out = tmp_path / "out"
    proc = start(
        "evaluate.py",
        *("understanding", "--hf", str(model_dir), "--vqgan", str(vqgan_dir), "--benchmarks", "POPE"),
        *("--benchmark-dir", str(tmp_path / "bench"), "--device", "cpu", "--output-dir", str(out)),
    )
    answers = out / "answers.jsonl"
    wait_for(proc, lambda: answers.exists() and answers.read_text().count("\n") >= 2)  # settings, an answer
    lines = ctrl_c(proc)
    assert (
        lines[-1]
        == f"evaluate: stopped by SIGINT; the answers so far are in {answers}: the same command resumes after them"
    )
    records = [json.loads(line) for line in answers.read_text().splitlines()]  # whole lines only
    assert "settings" in records[0] and 1 <= len(records[1:]) < 300
    assert {r["index"] for r in records[1:]} <= set(range(300))
    assert no_temporaries(out) == [] and not (out / "results.json").exists()
