"""The two pieces a Uni-X layer stack adds to Megatron: a sequence-parallel-aware RMSNorm and
the separated layer (a text TransformerLayer that owns a vision copy and routes tokens)."""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_unix.model.routing import ModalityRoute, UniXPackedSeqParams


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
        self.separated_index = config.separated_index(self.layer_number - 1)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        params: UniXPackedSeqParams | None = kwargs.get("packed_seq_params")
        if params is None or params.routes is None:
            raise ValueError("a separated Uni-X layer needs routing: pass packed_seq_params=build_routing(...)")
        if args:
            raise TypeError("SeparatedTransformerLayer takes keyword arguments after hidden_states")
        sp = self.config.sequence_parallel
        full = (
            gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
            if sp
            else hidden_states
        )
        output = torch.zeros_like(full)
        rotary = kwargs.get("rotary_pos_emb")
        for run, route in ((super().forward, params.routes.text), (self.vision.forward, params.routes.vision)):
            output = output.index_copy(0, route.index, self._run_copy(run, full, route, rotary, kwargs))
        return (scatter_to_sequence_parallel_region(output) if sp else output), kwargs.get("context")

    def _run_copy(self, run, full: torch.Tensor, route: ModalityRoute, rotary, kwargs: dict) -> torch.Tensor:
        sp = self.config.sequence_parallel
        x = full.index_select(0, route.index)
        if route.padded_len > route.length:
            x = torch.cat([x, x.new_zeros(route.padded_len - route.length, *x.shape[1:])])
        if sp:
            x = scatter_to_sequence_parallel_region(x)
        copy_kwargs = {**kwargs, "packed_seq_params": route.params, "attention_mask": None}
        if rotary is not None:
            copy_kwargs["rotary_pos_emb"] = rotary.index_select(0, route.positions)
        y, _ = run(x, **copy_kwargs)
        if sp:
            y = gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=False)
        return y[: route.length]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """Text weights on the plain GPT keys (stacked over all layers); vision weights stacked
        over the separated layers only, as ``<layers>.vision.*`` with a leading dim of N+M."""
        vision_prefix = f"{prefix}vision."
        text = {
            k: v
            for k, v in super().sharded_state_dict(prefix, sharded_offsets, metadata).items()
            if not k.startswith(vision_prefix)
        }
        vision_offsets = ((0, self.separated_index, self.config.num_separated_layers),)
        vision = self.vision.sharded_state_dict(vision_prefix, vision_offsets, metadata)
        return {**text, **vision}
