"""UniXConfig fields <-> Hugging Face config.json (spec §5).

Reading refuses, by field name, whatever the Megatron model cannot compute exactly (another
activation, RoPE scaling, sliding windows, an o_proj bias, the reference's optional variants), so a
conversion never silently changes the function.

Writing does not go through the installed transformers' ``save_pretrained``, whose output differs
between versions: config.json is built here, key by key, as the reference's transformers 4.53.3
writes it (``rope_theta``, ``torch_dtype``, separators as token text, every reference field), plus
the keys newer transformers read (``rope_parameters``, ``dtype``) and ``auto_map``, so that every
version reads the same model. Keys of the imported source's config.json travel through the
Megatron checkpoint (:data:`INTERCHANGE`) and are written back unchanged unless the model changed them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from megatron_unix.conversion.hf_io import ConversionError, HFCheckpoint, model_class, read_json
from megatron_unix.conversion.hf_remote import auto_map, variant_of
from megatron_unix.conversion.hf_remote.configuration_unix import (
    UNIX_DEFAULTS,
    VIS_SEP_TOKEN_IDS,
    head_dim,
    rope_theta,
    unix_field,
)
from megatron_unix.conversion.hf_remote.modeling_unix import check_supported
from megatron_unix.data.tokenizer import TextTokenizer
from megatron_unix.model.config import UniXConfig

INTERCHANGE = "hf_interchange"
"""``model_args`` key holding the source's ``config.json`` and ``generation_config.json`` (dicts)."""
FORMAT_VERSION = "4.53.3"
"""The transformers release whose config.json layout is written (the reference's pin)."""
BASE_DEFAULTS: dict[str, Any] = {"attention_dropout": 0.0, "max_position_embeddings": 32768, "use_cache": True}
"""Qwen config keys the Megatron model does not determine: Qwen3Config's defaults unless carried."""
NOT_CARRIED = (
    "auto_map",
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "rope_scaling",
    VIS_SEP_TOKEN_IDS,
)
"""Source keys always recomputed on export."""


def layer_style(config: UniXConfig) -> str:
    """``"qwen3"`` (QK norm, no q/k/v bias) or ``"qwen2"`` (q/k/v bias, no QK norm): the HF layer
    classes that exist; the other two combinations have none and are refused."""
    if config.qk_layernorm and not config.add_qkv_bias:
        return "qwen3"
    if config.add_qkv_bias and not config.qk_layernorm:
        return "qwen2"
    raise ConversionError(
        f"qk_layernorm={config.qk_layernorm} with add_qkv_bias={config.add_qkv_bias} has no "
        "Hugging Face layer class (Qwen3: QK norm without q/k/v bias; Qwen2: q/k/v bias without "
        "QK norm)"
    )


def _refuse(hf: PretrainedConfig, field: str, bad: bool, why: str) -> None:
    if bad:
        raise ConversionError(f"config.json {field}={getattr(hf, field, None)!r} is not supported: {why}")


def text_fields(hf: PretrainedConfig) -> dict[str, Any]:
    """The UniXConfig architecture fields of a Qwen2/Qwen3 config.json (layer style included), after the
    remote code's refusals of what neither model computes."""
    try:
        check_supported(hf)
    except ValueError as error:
        raise ConversionError(f"config.json {error}") from None
    return dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        ffn_hidden_size=hf.intermediate_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        kv_channels=head_dim(hf),
        qk_layernorm=hf.model_type == "qwen3",
        add_qkv_bias=hf.model_type == "qwen2",
        tie_word_embeddings=hf.tie_word_embeddings,
        rotary_base=rope_theta(hf),
        layernorm_epsilon=hf.rms_norm_eps,
    )


def resolve_separators(hf: PretrainedConfig, tokenizer: TextTokenizer | None, where: Path) -> tuple[int, ...]:
    """The separator ids of a Uni-X config.json, recorded on ``hf`` as ``vis_sep_token_ids``.

    As in the reference, separators exist only with ``add_sep_for_vis`` and ``vis_sep_tokens`` names
    them by token text (comma-separated), resolved through the directory's tokenizer; each must be
    one token. An export of this stack also carries the ids; they must agree with the tokenizer.
    """
    if not int(getattr(hf, "add_sep_for_vis", 0) or 0):
        return ()
    texts = [t.strip() for t in str(getattr(hf, "vis_sep_tokens", UNIX_DEFAULTS["vis_sep_tokens"])).split(",")]
    recorded = getattr(hf, VIS_SEP_TOKEN_IDS, None)
    if tokenizer is None:
        if recorded is None:
            raise ConversionError(
                f"{where}/config.json: add_sep_for_vis=1 names vis_sep_tokens={texts} by text, "
                f"and {where} has no tokenizer to resolve them"
            )
        ids = tuple(int(i) for i in recorded)
    else:
        ids = tuple(_token_id(tokenizer, text, where) for text in texts)
        if recorded is not None and tuple(int(i) for i in recorded) != ids:
            raise ConversionError(
                f"{where}/config.json: {VIS_SEP_TOKEN_IDS}={recorded} but the tokenizer gives "
                f"vis_sep_tokens={texts} the ids {list(ids)}"
            )
    setattr(hf, VIS_SEP_TOKEN_IDS, list(ids))
    return ids


def _token_id(tokenizer: TextTokenizer, text: str, where: Path) -> int:
    index = tokenizer.token_id(text)
    if index is None:
        raise ConversionError(
            f"{where}/config.json: vis_sep_tokens item {text!r} is not a token of the tokenizer in {where}"
        )
    return index


def variant_fields(hf: PretrainedConfig) -> dict[str, Any]:
    """The layer variant and its fields; the baselines' reference classes ignore the Uni-X split fields."""
    variant = variant_of(hf)
    if variant == "unix":
        return {"layer_variant": variant}
    fields: dict[str, Any] = {"layer_variant": variant, "vision_encode_layers": 0, "vision_decode_layers": 0}
    if variant == "hardmoe":
        fields["decoder_sparse_step"] = int(unix_field(hf, "decoder_sparse_step"))
    else:
        fields["ffn_vision_size"] = int(unix_field(hf, "ffn_vision_size"))
    return fields


def unix_fields(hf: PretrainedConfig, tokenizer: TextTokenizer | None, where: Path) -> dict[str, Any]:
    """Architecture and vocabulary layout of a reference-format Uni-X (or baseline) config.json: all
    from the file."""
    fields = text_fields(hf)
    codes_end = hf.real_text_vocab_size + hf.vision_vocab_size
    _refuse(
        hf,
        "vocab_size",
        hf.vocab_size < codes_end,
        f"real_text_vocab_size + vision_vocab_size = {codes_end} ids do not fit",
    )
    _refuse(
        hf,
        "vision_start_id",
        not 0 <= hf.vision_start_id < hf.real_text_vocab_size,
        f"BOI must be a text id below real_text_vocab_size={hf.real_text_vocab_size}",
    )
    fields.update(
        vision_encode_layers=hf.num_vision_encode_layers,
        vision_decode_layers=hf.num_vision_decode_layers,
        vq_offset=hf.real_text_vocab_size,
        vq_codebook_size=hf.vision_vocab_size,
        boi_id=hf.vision_start_id,
        separator_ids=resolve_separators(hf, tokenizer, where),
    )
    fields.update(variant_fields(hf))
    return fields


def read_interchange(source: HFCheckpoint) -> dict[str, Any]:
    """The source's config.json and generation_config.json, as dicts, to carry through the checkpoint."""
    generation = source.path / "generation_config.json"
    return {"config": source.raw, "generation_config": read_json(generation) if generation.is_file() else None}


def unix_config_json(
    config: UniXConfig, vocab_size: int, separator_texts: list[str], interchange: dict[str, Any] | None = None
) -> dict[str, Any]:
    """config.json of a Uni-X model with ``vocab_size`` rows (TP padding excluded), bf16 weights.

    Three layers, later ones winning: defaults (Qwen's and the reference's), the carried source keys,
    and what this model's architecture fixes.
    """
    style = layer_style(config)
    carried = {k: v for k, v in ((interchange or {}).get("config") or {}).items() if k not in NOT_CARRIED}
    separators = list(config.separator_ids)
    defaults = {
        **BASE_DEFAULTS,
        **UNIX_DEFAULTS,
        "initializer_range": config.init_method_std,
        "eos_token_id": config.eos_id,
        "layer_types": ["full_attention"] * config.num_layers,
    }
    fixed: dict[str, Any] = {
        "architectures": [model_class(style, config.layer_variant).__name__],
        "model_type": style,
        "auto_map": auto_map(style, config.layer_variant),
        "vocab_size": vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups or config.num_attention_heads,
        "head_dim": config.kv_channels,
        "hidden_act": "silu",
        "rms_norm_eps": config.layernorm_epsilon,
        "tie_word_embeddings": config.tie_word_embeddings,
        "rope_theta": config.rotary_base,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base},
        "use_sliding_window": False,
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
        "transformers_version": FORMAT_VERSION,
        "num_vision_encode_layers": config.vision_encode_layers,
        "num_vision_decode_layers": config.vision_decode_layers,
        "vision_vocab_size": config.vq_codebook_size,
        "real_text_vocab_size": config.vq_offset,
        "vision_start_id": config.boi_id,
        "add_sep_for_vis": int(bool(separators)),
    }
    if style == "qwen3":
        fixed["attention_bias"] = False
    if config.layer_variant != "unix":
        fixed = _variant_fixed(fixed, config)
    if carried.get("num_hidden_layers", config.num_layers) != config.num_layers:
        carried.pop("layer_types", None)
    if separators:
        fixed.update(vis_sep_tokens=",".join(separator_texts), **{VIS_SEP_TOKEN_IDS: separators})
    return dict(sorted({**defaults, **carried, **fixed}.items()))


def _variant_fixed(fixed: dict[str, Any], config: UniXConfig) -> dict[str, Any]:
    """A baseline's fixed keys: the variant's own field; the Uni-X split is left to the carried keys (the
    baselines' classes, the reference's and ours, ignore it)."""
    dropped = ("num_vision_encode_layers", "num_vision_decode_layers")
    own = (
        {"decoder_sparse_step": config.decoder_sparse_step}
        if config.layer_variant == "hardmoe"
        else {"ffn_vision_size": config.ffn_vision_size}
    )
    return {**{k: v for k, v in fixed.items() if k not in dropped}, **own}


def generation_config_json(config_json: dict[str, Any], interchange: dict[str, Any] | None) -> dict[str, Any]:
    """The source's generation_config.json when there was one; else what save_pretrained derives."""
    carried = (interchange or {}).get("generation_config")
    if carried:
        return carried
    derived = {
        "_from_model_config": True,
        "bos_token_id": config_json.get("bos_token_id"),
        "eos_token_id": config_json.get("eos_token_id"),
        "transformers_version": FORMAT_VERSION,
    }
    return {k: v for k, v in derived.items() if v is not None}


def hf_config_object(config_json: dict[str, Any]) -> PretrainedConfig:
    """The remote-code config class of ``config_json``'s variant holding it (for in-memory HF models)."""
    return model_class(config_json["model_type"], variant_of(config_json)).config_class.from_dict(config_json)
