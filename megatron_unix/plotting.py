"""Line plots as PNG files, drawn with Pillow (installed with tensorboard), so that looking at a run, an
analysis or an evaluation needs no plotting library. Every plot of the stack goes through
:func:`render_lines`: the loss curves, the conflict and entropy figures, the evaluation progress."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from megatron_unix.files import write_atomically

Colour = tuple[int, int, int]
PALETTE: tuple[Colour, ...] = (
    (31, 119, 180),
    (230, 110, 0),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
"""Distinct line colours (matplotlib's tab10), for curves without a colour of their own."""
GRID = (225, 225, 225)
SCALE = 2  # drawn at twice the size, then downsampled: smooth lines without an antialiasing renderer
DASHES = {"dashed": (8 * SCALE, 6 * SCALE), "dotted": (3 * SCALE, 5 * SCALE)}
"""(dash, gap) lengths of the broken line styles, in drawing pixels."""


@dataclass(frozen=True)
class Curve:
    """One labelled line: ``solid``, ``dashed`` (with a marker on every point) or ``dotted``."""

    label: str
    points: Sequence[tuple[float, float]]
    colour: Colour = PALETTE[0]
    style: str = "solid"


@functools.cache
def _font(points: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font (no system font needed) at ``points`` output pixels."""
    return ImageFont.load_default(size=points * SCALE)


def ticks(low: float, high: float, count: int = 6, min_step: float = 0.0) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart, at least ``min_step``) covering [low, high]."""
    raw = max(high - low, 1e-9) / count
    power = 10 ** math.floor(math.log10(raw))
    step = max(min_step, next(m * power for m in (1, 2, 5, 10) if m * power >= raw))
    return [i * step for i in range(math.ceil(low / step - 1e-9), math.floor(high / step + 1e-9) + 1)]


@dataclass(frozen=True)
class _Axes:
    """The plotting box in drawing pixels and the data ranges it shows."""

    left: int
    right: int
    top: int
    bottom: int
    x_low: float
    x_high: float
    y_low: float
    y_high: float

    def xy(self, x: float, y: float) -> tuple[float, float]:
        return (
            self.left + (x - self.x_low) / (self.x_high - self.x_low) * (self.right - self.left),
            self.bottom - (y - self.y_low) / (self.y_high - self.y_low) * (self.bottom - self.top),
        )


def _range(values: list[float], from_zero: bool) -> tuple[float, float]:
    """The shown range: from 0 (or the lowest value, if negative or ``from_zero`` is off) with a margin."""
    low, high = min(values), max(values)
    if from_zero and low >= 0:
        low = 0.0
    margin = 0.08 * (high - low) or max(abs(high), 1.0) * 0.08
    return (low if low == 0 else low - margin), high + margin


def render_lines(
    curves: Sequence[Curve],
    output: str | Path,
    title: str,
    x_label: str,
    y_label: str,
    size: tuple[int, int] = (900, 540),
    whole_x: bool = False,
    y_from_zero: bool = True,
) -> None:
    """Draw ``curves`` with a grid, ticks, axis labels and a legend, and write the PNG atomically.
    ``whole_x``: x ticks at whole numbers only (iterations, n-gram orders, layers)."""
    points = [p for curve in curves for p in curve.points]
    if not points:
        raise ValueError(f"nothing to plot in {output}: no curve has a point")
    x_low, x_high = _range([x for x, _ in points], from_zero=True)
    y_low, y_high = _range([y for _, y in points], from_zero=y_from_zero)
    image = Image.new("RGB", (size[0] * SCALE, size[1] * SCALE), "white")
    draw = ImageDraw.Draw(image)
    left = 80 * SCALE
    axes = _Axes(left, image.width - 20 * SCALE, 45 * SCALE, image.height - 60 * SCALE, x_low, x_high, y_low, y_high)
    _frame(image, draw, axes, title, x_label, y_label, whole_x)
    drawn = [[axes.xy(x, y) for x, y in curve.points] for curve in curves]
    for curve, xy in zip(curves, drawn):
        _line(draw, xy, curve.colour, curve.style)
    _legend(draw, curves, axes, [p for xy in drawn for p in _dense(xy)])
    write_atomically(output, lambda temporary: image.resize(size, Image.LANCZOS).save(temporary, format="PNG"))


def _frame(
    image: Image.Image, draw: ImageDraw.ImageDraw, axes: _Axes, title: str, x_label: str, y_label: str, whole_x: bool
) -> None:
    """Grid, ticks, box, axis labels and title."""
    font = _font(15)
    for tick in ticks(axes.y_low, axes.y_high):
        level = axes.xy(axes.x_low, tick)[1]
        draw.line([(axes.left, level), (axes.right, level)], fill=GRID, width=SCALE)
        draw.text((axes.left - 8 * SCALE, level), f"{tick:g}", fill="black", font=_font(13), anchor="rm")
    for tick in ticks(axes.x_low, axes.x_high, min_step=1 if whole_x else 0):
        position = axes.xy(tick, axes.y_low)[0]
        draw.line([(position, axes.top), (position, axes.bottom)], fill=GRID, width=SCALE)
        draw.text((position, axes.bottom + 8 * SCALE), f"{tick:g}", fill="black", font=_font(13), anchor="mt")
    draw.rectangle([axes.left, axes.top, axes.right, axes.bottom], outline="black", width=SCALE)
    middle = (axes.left + axes.right) / 2
    draw.text((middle, image.height - 12 * SCALE), x_label, fill="black", font=font, anchor="md")
    draw.text((middle, axes.top / 2), title, fill="black", font=font, anchor="mm")
    label = Image.new("RGB", (axes.bottom - axes.top, 24 * SCALE), "white")
    ImageDraw.Draw(label).text((label.width / 2, label.height / 2), y_label, fill="black", font=font, anchor="mm")
    image.paste(label.rotate(90, expand=True), (8 * SCALE, axes.top))


def _line(draw: ImageDraw.ImageDraw, xy: list[tuple[float, float]], colour: Colour, style: str) -> None:
    """A polyline: solid, dashed with a marker on every point, or dotted; a lone point is a marker."""
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


def _dense(xy: list[tuple[float, float]], step: float = 6 * SCALE) -> list[tuple[float, float]]:
    """Points along a polyline every ``step`` pixels (what a legend box would hide)."""
    out = list(xy[:1])
    for (x0, y0), (x1, y1) in itertools.pairwise(xy):
        n = max(1, int(math.hypot(x1 - x0, y1 - y0) / step))
        out += [(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n) for i in range(1, n + 1)]
    return out


def _legend(draw: ImageDraw.ImageDraw, curves: Sequence[Curve], axes: _Axes, points: list[tuple[float, float]]) -> None:
    """The curves' labels in a framed box, in the corner of the plot that hides the fewest line points."""
    font, line_height, sample, margin = _font(13), 20 * SCALE, 36 * SCALE, 10 * SCALE
    width = max(draw.textlength(curve.label, font=font) for curve in curves) + sample + 24 * SCALE
    height = line_height * len(curves) + 10 * SCALE
    corners = [
        (axes.right - margin - width, axes.top + margin),
        (axes.left + margin, axes.top + margin),
        (axes.right - margin - width, axes.bottom - margin - height),
        (axes.left + margin, axes.bottom - margin - height),
    ]

    def hidden(corner: tuple[float, float]) -> int:
        left, top = corner
        return sum(left <= x <= left + width and top <= y <= top + height for x, y in points)

    box_left, top = min(corners, key=hidden)
    draw.rectangle([box_left, top, box_left + width, top + height], fill="white", outline=(160, 160, 160), width=SCALE)
    for i, curve in enumerate(curves):
        middle, start = top + 5 * SCALE + line_height * (i + 0.5), box_left + 8 * SCALE
        _line(draw, [(start, middle), (start + sample, middle)], curve.colour, curve.style)
        draw.text((start + sample + 8 * SCALE, middle), curve.label, fill="black", font=font, anchor="lm")
