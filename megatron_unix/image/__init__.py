"""Images in and out: the VQGAN image tokenizer (spec §2, §6) and the reference's pixel transforms."""

from megatron_unix.image.transforms import to_image, to_pixels
from megatron_unix.image.vqgan import VQGAN, VQGANConfig, VQGANError

__all__ = ["VQGAN", "VQGANConfig", "VQGANError", "to_image", "to_pixels"]
