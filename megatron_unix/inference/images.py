"""Image files <-> VQ codes through the VQGAN (spec §6), and the grid of a prompt's samples.

The VQGAN runs in fp32 on every device: its quantizer picks the nearest codebook entry, and bf16
latents move enough of them to another code to change what a model sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image


def encode_files(vqgan, paths: Sequence[str | Path], batch_size: int = 8) -> list[list[int]]:
    """Codes (0-based, ``codes_per_image`` each) of image files, read and cropped as ``encode_images``
    does (:func:`megatron_unix.image.encode.load`), encoded ``batch_size`` at a time."""
    from megatron_unix.image.encode import Filters, Item, encode_crops, load_chunk

    filters = Filters(size=vqgan.image_size, min_size=1, max_aspect=float("inf"))  # any image: no filtering
    codes: list[list[int]] = []
    for start in range(0, len(paths), batch_size):
        batch = paths[start : start + batch_size]
        chunk = load_chunk([Item(str(path), {}, path=str(path)) for path in batch], filters)
        if chunk.bad:
            index, _, why = chunk.bad[0]
            raise ValueError(f"--image {batch[index]}: {why}")
        codes += encode_crops(vqgan, chunk.crops).tolist()
    return codes


def decode_codes(vqgan, codes: Sequence[Sequence[int]], batch_size: int = 8) -> list[Image.Image]:
    """RGB images of code sequences (0-based), ``batch_size`` at a time."""
    from megatron_unix.image.transforms import to_image

    device = next(vqgan.parameters()).device
    images = []
    for start in range(0, len(codes), batch_size):
        batch = torch.tensor([list(c) for c in codes[start : start + batch_size]], device=device)
        images += [to_image(pixels) for pixels in vqgan.decode(batch)]
    return images


def image_grid(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Images of equal size, row-major, ``columns`` per row."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid
