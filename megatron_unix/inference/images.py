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


def encode_images(vqgan, images: Sequence[Image.Image], batch_size: int = 8) -> list[list[int]]:
    """Codes of in-memory images (benchmark questions), cropped as files are
    (:func:`megatron_unix.image.transforms.crop_bytes`), encoded ``batch_size`` at a time."""
    import numpy as np

    from megatron_unix.image.encode import encode_crops
    from megatron_unix.image.transforms import crop_bytes

    codes: list[list[int]] = []
    for start in range(0, len(images), batch_size):
        crops = np.stack([crop_bytes(image, vqgan.image_size) for image in images[start : start + batch_size]])
        codes += encode_crops(vqgan, crops).tolist()
    return codes


def vqgan_fingerprint(vqgan) -> str:
    """A short hash of the VQGAN's config and weights: which image tokenizer made some codes, whatever
    path it was loaded from (a resumed evaluation must not mix two)."""
    import hashlib
    import json
    from dataclasses import asdict

    digest = hashlib.blake2b(json.dumps(asdict(vqgan.config), sort_keys=True).encode(), digest_size=8)
    for name, tensor in sorted(vqgan.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_codebook(vqgan, codebook_size: int) -> None:
    """Refuse a VQGAN whose codebook is not the model's image vocabulary."""
    if vqgan.config.n_embed != codebook_size:
        raise ValueError(
            f"the VQGAN has {vqgan.config.n_embed} codes, the model's codebook {codebook_size}: "
            "not the image tokenizer the model was trained with"
        )


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
