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
    """(iteration, loss) per key of :data:`SERIES`, by iteration (a later record of one iteration wins).
    A line that is not such a record is refused by file and line (ValueError), and a file without
    any loss value too."""
    points: dict[str, dict[int, float]] = {key: {} for key in SERIES}
    for number, line in enumerate(Path(metrics_file).read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{metrics_file}:{number}"
        try:
            record = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{where}: not a JSON record ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise ValueError(f'{where}: not a metrics record (no integer "iteration")')
        for key in SERIES:
            value = record.get(key)
            if value is not None:
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ValueError(f"{where}: {key} is {value!r}, not a number")
                points[key][record["iteration"]] = float(value)
    if not any(points.values()):
        raise ValueError(f"{metrics_file}: no text or vision loss in it (a run's metrics.jsonl has them)")
    return {key: sorted(values.items()) for key, values in points.items()}


def summary(series: Series, codebook_size: int | None = None) -> str:
    """One line per series: its first and last value, with their iterations (and how many values are
    not finite: they are not drawn); with ``codebook_size``, the uniform vision loss."""
    lines = []
    for key, points in series.items():
        lines.append(f"{SERIES[key]:<18} {_first_last(points)}")
        bad = [it for it, value in points if not math.isfinite(value)]
        if bad:
            lines[-1] += f" ({len(bad)} not finite, not drawn: iteration {', '.join(map(str, bad[:5]))}"
            lines[-1] += ", ...)" if len(bad) > 5 else ")"
    if codebook_size:
        lines.append(uniform_line(codebook_size))
    return "\n".join(lines)


def uniform_line(codebook_size: int) -> str:
    """The loss of guessing the codes uniformly, ln(codebook_size): where a vision loss starts."""
    return f"{'uniform vision':<18} {math.log(codebook_size):.3f} (ln {codebook_size}: nothing learnt)"


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
    curves = [
        Curve(c.label, finite, c.colour, c.style)
        for c in curves
        if (finite := [(x, y) for x, y in c.points if math.isfinite(y)])
    ]
    if not curves:
        raise ValueError(f"no finite loss value to plot in {output}")
    if codebook_size:
        x_high = max(it for curve in curves for it, _ in curve.points)
        level = math.log(codebook_size)
        curves.append(Curve(f"uniform over {codebook_size} codes", [(0, level), (x_high, level)], UNIFORM, "dotted"))
    render_lines(curves, output, title, "iteration", "loss (nats per token)", size, whole_x=True)
