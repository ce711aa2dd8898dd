"""tools/preprocess_data.py on a full disk: one line naming the output, exit 2, no partial file left."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CORPUS

ROOT = Path(__file__).resolve().parents[1]
LINES = "".join(json.dumps({"text": line}) + "\n" for line in CORPUS).encode()


@pytest.mark.slow
def test_a_full_disk_names_the_output_prefix(tmp_path, hf_tokenizer_dir):
    """Files capped at 4 kB (RLIMIT_FSIZE: EFBIG past it, as a full disk): the write fails in the open
    partial file, which the error of the OS does not name."""
    (tmp_path / "in.jsonl").write_bytes(LINES * 40)
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(tmp_path / "in.jsonl")]
    cmd += ["--output-prefix", str(tmp_path / "out"), "--tokenizer-model", str(hf_tokenizer_dir)]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY)),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"preprocess_data.py: error: File too large while writing --output-prefix {tmp_path / 'out'} (nothing written)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_only_a_full_disk_without_a_file_is_named_by_what_was_written():
    import errno

    from megatron_unix.cli import os_error_message

    writing = "--output-prefix out"
    assert os_error_message(OSError(errno.ENOSPC, "No space left on device"), writing) == (
        "No space left on device while writing --output-prefix out"
    )
    assert os_error_message(OSError("10 requested and 4 written"), writing) == (
        "a write fell short (10 requested and 4 written: a full disk?) while writing --output-prefix out"
    )
    named = OSError(errno.ENOSPC, "No space left on device", "out.bin")
    assert os_error_message(named, writing) == str(named)  # it names its file
    assert os_error_message(FileNotFoundError("--input x: no such file"), writing) == "--input x: no such file"
