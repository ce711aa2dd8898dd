"""Tiny model shapes and packed batches shared by the tests."""

from __future__ import annotations

from megatron_unix.data.synthetic import Layout
from megatron_unix.data.synthetic import make_batch as _make_batch

TEXT_VOCAB = 100  # text ids 0..99; BOI/EOI/EOS/SEP are among them
VQ_CODES = 48
TINY_VOCAB = TEXT_VOCAB + VQ_CODES
BOI, EOI, EOS, SEP = 90, 91, 92, 93
LAYOUT = Layout(vq_offset=TEXT_VOCAB, vq_codes=VQ_CODES, boi_id=BOI, eoi_id=EOI, eos_id=EOS, image_codes=6, text_ids=89)

TINY_HF = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)
"""The tiny shape as Hugging Face config fields (TINY_MODEL's dimensions), for models built with transformers."""

TINY_MODEL = dict(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=96,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=16,
    vision_encode_layers=1,
    vision_decode_layers=1,
    vq_offset=TEXT_VOCAB,
    vq_codebook_size=VQ_CODES,
    boi_id=BOI,
    eoi_id=EOI,
    eos_id=EOS,
    qk_layernorm=True,
)


def make_batch(rows: list[list[str]], seq: int, seed: int):
    return _make_batch(rows, seq, LAYOUT, seed)


MIXED_ROWS = [["text", "t2i", "mid"], ["i2t", "image", "text"]]


def make_batches(kind: str, count: int, seq: int = 32):
    """``mixed``: every micro-batch mixes all layouts. ``split-modality``: text-only and
    image-only micro-batches alternate (a copy gets no tokens in some micro-batches)."""
    if kind == "mixed":
        return [make_batch(MIXED_ROWS, seq, seed=100 + i) for i in range(count)]
    text_only = [["text"] * 4, ["text"] * 4]
    image_only = [["image"] * 4, ["image"] * 4]
    return [make_batch(text_only if i % 2 == 0 else image_only, seq, seed=200 + i) for i in range(count)]
