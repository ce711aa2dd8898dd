"""A random, untrained VQGAN small enough for a CPU: for trying encode_images, text-to-image, image-to-text
and the understanding/generation evaluations without Chameleon's release. Its codes mean nothing; its
folder says so (``config.json``'s ``untrained`` note and a ``README.md``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_unix.files import write_text_atomically
from megatron_unix.image.vqgan import CONFIG_FILE, VQGAN, VQGANConfig

NOTE = "RANDOM, UNTRAINED VQGAN (tools/make_tiny_vqgan.py): for trying the pipeline only; its codes mean nothing"
SAMPLE_IMAGES = 16
"""Random images whose latents seed the codebook."""


def random_vqgan(codebook_size: int = 8192, grid: int = 32, seed: int = 0) -> VQGAN:
    """``grid`` x ``grid`` codes per image of ``2 * grid`` pixels, ``codebook_size`` codes. The codebook
    entries are latents of random images, so that images use many codes (a random codebook would give
    every image the same few)."""
    config = VQGANConfig(
        n_embed=codebook_size,
        embed_dim=8,
        z_channels=8,
        ch=32,
        ch_mult=(1, 1),
        num_res_blocks=1,
        resolution=2 * grid,
    )
    torch.manual_seed(seed)
    model = VQGAN(config)
    with torch.no_grad():
        images = torch.rand(max(SAMPLE_IMAGES, -(-codebook_size // grid**2)), 3, 2 * grid, 2 * grid) * 2 - 1
        latents = model.latents(images).permute(0, 2, 3, 1).reshape(-1, config.embed_dim)
        model.quantize.embedding.weight.copy_(latents[torch.randperm(len(latents))[:codebook_size]])
    return model


def save_random_vqgan(directory: str | Path, codebook_size: int = 8192, grid: int = 32, seed: int = 0) -> VQGAN:
    """:func:`random_vqgan` as a ``save_pretrained`` folder (``--vqgan DIR`` of every program), labelled."""
    directory = Path(directory)
    model = random_vqgan(codebook_size, grid, seed)
    model.save_pretrained(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    write_text_atomically(directory / CONFIG_FILE, json.dumps({"untrained": NOTE, **config}, indent=2) + "\n")
    write_text_atomically(
        directory / "README.md", f"# {NOTE}\n\nseed {seed}, {codebook_size} codes, {grid}x{grid} per image.\n"
    )
    return model
