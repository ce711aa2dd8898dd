"""Tiny model shapes and packed batches shared by the tests (plain data, no production code)."""

from __future__ import annotations

import torch

TEXT_VOCAB = 100  # text ids 0..99; BOI/EOI/EOS are among them
VQ_CODES = 48
TINY_VOCAB = TEXT_VOCAB + VQ_CODES
BOI, EOI, EOS, SEP = 90, 91, 92, 93
IMAGE_CODES = 6  # a real image is 1024 codes; the model does not care

TINY_MODEL = dict(
    num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2, kv_channels=16,
    vision_encode_layers=1, vision_decode_layers=1, vq_offset=TEXT_VOCAB, vq_codebook_size=VQ_CODES,
    boi_id=BOI, eoi_id=EOI, eos_id=EOS, qk_layernorm=True,
)


def _text(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 89, (n,), generator=g).tolist()


def _image(g: torch.Generator) -> list[int]:
    return [BOI] + (TEXT_VOCAB + torch.randint(0, VQ_CODES, (IMAGE_CODES,), generator=g)).tolist() + [EOI]


def document(kind: str, g: torch.Generator) -> list[int]:
    """text | image | t2i | i2t | mid (an image in the middle of a document)."""
    return {
        "text": lambda: _text(g, 7) + [EOS],
        "image": lambda: _image(g),
        "t2i": lambda: _text(g, 4) + _image(g) + [EOS],
        "i2t": lambda: _image(g) + _text(g, 5) + [EOS],
        "mid": lambda: _text(g, 3) + _image(g) + _text(g, 3) + [EOS],
    }[kind]()


def pack_row(kinds: list[str], seq: int, g: torch.Generator) -> tuple[list[int], list[int]]:
    """Documents packed into one row of ``seq`` tokens; the rest is EOS padding as its own document."""
    tokens, docs = [], []
    for i, kind in enumerate(kinds):
        doc = document(kind, g)[: seq - len(tokens)]
        tokens += doc
        docs += [i] * len(doc)
    pad = seq - len(tokens)
    return tokens + [EOS] * pad, docs + [len(kinds)] * pad


def make_batch(rows: list[list[str]], seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    packed = [pack_row(kinds, seq, g) for kinds in rows]
    tokens = torch.tensor([p[0] for p in packed])
    docs = torch.tensor([p[1] for p in packed])
    labels = torch.cat([tokens[:, 1:], torch.full((len(rows), 1), EOS)], dim=1)
    loss_mask = torch.ones_like(tokens, dtype=torch.float)
    loss_mask[:, -1] = 0
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "document_ids": docs}


MIXED_ROWS = [["text", "t2i", "mid"], ["i2t", "image", "text"]]


def make_batches(kind: str, count: int, seq: int = 32) -> list[dict[str, torch.Tensor]]:
    """``mixed``: every micro-batch mixes all layouts. ``split-modality``: text-only and
    image-only micro-batches alternate (a copy gets no tokens in some micro-batches)."""
    if kind == "mixed":
        return [make_batch(MIXED_ROWS, seq, seed=100 + i) for i in range(count)]
    text_only = [["text"] * 4, ["text"] * 4]
    image_only = [["image"] * 4, ["image"] * 4]
    return [make_batch(text_only if i % 2 == 0 else image_only, seq, seed=200 + i) for i in range(count)]
