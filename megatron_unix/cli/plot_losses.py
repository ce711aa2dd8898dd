"""Print the first and last text and vision losses of a run and plot them against iteration (PNG).

    python tools/plot_losses.py SAVE/metrics.jsonl --output loss.png [--codebook-size 8192]
    python tools/plot_losses.py A/metrics.jsonl B/metrics.jsonl --labels unix,mot --output compare.png

Reads the metrics.jsonl that pretrain_unix.py writes (training windows and validations); with
--codebook-size, the uniform vision loss ln(codebook) is drawn and printed for reference. Several
files are drawn on one plot (their training losses, a colour per run) and summarised one after another.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_unix.cli import refuse_out_of_range
from megatron_unix.training.loss_plot import read_series, render_comparison, render_png, summary, uniform_line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "metrics_file", type=Path, nargs="+", help="metrics.jsonl of a run (default place: SAVE/metrics.jsonl)"
    )
    p.add_argument("--labels", help="comma-separated names of the runs (default: the metrics files' folder names)")
    p.add_argument("--output", type=Path, help="PNG to write (default: loss.png beside the first metrics file)")
    p.add_argument("--codebook-size", type=int, default=None, help="draw the uniform vision loss ln(this)")
    args = p.parse_args(argv)
    refuse_out_of_range(p, args, [("--codebook-size", args.codebook_size is None or args.codebook_size >= 2)])
    files = args.metrics_file
    labels = args.labels.split(",") if args.labels else [path.parent.name or str(path) for path in files]
    if len(labels) != len(files):
        p.error(f"--labels names {len(labels)} runs for {len(files)} metrics files")
    output = args.output or files[0].with_name("loss.png")
    try:
        runs = {label: read_series(path) for label, path in zip(labels, files)}
        if len(files) == 1:
            render_png(runs[labels[0]], output, f"Uni-X loss: {files[0]}", args.codebook_size)
        else:
            render_comparison(runs, output, "training loss per modality", args.codebook_size)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for label, series in runs.items():
        print(summary(series) if len(runs) == 1 else f"== {label}\n{summary(series)}")
    if args.codebook_size:
        print(uniform_line(args.codebook_size))
    print(f"{'plot':<18} {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
