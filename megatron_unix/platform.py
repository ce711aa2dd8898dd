"""Run megatron-core on whatever this machine has, decided once at start-up.

megatron-core assumes CUDA in a handful of places (RNG tracker, ``torch.cuda.current_device()``,
tensors created on ``"cuda"`` by the pipeline schedules, fused kernels). On a machine without a
GPU :func:`setup` bridges those once, so the model and training code contain no CPU branches.
It also reports which optional accelerators (Transformer Engine, flash-attn, apex) are present.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class Accelerators:
    """What this process can use; everything is optional except torch."""

    cuda: bool
    transformer_engine: bool
    flash_attn: bool
    apex: bool
    torch_varlen: bool

    def absent(self) -> list[str]:
        """The names of what this process lacks (megatron-core and this code fall back to torch for each)."""
        return [name for name, present in self.__dict__.items() if not present]


def has_module(name: str) -> bool:
    """Whether ``name`` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def detect_accelerators() -> Accelerators:
    return Accelerators(
        cuda=torch.cuda.is_available(),
        transformer_engine=has_module("transformer_engine"),
        flash_attn=has_module("flash_attn"),
        apex=has_module("apex"),
        torch_varlen=has_module("torch.nn.attention.varlen"),
    )


TRANSFORMER_IMPLS = ("local", "transformer_engine")


def default_transformer_impl() -> str:
    """Megatron's ``--transformer-impl`` default here: Transformer Engine on a GPU machine that has
    it installed, Megatron's local modules otherwise."""
    found = detect_accelerators()
    return "transformer_engine" if found.cuda and found.transformer_engine else "local"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (signal 0 checks without sending anything): files
    named after a dead writer's PID are leftovers of a killed run."""
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's process
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def leftovers_of_dead_processes(parent: Path, prefix: str, suffixes: Sequence[str] = ("",)) -> list[Path]:
    """The paths ``parent/<prefix><PID><suffix>`` whose PID runs no more: what killed writers left, as
    writers here name what they have not committed yet. PIDs are this machine's."""
    name = re.compile(re.escape(prefix) + r"(\d+)(?:" + "|".join(map(re.escape, suffixes)) + ")")
    return sorted(
        path
        for path in parent.glob(glob.escape(prefix) + "*")
        if (match := name.fullmatch(path.name)) and not process_alive(int(match[1]))
    )


def device() -> torch.device:
    """The device tensors of this process live on."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def distributed_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def config_defaults() -> dict[str, Any]:
    """TransformerConfig fields that must differ from Megatron's defaults on this machine."""
    if torch.cuda.is_available():
        return {}
    return {
        "use_cpu_initialization": True,
        "masked_softmax_fusion": False,
        "bias_activation_fusion": False,
        "bias_dropout_fusion": False,
        "gradient_accumulation_fusion": False,
        "apply_rope_fusion": False,
        "persist_layer_norm": False,
    }


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, int):
        return True
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, torch.device) and dev.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    """Maps ``device="cuda"`` (and ``Tensor.cuda()``) to the CPU for code we do not own."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.cuda,):
            return args[0]
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda_device(args[1]) and not isinstance(args[1], int):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """Megatron's named RNG states ("model-parallel-rng", ...) kept as CPU generator states."""

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_, self.seeds_ = {}, set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {k: v.clone() for k, v in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        if name in self.states_:
            raise ValueError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"rng state {name} is not added")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


_SETUP_DONE = False


def _clip_grads_cpu(parameters, max_norm: float, total_norm: float, use_decoupled_grad: bool = False) -> None:
    """Megatron's ``clip_grad_by_total_norm_fp32`` without its CUDA-tensor assertion and fused scale."""
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff >= 1.0:
        return
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    for param in parameters:
        grad = getattr(param, attr, None)
        if grad is not None:
            grad.detach().mul_(coeff)


def setup() -> Accelerators:
    """Apply the CPU bridges once (no-op with a GPU); return the accelerators found."""
    global _SETUP_DONE
    found = detect_accelerators()
    if _SETUP_DONE or found.cuda:
        _SETUP_DONE = True
        return found
    from megatron.core.tensor_parallel import random as mrandom

    tracker = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    # Activation recompute saves/restores "the CUDA RNG": on CPU that is the CPU generator.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.manual_seed = lambda *a, **k: None  # type: ignore[assignment]
    from megatron.core.optimizer import optimizer as moptimizer

    moptimizer.clip_grad_by_total_norm_fp32 = _clip_grads_cpu
    _CudaToCpu().__enter__()
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _SETUP_DONE = True
    return found


def seed_model_parallel(seed: int) -> None:
    """Seed torch and Megatron's named RNG states the way Megatron-LM does (data/model/expert)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    seed += 100 * ps.get_pipeline_model_parallel_rank()  # as Megatron-LM: stages must not init alike
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mrandom.model_parallel_cuda_manual_seed(seed)
        return
    tracker = mrandom.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + ps.get_tensor_model_parallel_rank())
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ps.get_expert_model_parallel_rank())
