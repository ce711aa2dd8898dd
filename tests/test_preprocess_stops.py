"""tools/preprocess_data.py stopped by Ctrl-C (SIGINT to its whole process group, as a terminal sends it),
at start-up or mid-run: one line, exit 130, no traceback from it or its workers, nothing written."""

from __future__ import annotations

import json
import time

import pytest
from conftest import CORPUS
from test_program_stops import ctrl_c, start


@pytest.mark.slow
@pytest.mark.parametrize("when", ["start-up", "mid-run"])
def test_ctrl_c_stops_in_one_line_leaving_nothing(tmp_path, hf_tokenizer_dir, when):
    lines = "".join(json.dumps({"text": f"{i} {line}"}) + "\n" for i, line in enumerate(CORPUS * 1500))
    (tmp_path / "in.jsonl").write_text(lines)
    proc = start(
        "preprocess_data.py",
        *("--input", str(tmp_path / "in.jsonl"), "--output-prefix", str(tmp_path / "out")),
        *("--tokenizer-model", str(hf_tokenizer_dir), "--workers", "2", "--log-interval", "1000"),
    )
    if when == "start-up":
        time.sleep(0.5)  # still importing: megatron-core alone takes seconds
    else:
        first = proc.stdout.readline()
        assert "documents" in first, first
    assert ctrl_c(proc)[-1] == "preprocess_data.py: stopped by SIGINT; nothing written"  # 130, no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
