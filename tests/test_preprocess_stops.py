"""tools/preprocess_data.py stopped by Ctrl-C (SIGINT to its whole process group, as a terminal sends it),
at start-up or mid-run: one line, exit 130, no traceback from it or its workers, nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CORPUS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("when", ["start-up", "mid-run"])
def test_ctrl_c_stops_in_one_line_leaving_nothing(tmp_path, hf_tokenizer_dir, when):
    lines = "".join(json.dumps({"text": f"{i} {line}"}) + "\n" for i, line in enumerate(CORPUS * 1500))
    (tmp_path / "in.jsonl").write_text(lines)
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(tmp_path / "in.jsonl")]
    cmd += ["--output-prefix", str(tmp_path / "out"), "--tokenizer-model", str(hf_tokenizer_dir)]
    cmd += ["--workers", "2", "--log-interval", "1000"]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background shell ignores it
    )
    if when == "start-up":
        time.sleep(0.5)  # still importing: megatron-core alone takes seconds
    else:
        first = proc.stdout.readline()
        assert "documents" in first, first
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in out, out
    assert out.splitlines()[-1] == "preprocess_data.py: stopped by SIGINT; nothing written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
