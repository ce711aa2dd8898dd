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
from megatron_unix.conversion.hf_config import INTERCHANGE, unix_fields
from megatron_unix.conversion.hf_io import ConversionError, HFCheckpoint, has_tokenizer, model_class, quiet_loading
from megatron_unix.conversion.hf_remote.configuration_unix import unix_field
from megatron_unix.conversion.hf_remote.modeling_unix import separator_ids
from megatron_unix.conversion.mappings import megatron_to_hf
from megatron_unix.data.tokenizer import (
    LAYOUT_FIELDS,
    MultimodalTokenizer,
    TextTokenizer,
    check_checkpoint_tokenizer,
    load_text_tokenizer,
)
from megatron_unix.inference.sampling import VocabLayout
from megatron_unix.model.config import UniXConfig


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    """A ``UniXForCausalLM`` (in-repo class: Uni-X or a baseline) in eval mode."""
    tokenizer: TextTokenizer
    layout: VocabLayout


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_of(flag: str | None) -> torch.device:
    """The programs' ``--device``: as given, else cuda when available, else cpu. The one place that
    refuses a device that does not parse or that this machine does not have, naming the flag."""
    if not flag:
        return default_device()
    try:
        device = torch.device(flag)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {flag}: not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"--device {flag}: no {device.type} device is available on this machine")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {flag}: this machine has {count} {device.type} device(s), numbered from 0")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (the checkpoints' dtype); fp32 on CPU, where bf16 matmuls are slow."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def vocab_layout(
    config: PretrainedConfig,
    tokenizer: TextTokenizer,
    own: TextTokenizer | None = None,
    source: str = "the model",
    **names: str,
) -> VocabLayout:
    """The layout of a Uni-X HF config (``model.config``): codes, BOI and the routed separators from the
    config, EOI and EOS from the tokenizer through a :class:`MultimodalTokenizer` (which refuses a
    tokenizer overlapping the codes; ``names``: its ``boi``/``eoi``/``eos`` token texts where a run
    chose others), refused when it is not the checkpoint's ``own`` tokenizer's vocabulary
    (:func:`check_checkpoint_tokenizer`). The reference generates with one separator token and one
    interval (``vis_sep_lens``)."""
    multimodal = MultimodalTokenizer(
        tokenizer, config.vision_vocab_size, vq_offset=config.real_text_vocab_size, **names
    )
    check_checkpoint_tokenizer(multimodal, {}, "--tokenizer", source, own)
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


def own_tokenizer(given: str | Path | None, own: str | Path | None) -> TextTokenizer | None:
    """The checkpoint's own tokenizer at ``own``, to compare a ``given`` other one with (None when no other
    was given, or the checkpoint's is not there)."""
    if given is None or own is None or not Path(own).exists() or Path(given).resolve() == Path(own).resolve():
        return None
    return load_text_tokenizer(own)


def hf_tokenizer(
    directory: str | Path, config: PretrainedConfig, tokenizer: str | Path | None
) -> tuple[TextTokenizer, VocabLayout]:
    """The text tokenizer of an HF Uni-X directory (``tokenizer``, by default the directory's own) and
    its layout; refused when it cannot run the model: overlapping the codes, missing a special token,
    another vocabulary than the directory's tokenizer."""
    own = directory if has_tokenizer(directory) else None
    missing = f"--tokenizer {tokenizer}: no such file" if tokenizer else f"--hf {directory} has no tokenizer files"
    text = _text_tokenizer(tokenizer or own, missing)
    unix_fields(config, text, Path(directory))  # refuses what the model cannot run; records the separators' ids
    return text, vocab_layout(config, text, own_tokenizer(tokenizer, own), f"--hf {directory}")


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
    text, vocab = hf_tokenizer(directory, config, tokenizer)
    with quiet_loading():
        model = model_class(source.style, source.variant).from_pretrained(
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
    run_args = common.get("args") or {}
    recorded = run_args.get("tokenizer_model")
    missing = (
        f"--tokenizer {tokenizer}: no such file"
        if tokenizer
        else f"--load {path} records tokenizer_model={recorded!r}, which is not there"
    )
    text = _text_tokenizer(tokenizer or recorded, missing)
    names = {k: run_args[k] for k in ("boi", "eoi", "eos") if run_args.get(k)}
    multimodal = MultimodalTokenizer(text, config.vq_codebook_size, vq_offset=config.vq_offset, **names)
    trained = {name: getattr(config, name) for name in LAYOUT_FIELDS}
    check_checkpoint_tokenizer(multimodal, trained, "--tokenizer", path, own_tokenizer(tokenizer, recorded))
    model_args = common["model_args"]
    model = hf_model_from_megatron(megatron, config, model_args["vocab_size"], model_args.get(INTERCHANGE))
    del megatron  # the fp32 Megatron copy, before the HF one is moved and cast
    vocab = vocab_layout(model.config, text, **names)
    return LoadedModel(model.to(device, dtype or default_dtype(device)).eval(), text, vocab)
