"""``tools/evaluate.py text``: the paper's text benchmarks (lm-evaluation-harness, 0-shot by default).

The model is loaded here and handed to lm-eval's ``HFLM`` as an instance, one of three ways:

- ``--hf DIR``: the export's own remote code (``trust_remote_code``, its config.json ``auto_map``), as a
  user of the export runs it; a directory in the reference's format has no ``auto_map`` and loads into
  this package's classes (Uni-X or a baseline) instead.
- ``--hf DIR --as-qwen3``: the reference's way, transformers' plain ``Qwen3ForCausalLM`` (``Qwen2ForCausalLM``
  for Qwen2 layers): the text path alone; the vision tensors (Uni-X's copies, a baseline's vision parts)
  are left unloaded (spec §5, §9: on text the model's logits are exactly the text LM's).
- ``--load CKPT``: a Megatron checkpoint converted to the HF model of its variant in memory.

lm-eval scores a choice by its summed log-likelihood under the full output distribution (image codes included).
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_unix.cli import add_model_arguments, missing_flag_path, out_of_range
from megatron_unix.cli.evaluate import add_output_arguments, checkpoint_record, loaded_folder
from megatron_unix.evaluation import text

if TYPE_CHECKING:
    import torch

HELP = "text benchmarks (ARC, WinoGrande, BoolQ, MMLU) through lm-evaluation-harness"
KEPT = "the answers so far are in the request cache in {output_dir}/" + text.CACHE_DIR + ": the same command resumes"
SECTION = "text"

RESUME = f"""\
Resume: lm-eval's request cache (its use_cache, an SQLite file) lives in OUTPUT_DIR/{text.CACHE_DIR}/, one
file per model (loader, files, tokenizer, dtype). Every answer is stored as soon as it is computed, so a
rerun with the same --output-dir reads finished requests back and computes only the rest; delete the
folder to recompute. Results go to results.json's "text" section as {{task: {{metric: value}}}} (accuracies in
[0, 1], stderr included); tasks evaluated earlier and not now are kept.
Needs {text.INSTALL}."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = RESUME
    add_model_arguments(parser)
    parser.add_argument(
        "--tasks",
        default=",".join(text.PAPER_TASKS),
        help="comma-separated lm-eval task or group names (default: %(default)s)",
    )
    parser.add_argument(
        "--include-path",
        action="append",
        default=[],
        type=Path,
        help="a folder of lm-eval task YAML files (repeatable): local tasks, or hub tasks rewritten for offline data",
    )
    parser.add_argument("--num-fewshot", type=int, default=0, help="examples in each prompt (paper: 0)")
    parser.add_argument("--limit", type=int, help="only the first N documents of each task (smoke tests)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests per forward batch")
    parser.add_argument(
        "--as-qwen3",
        action="store_true",
        help="load --hf as transformers' plain Qwen3ForCausalLM (the reference's way; vision copies unused)",
    )
    parser.add_argument(
        "--log-samples", action="store_true", help=f"write lm-eval's per-document log to OUTPUT_DIR/{text.SAMPLES_DIR}/"
    )
    add_output_arguments(parser)


def log(message: str) -> None:
    print(f"[evaluate text] {message}", file=sys.stderr, flush=True)


@dataclass
class Loaded:
    """A model to hand to lm-eval, and what identifies its answers in the cache."""

    model: torch.nn.Module
    tokenizer: Any
    """A Hugging Face tokenizer (lm-eval's ``HFLM`` calls it directly)."""
    identity: dict[str, Any]
    files: list[Path]


def check(args: argparse.Namespace) -> None:
    """What can be refused before lm-eval or a model is loaded, naming the flag."""
    message = out_of_range(
        args,
        (
            ("--num-fewshot", args.num_fewshot >= 0),
            ("--limit", args.limit is None or args.limit >= 1),
            ("--batch-size", args.batch_size >= 1),
        ),
    )
    if message:
        raise ValueError(message)
    if args.as_qwen3 and not args.hf:
        raise ValueError("--as-qwen3 loads an HF directory: give --hf")
    if message := missing_flag_path(args, ("--hf", "--load", "--tokenizer", "--include-path")):
        raise ValueError(message)


def hf_tokenizer(path: str | Path, flag: str) -> Any:
    """The Hugging Face tokenizer at ``path``; lm-eval cannot drive a SentencePiece model."""
    from megatron_unix.data.tokenizer import HuggingFaceText, load_text_tokenizer

    tokenizer = load_text_tokenizer(path)
    if not isinstance(tokenizer, HuggingFaceText):
        raise ValueError(f"{flag} {path}: lm-eval needs a Hugging Face tokenizer directory, not a SentencePiece model")
    return tokenizer.model


def load_hf(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Loaded:
    from transformers import AutoModelForCausalLM

    from megatron_unix.conversion.hf_io import HFCheckpoint, has_tokenizer, quiet_loading
    from megatron_unix.inference import loading

    source = HFCheckpoint(args.hf)
    if not args.tokenizer and not has_tokenizer(args.hf):
        raise ValueError(f"--hf {args.hf} has no tokenizer files: give --tokenizer")
    tokenizer_path = args.tokenizer or args.hf
    tokenizer = hf_tokenizer(tokenizer_path, "--tokenizer" if args.tokenizer else "--hf")
    if args.tokenizer and source.kind == "unix":  # another tokenizer must fit the model (as for generation)
        loading.hf_tokenizer(args.hf, source.config, args.tokenizer)
    if args.as_qwen3:
        model, loader = as_text_lm(source, dtype), f"{source.style} text LM"
    elif "AutoModelForCausalLM" in (source.raw.get("auto_map") or {}):
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(args.hf, trust_remote_code=True, dtype=dtype)
        loader = "remote code"
    else:
        log(f"--hf {args.hf}: config.json has no auto_map (the reference's format): this package's classes")
        model, loader = loading.load_hf(args.hf, args.tokenizer, device, dtype).model, "uni-x classes"
    log(f"model: {type(model).__name__} from {args.hf} ({loader}), {dtype}, {device}")
    identity = dict(loader=loader, source=Path(args.hf).resolve(), tokenizer=Path(tokenizer_path).resolve())
    return Loaded(model.to(device).eval(), tokenizer, identity, list(Path(args.hf).iterdir()))


def as_text_lm(source: Any, dtype: torch.dtype) -> torch.nn.Module:
    """transformers' own text LM of the directory's layer style; the unloaded tensors must be vision
    tensors alone (:func:`is_vision_tensor`), and are counted in the log instead of transformers' per-tensor report."""
    from megatron_unix.conversion.hf_io import model_class, quiet_loading
    from megatron_unix.conversion.mappings import is_vision_tensor

    cls = model_class(source.style)
    with quiet_loading():
        model, info = cls.from_pretrained(source.path, dtype=dtype, output_loading_info=True)
    unused = sorted(info["unexpected_keys"])
    other = [name for name in unused if not is_vision_tensor(name)]
    missing = sorted(info["missing_keys"])
    if missing or other:
        example = (missing or other)[0]
        raise ValueError(
            f"--as-qwen3: {source.path} does not load as {cls.__name__}: "
            f"{len(missing)} tensors missing, {len(other)} not vision tensors and unused (e.g. {example})"
        )
    if unused:
        log(f"--as-qwen3: {len(unused)} vision tensors dropped (text-only evaluation does not use them)")
    return model


def load_megatron(args: argparse.Namespace, device: torch.device, dtype: torch.dtype, checkpoint: Path) -> Loaded:
    """``checkpoint``: the ``iter_*`` folder ``--load`` names (its files identify the cached answers)."""
    from megatron_unix.data.tokenizer import HuggingFaceText
    from megatron_unix.inference.loading import load_model

    loaded = load_model(args, device, dtype)
    if not isinstance(loaded.tokenizer, HuggingFaceText):
        raise ValueError(
            f"--load {args.load}: its tokenizer {loaded.tokenizer.path} is a SentencePiece model; "
            "lm-eval needs a Hugging Face tokenizer directory: give --tokenizer"
        )
    log(f"model: {checkpoint} converted in memory, {dtype}, {device}")
    identity = dict(loader="megatron", source=checkpoint.resolve(), tokenizer=Path(loaded.tokenizer.path).resolve())
    return Loaded(loaded.model, loaded.tokenizer.model, identity, list(checkpoint.iterdir()))


def lm_eval_model(loaded: Loaded, batch_size: int) -> Any:
    """lm-eval's ``HFLM`` around the loaded instance; log-softmax in fp32 (a bf16 model's logits would
    otherwise be normalised in bf16). Its two warnings about being given an instance, not a name, are
    silenced: that is how every model is passed here."""
    from lm_eval.models.huggingface import HFLM

    logger = logging.getLogger(HFLM.__module__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, softmax_dtype="float32")
    finally:
        logger.setLevel(level)


def evaluate(args: argparse.Namespace, tasks: list[str], record: dict[str, Any]) -> dict[str, Any]:
    """Load the model (``record``: its :func:`checkpoint_record`), run lm-eval with the request cache in
    --output-dir; lm-eval's results."""

    from megatron_unix.inference.loading import default_dtype, device_of

    device = device_of(args.device)
    dtype = default_dtype(device)
    loaded = load_hf(args, device, dtype) if args.hf else load_megatron(args, device, dtype, loaded_folder(record))
    cache = text.cache_prefix(args.output_dir, {**loaded.identity, "dtype": str(dtype)}, loaded.files)
    log(f"request cache {cache}_rank0.db: {text.cached_answers(cache)} answers stored")
    lm = lm_eval_model(loaded, args.batch_size)
    try:
        results = text.run_tasks(
            lm, tasks, args.include_path, args.num_fewshot, args.limit, cache, args.log_samples, args.seed
        )
    except OSError as error:
        raise OSError(
            f"a task's dataset could not be read ({error}); where the hub is out of reach, give task YAML files "
            "naming local data with --include-path"
        ) from None
    log(f"request cache: {text.cached_answers(cache)} answers stored")
    return results


def run(args: argparse.Namespace) -> int:
    from megatron_unix.evaluation.results import update_results

    try:
        tasks = text.parse_tasks(args.tasks)
        check(args)
        if why := text.hub_offline():
            text.go_offline()
            hint = (
                "" if args.include_path else "; for data elsewhere, give task YAML files naming it with --include-path"
            )
            log(f"offline ({why}): task datasets come from the local Hugging Face cache only{hint}")
        log(f"lm-eval {text.require_lm_eval()}: {', '.join(tasks)}, {args.num_fewshot}-shot")
        record = checkpoint_record(args)
        text.check_tasks(tasks, args.include_path)
        results = evaluate(args, tasks, record)
        update_results(args.output_dir, SECTION, text.metrics(results), record, merge=True)
        print(text.table(results), flush=True)
        log(f"results: {args.output_dir / 'results.json'} (section {SECTION!r})")
        if args.log_samples:
            log(f"per-document logs: {', '.join(map(str, text.write_samples(args.output_dir, results)))}")
    except (ValueError, OSError) as error:
        print(f"evaluate text: error: {error}", file=sys.stderr)
        return 2
    return 0
