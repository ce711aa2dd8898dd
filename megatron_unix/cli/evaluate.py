"""Evaluate a Uni-X checkpoint on the paper's benchmarks; one subcommand per family.

    python tools/evaluate.py loss --load ckpt/run --data-path data/val_text data/val_pairs --output-dir eval/run
    python tools/evaluate.py text --hf hf/run --tasks arc_easy,mmlu --output-dir eval/run
    python tools/evaluate.py understanding --hf hf/run --benchmark-dir vlmeval/ --vqgan vqgan/ --output-dir eval/run
    python tools/evaluate.py generation --hf hf/run --geneval-prompts evaluation_metadata.jsonl --vqgan vqgan/ --output-dir eval/run
    python tools/evaluate.py report eval/run-* --output-dir eval/summary

Each subcommand adds its section to ``OUTPUT_DIR/results.json`` (written atomically; other sections are
kept) and rewrites ``OUTPUT_DIR/results.md``, the checkpoint beside the paper's Table 4. Interrupted runs
resume: finished items are read back, not redone. ``report`` gathers several output folders into one
table and a plot of loss and scores against tokens seen. Exit status: 0 ok, 2 refused (a flag or file, named).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from megatron_unix.cli import vqgan_flags_error

SUBCOMMANDS = {
    "loss": "megatron_unix.cli.evaluate_loss",
    "text": "megatron_unix.cli.evaluate_text",
    "understanding": "megatron_unix.cli.evaluate_understanding",
    "generation": "megatron_unix.cli.evaluate_generation",
    "report": "megatron_unix.cli.evaluate_report",
}
"""Subcommand -> module with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int`` (exit status)."""


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where results go and how the checkpoint is named in tables and plots."""
    parser.add_argument("--output-dir", type=Path, required=True, help="results.json, results.md and caches")
    parser.add_argument("--name", help="the checkpoint's name in tables and plots (default: the output folder's)")
    parser.add_argument(
        "--tokens-seen", type=float, help="training tokens behind this checkpoint (default: read from --load)"
    )


def checkpoint_record(args: argparse.Namespace) -> dict[str, Any]:
    """What results.json records about the evaluated checkpoint; ``iteration`` and ``tokens_seen``
    come from a Megatron checkpoint's common record when the flags do not give them. Refuses an
    ``--output-dir`` holding another checkpoint's results, before any work."""
    from megatron_unix.evaluation.results import check_owner

    source = getattr(args, "hf", None) or args.load
    record: dict[str, Any] = {
        "source": str(Path(source).resolve()),
        "format": "hf" if getattr(args, "hf", None) else "megatron",
    }
    if args.name:
        record["name"] = args.name
    if record["format"] == "megatron":
        from megatron_unix.training.checkpointing import find_checkpoint, read_common

        found = find_checkpoint(args.load)
        if found is None:
            raise ValueError(f"--load {args.load}: no checkpoint there")
        common = read_common(found, verify=False)
        record["iteration"] = common["iteration"]
        seq_length = (common.get("args") or {}).get("seq_length")
        if seq_length:
            record["tokens_seen"] = common.get("consumed_train_samples", 0) * seq_length
    if args.tokens_seen is not None:
        record["tokens_seen"] = args.tokens_seen
    check_owner(args.output_dir, record)
    return record


def check_paths(args: argparse.Namespace, flags: Iterable[str]) -> None:
    """Refuse a path flag naming nothing, before anything is loaded."""
    for flag in flags:
        path = getattr(args, flag[2:].replace("-", "_"), None)
        if path is not None and not Path(path).exists():
            raise ValueError(f"{flag} {path}: no such file or directory")


MODEL_PATHS = ("--hf", "--load", "--tokenizer", "--vqgan", "--vqgan-config", "--vqgan-checkpoint")


def check_model_flags(args: argparse.Namespace) -> None:
    """The checkpoint and VQGAN flags both evaluations share."""
    if message := vqgan_flags_error(args, required=True):
        raise ValueError(message)
    check_paths(args, MODEL_PATHS)


def load_models(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(LoadedModel, VQGAN)`` on ``--device``; a VQGAN of another codebook than the model's is refused."""
    import torch

    from megatron_unix.cli.generate import load_model
    from megatron_unix.image.vqgan import VQGAN
    from megatron_unix.inference.images import check_codebook
    from megatron_unix.inference.loading import default_device

    device = torch.device(args.device) if args.device else default_device()
    vqgan = VQGAN.load(args.vqgan, args.vqgan_config, args.vqgan_checkpoint, device)
    loaded = load_model(args, device)
    check_codebook(vqgan, loaded.layout.codebook_size)
    return loaded, vqgan


def model_settings(args: argparse.Namespace, record: dict[str, Any], vqgan: Any) -> dict[str, Any]:
    """What decides a model's outputs besides the benchmark's own options: resumed outputs must share it."""
    from megatron_unix.inference.images import vqgan_fingerprint

    return {
        "checkpoint": record["source"],
        "iteration": record.get("iteration"),
        "tokenizer": str(Path(args.tokenizer).resolve()) if args.tokenizer else None,
        "vqgan": vqgan_fingerprint(vqgan),
    }


def build_parser(commands: dict[str, str] = SUBCOMMANDS) -> argparse.ArgumentParser:
    """The parser with ``commands``' subparsers (importing a subcommand's module imports only its needs)."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, module_name in commands.items():
        module = importlib.import_module(module_name)
        subparsers.add_parser(name, help=module.HELP, description=module.HELP).set_defaults(module=module)
        module.add_arguments(subparsers.choices[name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = {argv[0]: SUBCOMMANDS[argv[0]]} if argv and argv[0] in SUBCOMMANDS else SUBCOMMANDS
    args = build_parser(chosen).parse_args(argv)
    return args.module.run(args)


if __name__ == "__main__":
    sys.exit(main())
