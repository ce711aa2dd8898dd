"""Text and vision loss of a run, from its metrics.jsonl: a first -> last summary and a PNG plot.

Drawn with Pillow (installed with tensorboard), so that looking at a run needs no plotting library.
Training points are the logged windows (``text_loss``, ``vision_loss``), validation points the
evaluations (``valid_text_loss``, ``valid_vision_loss``); a record without a value (a window with
no token of that modality) is left out.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SERIES = {
    "text_loss": "train text",
    "vision_loss": "train vision",
    "valid_text_loss": "validation text",
    "valid_vision_loss": "validation vision",
}
"""metrics.jsonl key -> label, in the order of the summary and the legend."""

COLOURS = {"text": (31, 119, 180), "vision": (230, 110, 0)}
GRID, UNIFORM = (225, 225, 225), (120, 120, 120)
SCALE = 2  # drawn at twice the size, then downsampled: smooth lines without an antialiasing renderer
DASHES = {"dashed": (8 * SCALE, 6 * SCALE), "dotted": (3 * SCALE, 5 * SCALE)}
"""(dash, gap) lengths of the broken line styles, in drawing pixels."""

Series = dict[str, list[tuple[int, float]]]


@functools.cache
def _font(points: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font (no system font needed) at ``points`` output pixels."""
    return ImageFont.load_default(size=points * SCALE)


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


def _ticks(low: float, high: float, count: int = 6, min_step: float = 0.0) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart, at least ``min_step``) covering [low, high]."""
    raw = max(high - low, 1e-9) / count
    power = 10 ** math.floor(math.log10(raw))
    step = max(min_step, next(m * power for m in (1, 2, 5, 10) if m * power >= raw))
    return [i * step for i in range(math.ceil(low / step), math.floor(high / step) + 1)]


@dataclass(frozen=True)
class _Axes:
    """The plotting box in drawing pixels and the data ranges it shows, from (0, 0)."""

    left: int
    right: int
    top: int
    bottom: int
    x_high: float
    y_high: float

    def xy(self, iteration: float, value: float) -> tuple[float, float]:
        return (
            self.left + iteration / self.x_high * (self.right - self.left),
            self.bottom - value / self.y_high * (self.bottom - self.top),
        )


def render_png(
    series: Series, output: str | Path, title: str, codebook_size: int | None = None, size: tuple[int, int] = (900, 540)
) -> None:
    """Loss against iteration: training as lines, validation as dashed lines with markers; text blue,
    vision orange; with ``codebook_size``, a dotted line at the uniform vision loss ln(codebook)."""
    if not any(series.values()):
        raise ValueError("no loss values to plot (the metrics file has no text or vision loss)")
    uniform = [math.log(codebook_size)] if codebook_size else []
    image = Image.new("RGB", (size[0] * SCALE, size[1] * SCALE), "white")
    draw = ImageDraw.Draw(image)
    axes = _Axes(
        80 * SCALE,
        image.width - 20 * SCALE,
        45 * SCALE,
        image.height - 60 * SCALE,
        x_high=max(1, *(it for points in series.values() for it, _ in points)),
        y_high=1.08 * max(1e-3, *(v for points in series.values() for _, v in points), *uniform),
    )
    _frame(image, draw, axes, title)
    legend: list[tuple[str, tuple[int, int, int], str]] = []
    for key, points in series.items():
        if points:
            colour, style = COLOURS["vision" if "vision" in key else "text"], "dashed" if "valid" in key else "solid"
            _line(draw, [axes.xy(it, value) for it, value in points], colour, style)
            legend.append((SERIES[key], colour, style))
    for level in uniform:
        _line(draw, [axes.xy(0, level), axes.xy(axes.x_high, level)], UNIFORM, "dotted")
        legend.append((f"uniform over {codebook_size} codes", UNIFORM, "dotted"))
    _legend(draw, legend, axes.right - 10 * SCALE, axes.top + 10 * SCALE)
    image.resize(size, Image.LANCZOS).save(output, format="PNG")


def _frame(image: Image.Image, draw: ImageDraw.ImageDraw, axes: _Axes, title: str) -> None:
    """Grid, ticks, box, axis labels and title."""
    font = _font(15)
    for tick in _ticks(0, axes.y_high):
        level = axes.xy(0, tick)[1]
        draw.line([(axes.left, level), (axes.right, level)], fill=GRID, width=SCALE)
        draw.text((axes.left - 8 * SCALE, level), f"{tick:g}", fill="black", font=_font(13), anchor="rm")
    for tick in _ticks(0, axes.x_high, min_step=1):  # iterations are whole
        position = axes.xy(tick, 0)[0]
        draw.line([(position, axes.top), (position, axes.bottom)], fill=GRID, width=SCALE)
        draw.text((position, axes.bottom + 8 * SCALE), f"{tick:g}", fill="black", font=_font(13), anchor="mt")
    draw.rectangle([axes.left, axes.top, axes.right, axes.bottom], outline="black", width=SCALE)
    middle = (axes.left + axes.right) / 2
    draw.text((middle, image.height - 12 * SCALE), "iteration", fill="black", font=font, anchor="md")
    draw.text((middle, axes.top / 2), title, fill="black", font=font, anchor="mm")
    y_label = Image.new("RGB", (axes.bottom - axes.top, 24 * SCALE), "white")
    ImageDraw.Draw(y_label).text(
        (y_label.width / 2, y_label.height / 2), "loss (nats per token)", fill="black", font=font, anchor="mm"
    )
    image.paste(y_label.rotate(90, expand=True), (8 * SCALE, axes.top))


def _line(draw: ImageDraw.ImageDraw, xy: list[tuple[float, float]], colour: tuple[int, int, int], style: str) -> None:
    """A polyline: solid (training), dashed with a marker on every point (validation) or dotted."""
    width = 2 * SCALE
    if style == "solid" and len(xy) > 1:
        draw.line(xy, fill=colour, width=width, joint="curve")
    elif style != "solid":
        dash, gap = DASHES[style]
        for (x0, y0), (x1, y1) in itertools.pairwise(xy):
            length = math.hypot(x1 - x0, y1 - y0) or 1.0
            for start in range(0, int(length), dash + gap):
                a, b = start / length, min(start + dash, length) / length
                draw.line(
                    [(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                    fill=colour,
                    width=width,
                )
    if style == "dashed" or len(xy) == 1:
        radius = 3.5 * SCALE
        for px, py in xy:
            draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=colour)


def _legend(
    draw: ImageDraw.ImageDraw, entries: list[tuple[str, tuple[int, int, int], str]], right: float, top: float
) -> None:
    """The entries in a framed box whose top-right corner is (right, top)."""
    font, line_height, sample = _font(13), 20 * SCALE, 36 * SCALE
    box_left = right - max(draw.textlength(label, font=font) for label, _, _ in entries) - sample - 24 * SCALE
    draw.rectangle(
        [box_left, top, right, top + line_height * len(entries) + 10 * SCALE],
        fill="white",
        outline=(160, 160, 160),
        width=SCALE,
    )
    for i, (label, colour, style) in enumerate(entries):
        middle, start = top + 5 * SCALE + line_height * (i + 0.5), box_left + 8 * SCALE
        _line(draw, [(start, middle), (start + sample, middle)], colour, style)
        draw.text((start + sample + 8 * SCALE, middle), label, fill="black", font=font, anchor="lm")
