"""The HF Uni-X model, its text tokenizer and vocabulary layout, from an exported HF directory or a
Megatron checkpoint.

HF directories load into the in-repo remote-code classes (``hf_remote``), not through
``AutoModelForCausalLM(trust_remote_code=True)``: the reference writes no ``auto_map``, so Auto would
silently give a plain Qwen text LM for its checkpoints; the reference names separators by token text,
which only the tokenizer resolves (done here); and the modeling code that runs is the one generation
is tested with, not whatever copy a directory holds (nothing from the directory is executed).

A Megatron checkpoint's weights go through the conversion table (``megatron_to_hf``) into the same
HF model in memory, so both sources run one generation path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from megatron_unix.conversion import convert
from megatron_unix.conversion.convert import load_megatron
from megatron_unix.conversion.hf_config import INTERCHANGE, layer_variant, unix_fields
from megatron_unix.conversion.hf_io import ConversionError, HFCheckpoint, has_tokenizer, model_class
from megatron_unix.conversion.hf_remote.configuration_unix import unix_field
from megatron_unix.conversion.hf_remote.modeling_unix import separator_ids
from megatron_unix.conversion.mappings import megatron_to_hf
from megatron_unix.data.tokenizer import MultimodalTokenizer, TextTokenizer, load_text_tokenizer
from megatron_unix.inference.sampling import VocabLayout
from megatron_unix.model.config import UniXConfig

NO_HF_CODE = (
    "the HF classes here build Uni-X only; the reference's modeling/moe_qwen.py and mot_qwen.py run the baselines"
)


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    """A ``UniXForCausalLM`` (in-repo class) in eval mode."""
    tokenizer: TextTokenizer
    layout: VocabLayout


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_of(flag: str | None) -> torch.device:
    """The programs' ``--device``: as given, else cuda when available, else cpu."""
    return torch.device(flag) if flag else default_device()


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (the checkpoints' dtype); fp32 on CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def vocab_layout(config: PretrainedConfig, tokenizer: TextTokenizer, **names: str) -> VocabLayout:
    """The layout of a Uni-X HF config (``model.config``): codes, BOI and the routed separators from the
    config, EOI and EOS from the tokenizer through a :class:`MultimodalTokenizer` (which refuses a
    tokenizer overlapping the codes; ``names``: its ``boi``/``eoi``/``eos`` token texts where a run
    chose others). The reference generates with one separator token and one interval (``vis_sep_lens``)."""
    multimodal = MultimodalTokenizer(
        tokenizer, config.vision_vocab_size, vq_offset=config.real_text_vocab_size, **names
    )
    separators = separator_ids(config)
    if len(separators) > 1:
        raise ValueError(f"separators {separators}: generation forces a single separator token")
    every = 0
    if separators:
        vis_sep_lens = unix_field(config, "vis_sep_lens")
        try:
            every = int(str(vis_sep_lens))
        except ValueError:
            raise ValueError(f"config.json vis_sep_lens={vis_sep_lens!r}: generation needs one interval") from None
    return VocabLayout(
        vq_offset=multimodal.vq_offset,
        codebook_size=multimodal.codebook_size,
        boi_id=config.vision_start_id,
        eoi_id=multimodal.eoi_id,
        eos_id=multimodal.eos_id,
        separator_id=separators[0] if separators else None,
        separator_every=every,
    )


def _text_tokenizer(path: str | Path | None, missing: str) -> TextTokenizer:
    """The text tokenizer at ``path``; ``missing`` says where none was found."""
    if path is None or not Path(path).exists():
        raise ValueError(f"{missing}: give --tokenizer (an HF tokenizer directory or a SentencePiece model)")
    return load_text_tokenizer(path)


def load_hf(
    directory: str | Path,
    tokenizer: str | Path | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """An exported (or reference-format) Uni-X HF directory; ``tokenizer`` defaults to the directory."""
    device = device or default_device()
    source = HFCheckpoint(directory)
    if source.kind != "unix":
        raise ConversionError(f"--hf {directory}: config.json has no num_vision_encode_layers: not a Uni-X model")
    config = source.config
    if (variant := layer_variant(config)) != "unix":
        raise ConversionError(f"--hf {directory} is a {variant} model ({NO_HF_CODE})")
    if tokenizer is None and has_tokenizer(directory):
        tokenizer = directory
    missing = f"--tokenizer {tokenizer}: no such file" if tokenizer else f"--hf {directory} has no tokenizer files"
    text = _text_tokenizer(tokenizer, missing)
    unix_fields(config, text, source.path)  # refuses what the model cannot run; records the separators' ids
    vocab = vocab_layout(config, text)
    model = model_class(source.style, unix=True).from_pretrained(
        directory, config=config, dtype=dtype or default_dtype(device)
    )
    return LoadedModel(model.to(device).eval(), text, vocab)


def hf_model_from_megatron(
    model: torch.nn.Module, config: UniXConfig, vocab_size: int, interchange: dict[str, Any] | None = None
) -> torch.nn.Module:
    """The in-memory HF Uni-X model (fp32) holding a TP1/PP1 Megatron model's weights; ``interchange``
    (the checkpoint's :data:`INTERCHANGE` record) gives it the config.json keys an export writes."""
    weights = megatron_to_hf({name: p.detach() for name, p in model.named_parameters()}, config, vocab_size)
    return convert.hf_unix_model(config, vocab_size, weights, interchange)


def load_checkpoint(
    path: str | Path,
    tokenizer: str | Path | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
) -> LoadedModel:
    """A Megatron checkpoint (needs an initialised process group: ``distributed.initialize``);
    ``tokenizer`` defaults to the one the checkpoint records."""
    device = device or default_device()
    megatron, config, common = load_megatron(path, verify)
    if config.layer_variant != "unix":
        raise ValueError(f"--load {path} is a {config.layer_variant} model ({NO_HF_CODE})")
    run_args = common.get("args") or {}
    recorded = run_args.get("tokenizer_model")
    missing = (
        f"--tokenizer {tokenizer}: no such file"
        if tokenizer
        else f"--load {path} records tokenizer_model={recorded!r}, which is not there"
    )
    text = _text_tokenizer(tokenizer or recorded, missing)
    model_args = common["model_args"]
    model = hf_model_from_megatron(megatron, config, model_args["vocab_size"], model_args.get(INTERCHANGE))
    del megatron  # the fp32 Megatron copy, before the HF one is moved and cast
    vocab = vocab_layout(model.config, text, **{k: run_args[k] for k in ("boi", "eoi", "eos") if run_args.get(k)})
    for name in ("eoi_id", "eos_id"):
        if getattr(vocab, name) != getattr(config, name):
            raise ValueError(
                f"--load {path} was trained with {name}={getattr(config, name)} but the tokenizer "
                f"{tokenizer or recorded} gives {getattr(vocab, name)}: use the tokenizer of the checkpoint"
            )
    return LoadedModel(model.to(device, dtype or default_dtype(device)).eval(), text, vocab)
