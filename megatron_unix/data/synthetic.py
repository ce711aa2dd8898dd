"""Synthetic packed micro-batches in the spec's layouts (§3), for demos, tests and benchmarks.

Random tokens, real structure: text documents, bare images, T2I, I2T and an image in the middle of
a document, packed into rows with per-token document ids; the unused tail of a row is padding of
its own document with no loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Layout:
    """Vocabulary facts the generator needs (text ids below ``vq_offset``)."""

    vq_offset: int
    vq_codes: int
    boi_id: int
    eoi_id: int
    eos_id: int
    image_codes: int = 1024
    text_ids: int | None = None  # sample text from 0..text_ids-1 (default: below the specials)

    @property
    def text_high(self) -> int:
        return self.text_ids or min(self.boi_id, self.eoi_id, self.eos_id)


KINDS = ("text", "image", "t2i", "i2t", "mid")


def document(kind: str, layout: Layout, g: torch.Generator, text_len: int = 7) -> list[int]:
    def text(n: int) -> list[int]:
        return torch.randint(0, layout.text_high, (n,), generator=g).tolist()

    def image() -> list[int]:
        codes = layout.vq_offset + torch.randint(0, layout.vq_codes, (layout.image_codes,), generator=g)
        return [layout.boi_id, *codes.tolist(), layout.eoi_id]

    half = max(1, text_len // 2)
    return {
        "text": lambda: text(text_len) + [layout.eos_id],
        "image": image,
        "t2i": lambda: text(half) + image() + [layout.eos_id],
        "i2t": lambda: image() + text(text_len - 2) + [layout.eos_id],
        "mid": lambda: text(half) + image() + text(half) + [layout.eos_id],
    }[kind]()


def pack_row(
    kinds: list[str], seq: int, layout: Layout, g: torch.Generator
) -> tuple[list[int], list[int], list[float]]:
    """Documents packed into ``seq`` tokens (the last one cut), then padding as its own document."""
    tokens: list[int] = []
    docs: list[int] = []
    for i, kind in enumerate(kinds):
        doc = document(kind, layout, g)[: seq - len(tokens)]
        tokens += doc
        docs += [i] * len(doc)
    pad = seq - len(tokens)
    mask = [1.0] * len(tokens) + [0.0] * pad
    return tokens + [layout.eos_id] * pad, docs + [len(kinds)] * pad, mask


def make_batch(rows: list[list[str]], seq: int, layout: Layout, seed: int) -> dict[str, torch.Tensor]:
    """tokens, labels (next token), loss_mask, document_ids: each ``[len(rows), seq]``."""
    g = torch.Generator().manual_seed(seed)
    packed = [pack_row(kinds, seq + 1, layout, g) for kinds in rows]
    full = torch.tensor([p[0] for p in packed])
    docs = torch.tensor([p[1] for p in packed])[:, :-1]
    mask = torch.tensor([p[2] for p in packed])
    same_doc = torch.tensor([p[1] for p in packed])
    loss_mask = mask[:, 1:] * (same_doc[:, 1:] == same_doc[:, :-1])
    return {"tokens": full[:, :-1], "labels": full[:, 1:], "loss_mask": loss_mask, "document_ids": docs}


def random_rows(batch: int, docs_per_row: int, g: torch.Generator) -> list[list[str]]:
    picks = torch.randint(0, len(KINDS), (batch, docs_per_row), generator=g).tolist()
    return [[KINDS[i] for i in row] for row in picks]
