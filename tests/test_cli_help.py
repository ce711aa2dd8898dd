"""The tools answer --help and refuse a flag out of range before importing torch or megatron-core (which
made them wait 5 s idle, up to 19 s on a loaded machine), as pretrain_unix.py does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = (
    "import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
    "except SystemExit as e:\n    print('exit', e.code)\n"
    "print(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules))"
)


@pytest.mark.parametrize(
    "tool, flags, said",
    [
        ("preprocess_data", ["--help"], "--output-prefix"),
        ("preprocess_data", ["--input", "x.jsonl", "--output-prefix", "o", "--tokenizer-model", "t", "--workers", "0"], "--workers 0 is out of range"),
        ("encode_images", ["--help"], "--vqgan-checkpoint"),
        ("encode_images", ["--input", "x.jsonl", "--output", "o.jsonl", "--vqgan", "v", "--batch-size", "0"], "--batch-size 0 is out of range"),
        ("conditional_entropy", ["--help"], "--memory-budget-mb"),
        ("conditional_entropy", ["--data-path", "d", "--output-dir", "o", "--max-n", "0"], "--max-n 0 is out of range"),
        ("plot_losses", ["--help"], "--codebook-size"),
        ("train_tokenizer", ["--help"], "--vocab-size"),
    ],
)  # fmt: skip
def test_help_and_range_errors_import_neither_torch_nor_megatron(tool, flags, said):
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT / "tools" / f"{tool}.py"), *flags],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    lines = proc.stdout.strip().splitlines()
    assert said in proc.stdout + proc.stderr
    assert lines[-2] == ("exit 0" if flags == ["--help"] else "exit 2")
    assert lines[-1] == "[]", proc.stdout
