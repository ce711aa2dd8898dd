"""Uni-X and baseline configs for Hugging Face remote code (copied verbatim into exported checkpoints).

Plain subclasses of transformers' Qwen3Config / Qwen2Config, like the reference's: the Uni-X fields
(spec §5) are ordinary config.json keys, which every transformers version keeps as attributes, so
the same file works from transformers 4.53 (the reference's pin) to 5.x. ``model_type`` stays the
base model's, so transformers' own Qwen3ForCausalLM / Qwen2ForCausalLM load the directory as a text LM.
Each model class has a config class of its own (the reference's share one, ``UniQwen3Config``): an
``auto_map`` registers its config class with AutoModelForCausalLM, which maps one config class to one
model class.
"""

from transformers import Qwen2Config, Qwen3Config

UNIX_DEFAULTS = {
    "num_vision_encode_layers": 0,
    "num_vision_decode_layers": 0,
    "vision_vocab_size": 8192,
    "real_text_vocab_size": 151665,
    "vision_start_id": 151652,
    "all_modal_visible": 0,
    "add_sep_for_vis": 0,
    "vis_sep_tokens": "<|vision_pad|>",
    "vis_sep_lens": "8",
    "skip_connection_loc": -1,
    "add_share_ffn": 0,
    "ffn_share_size": 2048,
    "ffn_vision_size": 2048,
    "use_share_attn": 1,
    "use_share_ffn": 1,
    "attn_v_q_heads": 4,
    "decoder_sparse_step": 2,
}
"""The reference's config fields and its defaults (used where a config.json lacks a key)."""

VIS_SEP_TOKEN_IDS = "vis_sep_token_ids"
"""Our addition: the separator ids that ``vis_sep_tokens`` (token texts) name, resolved at export."""


def unix_field(config, name: str):
    """A Uni-X field of ``config``, or the reference's default when config.json has no such key."""
    return getattr(config, name, UNIX_DEFAULTS[name])


def rope_theta(config) -> float:
    """The rotary base as either generation of transformers reads it: ``rope_parameters`` (5.x) or
    top-level ``rope_theta`` (4.x, the reference); 10000 is transformers' default for neither."""
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))


def head_dim(config) -> int:
    """``head_dim``, which Qwen2 configs may leave out (then hidden size / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class UniQwen3Config(Qwen3Config):
    """Uni-X with Qwen3-style layers (QK norm, no q/k/v bias): the reference checkpoints."""


class UniQwen2Config(Qwen2Config):
    """Uni-X with Qwen2-style layers (q/k/v bias, no QK norm): a Qwen2.5 import kept as is."""


class HardMoeQwen3Config(Qwen3Config):
    """HardMoE (spec §9) with Qwen3-style layers: the reference's ``modeling/moe_qwen.py``."""


class HardMoeQwen2Config(Qwen2Config):
    """HardMoE with Qwen2-style layers."""


class MoTQwen3Config(Qwen3Config):
    """MoT (spec §9) with Qwen3-style layers: the reference's ``modeling/mot_qwen.py``."""


class MoTQwen2Config(Qwen2Config):
    """MoT with Qwen2-style layers."""
