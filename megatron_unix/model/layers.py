"""What a Uni-X layer stack adds to Megatron: a sequence-parallel-aware RMSNorm, the modality
routing of sub-streams, the separated layer (a text TransformerLayer that owns a vision copy), and
the baselines' pieces (spec §9): an MLP and a q/k/v projection that own a vision copy, in a layer
that hands them the micro-batch's routes."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_unix.model.routing import ModalityRoute, Routes, UniXPackedSeqParams

RouteRun = Callable[[torch.Tensor, ModalityRoute], torch.Tensor]
"""Runs one modality's module on its gathered (padded, under SP re-scattered) tokens."""


def routes_of(params: UniXPackedSeqParams | None, what: str) -> Routes:
    if params is None or params.routes is None:
        raise ValueError(f"{what} needs routing: pass packed_seq_params=build_routing(...)")
    return params.routes


def run_on_route(
    run: RouteRun, full: torch.Tensor, route: ModalityRoute, sequence_parallel: bool, sharded_output: bool = True
) -> torch.Tensor:
    """``run`` over the tokens of ``route`` taken from the whole stream ``full``: gathered in order,
    right-padded, scattered for SP; its output is gathered back under SP when ``sharded_output`` (a
    layer or MLP; a column-parallel projection already returns the whole sub-stream), padding dropped."""
    x = full.index_select(0, route.index)
    if route.padded_len > route.length:
        x = torch.cat([x, x.new_zeros(route.padded_len - route.length, *x.shape[1:])])
    if sequence_parallel:
        x = scatter_to_sequence_parallel_region(x)
    y = run(x, route)
    if sequence_parallel and sharded_output:
        y = gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=False)
    return y[: route.length]


def route_modalities(
    hidden_states: torch.Tensor,
    routes: Routes,
    runs: Sequence[RouteRun],
    sequence_parallel: bool,
    sharded_output: bool = True,
) -> torch.Tensor:
    """Every token through the run of its modality (``runs``: text, vision), outputs back in stream order.

    Under SP the stream is gathered first and the result re-scattered (when ``sharded_output``).
    Both runs always execute, an absent modality on padding only, so the weights of both copies get
    (then zero) gradients, as DDP requires."""
    full = (
        gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        if sequence_parallel
        else hidden_states
    )
    output = None
    for run, route in zip(runs, routes):
        y = run_on_route(run, full, route, sequence_parallel, sharded_output)
        if output is None:
            output = y.new_zeros(full.shape[0], *y.shape[1:])
        output = output.index_copy(0, route.index, y)
    return scatter_to_sequence_parallel_region(output) if sequence_parallel and sharded_output else output


def with_vision_stacked(
    state: dict, parts: dict[str, torch.nn.Module], prefix: str, index: int, count: int, metadata: dict | None
) -> dict:
    """A layer's sharded ``state`` with the entries of its vision ``parts`` (name -> module) replaced by
    theirs stacked over the ``count`` layers that have them, this one at ``index``: keys that exist for
    those layers only, so a checkpoint reshards at any TP/PP."""
    kept = {k: v for k, v in state.items() if not any(k.startswith(prefix + name) for name in parts)}
    for name, module in parts.items():
        kept.update(module.sharded_state_dict(prefix + name, ((0, index, count),), metadata))
    return kept


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm with Megatron's constructor; marks its weight for the sequence-parallel
    gradient all-reduce (Megatron's own torch norm refuses sequence parallelism)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **_: Any) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


class SeparatedTransformerLayer(TransformerLayer):
    """A separated layer: this layer *is* the text copy (its weights keep the plain GPT keys);
    ``self.vision`` is a second TransformerLayer of the same spec. Each modality's tokens are
    gathered into their own stream, run through their copy, and scattered back, so every token
    passes through exactly one copy and the modalities never attend to each other here."""

    def __init__(self, config, submodules, layer_number: int = 1, **kwargs: Any) -> None:
        super().__init__(config, submodules, layer_number=layer_number, **kwargs)
        self.vision = build_module(
            ModuleSpec(module=TransformerLayer, submodules=submodules),
            config=config,
            layer_number=layer_number,
            **kwargs,
        )

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        routes = routes_of(kwargs.get("packed_seq_params"), "a separated Uni-X layer")
        if args:
            raise TypeError("SeparatedTransformerLayer takes keyword arguments after hidden_states")
        rotary = kwargs.get("rotary_pos_emb")

        def copy_of(run) -> RouteRun:
            def run_copy(x: torch.Tensor, route: ModalityRoute) -> torch.Tensor:
                copy_kwargs = {**kwargs, "packed_seq_params": route.params, "attention_mask": None}
                if rotary is not None:
                    copy_kwargs["rotary_pos_emb"] = rotary.index_select(0, route.positions)
                return run(x, **copy_kwargs)[0]

            return run_copy

        runs = (copy_of(super().forward), copy_of(self.vision.forward))
        output = route_modalities(hidden_states, routes, runs, self.config.sequence_parallel)
        return output, kwargs.get("context")

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Text weights on the plain GPT keys (stacked over all layers); vision weights stacked
        over the separated layers only, as ``<layers>.vision.*`` with a leading dim of N+M."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        parts = {"vision.": self.vision}
        return with_vision_stacked(
            state,
            parts,
            prefix,
            self.config.vision_copy_index(self.layer_number - 1),
            self.config.num_vision_copy_layers,
            metadata,
        )


class RoutedMLP(MLP):
    """An MLP that is the text MLP (plain GPT keys) and owns ``vision``, an MLP of its own width
    (HardMoE: the text width; MoT: ``ffn_vision_size``). ``routes`` is set by the owning layer for
    each call: Megatron's layer calls its MLP with the hidden states alone."""

    def __init__(
        self, config, submodules: MLPSubmodules, vision_ffn_hidden_size: int, tp_group=None, **kwargs: Any
    ) -> None:
        super().__init__(config, submodules, ffn_hidden_size=config.ffn_hidden_size, tp_group=tp_group, **kwargs)
        # Megatron's MLP sizes linear_fc2's input from config.ffn_hidden_size, whatever width it is given.
        vision_config = copy.copy(config)
        vision_config.ffn_hidden_size = vision_ffn_hidden_size
        self.vision = MLP(
            vision_config, submodules, ffn_hidden_size=vision_ffn_hidden_size, tp_group=tp_group, **kwargs
        )
        self.routes: Routes | None = None

    def forward(self, hidden_states: torch.Tensor, **_: Any) -> tuple[torch.Tensor, None]:
        if self.routes is None:
            raise ValueError("a RoutedMLP runs inside a RoutedTransformerLayer, which hands it the routes")
        runs = (self._run(super().forward), self._run(self.vision.forward))
        return route_modalities(hidden_states, self.routes, runs, self.config.sequence_parallel), None

    @staticmethod
    def _run(mlp: Callable) -> RouteRun:
        """The MLP with its output bias added per token (each copy has its own)."""

        def run(x: torch.Tensor, _: ModalityRoute) -> torch.Tensor:
            out, bias = mlp(x)
            return out if bias is None else out + bias

        return run


class MoTSelfAttention(SelfAttention):
    """MoT's attention: this module's linear_qkv and QK norms serve text tokens, ``vision`` (a
    SelfAttention holding only those three) serves vision tokens; the q/k/v of all tokens are merged
    back into stream order and ONE causal attention runs over the whole stream (within documents),
    then the shared ``linear_proj``."""

    def __init__(self, config, submodules, layer_number: int, **kwargs: Any) -> None:
        super().__init__(config, submodules, layer_number, **kwargs)
        projections_only = dataclasses.replace(submodules, core_attention=IdentityOp, linear_proj=IdentityOp)
        self.vision = SelfAttention(config, projections_only, layer_number, **kwargs)
        self._routes: Routes | None = None

    def forward(self, hidden_states: torch.Tensor, attention_mask, *args: Any, **kwargs: Any):
        # Megatron calls get_query_key_value_tensors with the hidden states alone: keep the routes.
        self._routes = routes_of(kwargs.get("packed_seq_params"), "MoT attention")
        return super().forward(hidden_states, attention_mask, *args, **kwargs)

    def get_query_key_value_tensors(
        self, hidden_states: torch.Tensor, key_value_states=None, output_gate: bool = False, split_qkv: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if output_gate or not split_qkv or key_value_states is not None:
            raise ValueError("MoT attention supports plain self-attention only (no output gate, no fused qkv-rope)")
        widths: list[int] = []
        heads: list[int] = []

        def project(attention: SelfAttention) -> RouteRun:
            def run(x: torch.Tensor, _: ModalityRoute) -> torch.Tensor:
                qkv = SelfAttention.get_query_key_value_tensors(attention, x)
                widths[:] = [t.shape[2] * t.shape[3] for t in qkv]
                heads[:] = [t.shape[2] for t in qkv]
                return torch.cat([t.flatten(2) for t in qkv], dim=-1)

            return run

        merged = route_modalities(
            hidden_states, self._routes, (project(self), project(self.vision)), self.config.sequence_parallel, False
        )
        q, k, v = torch.split(merged, widths, dim=-1)
        return tuple(t.unflatten(2, (n, -1)) for t, n in zip((q, k, v), heads))


class RoutedTransformerLayer(TransformerLayer):
    """A HardMoE or MoT layer: Megatron's layer (shared norms, attention output projection) with a
    :class:`RoutedMLP` and, for MoT, :class:`MoTSelfAttention` from the spec. Its ``sharded_state_dict``
    stacks the vision parts over the layers that have them, as ``<layers>.mlp.vision.*`` and
    ``<layers>.self_attention.vision.*``, so checkpoints reshard across TP/PP."""

    def __init__(self, config, submodules, layer_number: int = 1, *, vision_ffn_hidden_size: int, **kwargs: Any):
        # The routed MLP is built here, not from the spec: Megatron's layer passes its process group
        # only to a plain MLP spec and warns about any other.
        super().__init__(config, dataclasses.replace(submodules, mlp=IdentityOp), layer_number, **kwargs)
        self.mlp = RoutedMLP(config, submodules.mlp.submodules, vision_ffn_hidden_size, tp_group=self.tp_group)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        self.mlp.routes = routes_of(kwargs.get("packed_seq_params"), "a HardMoE/MoT layer")
        return super().forward(hidden_states, *args, **kwargs)

    def _vision_parts(self) -> dict[str, torch.nn.Module]:
        parts = {"mlp.vision.": self.mlp.vision}
        if isinstance(self.self_attention, MoTSelfAttention):
            parts["self_attention.vision."] = self.self_attention.vision
        return parts

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        index = self.config.vision_copy_index(self.layer_number - 1)
        return with_vision_stacked(
            state, self._vision_parts(), prefix, index, self.config.num_vision_copy_layers, metadata
        )
