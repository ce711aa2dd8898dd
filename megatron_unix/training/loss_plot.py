"""Text and vision loss of a run, from its metrics.jsonl: a first -> last summary and a PNG plot.

Training points are the logged windows (``text_loss``, ``vision_loss``), validation points the
evaluations (``valid_text_loss``, ``valid_vision_loss``); a record without a value (a window with
no token of that modality) is left out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from megatron_unix.plotting import PALETTE, Curve, render_lines

SERIES = {
    "text_loss": "train text",
    "vision_loss": "train vision",
    "valid_text_loss": "validation text",
    "valid_vision_loss": "validation vision",
}
"""metrics.jsonl key -> label, in the order of the summary and the legend."""

COLOURS = {"text": PALETTE[0], "vision": PALETTE[1]}
UNIFORM = (120, 120, 120)

Series = dict[str, list[tuple[int, float]]]


def read_series(metrics_file: str | Path) -> Series:
    """(iteration, loss) per key of :data:`SERIES`, by iteration (a later record of one iteration wins)."""
    points: dict[str, dict[int, float]] = {key: {} for key in SERIES}
    for line in Path(metrics_file).read_text().splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        for key in SERIES:
            if record.get(key) is not None:
                points[key][record["iteration"]] = float(record[key])
    return {key: sorted(values.items()) for key, values in points.items()}


def summary(series: Series, codebook_size: int | None = None) -> str:
    """One line per series: its first and last value, with their iterations."""
    lines = [f"{SERIES[key]:<18} {_first_last(points)}" for key, points in series.items()]
    if codebook_size:
        lines.append(f"{'uniform vision':<18} {math.log(codebook_size):.3f} (ln {codebook_size}: nothing learnt)")
    return "\n".join(lines)


def _first_last(points: list[tuple[int, float]]) -> str:
    if not points:
        return "n/a"
    (first_it, first), (last_it, last) = points[0], points[-1]
    return f"{first:.3f} (iteration {first_it}) -> {last:.3f} (iteration {last_it})"


def render_png(
    series: Series, output: str | Path, title: str, codebook_size: int | None = None, size: tuple[int, int] = (900, 540)
) -> None:
    """Loss against iteration: training as lines, validation as dashed lines with markers; text blue,
    vision orange; with ``codebook_size``, a dotted line at the uniform vision loss ln(codebook)."""
    curves = [
        Curve(
            SERIES[key],
            points,
            COLOURS["vision" if "vision" in key else "text"],
            "dashed" if "valid" in key else "solid",
        )
        for key, points in series.items()
        if points
    ]
    _render(curves, output, title, codebook_size, size)


def render_comparison(
    runs: Mapping[str, Series],
    output: str | Path,
    title: str,
    codebook_size: int | None = None,
    size: tuple[int, int] = (900, 540),
) -> None:
    """Several runs' training losses on one plot: a colour per run, text solid, vision dotted."""
    curves = [
        Curve(f"{label} {modality}", series[f"{modality}_loss"], PALETTE[i % len(PALETTE)], style)
        for i, (label, series) in enumerate(runs.items())
        for modality, style in (("text", "solid"), ("vision", "dotted"))
        if series[f"{modality}_loss"]
    ]
    _render(curves, output, title, codebook_size, size)


def _render(
    curves: list[Curve], output: str | Path, title: str, codebook_size: int | None, size: tuple[int, int]
) -> None:
    if not curves:
        raise ValueError("no loss values to plot (the metrics file has no text or vision loss)")
    if codebook_size:
        x_high = max(it for curve in curves for it, _ in curve.points)
        level = math.log(codebook_size)
        curves.append(Curve(f"uniform over {codebook_size} codes", [(0, level), (x_high, level)], UNIFORM, "dotted"))
    render_lines(curves, output, title, "iteration", "loss (nats per token)", size, whole_x=True)
