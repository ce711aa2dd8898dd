"""tools/fault_matrix.py's running and classing of outcomes, on cheap real runs (plot_losses and plain
Python), so that the harness cannot rot unnoticed between the times the whole matrix is measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def matrix():
    spec = importlib.util.spec_from_file_location("fault_matrix", ROOT / "tools" / "fault_matrix.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_matrix"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_each_class_is_recognised(matrix, tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"iteration": 1, "text_loss": 2.0}) + "\n")
    fixtures = {"METRICS": str(metrics)}
    Case = matrix.Case
    bad_line = matrix.write("m.jsonl", '{"iteration": 1, "text_loss": }\n')
    cases = {
        "clear": Case("plot_losses", "bad line", ["tools/plot_losses.py", "{C}/m.jsonl"], ("{C}/m.jsonl:1",),
                      prepare=bad_line),
        "unclear": Case("plot_losses", "bad line, named wrongly", ["tools/plot_losses.py", "{C}/m.jsonl"],
                        ("{C}/m.jsonl:7",), prepare=bad_line),
        "silent": Case("plot_losses", "a good file", ["tools/plot_losses.py", "{METRICS}", "--output", "{C}/l.png"],
                       ("--output",)),
        "traceback": Case("python", "an exception", ["-c", "import json; json.loads('{')"], ("x",)),
        "left-behind": Case("python", "a temporary", ["-c", "open('{C}/.out.123.tmp', 'w'); raise SystemExit(2)"],
                            ("x",)),
    }  # fmt: skip
    outcomes = {
        expected: matrix.run_case(case, i, tmp_path, fixtures) for i, (expected, case) in enumerate(cases.items())
    }
    assert {expected: o.status for expected, o in outcomes.items()} == {expected: expected for expected in cases}
    assert outcomes["clear"].rc == 2 and "m.jsonl:1: not a JSON record" in outcomes["clear"].said
    assert outcomes["traceback"].said.startswith("json.decoder.JSONDecodeError")
    assert [p.name for p in outcomes["left-behind"].left] == [".out.123.tmp"]
    text = matrix.table(list(outcomes.values()), tmp_path)
    assert text.startswith("5 faults tried: clear 1 / unclear 1 / traceback 1 / silent 1 / left-behind 1\n")
    assert "| plot_losses | bad line | clear | 2 | error: W/cases/000/m.jsonl:1: not a JSON record" in text
