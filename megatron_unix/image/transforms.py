"""Pixels as the reference's image tokenizer makes them (Chameleon's ``ImageTokenizer``), so that codes
computed here equal the reference's: transparency blended on white, the short side resized to the
model's size with Lanczos, a centre crop, ``[0, 255] -> [-1, 1]``; and back to an RGB image."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

PIXEL_VALUES = (np.arange(256) / 255.0 * 2 - 1).astype(np.float32)
"""Byte -> model input, computed in float64 as the reference does, then rounded once to float32."""


class BadImage(ValueError):
    """An input that gives no image; ``reason`` is the short code a summary counts it under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def open_image(source: str | Path | bytes) -> Image.Image:
    """A file or in-memory image opened (its header read), with Pillow's complaints as :class:`BadImage`
    reasons that name no Pillow internals (its messages print ``<_io.BytesIO object at 0x...>`` for bytes),
    and its decompression-bomb warning as the ``too_large`` reason instead of a raw warning in the log."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except FileNotFoundError:
        raise BadImage("missing_file", f"{source}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage("too_large", f"too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise BadImage("unreadable", "not an image (no format Pillow reads)") from None
    except (OSError, ValueError) as e:
        raise BadImage("unreadable", f"not an image ({e})") from None


def whiten(image: Image.Image) -> Image.Image:
    """RGB, with any transparency blended on white (truncated to bytes, as the reference does)."""
    if image.mode == "RGB":
        return image
    rgba = np.array(image.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return image.convert("RGB")
    alpha = rgba[:, :, 3:] / 255.0
    return Image.fromarray(((1 - alpha) * 255 + alpha * rgba[:, :, :3]).astype(np.uint8), "RGB")


def crop_bytes(image: Image.Image, size: int = 512) -> np.ndarray:
    """``[size, size, 3]`` uint8: whitened, short side resized to ``size`` (Lanczos), centre-cropped."""
    image = whiten(image)
    scale = size / min(image.size)
    image = image.resize((round(scale * image.width), round(scale * image.height)), Image.LANCZOS)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def normalize(crops: np.ndarray) -> Tensor:
    """uint8 ``[..., H, W, 3]`` -> float32 ``[..., 3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(PIXEL_VALUES[crops]).movedim(-1, -3).contiguous()


def to_pixels(image: Image.Image, size: int = 512) -> Tensor:
    """``[3, size, size]`` model input of an image."""
    return normalize(crop_bytes(image, size))


def to_image(pixels: Tensor) -> Image.Image:
    """``[3, H, W]`` model output -> RGB image: clamped to [-1, 1], scaled to bytes (truncated, as the reference)."""
    unit = (pixels.detach().float().cpu().clamp(-1, 1) + 1) / 2
    return Image.fromarray((unit.permute(1, 2, 0).numpy() * 255).astype(np.uint8), "RGB")
