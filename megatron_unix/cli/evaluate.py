"""Evaluate a Uni-X checkpoint on the paper's benchmarks; one subcommand per family.

    python tools/evaluate.py loss --load ckpt/run --data-path data/val_text data/val_pairs --output-dir eval/run
    python tools/evaluate.py text --hf hf/run --tasks arc_easy,mmlu --output-dir eval/run
    python tools/evaluate.py understanding --hf hf/run --benchmark-dir vlmeval/ --vqgan vqgan/ --output-dir eval/run
    python tools/evaluate.py generation --hf hf/run --geneval-prompts evaluation_metadata.jsonl --vqgan vqgan/ --output-dir eval/run
    python tools/evaluate.py report eval/run-* --output-dir eval/summary

One --output-dir per checkpoint: a Megatron checkpoint and its export (export-hf records where it came
from) share one. Each subcommand adds its section to ``OUTPUT_DIR/results.json`` (written atomically under
a lock; other sections are kept) and rewrites ``OUTPUT_DIR/results.md``, the checkpoint beside the paper's
Table 4. Interrupted runs resume: finished items are read back, not redone. ``report`` gathers several
output folders into report.json, report.md and plots of loss and scores against tokens seen (loss.png,
scores.png). Exit status: 0 ok, 2 refused (a flag or file, named).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from megatron_unix.cli import MODEL_PATHS, missing_flag_path, not_a_folder, stops_in_one_line, vqgan_flags_error

SUBCOMMANDS = {
    "loss": "megatron_unix.cli.evaluate_loss",
    "text": "megatron_unix.cli.evaluate_text",
    "understanding": "megatron_unix.cli.evaluate_understanding",
    "generation": "megatron_unix.cli.evaluate_generation",
    "report": "megatron_unix.cli.evaluate_report",
}
"""Subcommand -> module with ``HELP``, ``KEPT`` (what a stop leaves in ``{output_dir}``),
``add_arguments(parser)`` and ``run(args) -> int`` (exit status)."""


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where results go and how the checkpoint is named in tables and plots."""
    parser.add_argument("--output-dir", type=Path, required=True, help="results.json, results.md and caches")
    parser.add_argument("--name", help="the checkpoint's name in tables and plots (default: the output folder's)")
    parser.add_argument(
        "--tokens-seen", type=float, help="training tokens behind this checkpoint (default: read from --load)"
    )


def checkpoint_record(
    args: argparse.Namespace, found: Path | None = None, common: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What results.json records about the evaluated model: ``checkpoint`` identifies it (a Megatron
    ``iter_*`` folder; an HF export by the checkpoint it was exported from, when it records one, else by
    its own folder), so the checkpoint and its export share one --output-dir; ``source`` and ``format``
    say what this subcommand read; ``iteration`` and ``tokens_seen`` where known (``--tokens-seen``
    overrides). ``found``/``common``: ``--load``'s checkpoint and common part when the caller has read
    them. Refuses an ``--output-dir`` holding another checkpoint's results, before any work."""
    from megatron_unix.evaluation.results import check_owner

    if message := not_a_folder("--output-dir", args.output_dir):
        raise ValueError(message)
    hf = getattr(args, "hf", None)
    source = str(Path(hf or args.load).resolve())
    record: dict[str, Any] = {"source": source, "format": "hf" if hf else "megatron", "checkpoint": source}
    if hf:
        from megatron_unix.conversion.hf_io import read_origin

        record.update({k: v for k, v in (read_origin(hf) or {}).items() if v is not None})
    else:
        from megatron_unix.training.checkpointing import tokens_seen
        from megatron_unix.training.from_checkpoint import StartingPoint

        if found is None:  # verified when the model is loaded
            start = StartingPoint.required(args.load, verify=False)
            found, common = start.checkpoint, start.common
        record.update(checkpoint=str(found.resolve()), iteration=common["iteration"], tokens_seen=tokens_seen(common))
    if args.name:
        record["name"] = args.name
    if args.tokens_seen is not None:
        record["tokens_seen"] = args.tokens_seen
    check_owner(args.output_dir, record)
    return {k: v for k, v in record.items() if v is not None}


def check_paths(args: argparse.Namespace, flags: Iterable[str]) -> None:
    """Refuse a path flag naming nothing, before anything is loaded."""
    if message := missing_flag_path(args, flags):
        raise ValueError(message)


def check_model_flags(args: argparse.Namespace) -> None:
    """The checkpoint and VQGAN flags both evaluations share."""
    if message := vqgan_flags_error(args, required=True):
        raise ValueError(message)
    check_paths(args, MODEL_PATHS)


def load_models(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(LoadedModel, VQGAN)`` on ``--device``; a VQGAN of another codebook than the model's is refused."""

    from megatron_unix.image.vqgan import VQGAN
    from megatron_unix.inference.images import check_codebook
    from megatron_unix.inference.loading import device_of, load_model

    device = device_of(args.device)
    vqgan = VQGAN.load(args.vqgan, args.vqgan_config, args.vqgan_checkpoint, device)
    loaded = load_model(args, device)
    check_codebook(vqgan, loaded.layout.codebook_size)
    return loaded, vqgan


def loaded_folder(record: dict[str, Any]) -> Path:
    """The folder whose files the model is read from: the HF directory, or the Megatron ``iter_*``."""
    return Path(record["source"] if record["format"] == "hf" else record["checkpoint"])


def model_settings(args: argparse.Namespace, record: dict[str, Any], vqgan: Any) -> dict[str, Any]:
    """What decides a model's outputs besides the benchmark's own options: resumed outputs must share it."""
    from megatron_unix.files import stat_digest
    from megatron_unix.inference.images import vqgan_fingerprint

    return {
        "checkpoint": record["checkpoint"],
        "source": record["source"],
        "files": stat_digest(loaded_folder(record).iterdir()),  # a checkpoint rewritten in place
        "tokenizer": str(Path(args.tokenizer).resolve()) if args.tokenizer else None,
        "vqgan": vqgan_fingerprint(vqgan),
    }


def build_parser(commands: dict[str, str] = SUBCOMMANDS) -> argparse.ArgumentParser:
    """The parser with ``commands``' subparsers (importing a subcommand's module imports only its needs)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, module_name in commands.items():
        module = importlib.import_module(module_name)
        subparsers.add_parser(name, help=module.HELP, description=module.HELP).set_defaults(module=module)
        module.add_arguments(subparsers.choices[name])
    return parser


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags, the chosen subcommand's module only imported (``--help`` without one imports all)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = {argv[0]: SUBCOMMANDS[argv[0]]} if argv and argv[0] in SUBCOMMANDS else SUBCOMMANDS
    return build_parser(chosen).parse_args(argv)


@stops_in_one_line("evaluate", parse, lambda args: args.module.KEPT.format(output_dir=args.output_dir))
def main(args: argparse.Namespace) -> int:
    """The chosen subcommand; its module's ``KEPT`` says what a stop leaves."""
    return args.module.run(args)


if __name__ == "__main__":
    sys.exit(main())
