"""HF <-> Megatron parameter names as a table of named mappings (Megatron-Bridge style).

Every mapping relates one Megatron tensor to one or more HF tensors and knows how to merge the HF
side into the Megatron layout and split it back. Layer mappings are relative to a layer prefix;
:func:`layer_prefixes` pairs Megatron layer prefixes (text copy and vision copy) with HF ones.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_unix.model.config import UniXConfig
from megatron_unix.model.fused import merge_qkv, split_gate_up, split_qkv


@dataclass(frozen=True)
class Mapping:
    megatron: str
    hf: tuple[str, ...]
    kind: str = "direct"  # "direct" | "qkv" | "gate_up"
    vocab: bool = False
    """Rows are vocabulary entries: padded for TP in Megatron, stripped on export, extended on import."""

    def to_megatron(self, tensors: list[torch.Tensor], config: UniXConfig) -> torch.Tensor:
        if self.kind == "direct":
            return tensors[0]
        if self.kind == "gate_up":
            return torch.cat(tensors, dim=0)
        return merge_qkv(*tensors, *_qkv_shape(config))

    def to_hf(self, tensor: torch.Tensor, config: UniXConfig) -> list[torch.Tensor]:
        if self.kind == "direct":
            return [tensor]
        if self.kind == "gate_up":
            return list(split_gate_up(tensor))
        return list(split_qkv(tensor, *_qkv_shape(config)))


def _qkv_shape(config: UniXConfig) -> tuple[int, int, int]:
    groups = config.num_query_groups or config.num_attention_heads
    return groups, config.num_attention_heads // groups, config.kv_channels


LAYER_MAPPINGS: tuple[Mapping, ...] = (
    Mapping("input_layernorm.weight", ("input_layernorm.weight",)),
    Mapping("self_attention.linear_qkv.weight", tuple(f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"),
    Mapping("self_attention.linear_qkv.bias", tuple(f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv"),
    Mapping("self_attention.q_layernorm.weight", ("self_attn.q_norm.weight",)),
    Mapping("self_attention.k_layernorm.weight", ("self_attn.k_norm.weight",)),
    Mapping("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",)),
    Mapping("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
    Mapping("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    Mapping("mlp.linear_fc2.weight", ("mlp.down_proj.weight",)),
)

HARDMOE_VISION_MAPPINGS: tuple[Mapping, ...] = (
    Mapping("mlp.vision.linear_fc1.weight", ("mlp.vis_gate_proj.weight", "mlp.vis_up_proj.weight"), "gate_up"),
    Mapping("mlp.vision.linear_fc2.weight", ("mlp.vis_down_proj.weight",)),
)
"""The vision MLP of a HardMoE layer, as the reference's ``HardMoeLayer`` names it (spec §9)."""

MOT_VISION_MAPPINGS: tuple[Mapping, ...] = (
    Mapping("self_attention.vision.linear_qkv.weight", tuple(f"self_attn.vis_{p}_proj.weight" for p in "qkv"), "qkv"),
    Mapping("self_attention.vision.linear_qkv.bias", tuple(f"self_attn.vis_{p}_proj.bias" for p in "qkv"), "qkv"),
    Mapping("self_attention.vision.q_layernorm.weight", ("self_attn.vis_q_norm.weight",)),
    Mapping("self_attention.vision.k_layernorm.weight", ("self_attn.vis_k_norm.weight",)),
    Mapping("mlp.vision.linear_fc1.weight", ("mlp.vision_gate_proj.weight", "mlp.vision_up_proj.weight"), "gate_up"),
    Mapping("mlp.vision.linear_fc2.weight", ("mlp.vision_down_proj.weight",)),
)
"""The vision q/k/v projections, QK norms and MLP of a MoT layer, as the reference's ``MoTQwen3Attention``
and ``MoTQwen3MLP`` name them (spec §9)."""

VARIANT_VISION_MAPPINGS: dict[str, tuple[Mapping, ...]] = {
    "hardmoe": HARDMOE_VISION_MAPPINGS,
    "mot": MOT_VISION_MAPPINGS,
}
"""Per baseline, the vision parts inside a layer (Uni-X's vision copies are whole layers: :func:`layer_prefixes`)."""

DROPPED_ON_IMPORT: dict[str, tuple[str, ...]] = {"mot": ("self_attn.vis_o_proj.weight", "self_attn.vis_o_proj.bias")}
"""Reference tensors that take no part in the model's function: MoT's ``vis_o_proj`` is created but
never used (the shared ``o_proj`` serves both modalities); import accepts and drops it, export omits it."""

GLOBAL_MAPPINGS: tuple[Mapping, ...] = (
    Mapping("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), vocab=True),
    Mapping("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Mapping("output_layer.weight", ("lm_head.weight",), vocab=True),
)

HF_VOCAB_TENSORS = tuple(name for m in GLOBAL_MAPPINGS if m.vocab for name in m.hf)


def layer_prefixes(config: UniXConfig) -> list[tuple[str, str]]:
    """(Megatron prefix, HF prefix) for every text layer and every vision copy."""
    pairs = []
    first_decode = config.num_layers - config.vision_decode_layers
    for i in range(config.num_layers):
        pairs.append((f"decoder.layers.{i}.", f"model.layers.{i}."))
        if i < config.vision_encode_layers:
            pairs.append((f"decoder.layers.{i}.vision.", f"model.vision_encode_layers.{i}."))
        elif i >= first_decode:
            pairs.append((f"decoder.layers.{i}.vision.", f"model.vision_decode_layers.{i - first_decode}."))
    return pairs


def _prefixed(mappings: tuple[Mapping, ...], meg_prefix: str, hf_prefix: str) -> list[Mapping]:
    return [Mapping(meg_prefix + m.megatron, tuple(hf_prefix + h for h in m.hf), m.kind) for m in mappings]


def all_mappings(config: UniXConfig) -> list[Mapping]:
    """The full table for a model of this config, with prefixes applied."""
    table = list(GLOBAL_MAPPINGS)
    for meg_prefix, hf_prefix in layer_prefixes(config):
        table += _prefixed(LAYER_MAPPINGS, meg_prefix, hf_prefix)
    vision_parts = VARIANT_VISION_MAPPINGS.get(config.layer_variant, ())
    for i in range(config.num_layers):
        if vision_parts and config.has_vision_copy(i):
            table += _prefixed(vision_parts, f"decoder.layers.{i}.", f"model.layers.{i}.")
    return table


def vision_twins(config: UniXConfig) -> list[tuple[str, str]]:
    """(HF name of a baseline's vision tensor, HF name of its text twin) for every layer with vision parts:
    the twin is the text mapping of the same Megatron tensor without ``vision.`` (what a vision part is
    initialised from when a baseline starts from a text model)."""
    text = {m.megatron: m for m in LAYER_MAPPINGS}
    pairs = []
    for i in range(config.num_layers):
        if not config.has_vision_copy(i):
            continue
        for m in VARIANT_VISION_MAPPINGS.get(config.layer_variant, ()):
            twin = text[m.megatron.replace("vision.", "")]
            pairs += [(f"model.layers.{i}.{v}", f"model.layers.{i}.{t}") for v, t in zip(m.hf, twin.hf)]
    return pairs


def dropped_on_import(config: UniXConfig) -> list[str]:
    """The HF names of :data:`DROPPED_ON_IMPORT` for every layer of this config."""
    return [
        f"model.layers.{i}.{name}"
        for i in range(config.num_layers)
        for name in DROPPED_ON_IMPORT.get(config.layer_variant, ())
    ]


VISION_LAYER_PREFIXES = ("model.vision_encode_layers.", "model.vision_decode_layers.")
"""HF prefixes of Uni-X's vision copies of the separated layers (:func:`layer_prefixes`)."""
VISION_PART_NAMES = frozenset(
    {name for table in VARIANT_VISION_MAPPINGS.values() for m in table for name in m.hf}
    | {name for names in DROPPED_ON_IMPORT.values() for name in names}
)
"""The baselines' vision tensors inside ``model.layers.N.`` (the reference's names, unused ones included)."""


def is_vision_tensor(name: str) -> bool:
    """An HF tensor only vision tokens use (a Uni-X vision copy's, a baseline's vision part): what a plain
    Qwen text LM loading the directory leaves unused."""
    parts = name.split(".", 3)
    in_layer = len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
    return name.startswith(VISION_LAYER_PREFIXES) or (in_layer and parts[3] in VISION_PART_NAMES)


def megatron_to_hf(state_dict: dict[str, torch.Tensor], config: UniXConfig, vocab_size: int) -> dict[str, torch.Tensor]:
    """Unsharded Megatron weights -> HF names; vocabulary padding stripped to ``vocab_size`` rows."""
    out: dict[str, torch.Tensor] = {}
    for mapping in all_mappings(config):
        tensor = state_dict.get(mapping.megatron)
        if tensor is None:
            continue
        if mapping.vocab:
            tensor = tensor[:vocab_size]
        out.update(zip(mapping.hf, mapping.to_hf(tensor, config)))
    return out


def iter_hf_to_megatron(
    hf: collections.abc.Mapping[str, torch.Tensor], config: UniXConfig, padded_vocab: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """HF names -> (Megatron name, tensor), one mapping at a time, so that a converter reading a lazy
    ``hf`` (tensors loaded on access) holds one tensor besides the model; vocabulary rows are
    zero-padded to ``padded_vocab``."""
    for mapping in all_mappings(config):
        present = [name in hf for name in mapping.hf]
        if not any(present):
            continue
        if not all(present):
            missing = [n for n, p in zip(mapping.hf, present) if not p]
            raise KeyError(f"{mapping.megatron} needs {list(mapping.hf)} but {missing} are missing")
        tensor = mapping.to_megatron([hf[name] for name in mapping.hf], config)
        if mapping.vocab and tensor.shape[0] < padded_vocab:
            tensor = torch.cat([tensor, tensor.new_zeros(padded_vocab - tensor.shape[0], *tensor.shape[1:])])
        yield mapping.megatron, tensor
