"""Layer specs: one ModuleSpec per layer, declared from one base spec.

The base spec is Megatron's GPT layer spec (Transformer Engine modules when TE is installed, local
modules otherwise) with Uni-X's core attention; a separated layer is the same spec under
:class:`SeparatedTransformerLayer`, which builds the vision copy from it.
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

from megatron_unix import platform
from megatron_unix.model.attention import UniXCoreAttention
from megatron_unix.model.config import UniXConfig
from megatron_unix.model.layers import RMSNorm, SeparatedTransformerLayer


def _with_submodules(spec: ModuleSpec, **changes) -> ModuleSpec:
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, **changes))


def base_layer_spec(config: UniXConfig, use_transformer_engine: bool | None = None) -> ModuleSpec:
    """Megatron's GPT layer with Uni-X core attention (and our SP-aware RMSNorm on the local path)."""
    if use_transformer_engine is None:
        use_transformer_engine = platform.detect_accelerators().transformer_engine
    if use_transformer_engine:
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
        spec = _with_submodules(spec, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm)
        if config.qk_layernorm:
            attn = spec.submodules.self_attention
            spec = _with_submodules(spec, self_attention=_with_submodules(attn, q_layernorm=RMSNorm, k_layernorm=RMSNorm))
    attn = spec.submodules.self_attention
    return _with_submodules(spec, self_attention=_with_submodules(attn, core_attention=UniXCoreAttention))


def layer_specs(config: UniXConfig, use_transformer_engine: bool | None = None) -> list[ModuleSpec]:
    """All L layer specs: separated layers at 0..N-1 and L-M..L-1, shared in between."""
    base = base_layer_spec(config, use_transformer_engine)
    separated = dataclasses.replace(base, module=SeparatedTransformerLayer)
    return [separated if config.is_separated(i) else base for i in range(config.num_layers)]


def block_spec(config: UniXConfig, use_transformer_engine: bool | None = None,
               vp_stage: int | None = None, pp_rank: int | None = None) -> TransformerBlockSubmodules:
    """The specs of the layers this pipeline stage builds, for ``TransformerBlock``."""
    specs = layer_specs(config, use_transformer_engine)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    norm = base_layer_spec(config, use_transformer_engine).submodules.input_layernorm
    if not isinstance(norm, type):
        norm = RMSNorm
    return TransformerBlockSubmodules(layer_specs=specs[offset: offset + count], layer_norm=norm)
