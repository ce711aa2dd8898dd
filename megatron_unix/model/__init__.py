"""Uni-X as a Megatron-Core GPTModel: config, routing, attention, layers, spec, builder."""

from megatron_unix.model.builder import build_model, padded_vocab_size
from megatron_unix.model.config import UniXConfig, make_config
from megatron_unix.model.routing import UniXPackedSeqParams, build_routing

__all__ = ["UniXConfig", "make_config", "build_model", "padded_vocab_size", "build_routing", "UniXPackedSeqParams"]
