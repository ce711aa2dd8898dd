#!/usr/bin/env python
"""Regenerate the quickstart's shipped data (deterministic): English-like text documents and
image-text pairs whose "images" are 32x32 grids of VQ codes drawn from a shape-and-colour scene.

The codes are synthetic but learnable in a few minutes on a CPU, so the quickstart shows the image
side learning: each colour owns a 2x2 tile of four codes of the 8192-entry codebook (32 codes are
used in all), repeated over the colour's area, and the caption names both colours and the shape.
A code is then predictable from the caption and the codes before it.

    python examples/data/make_quickstart_data.py examples/data
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

CODEBOOK, SIZE, PAIRS = 8192, 32, 192
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
SHAPES = ["square", "circle", "stripe", "cross"]
SUBJECTS = ["The old fisherman", "A young engineer", "The village teacher", "My neighbour", "The travelling musician",
            "A curious child", "The ship's captain", "An elderly painter", "The baker", "A quiet student"]
VERBS = ["walked along", "looked across", "wrote about", "dreamed of", "painted", "remembered", "crossed",
         "sang about", "photographed", "described"]
OBJECTS = ["the frozen river", "the crowded market", "the narrow bridge", "the distant mountains", "the harbour",
           "the ruined castle", "the wheat fields", "the busy station", "the silent forest", "the lighthouse"]
CLAUSES = ["before the sun rose", "while the rain kept falling", "after a long winter", "on a quiet afternoon",
           "when the bells rang", "as the tide came in", "during the summer festival", "late in the evening"]


def sentence(rng: random.Random) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(CLAUSES)}."


def inside(shape: str, row: int, col: int) -> bool:
    if shape == "square":
        return 8 <= row < 24 and 8 <= col < 24
    if shape == "circle":
        return (row - 15.5) ** 2 + (col - 15.5) ** 2 < 81
    if shape == "stripe":
        return 12 <= row < 20
    return 13 <= row < 19 or 13 <= col < 19


def image(shape: str, fg: list[int], bg: list[int]) -> list[int]:
    """Row-major codes: the 2x2 tile of the colour at each cell, at the cell's position in the tile."""
    return [(fg if inside(shape, r, c) else bg)[2 * (r % 2) + c % 2] for r in range(SIZE) for c in range(SIZE)]


def main(out: Path) -> None:
    rng = random.Random(2026)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "text.jsonl", "w") as f:
        for _ in range(400):
            f.write(json.dumps({"text": " ".join(sentence(rng) for _ in range(rng.randint(3, 8)))}) + "\n")
    codes = rng.sample(range(CODEBOOK), 4 * len(COLOURS))
    tiles = [codes[4 * i:4 * i + 4] for i in range(len(COLOURS))]
    with gzip.GzipFile(out / "image_text.jsonl.gz", "wb", mtime=0) as f:  # mtime 0: the same bytes every time
        for _ in range(PAIRS):
            shape = rng.choice(SHAPES)
            fg, bg = rng.sample(range(len(COLOURS)), 2)
            caption = f"a {COLOURS[fg]} {shape} on a {COLOURS[bg]} background"
            f.write((json.dumps({"caption": caption, "vqcode": image(shape, tiles[fg], tiles[bg])}) + "\n").encode())


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent))
