"""The command-line programs. Each is ``python -m megatron_unix.cli.NAME``, a console script of the
package (``unix-NAME``; see pyproject.toml) and a thin file in ``tools/`` (``pretrain_unix.py`` at the top)."""

from __future__ import annotations

import argparse
import errno
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from megatron_unix.signals import Interrupted, stop_on_signals  # noqa: F401  (the programs' names for them)


def out_of_range(args: argparse.Namespace, checks: Iterable[tuple[str, bool]]) -> str | None:
    """``FLAG VALUE is out of range`` for the first ``(flag, ok)`` check that failed, else None."""
    for flag, ok in checks:
        if not ok:
            return f"{flag} {getattr(args, flag[2:].replace('-', '_'))} is out of range"
    return None


def sampling_checks(args: argparse.Namespace) -> tuple[tuple[str, bool], ...]:
    """The range rules of the sampling flags (generate, evaluate generation), for :func:`out_of_range`:
    finite numbers where they mean something (NaN and infinities are refused: they sample garbage)."""
    temperature, top_p = args.temperature, args.top_p
    return (
        ("--cfg-scale", math.isfinite(args.cfg_scale) and args.cfg_scale >= 0),
        ("--temperature", temperature is None or (math.isfinite(temperature) and temperature > 0)),
        ("--top-k", args.top_k is None or args.top_k >= 0),
        ("--top-p", top_p is None or 0 < top_p <= 1),
    )


def refuse_out_of_range(
    parser: argparse.ArgumentParser, args: argparse.Namespace, checks: Iterable[tuple[str, bool]]
) -> None:
    """Exit through ``parser.error`` (status 2) at the first failed check (:func:`out_of_range`)."""
    message = out_of_range(args, checks)
    if message:
        parser.error(message)


FULL_DISK = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
"""A full disk, a file past the size limit, a full quota."""


def os_error_message(error: OSError, writing: str) -> str:
    """``error`` in one line that names a file: a full disk reported without one (as writes into an open
    file are; numpy reports a short write without even an errno) names ``writing``, what the program
    was writing (the flag and path)."""
    short_write = type(error) is OSError and error.errno is None  # numpy's "N requested and M written"
    if error.filename is None and (error.errno in FULL_DISK or short_write):
        what = error.strerror if error.errno else f"a write fell short ({error}: a full disk?)"
        return f"{what} while writing {writing}"
    return str(error)


def stops_in_one_line(
    program: str,
    parse: Callable[[Sequence[str] | None], argparse.Namespace],
    kept: Callable[[argparse.Namespace], str],
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[Sequence[str] | None], int]]:
    """Makes a program's ``main(argv)`` of its ``parse(argv)`` and of the decorated ``main(args) -> exit
    status``: SIGTERM or SIGINT (Ctrl-C) during either unwinds it (:class:`Interrupted`: its ``with`` and
    ``finally`` blocks remove what is unfinished) and ends it in one line on stderr, ``PROGRAM: stopped
    by SIGINT; KEPT`` (``kept(args)``, read after the unwinding: what the stop left; "nothing written"
    while parsing), with the shell's status of that signal (130, 143) and no traceback."""

    def decorate(run: Callable[[argparse.Namespace], int]) -> Callable[[Sequence[str] | None], int]:
        def main(argv: Sequence[str] | None = None) -> int:
            args = None
            try:
                with stop_on_signals():
                    args = parse(argv)
                    return run(args)
            except Interrupted as stop:
                print(f"{program}: {stop}; {'nothing written' if args is None else kept(args)}", file=sys.stderr)
                return stop.exit_status

        main.__doc__ = run.__doc__
        return main

    return decorate


def add_vqgan_arguments(group: argparse._ActionsContainer) -> None:
    """The VQGAN of the programs that turn images into codes or codes into images: a ``save_pretrained``
    folder, or the Chameleon release's two files."""
    group.add_argument("--vqgan", type=Path, help="VQGAN folder (save_pretrained: config.json, model.safetensors)")
    group.add_argument("--vqgan-config", type=Path, help="Chameleon's tokenizer/vqgan.yaml (with --vqgan-checkpoint)")
    group.add_argument("--vqgan-checkpoint", type=Path, help="Chameleon's tokenizer/vqgan.ckpt")


def vqgan_flags_error(args: argparse.Namespace, required: bool) -> str | None:
    """What is wrong with the VQGAN flags of :func:`add_vqgan_arguments`, if anything."""
    if (args.vqgan_config is None) != (args.vqgan_checkpoint is None):
        return "--vqgan-config and --vqgan-checkpoint go together"
    if args.vqgan and args.vqgan_config:
        return "give --vqgan or --vqgan-config/--vqgan-checkpoint, not both"
    if required and not (args.vqgan or args.vqgan_config):
        return "give --vqgan, or --vqgan-config with --vqgan-checkpoint"
    return None


def missing_path(paths: Iterable[tuple[str, str | Path | None]]) -> str | None:
    """``FLAG PATH: no such file or directory`` for the first given ``(flag, path)`` that does not exist."""
    for flag, path in paths:
        if path is not None and not Path(path).exists():
            return f"{flag} {path}: no such file or directory"
    return None


def not_a_folder(flag: str, path: Path | None) -> str | None:
    """``FLAG PATH: ...`` when an output folder flag names something that is not a folder."""
    if path is not None and path.exists() and not path.is_dir():
        return f"{flag} {path}: a file, not a folder"
    return None


def missing_flag_path(args: argparse.Namespace, flags: Iterable[str]) -> str | None:
    """:func:`missing_path` of the path flags named (``--hf``: ``args.hf``; a list value: each path)."""
    given = []
    for flag in flags:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        given += [(flag, path) for path in (value if isinstance(value, list) else [value])]
    return missing_path(given)


def add_verify_argument(parser: argparse._ActionsContainer) -> None:
    """``--no-verify-checkpoint``: every program that reads a Megatron checkpoint has it."""
    parser.add_argument(
        "--no-verify-checkpoint",
        action="store_false",
        dest="verify_checkpoint",
        help="--load without checking the checkpoint's files against its checksums.json",
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model to run: an HF directory (``--hf``) or a Megatron checkpoint (``--load``), its tokenizer,
    device and seed (the generation and evaluation programs; ``inference.loading.load_model`` reads them)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="Uni-X HF directory (an export of this stack, or the reference's format)")
    source.add_argument("--load", help="Megatron checkpoint: save directory or iter_* directory")
    parser.add_argument("--tokenizer", help="text tokenizer (default: the HF directory's, or the one --load records)")
    add_verify_argument(parser)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=1234)


MODEL_PATHS = ("--hf", "--load", "--tokenizer", "--vqgan", "--vqgan-config", "--vqgan-checkpoint")
"""The path flags of :func:`add_model_arguments` and :func:`add_vqgan_arguments`, refused when they name nothing."""


RUN_FLAGS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "sequence_parallel",
    "transformer_impl",
    "attention_backend",
)
"""The flags of :func:`add_run_arguments`, as pretrain_unix.py names them."""


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Parallelism and kernels of the programs that run a Megatron checkpoint as training runs it (any
    TP/PP under torchrun); not given, training's defaults, or the checkpoint's recorded run's."""
    run = parser.add_argument_group("parallelism and kernels (as pretrain_unix.py's flags)")
    run.add_argument("--tensor-model-parallel-size", type=int, help="TP (default: 1)")
    run.add_argument("--pipeline-model-parallel-size", type=int, help="PP (default: 1)")
    run.add_argument("--sequence-parallel", action="store_true", default=None)
    run.add_argument("--transformer-impl", choices=["local", "transformer_engine"])
    run.add_argument("--attention-backend", help="default: the checkpoint's")


def given_run_flags(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The training flags among ``names`` that were given (not None), for ``from_checkpoint.open_run``."""
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}
