"""megatron_unix.startup: megatron-core's import leaves wandb and the compiler unimported until used, and
both work as before when used (``--wandb-project`` logging: tests/test_pretrain.py's wandb run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from megatron_unix.startup import compile_at_first_call

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import importlib.util, sys
import megatron_unix.training.trainer
import megatron.core.jit
from megatron.core.transformer.utils import gelu_impl
from megatron_unix.startup import compile_at_first_call
print(sorted(m for m in ("wandb.sdk", "torch._dynamo", "torch._inductor") if m in sys.modules))
print(megatron.core.jit.jit_fuser is compile_at_first_call, gelu_impl.__wrapped__.__module__)
print(importlib.util.find_spec("wandb").name)
import wandb
print(callable(wandb.init), "wandb.sdk" in sys.modules, sys.modules["wandb"].init is wandb.init)
"""


def test_megatron_core_import_leaves_wandb_and_the_compiler_for_their_first_use():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == [
        "[]",  # the trainer imported megatron-core whole: neither wandb nor torch.compile's machinery
        "True megatron.core.transformer.utils",  # its fused functions are compiled at their first call
        "wandb",  # its spec is the real one (transformers' is_wandb_available asks for it)
        "True True True",  # the first attribute imports the real wandb, in the stand-in's place
    ]


def test_compile_at_first_call_compiles_once_at_the_first_call():
    graphs = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    def gelu(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))

    deferred = compile_at_first_call(gelu, backend=backend)
    assert deferred.__name__ == "gelu" and graphs == []
    x = torch.randn(16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(deferred(x), torch.nn.functional.gelu(x, approximate="tanh"))
    deferred(x + 1)
    assert len(graphs) == 1 and "tanh" in str(graphs[0].code)
