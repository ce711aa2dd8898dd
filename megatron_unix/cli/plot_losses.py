"""Print the first and last text and vision losses of a run and plot them against iteration (PNG).

    python tools/plot_losses.py SAVE/metrics.jsonl --output loss.png [--codebook-size 8192]

Reads the metrics.jsonl that pretrain_unix.py writes (training windows and validations); with
--codebook-size, the uniform vision loss ln(codebook) is drawn and printed for reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_unix.training.loss_plot import read_series, render_png, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("metrics_file", type=Path, help="metrics.jsonl of a run (default place: SAVE/metrics.jsonl)")
    p.add_argument("--output", type=Path, help="PNG to write (default: loss.png beside the metrics file)")
    p.add_argument("--codebook-size", type=int, default=None, help="draw the uniform vision loss ln(this)")
    args = p.parse_args(argv)
    output = args.output or args.metrics_file.with_name("loss.png")
    try:
        series = read_series(args.metrics_file)
        render_png(series, output, f"Uni-X loss: {args.metrics_file}", args.codebook_size)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary(series, args.codebook_size))
    print(f"{'plot':<18} {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
