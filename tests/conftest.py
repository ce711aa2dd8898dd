"""Shared fixtures: one single-process gloo group with Megatron's parallel state (TP=PP=1)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def megatron_single():
    from megatron_unix.training import distributed

    os.environ["MASTER_PORT"] = str(23000 + os.getpid() % 5000)
    distributed.initialize(1, 1, seed=1)
    yield


@pytest.fixture(autouse=True)
def _clear_nvte_env():
    """TransformerConfig writes NVTE_* variables into os.environ; keep tests independent."""
    before = {k for k in os.environ if k.startswith("NVTE_")}
    yield
    for key in [k for k in os.environ if k.startswith("NVTE_")]:
        if key not in before:
            del os.environ[key]
