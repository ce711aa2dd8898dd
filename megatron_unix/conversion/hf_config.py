"""UniXConfig fields <-> Hugging Face config.json (spec §5).

Reading refuses, by field name, whatever the Megatron model cannot compute exactly (another
activation, RoPE scaling, sliding windows, an o_proj bias, the reference's optional variants), so a
conversion never silently changes the function. Writing produces the reference's config.json plus
``auto_map`` for trust_remote_code; ``model_type`` stays the base model's, so transformers' own
Qwen3ForCausalLM / Qwen2ForCausalLM still load the directory as a text LM.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig

from megatron_unix.conversion.hf_io import CLASSES, ConversionError
from megatron_unix.conversion.hf_remote import auto_map
from megatron_unix.model.config import UniXConfig


def layer_style(config: UniXConfig) -> str:
    """``"qwen3"`` (QK norm, no q/k/v bias) or ``"qwen2"`` (q/k/v bias, no QK norm): the HF layer
    classes that exist; the other two combinations have none and are refused."""
    if config.qk_layernorm and not config.add_qkv_bias:
        return "qwen3"
    if config.add_qkv_bias and not config.qk_layernorm:
        return "qwen2"
    raise ConversionError(f"qk_layernorm={config.qk_layernorm} with add_qkv_bias={config.add_qkv_bias} has no "
                          "Hugging Face layer class (Qwen3: QK norm without q/k/v bias; Qwen2: q/k/v bias without "
                          "QK norm)")


def _refuse(hf: PretrainedConfig, field: str, bad: bool, why: str) -> None:
    if bad:
        raise ConversionError(f"config.json {field}={getattr(hf, field, None)!r} is not supported: {why}")


def text_fields(hf: PretrainedConfig) -> dict[str, Any]:
    """The UniXConfig architecture fields of a Qwen2/Qwen3 config.json (layer style included)."""
    rope = hf.rope_parameters or {}
    _refuse(hf, "hidden_act", hf.hidden_act != "silu", "the Megatron model uses SwiGLU (silu)")
    _refuse(hf, "rope_parameters", rope.get("rope_type", "default") != "default",
            "only plain rotary embeddings (rope_type 'default') are implemented")
    _refuse(hf, "use_sliding_window", bool(getattr(hf, "use_sliding_window", False)),
            "Uni-X attends over the whole sequence")
    _refuse(hf, "attention_bias", bool(getattr(hf, "attention_bias", False)),
            "a Qwen3 attention bias includes o_proj.bias, which the Megatron layers do not have")
    return dict(
        num_layers=hf.num_hidden_layers, hidden_size=hf.hidden_size, ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads, num_query_groups=hf.num_key_value_heads,
        kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        qk_layernorm=hf.model_type == "qwen3", add_qkv_bias=hf.model_type == "qwen2",
        tie_word_embeddings=hf.tie_word_embeddings, rotary_base=float(rope.get("rope_theta", 1e6)),
        layernorm_epsilon=hf.rms_norm_eps,
    )


def unix_fields(hf: PretrainedConfig) -> dict[str, Any]:
    """Architecture and vocabulary layout of a reference-format Uni-X config.json: all from the file."""
    try:
        hf.check_supported()
    except ValueError as error:
        raise ConversionError(f"config.json: {error}") from None
    fields = text_fields(hf)
    codes_end = hf.real_text_vocab_size + hf.vision_vocab_size
    _refuse(hf, "vocab_size", hf.vocab_size < codes_end,
            f"real_text_vocab_size + vision_vocab_size = {codes_end} ids do not fit")
    _refuse(hf, "vision_start_id", not 0 <= hf.vision_start_id < hf.real_text_vocab_size,
            f"BOI must be a text id below real_text_vocab_size={hf.real_text_vocab_size}")
    fields.update(vision_encode_layers=hf.num_vision_encode_layers, vision_decode_layers=hf.num_vision_decode_layers,
                  vq_offset=hf.real_text_vocab_size, vq_codebook_size=hf.vision_vocab_size,
                  boi_id=hf.vision_start_id, separator_ids=hf.separator_ids())
    return fields


def unix_hf_config(config: UniXConfig, vocab_size: int) -> PretrainedConfig:
    """The spec §5 config of a Uni-X model with ``vocab_size`` rows (TP padding excluded), bf16."""
    style = layer_style(config)
    _, _, config_cls, model_cls = CLASSES[style]
    separators = list(config.separator_ids)
    hf = config_cls(
        vocab_size=vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_query_groups or config.num_attention_heads, head_dim=config.kv_channels,
        hidden_act="silu", rms_norm_eps=config.layernorm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": config.rotary_base},
        tie_word_embeddings=config.tie_word_embeddings, eos_token_id=config.eos_id,
        num_vision_encode_layers=config.vision_encode_layers, num_vision_decode_layers=config.vision_decode_layers,
        vision_vocab_size=config.vq_codebook_size, real_text_vocab_size=config.vq_offset,
        vision_start_id=config.boi_id, all_modal_visible=0, add_sep_for_vis=int(bool(separators)),
        vis_sep_tokens=",".join(map(str, separators)) or None, vis_sep_lens=None, skip_connection_loc=-1,
        add_share_ffn=0, ffn_share_size=None, ffn_vision_size=None,
    )
    hf.architectures = [model_cls.__name__]
    hf.auto_map = auto_map(style)
    hf.dtype = torch.bfloat16
    return hf
