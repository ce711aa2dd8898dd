"""tools/evaluate.py loss: a checkpoint's validation loss per modality is the number its training run
logged for the same validation batches, at any TP/PP; results.json records it with the checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_pretrain import common_args, data, run  # noqa: F401  (data: the shared datasets fixture)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:  # noqa: F811
    """Two iterations, then one validation of 2 global batches (the split's first), then the checkpoint."""
    save = tmp_path_factory.mktemp("trained")
    run(common_args(data, iters=2) + ["--eval-interval", "2", "--eval-iters", "2", "--save", str(save)])
    return save


def evaluate(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = [sys.executable]
    if nproc > 1:
        port = str(21000 + os.getpid() % 8000)
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", port]
    return subprocess.run(
        [*launcher, str(ROOT / "tools" / "evaluate.py"), "loss", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def logged_validation(save: Path) -> dict:
    return next(r for r in map(json.loads, (save / "metrics.jsonl").read_text().splitlines()) if "valid_loss" in r)


def check_against_log(save: Path, output: Path, rel: float) -> dict:
    logged = logged_validation(save)
    results = json.loads((output / "results.json").read_text())
    loss = results["sections"]["loss"]
    for key in ("loss", "text_loss", "vision_loss"):
        assert loss[key] == pytest.approx(logged[f"valid_{key}"], rel=rel), key
    assert loss["vision_perplexity"] == pytest.approx(math.exp(logged["valid_vision_loss"]), rel=rel)
    assert loss["text_tokens"] > 0 and loss["vision_tokens"] > 0 and loss["samples"] == 8
    return results


@pytest.mark.slow
def test_loss_equals_the_validation_the_run_logged(trained, tmp_path):
    proc = evaluate(["--load", str(trained), "--output-dir", str(tmp_path), "--name", "tiny"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = check_against_log(trained, tmp_path, rel=1e-9)
    assert results["checkpoint"]["iteration"] == 2
    assert results["checkpoint"]["tokens_seen"] == 2 * 4 * 64  # iterations x global batch x seq length
    assert "| tiny |" in (tmp_path / "results.md").read_text()


@pytest.mark.dist
@pytest.mark.parametrize(
    "flags", [["--tensor-model-parallel-size", "2", "--sequence-parallel"], ["--pipeline-model-parallel-size", "2"]]
)
def test_loss_at_tp2_and_pp2_equals_the_single_process_log(trained, tmp_path, flags):
    proc = evaluate(["--load", str(trained), "--output-dir", str(tmp_path), *flags], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_against_log(trained, tmp_path, rel=1e-5)


@pytest.mark.slow
def test_other_data_and_refusals_name_the_flag(trained, data, tmp_path):  # noqa: F811
    proc = evaluate(
        ["--load", str(trained), "--data-path", data["text"], "--split", "0,1,0", "--output-dir", str(tmp_path)]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss = json.loads((tmp_path / "results.json").read_text())["sections"]["loss"]
    assert loss["vision_loss"] is None and loss["vision_tokens"] == 0 and loss["text_loss"] > 0
    missing = evaluate(["--load", str(tmp_path / "nothing"), "--output-dir", str(tmp_path)])
    assert missing.returncode == 2 and "no checkpoint there" in missing.stderr
    no_valid = evaluate(["--load", str(trained), "--split", "1,0,0", "--output-dir", str(tmp_path / "x")])
    assert no_valid.returncode == 2 and "--split" in no_valid.stderr
