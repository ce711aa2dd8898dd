"""tools/gpu_check.py: its ``--smoke`` run (every step of the GPU check on the CPU at tiny sizes) passes, so
that an import, a flag or a path error shows here and not during a GPU lease; a step that cannot run is
recorded and fails the exit status; its tokenizer gives the vocabulary the GPU run claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_check  # noqa: E402  (tools/ is no package)


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_smoke_run_passes_every_step(tmp_path):
    out = tmp_path / "out"
    proc = _run("--smoke", "--out", str(out), "--work", str(tmp_path / "work"), timeout=1300)
    summary = json.loads((out / "summary.json").read_text())
    failed = {name: step.get("error") for name, step in summary["steps"].items() if step["status"] != "pass"}
    assert proc.returncode == 0 and not failed, f"{failed}\n{proc.stdout[-3000:]}"
    assert list(summary["steps"]) == list(gpu_check.STEPS) and summary["passed"]
    assert "pretrain_unix.py" in (out / "gpu_check.log").read_text()
    assert "aten::mm" in (out / "profile.txt").read_text()
    steps = {name: step["figures"] for name, step in summary["steps"].items()}
    # CPU fp32 against CPU fp32 from the same init, and a resume: the same numbers exactly
    correctness = steps["correctness"]
    assert correctness["first_loss"] == correctness["cpu_fp32_first_loss"]
    assert correctness["resumed_loss"] == correctness["uninterrupted_loss"]
    assert len(correctness["losses"]) == gpu_check.SMOKE.correctness_iters
    throughput = steps["throughput"]
    for variant in gpu_check.VARIANTS:
        assert throughput[variant]["tokens_per_s"] > 0 and throughput[variant]["timed_iterations"] == 1
    assert throughput["vocab"] == steps["setup"]["synthetic"]["vocab_size"]
    assert steps["fit_3b"]["recompute"] is True
    assert steps["vqgan"]["equal_tf32_off"] == 1.0
    assert set(steps["generation"]) >= {f"t2i_tokens_per_s_batch_{b}" for b in gpu_check.SMOKE.gen_batches}


@pytest.mark.slow
def test_steps_that_cannot_run_are_errors_and_fail_the_run(tmp_path):
    out = tmp_path / "out"
    proc = _run("--smoke", "--out", str(out), "--time-limit", "1", timeout=120)
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 1 and not summary["passed"]
    assert [step["status"] for step in summary["steps"].values()] == ["error"] * len(gpu_check.STEPS)
    assert "--time-limit" in summary["steps"]["profile"]["error"]


def test_layout_tokenizer_gives_qwen25_ids_and_vocabulary_160128(tmp_path):
    from megatron_unix.data import vocabulary
    from megatron_unix.data.tokenizer import MultimodalTokenizer

    gpu_check.layout_tokenizer(tmp_path, gpu_check.FULL.text_words, gpu_check.FULL.reserved)
    tok = MultimodalTokenizer.from_pretrained(tmp_path)
    assert (tok.eos_id, tok.boi_id, tok.eoi_id) == (vocabulary.QWEN25_EOS, vocabulary.QWEN25_BOI, vocabulary.QWEN25_EOI)
    assert tok.text.token_id("<|vision_pad|>") == 151654 and tok.text.token_id("<|file_sep|>") == 151664
    assert tok.vq_offset == gpu_check.FULL.vq_offset == 151936 and tok.vocab_size == 160128
