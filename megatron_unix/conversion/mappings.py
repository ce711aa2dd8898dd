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
        return merge_qkv(*tensors, config=config)

    def to_hf(self, tensor: torch.Tensor, config: UniXConfig) -> list[torch.Tensor]:
        if self.kind == "direct":
            return [tensor]
        if self.kind == "gate_up":
            return list(torch.chunk(tensor, 2, dim=0))
        return list(split_qkv(tensor, config))


def _qkv_shape(config: UniXConfig) -> tuple[int, int, int]:
    groups = config.num_query_groups or config.num_attention_heads
    return groups, config.num_attention_heads // groups, config.kv_channels


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: UniXConfig) -> torch.Tensor:
    """Megatron stores q/k/v interleaved per query group: [q heads of group g, k_g, v_g] for each g."""
    groups, per_group, dim = _qkv_shape(config)
    tail = q.shape[1:]
    q = q.reshape(groups, per_group * dim, *tail)
    k = k.reshape(groups, dim, *tail)
    v = v.reshape(groups, dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, config: UniXConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, per_group, dim = _qkv_shape(config)
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * dim, *tail)
    q, k, v = torch.split(grouped, [per_group * dim, dim, dim], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


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


def all_mappings(config: UniXConfig) -> list[Mapping]:
    """The full table for a model of this config, with prefixes applied."""
    table = list(GLOBAL_MAPPINGS)
    for meg_prefix, hf_prefix in layer_prefixes(config):
        table += [Mapping(meg_prefix + m.megatron, tuple(hf_prefix + h for h in m.hf), m.kind) for m in LAYER_MAPPINGS]
    return table


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
