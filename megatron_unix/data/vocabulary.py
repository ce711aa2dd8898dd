"""The vocabulary layout's fixed facts (spec §2) and the routing rule (spec §1), in one place.

Preprocessing counts vision tokens with the rule on numpy arrays, the model routes with it on torch
tensors; the codebook size is the default of every tool that needs one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

CODEBOOK_SIZE = 8192
"""VQ codes of Chameleon's image tokenizer: the default wherever a codebook size is not given."""

QWEN25_VQ_OFFSET = 151665
"""VQ code 0 after Qwen2.5's 151665 text tokens; the specials below are existing Qwen2.5 tokens."""
QWEN25_BOI, QWEN25_EOI, QWEN25_EOS = 151652, 151653, 151643
"""``<|vision_start|>``, ``<|vision_end|>``, ``<|endoftext|>``."""

Tokens = TypeVar("Tokens")  # a numpy array or a torch tensor of token ids


def vision_mask(tokens: Tokens, vq_offset: int, boi_id: int, separator_ids: Iterable[int]) -> Tokens:
    """Spec §1: a token is vision when it is a VQ code, BOI or a separator; everything else (EOI, EOS)
    is text. Works on numpy arrays and torch tensors alike; the separators (at most a few) are compared
    one by one, which is also ~100x faster than ``isin`` on numpy."""
    mask = (tokens >= vq_offset) | (tokens == boi_id)
    for separator in separator_ids:
        mask |= tokens == separator
    return mask
