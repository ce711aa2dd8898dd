"""Gradient conflict between modalities (spec §7), per layer and weight group, at any TP/PP/DP.

Two measurements share this code:

- **data conflict** (the paper's): ``g_text`` and ``g_mm`` are the gradients of the training loss summed
  over B text-only and B image-text global batches, ``g_A`` / ``g_B`` over the two halves of their
  shuffled union; ``S_inter = cos(g_text, g_mm)``, ``S_base = cos(g_A, g_B)``, ``c = -(S_inter - S_base)``.
  Sums, not means: a cosine does not see the 1/B.
- **modality-loss cosine** (``--grad-conflict-interval`` in training, and the offline tool on given
  batches): on one global batch, ``cos(g_text, g_vision)`` where ``g_text`` / ``g_vision`` are the
  gradients of the training loss's text-target / vision-target parts (same normalisation as the loss,
  so ``g_text + g_vision`` is the training gradient).

Groups are the weights of the reference's analysis: q, k, v, o, gate, up, down of every layer, and
``vision.q`` ... of a layer's vision weights (a Uni-X separated layer's copy, a baseline's vision
projections or MLP). Megatron's fused ``linear_qkv`` and ``linear_fc1`` are split per TP shard with
``model.fused`` (a shard holds whole query groups and ``[gate_r; up_r]``). Dot products and squared norms are summed over the TP group for
TP-sharded weights (every group is), counted once for replicated ones, and each pipeline stage's layers
are gathered to every rank. Gradients are read from the DDP buffers (``main_grad``) after Megatron's
schedule, so they are already averaged over data-parallel ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_unix.model.config import UniXConfig
from megatron_unix.model.forward import Batch, unwrap
from megatron_unix.model.fused import split_gate_up, split_qkv
from megatron_unix.training.step import Routed, forward_step, modality_forward_step, run_schedule

WEIGHT_GROUPS: dict[str, tuple[str, ...]] = {
    "self_attention.linear_qkv.weight": ("q", "k", "v"),
    "self_attention.linear_proj.weight": ("o",),
    "mlp.linear_fc1.weight": ("gate", "up"),
    "mlp.linear_fc2.weight": ("down",),
}
"""Megatron weight (within a layer or its vision part) -> the groups its gradient splits into; biases and
norms are not analysed."""
GROUPS = tuple(group for groups in WEIGHT_GROUPS.values() for group in groups)
VISION = "vision."
"""The vision part of a layer, in parameter names (``vision.…``, ``mlp.vision.…``) and in group names."""

Key = tuple[int, str]
"""(layer index from 0 over the whole model, group such as ``q`` or ``vision.q``)."""
Step = Callable[..., Any]
"""A forward-step function of Megatron's schedules."""


@dataclass(frozen=True)
class Products:
    """``<a, b>``, ``|a|^2``, ``|b|^2`` of one group's gradients, summed over its shards."""

    dot: float
    norm_a: float
    norm_b: float

    @property
    def cosine(self) -> float | None:
        """None where a gradient is zero (e.g. a vision copy on text-only data): no direction to compare."""
        if self.norm_a <= 0 or self.norm_b <= 0:
            return None
        return self.dot / math.sqrt(self.norm_a * self.norm_b)


@dataclass(frozen=True)
class _Weight:
    layer: int
    copy: str
    param: torch.nn.Parameter
    name: str
    """Its key in :data:`WEIGHT_GROUPS`."""


class GradientProbe:
    """The analysed weights of one DDP-wrapped model chunk on this rank, and how their gradients split
    into groups."""

    def __init__(self, ddp: torch.nn.Module, config: UniXConfig) -> None:
        groups = config.num_query_groups or config.num_attention_heads
        tp = ps.get_tensor_model_parallel_world_size()
        self.qkv_shard = (groups // tp, config.num_attention_heads // groups, config.kv_channels)
        """(query groups, heads per group, head dim) of this rank's ``linear_qkv`` shard."""
        self.weights: list[_Weight] = []
        for layer in unwrap(ddp).decoder.layers:
            for name, param in layer.named_parameters():
                # Uni-X's copy is "vision.<layer's name>"; a baseline's vision part "mlp.vision.linear_fc1..."
                copy = VISION if f".{VISION}" in f".{name}" else ""
                plain = f".{name}".replace(f".{VISION}", ".")[1:]
                if plain in WEIGHT_GROUPS:
                    self.weights.append(_Weight(layer.layer_number - 1, copy, param, plain))
        self.keys = sorted({(w.layer, w.copy + g) for w in self.weights for g in WEIGHT_GROUPS[w.name]})

    def _split(self, weight: _Weight, gradient: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A gradient shard cut into its groups' pieces."""
        if weight.name.endswith("linear_qkv.weight"):
            return split_qkv(gradient, *self.qkv_shard)
        if weight.name.endswith("linear_fc1.weight"):
            return split_gate_up(gradient)
        return (gradient,)

    def live(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """The current gradients (views of the DDP buffer, no copy)."""
        return {w.param: w.param.main_grad for w in self.weights}

    def zeros(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """fp32 running sums on the parameters' device."""
        return {w.param: torch.zeros_like(w.param.main_grad, dtype=torch.float32) for w in self.weights}

    def add_to(self, sums: dict[torch.nn.Parameter, torch.Tensor]) -> None:
        for w in self.weights:
            sums[w.param] += w.param.main_grad

    def products(
        self, a: dict[torch.nn.Parameter, torch.Tensor], b: dict[torch.nn.Parameter, torch.Tensor]
    ) -> dict[Key, Products]:
        """Per group, ``<a, b>``, ``|a|^2``, ``|b|^2`` over the whole model: summed over TP shards, the
        pipeline stages' groups gathered (identical on every rank)."""
        index = {key: i for i, key in enumerate(self.keys)}
        totals = torch.zeros(len(self.keys), 3, dtype=torch.float64, device=self.weights[0].param.device)
        first_of_tp = ps.get_tensor_model_parallel_rank() == 0
        for w in self.weights:
            if not (getattr(w.param, "tensor_model_parallel", False) or first_of_tp):
                continue  # a replicated weight: every TP rank holds the whole of it
            pieces = zip(WEIGHT_GROUPS[w.name], self._split(w, a[w.param]), self._split(w, b[w.param]))
            for group, x, y in pieces:
                x, y = x.reshape(-1), y.reshape(-1)
                totals[index[(w.layer, w.copy + group)]] += torch.stack(
                    [torch.dot(x, y), torch.dot(x, x), torch.dot(y, y)]
                ).double()
        dist.all_reduce(totals, group=ps.get_tensor_model_parallel_group())
        mine = {key: Products(*row) for key, row in zip(self.keys, totals.tolist())}
        stages: list[dict[Key, Products]] = [{}] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
        return dict(sorted(item for stage in stages for item in stage.items()))


def forward_backward(ddp: torch.nn.Module, micro_batches: list[Batch], step: Step = forward_step) -> list[Any]:
    """One global batch (this rank's micro-batches) through Megatron's schedule into zeroed grad
    buffers, as a training iteration runs it (DDP reduces over data-parallel ranks at the end)."""
    for param in ddp.parameters():  # after an optimizer step .grad aliases the buffer: autograd would add into it
        param.grad = None
    ddp.zero_grad_buffer()
    config = unwrap(ddp).config
    return run_schedule(ddp, [Routed.of(batch, config) for batch in micro_batches], step)


def accumulate(
    probe: GradientProbe,
    ddp: torch.nn.Module,
    global_batches: Iterable[list[Batch]],
    progress: Callable[[], None] = lambda: None,
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """The training-loss gradient summed over ``global_batches`` (fp32, one running sum per weight)."""
    sums = probe.zeros()
    for micro_batches in global_batches:
        forward_backward(ddp, micro_batches)
        probe.add_to(sums)
        progress()
    return sums


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Random states (torch CPU/CUDA and Megatron's tracker) as they were before: a measurement inside
    training leaves dropout and everything later unchanged."""
    tracker = get_cuda_rng_tracker().get_states()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        yield
    get_cuda_rng_tracker().set_states(tracker)


def modality_products(probe: GradientProbe, ddp: torch.nn.Module, micro_batches: list[Batch]) -> dict[Key, Products]:
    """``<g_text, g_vision>`` and norms on one global batch: two forward-backward passes, each with the
    training loss restricted to one modality's targets. Leaves the gradient buffers dirty (the caller's
    own step zeroes them) and the random states untouched."""
    with preserved_rng():
        forward_backward(ddp, micro_batches, modality_forward_step("text"))
        text = probe.zeros()
        probe.add_to(text)
        forward_backward(ddp, micro_batches, modality_forward_step("vision"))
        return probe.products(text, probe.live())


def data_conflict(
    probe: GradientProbe,
    ddp: torch.nn.Module,
    sets: dict[str, Iterable[list[Batch]]],
    progress: Callable[[str], None] = lambda name: None,
) -> list[dict[str, Any]]:
    """Rows ``layer, group, similarity, baseline, conflict`` from the global batches of the four sets
    ``text``, ``mm``, ``A``, ``B`` (two running sums alive at a time)."""
    pairs = {}
    for first, second in (("text", "mm"), ("A", "B")):
        a = accumulate(probe, ddp, sets[first], partial(progress, first))
        b = accumulate(probe, ddp, sets[second], partial(progress, second))
        pairs[first] = probe.products(a, b)
        del a, b
    rows = []
    for key in probe.keys:
        similarity, baseline = pairs["text"][key].cosine, pairs["A"][key].cosine
        conflict = None if similarity is None or baseline is None else -(similarity - baseline)
        rows.append(dict(layer=key[0], group=key[1], similarity=similarity, baseline=baseline, conflict=conflict))
    return rows


def metric_key(key: Key, num_layers: int) -> str:
    """``grad_cos/layer03/q``: the metrics name of a group's cosine (layers zero-padded so they sort)."""
    return f"grad_cos/layer{key[0]:0{max(2, len(str(num_layers - 1)))}d}/{key[1]}"


def group_means(products: dict[Key, Products]) -> dict[str, float]:
    """Per group, the mean cosine over the layers where it is defined (for one log line)."""
    by_group: dict[str, list[float]] = {}
    for (_, group), value in products.items():
        if value.cosine is not None:
            by_group.setdefault(group, []).append(value.cosine)
    return {group: sum(values) / len(values) for group, values in by_group.items()}
