"""TP / PP / SP / DP runs as real processes (torchrun, gloo) give the single-process numbers.

The single-process run writes a dist checkpoint; every parallel run loads it at its own TP/PP, so
these tests also cover saving at TP=1/PP=1 and loading at TP=2 and PP=2 (same logits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.dist

WORKER = Path(__file__).parent / "dist" / "parity_worker.py"


def torchrun(nproc: int, out: Path, *args: str) -> dict:
    port = 24000 + (os.getpid() + hash(args)) % 4000
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={port}",
        str(WORKER),
        "--out",
        str(out),
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # the worker imports tests/tiny.py
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    result["logits"] = torch.load(str(out) + ".logits.pt")
    return result


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    return root, torchrun(1, root / "single.json", "--save", str(root / "ckpt"))


@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"], ["--tp", "2", "--sp"]], ids=["tp2", "pp2", "tp2-sp"])
def test_parallel_run_matches_single_process(single, layout):
    root, base = single
    got = torchrun(2, root / f"{'-'.join(layout)}.json", "--load", str(root / "ckpt"), *layout)
    assert got["loss"] == pytest.approx(base["loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5)
    torch.testing.assert_close(got["logits"], base["logits"], rtol=1e-5, atol=1e-5)


def check_single_modality_ranks_under_ddp_overlap(root: Path, *flags: str) -> None:
    """DP=2 with overlap_grad_reduce: one rank sees only text, the other only images. No hang, and the
    averaged gradient equals one process running both micro-batches."""
    ckpt = str(root / "ckpt")
    split = ("--load", ckpt, "--batches", "split-modality")
    one = torchrun(1, root / "split1.json", *split, *flags)
    two = torchrun(2, root / "split2.json", *split, "--micro-batches", "1", "--overlap-grad-reduce", *flags)
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)


def test_single_modality_micro_batches_under_ddp_overlap(single):
    check_single_modality_ranks_under_ddp_overlap(single[0])


@pytest.fixture(scope="module", params=["hardmoe", "mot"])
def variant_single(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"parity-{request.param}")
    flags = ("--variant", request.param)
    return root, flags, torchrun(1, root / "single.json", "--save", str(root / "ckpt"), *flags)


def test_layer_variant_under_tp_sp_and_pp_matches_single_process(variant_single):
    """HardMoE / MoT at TP=2 with sequence parallelism and PP=2 at once (one launch of 4 processes):
    the routed sub-streams are gathered, padded and scattered, the stacked vision keys reshard."""
    root, flags, base = variant_single
    got = torchrun(4, root / "tp2-sp-pp2.json", "--load", str(root / "ckpt"), "--tp", "2", "--sp", "--pp", "2", *flags)
    assert got["loss"] == pytest.approx(base["loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(base["grad_norm"], rel=1e-5)
    torch.testing.assert_close(got["logits"], base["logits"], rtol=1e-5, atol=1e-5)


def test_layer_variant_single_modality_micro_batches_under_ddp_overlap(variant_single):
    """As for Uni-X: on each rank one copy of every routed module runs on padding alone."""
    root, flags, _ = variant_single
    check_single_modality_ranks_under_ddp_overlap(root, *flags)
