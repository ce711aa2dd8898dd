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

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_unix.conversion import convert
from megatron_unix.conversion.convert import load_megatron
from megatron_unix.conversion.hf_config import INTERCHANGE, resolve_separators
from megatron_unix.conversion.hf_io import ConversionError, HFCheckpoint, has_tokenizer, model_class
from megatron_unix.conversion.hf_remote.configuration_unix import UNIX_DEFAULTS, unix_field
from megatron_unix.conversion.hf_remote.modeling_unix import separator_ids
from megatron_unix.conversion.mappings import megatron_to_hf
from megatron_unix.data.tokenizer import MultimodalTokenizer, TextTokenizer, load_text_tokenizer
from megatron_unix.inference.sampling import VocabLayout
from megatron_unix.model.config import UniXConfig


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    """A ``UniXForCausalLM`` (in-repo class) in eval mode."""
    tokenizer: TextTokenizer
    layout: VocabLayout


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (the checkpoints' dtype); fp32 on CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def vocab_layout(
    vq_offset: int,
    codebook_size: int,
    boi_id: int,
    eoi_id: int,
    eos_id: int,
    separators: Sequence[int],
    vis_sep_lens: Any,
) -> VocabLayout:
    """The layout of a model whose routed separators are ``separators`` (the reference generates with
    one separator token and one interval, ``vis_sep_lens`` of config.json)."""
    if len(separators) > 1:
        raise ValueError(f"separators {list(separators)}: generation forces a single separator token")
    every = 0
    if separators:
        try:
            every = int(str(vis_sep_lens))
        except ValueError:
            raise ValueError(f"config.json vis_sep_lens={vis_sep_lens!r}: generation needs one interval") from None
    return VocabLayout(
        vq_offset=vq_offset,
        codebook_size=codebook_size,
        boi_id=boi_id,
        eoi_id=eoi_id,
        eos_id=eos_id,
        separator_id=separators[0] if separators else None,
        separator_every=every,
    )


def _text_tokenizer(path: str | Path | None, missing: str, vq_offset: int) -> TextTokenizer:
    """The text tokenizer at ``path``; ``missing`` says where none was found."""
    if path is None or not Path(path).exists():
        raise ValueError(f"{missing}: give --tokenizer (an HF tokenizer directory or a SentencePiece model)")
    text = load_text_tokenizer(path)
    if len(text) > vq_offset:
        raise ValueError(f"tokenizer {path}: its {len(text)} tokens overlap the VQ codes, which start at {vq_offset}")
    return text


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
    if tokenizer is None and has_tokenizer(directory):
        tokenizer = directory
    missing = f"--tokenizer {tokenizer}: no such file" if tokenizer else f"--hf {directory} has no tokenizer files"
    text = _text_tokenizer(tokenizer, missing, config.real_text_vocab_size)
    resolve_separators(config, text, source.path)
    names = MultimodalTokenizer(text, config.vision_vocab_size, vq_offset=config.real_text_vocab_size)
    vocab = vocab_layout(
        config.real_text_vocab_size,
        config.vision_vocab_size,
        config.vision_start_id,
        names.eoi_id,
        names.eos_id,
        separator_ids(config),
        unix_field(config, "vis_sep_lens"),
    )
    model = model_class(source.style, unix=True).from_pretrained(
        directory, config=config, dtype=dtype or default_dtype(device)
    )
    return LoadedModel(model.to(device).eval(), text, vocab)


def hf_model_from_megatron(model: torch.nn.Module, config: UniXConfig, vocab_size: int) -> torch.nn.Module:
    """The in-memory HF Uni-X model (fp32) holding a TP1/PP1 Megatron model's weights."""
    weights = megatron_to_hf({name: p.detach() for name, p in model.named_parameters()}, config, vocab_size)
    return convert.hf_unix_model(config, vocab_size, weights)


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
    vocab_size = common["model_args"]["vocab_size"]
    recorded = (common.get("args") or {}).get("tokenizer_model")
    missing = (
        f"--tokenizer {tokenizer}: no such file"
        if tokenizer
        else f"--load {path} records tokenizer_model={recorded!r}, which is not there"
    )
    text = _text_tokenizer(tokenizer or recorded, missing, config.vq_offset)
    carried = (common["model_args"].get(INTERCHANGE) or {}).get("config") or {}
    vocab = vocab_layout(
        config.vq_offset,
        config.vq_codebook_size,
        config.boi_id,
        config.eoi_id,
        config.eos_id,
        config.separator_ids,
        carried.get("vis_sep_lens", UNIX_DEFAULTS["vis_sep_lens"]),
    )
    model = hf_model_from_megatron(megatron, config, vocab_size)
    return LoadedModel(model.to(device, dtype or default_dtype(device)).eval(), text, vocab)
