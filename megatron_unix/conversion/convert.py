"""HF checkpoint -> Megatron checkpoint (import) and back (export), single process, TP1/PP1.

Import reads a Qwen2/Qwen2.5 or Qwen3 text model, or a reference-format Uni-X checkpoint, as a
lazy table of HF-named tensors in the *target* layout (expanded vocabulary, converted layer style,
vision copies: each entry computed on access), streams it through the mapping table into the
Megatron model and saves iteration 0; a run loads that at any TP/PP. Export loads a Megatron
checkpoint, maps it back (TP vocabulary padding stripped) and writes the reference format. Either
way the process holds one copy of the weights (the Megatron model, fp32) plus one tensor or shard;
``--verify`` adds the HF models it compares with.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from megatron_unix import platform
from megatron_unix.conversion.hf_config import (
    INTERCHANGE,
    generation_config_json,
    hf_config_object,
    layer_style,
    read_interchange,
    text_fields,
    unix_config_json,
    unix_fields,
)
from megatron_unix.conversion.hf_io import (
    ORIGIN,
    ConversionError,
    HFCheckpoint,
    LazyTensors,
    copy_remote_code,
    copy_tokenizer,
    has_tokenizer,
    model_class,
    quiet_loading,
    write_model_card,
    write_safetensors,
)
from megatron_unix.conversion.mappings import (
    HF_VOCAB_TENSORS,
    dropped_on_import,
    iter_hf_to_megatron,
    layer_prefixes,
    megatron_to_hf,
    vision_twins,
)
from megatron_unix.conversion.verify import (
    BF16,
    FP32,
    compare,
    hf_logits,
    megatron_logits,
    report,
    sample_inputs,
    sample_text_ids,
)
from megatron_unix.data.tokenizer import MultimodalTokenizer, TextTokenizer, load_text_tokenizer
from megatron_unix.data.vocabulary import CODEBOOK_SIZE
from megatron_unix.files import WriteError
from megatron_unix.model import build_model, make_config, padded_vocab_size
from megatron_unix.model.config import ModelArguments, UniXConfig
from megatron_unix.training import checkpointing
from megatron_unix.training.checkpointing import tokens_seen

MAX_SEQUENCE_LENGTH = 4096
"""Only rotary caching depends on it; the weights do not."""
IMPL = dict(transformer_impl="local", perform_initialization=False)
"""Conversion builds Megatron's local modules even where Transformer Engine is installed: the mapping
table names local parameters, and the checkpoint's keys are the same under either implementation."""
QKV_BIAS = tuple(f"self_attn.{p}_proj.bias" for p in "qkv")


def log(message: str) -> None:
    print(f"[convert] {message}", flush=True)


@dataclass(frozen=True)
class ImportOptions:
    """``import-hf`` flags; ``None`` = take it from the source (a Uni-X source fixes all but style)."""

    vision_encode_layers: int | None = None
    vision_decode_layers: int | None = None
    vision_init: str | None = None
    """``copy`` or ``random``; None: as the reference starts the variant (:meth:`vision_start`)."""
    layer_variant: str = "unix"
    """Text sources: Uni-X, or a baseline of spec §9 whose vision parts start as ``vision_init`` says."""
    decoder_sparse_step: int = 2
    vq_codebook_size: int | None = None
    vq_offset: int | None = None
    layer_style: str | None = None
    separator: str | None = None
    """Text sources: a token routed as vision besides BOI and the codes (none unless asked)."""
    seed: int = 1234

    @property
    def codebook(self) -> int:
        """Codebook size for a text source."""
        return self.vq_codebook_size or CODEBOOK_SIZE

    def vision_start(self) -> str:
        """How a text source's vision parts start. The reference copies the text layers into Uni-X's vision
        layers (``init_vision_weights``, run by ``train.py`` with ``init_vision_with_text``); its HardMoE
        and MoT classes have no such method, so their vision parts keep HF's fresh init (spec §9)."""
        if self.vision_init is not None:
            return self.vision_init
        return "copy" if self.layer_variant == "unix" else "random"


# ----------------------------------------------------------------------------------------- import


def _source_tokenizer(source: HFCheckpoint, options: ImportOptions) -> MultimodalTokenizer | None:
    """The tokenizer in the HF directory, with the codebook placed after it; None when there is none."""
    if not has_tokenizer(source.path):
        if options.separator:
            raise ConversionError(f"--separator {options.separator}: {source.path} has no tokenizer to look it up in")
        return None
    text = load_text_tokenizer(source.path)
    if source.kind == "unix":  # separators come from config.json
        return MultimodalTokenizer(text, source.config.vision_vocab_size, vq_offset=source.config.real_text_vocab_size)
    return MultimodalTokenizer(text, options.codebook, vq_offset=options.vq_offset, separator=options.separator)


def _target_config(
    source: HFCheckpoint, options: ImportOptions, tokenizer: MultimodalTokenizer | None
) -> tuple[UniXConfig, int]:
    """The converted model's config and real vocabulary size."""
    hf = source.config
    specials = tokenizer.model_config_fields() if tokenizer else {}
    if source.kind == "unix":
        if options.separator:
            raise ConversionError(
                "--separator is for text sources: a Uni-X config.json names its separators "
                "(add_sep_for_vis, vis_sep_tokens)"
            )
        fields = unix_fields(hf, tokenizer.text if tokenizer else None, source.path)
        given = dict(
            vision_encode_layers=options.vision_encode_layers,
            vq_offset=options.vq_offset,
            vision_decode_layers=options.vision_decode_layers,
            vq_codebook_size=options.vq_codebook_size,
        )
        for name, value in given.items():
            if value is not None and value != fields[name]:
                raise ConversionError(
                    f"--{name.replace('_', '-')} {value} contradicts the Uni-X checkpoint's "
                    f"config.json, which has {fields[name]}"
                )
        if tokenizer and tokenizer.boi_id != hf.vision_start_id:
            raise ConversionError(
                f"config.json vision_start_id={hf.vision_start_id} but the tokenizer's BOI is {tokenizer.boi_id}"
            )
        fields = {**specials, **fields}
        vocab_size = hf.vocab_size
    else:
        vq_offset = tokenizer.vq_offset if tokenizer else options.vq_offset
        if vq_offset is None:
            raise ConversionError(
                f"{source.path} has no tokenizer files: give --vq-offset (the text tokenizer's length)"
            )
        if vq_offset > hf.vocab_size:
            raise ConversionError(
                f"--vq-offset {vq_offset} exceeds the source's vocab_size {hf.vocab_size}: the "
                "VQ codes would not fit in the expanded vocabulary"
            )
        fields = {
            **text_fields(hf),
            **specials,
            "vq_offset": vq_offset,
            "vq_codebook_size": options.codebook,
            "vision_encode_layers": options.vision_encode_layers or 0,
            "vision_decode_layers": options.vision_decode_layers or 0,
            "layer_variant": options.layer_variant,
            "decoder_sparse_step": options.decoder_sparse_step,
        }
        vocab_size = hf.vocab_size + options.codebook
    style = options.layer_style or source.style
    if source.style == "qwen3" and style == "qwen2":
        raise ConversionError(
            "--layer-style qwen2 from a qwen3 source is refused: qwen2 layers have no QK norm, "
            "and dropping it changes the model's function"
        )
    fields.update(qk_layernorm=style == "qwen3", add_qkv_bias=style == "qwen2")
    config = make_config(**fields, **IMPL)
    for name in ("boi_id", "eoi_id", "eos_id"):
        if not 0 <= getattr(config, name) < config.vq_offset:
            raise ConversionError(
                f"{name} {getattr(config, name)} is not a text id below vq_offset "
                f"{config.vq_offset}: put the tokenizer files in {source.path}"
            )
    return config, vocab_size


def _with_mean_rows(load: Callable[[], torch.Tensor], rows: int) -> torch.Tensor:
    """Spec §2: rows added for the codebook start as the mean of the existing rows."""
    tensor = load().float()
    return torch.cat([tensor, tensor.mean(0, keepdim=True).expand(rows - tensor.shape[0], -1)])


def _random_like(load: Callable[[], torch.Tensor], name: str, seed: int, std: float) -> torch.Tensor:
    """Fresh init for a vision copy: norms 1, biases 0, matrices N(0, std); seeded by name so every
    access (import, then --verify) gives the same tensor."""
    shape = load().shape
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    return torch.empty(shape).normal_(0.0, std, generator=generator)


def _vision_part(
    twin: Callable[[], torch.Tensor], name: str, std: float, options: ImportOptions
) -> Callable[[], torch.Tensor]:
    """A vision tensor started from a text model: its text ``twin`` (copy) or fresh at ``std``."""
    if options.vision_start() == "copy":
        return twin
    return partial(_random_like, twin, name, options.seed, std)


def import_weights(source: HFCheckpoint, config: UniXConfig, vocab_size: int, options: ImportOptions) -> LazyTensors:
    """The converted model's tensors under HF names, each computed from the source on access."""
    drop_bias = source.style == "qwen2" and layer_style(config) == "qwen3"
    unused = set(dropped_on_import(config))
    thunks: dict[str, Callable[[], torch.Tensor]] = {}
    for name in source.names:
        if (name == "lm_head.weight" and config.tie_word_embeddings) or (drop_bias and name.endswith(QKV_BIAS)):
            continue
        if name in unused:
            continue
        thunks[name] = partial(source.get, name)
    if drop_bias:  # the reference's qwen2 -> qwen3: no q/k/v bias, QK norm of ones
        for _, prefix in layer_prefixes(config):
            if prefix + "self_attn.q_proj.weight" in thunks:
                for norm in ("q_norm", "k_norm"):
                    thunks[f"{prefix}self_attn.{norm}.weight"] = partial(torch.ones, config.kv_channels)
    if source.kind == "unix":
        return LazyTensors(thunks)
    for name in HF_VOCAB_TENSORS:
        if name in thunks:
            thunks[name] = partial(_with_mean_rows, thunks[name], vocab_size)
    std = getattr(source.config, "initializer_range", config.init_method_std)  # as HF's _init_weights
    text_prefix: dict[str, str] = {}
    for meg_prefix, hf_prefix in layer_prefixes(config):
        if not meg_prefix.endswith(".vision."):
            text_prefix[meg_prefix] = hf_prefix
            continue
        twin = text_prefix[meg_prefix[: -len("vision.")]]
        for name in [n for n in thunks if n.startswith(twin)]:
            thunks[hf_prefix + name[len(twin) :]] = _vision_part(
                thunks[name], hf_prefix + name[len(twin) :], std, options
            )
    for target, twin in vision_twins(config):  # the baselines' vision projections and MLPs
        if twin in thunks:
            thunks[target] = _vision_part(thunks[twin], target, std, options)
    return LazyTensors(thunks)


def load_weights(model: torch.nn.Module, weights: LazyTensors, config: UniXConfig, vocab_size: int) -> None:
    """Stream HF-named ``weights`` through the mapping table into the model's parameters."""
    params = dict(model.named_parameters())
    filled = set()
    padded = padded_vocab_size(vocab_size, config.tensor_model_parallel_size)
    for name, tensor in tqdm(
        iter_hf_to_megatron(weights, config, padded), total=len(params), desc="loading weights", unit="tensor"
    ):
        param = params.get(name)
        if param is None:
            raise ConversionError(f"{name} has no parameter in the Megatron model")
        if param.shape != tensor.shape:
            raise ConversionError(f"{name}: converted shape {list(tensor.shape)}, the model has {list(param.shape)}")
        with torch.no_grad():
            param.copy_(tensor)
        filled.add(name)
    missing = [name for name in params if name not in filled]
    if missing:
        raise ConversionError(f"no weights for Megatron parameter {missing[0]}")


def _describe(config: UniXConfig, vocab_size: int) -> str:
    return (
        f"{config.layer_variant}, {layer_style(config)} layers, L={config.num_layers}, N={config.vision_encode_layers}, "
        f"M={config.vision_decode_layers}, vocab {vocab_size} (vq_offset {config.vq_offset}, codebook "
        f"{config.vq_codebook_size}), {'tied' if config.tie_word_embeddings else 'untied'} embeddings"
    )


def import_hf(
    hf_dir: str | Path, save: str | Path, options: ImportOptions = ImportOptions(), verify: bool = False
) -> Path:
    """Convert an HF checkpoint directory into Megatron checkpoint ``save/iter_0000000``."""
    if Path(save).exists() and checkpointing.find_checkpoint(save) is not None:
        raise ConversionError(f"--save {save} already holds a Megatron checkpoint")
    source = HFCheckpoint(hf_dir)
    interchange = read_interchange(source)  # before the slow part: a damaged JSON file stops at once
    log(
        f"source {source.path}: {'Uni-X reference format' if source.kind == 'unix' else 'text model'}, "
        f"model_type {source.style}, {len(source.names)} tensors"
    )
    tokenizer = _source_tokenizer(source, options)
    config, vocab_size = _target_config(source, options, tokenizer)
    baseline_source = source.kind == "unix" and config.layer_variant != "unix"
    if not baseline_source:
        source.validate()
    log(
        f"target: {_describe(config, vocab_size)}"
        + ("" if source.kind == "unix" else f", vision parts start: {options.vision_start()}")
    )
    weights = import_weights(source, config, vocab_size, options)
    model = build_model(config, vocab_size, MAX_SEQUENCE_LENGTH)
    if baseline_source:
        _validate_by_table(source, model, config, vocab_size)
    load_weights(model, weights, config, vocab_size)
    run_args: dict[str, Any] = {
        "tokenizer_model": str(source.path) if tokenizer else None,
        "vq_codebook_size": config.vq_codebook_size,
        "converted_from": str(source.path),
    }
    model_args = {**ModelArguments.of(config, vocab_size).to_dict(), INTERCHANGE: interchange}
    path = checkpointing.save(save, 0, model, model_args=model_args, run_args=run_args)
    log(f"saved {path}")
    if verify:
        _verify_import(model, config, vocab_size, source, weights, tokenizer.text if tokenizer else None)
    return path


def _validate_by_table(source: HFCheckpoint, model: torch.nn.Module, config: UniXConfig, vocab_size: int) -> None:
    """A baseline's source against what the mapping table makes of the model: every tensor present with
    its shape, nothing else but the unused tensors import drops (MoT's ``vis_o_proj``)."""
    expected = {n: t.shape for n, t in megatron_to_hf(dict(model.named_parameters()), config, vocab_size).items()}
    source.check_tensors(expected, f"{source.path} ({config.layer_variant})", dropped_on_import(config))


def hf_unix_model(
    config: UniXConfig, vocab_size: int, weights: LazyTensors, interchange: dict[str, Any] | None = None
) -> torch.nn.Module:
    """The remote-code model of ``config``'s variant (fp32) holding ``weights``, built in memory;
    ``interchange`` (a checkpoint's :data:`INTERCHANGE` record) carries the source's config.json keys, as
    an export does."""
    hf_config = hf_config_object(unix_config_json(config, vocab_size, separator_texts=[], interchange=interchange))
    model = model_class(hf_config.model_type, config.layer_variant)(hf_config).float()
    result = model.load_state_dict({name: weights[name] for name in weights}, strict=False)
    tied_head = ["lm_head.weight"] if config.tie_word_embeddings else []
    if result.unexpected_keys or result.missing_keys != tied_head:
        raise ConversionError(f"converted weights do not fit the {type(model).__name__} HF model: {result}")
    return model


def _verify_import(
    model: torch.nn.Module,
    config: UniXConfig,
    vocab_size: int,
    source: HFCheckpoint,
    weights: LazyTensors,
    text_tokenizer: TextTokenizer | None,
) -> None:
    """Megatron vs the source text model (text, original vocabulary columns) and vs the remote-code HF
    model built in memory from the converted weights (all samples), everything in fp32."""
    samples = sample_inputs(config, sample_text_ids(config, text_tokenizer))
    results = []
    if source.kind != "unix" and source.style == layer_style(config):
        original = model_class(source.style).from_pretrained(source.path, dtype=torch.float32)
        columns = source.config.vocab_size
        results.append(
            compare(
                f"text vs {type(original).__name__} (source)",
                megatron_logits(model, samples["text"], vocab_size)[:, :columns],
                hf_logits(original, samples["text"]),
                FP32,
            )
        )
        del original
    elif source.kind != "unix":
        log("the source model differs from the converted one by design (--layer-style): not compared")
    unix = hf_unix_model(config, vocab_size, weights)
    for name, tokens in samples.items():
        results.append(
            compare(
                f"{name} vs {type(unix).__name__} (converted weights)",
                megatron_logits(model, tokens, vocab_size),
                hf_logits(unix, tokens),
                FP32,
            )
        )
    report(results, FP32)


# ----------------------------------------------------------------------------------------- export


def load_megatron(path: str | Path, verify: bool = True) -> tuple[torch.nn.Module, UniXConfig, dict[str, Any]]:
    """A TP1/PP1 model from a Megatron checkpoint (save directory or ``iter_*``), and its common part;
    ``verify`` checks its files against the checksum manifest."""
    checkpoint = checkpointing.find_checkpoint(path) if Path(path).exists() else None
    if checkpoint is None:
        raise ConversionError(
            f"--load {path}: no Megatron checkpoint there (no {checkpointing.TRACKER} or metadata.json)"
        )
    common = checkpointing.read_common(checkpoint, verify)
    if "model_args" not in common:
        raise ConversionError(f"{checkpoint} has no model_args: it was not written by this stack")
    arch = common["model_args"]
    config = ModelArguments.from_dict(arch).config(**IMPL)
    model = build_model(config, arch["vocab_size"], MAX_SEQUENCE_LENGTH)
    checkpointing.load(checkpoint, model, load_rng=False, verify=verify)
    log(f"loaded {checkpoint}: {_describe(config, arch['vocab_size'])}")
    return model, config, common


def _separator_texts(config: UniXConfig, tokenizer_path: str | None) -> list[str]:
    """The token texts of the separators, as the reference's ``vis_sep_tokens`` names them."""
    if not config.separator_ids:
        return []
    if not tokenizer_path or not Path(tokenizer_path).exists():
        raise ConversionError(
            f"the model routes separators {list(config.separator_ids)} as vision; config.json names "
            f"them by token text, which needs the tokenizer the checkpoint records "
            f"(tokenizer_model={tokenizer_path!r}, not found)"
        )
    tokenizer = load_text_tokenizer(tokenizer_path)
    return [tokenizer.token_text(index) for index in config.separator_ids]


STAGING_PREFIX = ".{name}.partial-"
"""An export is written into ``.NAME.partial-PID`` beside ``NAME`` and renamed when complete."""


def _remove_stale_staging(out: Path) -> None:
    """Staging directories of exports that were killed (SIGKILL, out of memory) are full-size copies."""
    for stale in platform.leftovers_of_dead_processes(out.parent, STAGING_PREFIX.format(name=out.name)):
        shutil.rmtree(stale, ignore_errors=True)
        log(f"removed {stale}, left by a killed export")


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def export_hf(
    load: str | Path,
    save: str | Path,
    verify: bool = False,
    max_shard_size: int | str = "5GB",
    verify_checkpoint: bool = True,
) -> Path:
    """Write the Megatron checkpoint ``load`` as an HF directory in the reference format (spec §5);
    ``verify`` compares logits afterwards, ``verify_checkpoint`` checks ``load``'s checksums first.

    Everything is written into a hidden sibling directory that is renamed to ``save`` at the end,
    so a failed export leaves nothing that looks like a checkpoint."""
    out = Path(save)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"--save {out} is not empty")
    model, config, common = load_megatron(load, verify_checkpoint)
    vocab_size = common["model_args"]["vocab_size"]
    interchange = common["model_args"].get(INTERCHANGE)
    tokenizer_path = (common.get("args") or {}).get("tokenizer_model")
    config_json = unix_config_json(config, vocab_size, _separator_texts(config, tokenizer_path), interchange)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = out.parent / f"{STAGING_PREFIX.format(name=out.name)}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_safetensors(
            megatron_to_hf({n: p.detach() for n, p in model.named_parameters()}, config, vocab_size),
            staging,
            max_shard_size=max_shard_size,
        )
        write_json(staging / "config.json", config_json)
        write_json(staging / "generation_config.json", generation_config_json(config_json, interchange))
        write_json(staging / ORIGIN, _origin(load, common))
        copy_remote_code(staging)
        write_model_card(staging, config_json)
        if tokenizer_path and has_tokenizer(tokenizer_path):
            log(f"tokenizer files from {tokenizer_path}: {', '.join(copy_tokenizer(Path(tokenizer_path), staging))}")
        else:
            log(f"no HF tokenizer directory recorded in the checkpoint ({tokenizer_path}): tokenizer not copied")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):  # named by --save, not by the staging folder removed here
            raise WriteError(error.errno, error.strerror or str(error), str(out)) from None
        raise
    log(f"wrote {out}")
    if verify:
        _verify_export(model, config, vocab_size, out)
    return out


def _origin(load: str | Path, common: dict[str, Any]) -> dict[str, Any]:
    checkpoint = checkpointing.find_checkpoint(load)
    return {
        "checkpoint": str(checkpoint.resolve()),
        "iteration": common["iteration"],
        "tokens_seen": tokens_seen(common),
    }


def _verify_export(model: torch.nn.Module, config: UniXConfig, vocab_size: int, out: Path) -> None:
    """Megatron vs the written directory: its remote-code model through trust_remote_code on all samples,
    and transformers' own text LM class on text. The bf16 files are loaded into fp32, so what is
    measured is the export (names, layout, rounding of the weights to bf16), not bf16 arithmetic,
    which flips near-tied greedy tokens of a correct conversion (random image codes have many)."""
    from transformers import AutoModelForCausalLM

    text_tokenizer = load_text_tokenizer(out) if has_tokenizer(out) else None
    samples = sample_inputs(config, sample_text_ids(config, text_tokenizer))
    reference = {name: megatron_logits(model, tokens, vocab_size) for name, tokens in samples.items()}
    with quiet_loading():
        unix = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    results = [
        compare(f"{name} vs {type(unix).__name__} (bf16 weights)", reference[name], hf_logits(unix, tokens), BF16)
        for name, tokens in samples.items()
    ]
    del unix
    with quiet_loading():  # its report would list every vision tensor, which it ignores by design
        plain = model_class(layer_style(config)).from_pretrained(out, dtype=torch.float32)
    results.append(
        compare(
            f"text vs {type(plain).__name__} (bf16 weights)", reference["text"], hf_logits(plain, samples["text"]), BF16
        )
    )
    report(results, BF16)
