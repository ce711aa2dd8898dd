"""``tools/evaluate.py report``: several checkpoints' results side by side (a table beside the paper's,
a table of every score and loss, and plots against tokens seen)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "gather the results of several checkpoints: tables beside the paper, loss and scores vs tokens seen"
KEPT = "each file written so far is whole"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folders", nargs="+", type=Path, help="output folders of the other subcommands")
    parser.add_argument("--output-dir", type=Path, required=True, help="report.json, report.md, loss.png, scores.png")
    parser.add_argument("--title", default="Uni-X evaluation", help="plot title")


def run(args: argparse.Namespace) -> int:
    from megatron_unix.cli import not_a_folder
    from megatron_unix.evaluation.progress import CheckpointResults, render_progress, tables
    from megatron_unix.evaluation.report import write_results
    from megatron_unix.files import write_text_atomically

    try:
        if message := not_a_folder("--output-dir", args.output_dir):
            raise ValueError(message)
        checkpoints = [CheckpointResults.read(folder) for folder in args.folders]
        checkpoints.sort(key=lambda c: (c.tokens_seen or 0, c.iteration or 0))
        names = [c.name for c in checkpoints]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            clashes = [str(c.folder) for c in checkpoints if c.name in twice]
            raise ValueError(
                f"checkpoints named alike ({', '.join(twice)}: {', '.join(clashes)}): evaluate with --name"
            )
        args.output_dir.mkdir(parents=True, exist_ok=True)
        plots = render_progress(checkpoints, args.output_dir, args.title)
        table = tables(checkpoints)
        write_text_atomically(args.output_dir / "report.md", table)
        records = [
            {"name": c.name, "folder": str(c.folder), "tokens_seen": c.tokens_seen, "iteration": c.iteration}
            | {"summary": c.summary, "mmb_reading": c.mmb_reading, "scores": c.scores, "losses": c.losses}
            for c in checkpoints
        ]
        write_results(args.output_dir / "report.json", {"checkpoints": records})
    except (ValueError, OSError) as error:
        print(f"evaluate report: error: {error}", file=sys.stderr, flush=True)
        return 2
    print(table, end="")
    for path in plots:
        print(f"plot {path}")
    return 0
