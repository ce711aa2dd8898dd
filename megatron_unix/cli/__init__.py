"""The command-line programs. Each is ``python -m megatron_unix.cli.NAME``, a console script of the
package (``unix-NAME``; see pyproject.toml) and a thin file in ``tools/`` (``pretrain_unix.py`` at the top)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable


def out_of_range(args: argparse.Namespace, checks: Iterable[tuple[str, bool]]) -> str | None:
    """``FLAG VALUE is out of range`` for the first ``(flag, ok)`` check that failed, else None."""
    for flag, ok in checks:
        if not ok:
            return f"{flag} {getattr(args, flag[2:].replace('-', '_'))} is out of range"
    return None


def refuse_out_of_range(
    parser: argparse.ArgumentParser, args: argparse.Namespace, checks: Iterable[tuple[str, bool]]
) -> None:
    """Exit through ``parser.error`` (status 2) at the first failed check (:func:`out_of_range`)."""
    message = out_of_range(args, checks)
    if message:
        parser.error(message)
