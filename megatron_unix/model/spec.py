"""Layer specs: one ModuleSpec per layer, declared from one base spec.

The base spec is Megatron's GPT layer spec for ``config.transformer_impl`` (Transformer Engine or
local modules) with Uni-X's core attention; a separated layer is the same spec under
:class:`SeparatedTransformerLayer`, which builds the vision copy from it. Either way the sharded
checkpoint keys are TE's (the local spec maps its norms onto TE's fused names), so a checkpoint
written under one implementation loads under the other.
"""

from __future__ import annotations

import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_unix.model.attention import UniXCoreAttention
from megatron_unix.model.config import UniXConfig
from megatron_unix.model.layers import MoTSelfAttention, RMSNorm, RoutedTransformerLayer, SeparatedTransformerLayer


def _with_submodules(spec: ModuleSpec, **changes) -> ModuleSpec:
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **changes))


def base_layer_spec(config: UniXConfig) -> ModuleSpec:
    """Megatron's GPT layer with Uni-X core attention (and our SP-aware RMSNorm on the local path)."""
    if config.transformer_impl == "transformer_engine":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
        spec = _with_submodules(spec, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm)
        if config.qk_layernorm:
            attn = spec.submodules.self_attention
            spec = _with_submodules(
                spec, self_attention=_with_submodules(attn, q_layernorm=RMSNorm, k_layernorm=RMSNorm)
            )
    attn = spec.submodules.self_attention
    return _with_submodules(spec, self_attention=_with_submodules(attn, core_attention=UniXCoreAttention))


def final_norm(config: UniXConfig) -> type:
    """The norm after the last layer, chosen as Megatron does: TE's under TE, RMSNorm otherwise. (It
    cannot be read off the layer spec: under TE the layer's input norm is fused into linear_qkv and
    its ``input_layernorm`` slot is an IdentityOp.)"""
    if config.transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    return RMSNorm


def vision_layer_spec(config: UniXConfig, base: ModuleSpec) -> ModuleSpec:
    """The spec of a layer with vision weights: Uni-X's separated layer, a HardMoE layer (routed MLP)
    or a MoT layer (routed MLP, routed q/k/v projections and QK norms)."""
    if config.layer_variant == "unix":
        return dataclasses.replace(base, module=SeparatedTransformerLayer)
    submodules = base.submodules
    if config.layer_variant == "mot":
        submodules = dataclasses.replace(
            submodules, self_attention=dataclasses.replace(submodules.self_attention, module=MoTSelfAttention)
        )
    return ModuleSpec(
        module=RoutedTransformerLayer,
        params={"vision_ffn_hidden_size": config.ffn_vision_size},
        submodules=submodules,
    )


def layer_specs(config: UniXConfig) -> list[ModuleSpec]:
    """All L layer specs: the layers with vision weights (Uni-X: 0..N-1 and L-M..L-1; HardMoE: every
    ``decoder_sparse_step``-th; MoT: all) and plain shared layers."""
    base = base_layer_spec(config)
    vision = vision_layer_spec(config, base)
    return [vision if config.has_vision_copy(i) else base for i in range(config.num_layers)]


def block_spec(
    config: UniXConfig, vp_stage: int | None = None, pp_rank: int | None = None
) -> TransformerBlockSubmodules:
    """The specs of the layers this pipeline stage builds, for ``TransformerBlock``."""
    specs = layer_specs(config)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=specs[offset : offset + count], layer_norm=final_norm(config))
