"""Tokenizing a block of lines in one batch call: the layouts run against a stand-in tokenizer that
records texts and codes, then every text is encoded at once and the samples come out in the on-disk
layout (flat tokens, loss-mask runs, vision counts)."""

from __future__ import annotations

from typing import Any

import numpy as np

from megatron_unix.data.indexed import TOKEN_DTYPE, SampleBatch
from megatron_unix.data.layouts import Sample
from megatron_unix.data.tokenizer import HuggingFaceText, MultimodalTokenizer, SentencePieceText, TextTokenizer
from megatron_unix.data.vocabulary import vision_mask


def encode_batch(text: TextTokenizer, texts: list[str]) -> list[list[int]]:
    """Many texts in one call, on one thread (the worker processes are the parallelism)."""
    if not texts:
        return []
    if isinstance(text, HuggingFaceText):
        return [e.ids for e in text.model.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    if isinstance(text, SentencePieceText):
        return text.model.encode(texts, num_threads=1)
    return [text.encode(t) for t in texts]


class DeferredTokenizer:
    """Stands in for the tokenizer inside the layout functions so that a block's texts are encoded in
    one batch call. ``tokenize`` and ``image_tokens`` return a one-element placeholder (a negative
    id); :meth:`resolve` encodes every text at once and expands the placeholders with numpy. This
    relies on the layouts adding each result whole, in one ``Sample.add`` (they do), and on the codes
    being checked already (:func:`parse_line` does)."""

    def __init__(self, tok: MultimodalTokenizer) -> None:
        self.tok = tok
        self.pieces: list[np.ndarray | None] = []
        self.texts: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tok, name)

    def tokenize(self, text: str) -> list[int]:
        if text not in self.texts:
            self.texts[text] = len(self.pieces)
            self.pieces.append(None)
        return [-1 - self.texts[text]]

    def image_tokens(self, codes: np.ndarray) -> list[int]:
        self.pieces.append((codes + self.tok.vq_offset).astype(TOKEN_DTYPE))
        return [-len(self.pieces)]

    def resolve(self, samples: list[Sample]) -> tuple[SampleBatch, int]:
        """The samples in the on-disk layout, and how many of their tokens are trained."""
        for index, ids in zip(self.texts.values(), encode_batch(self.tok.text, list(self.texts))):
            self.pieces[index] = np.array(ids, TOKEN_DTYPE)
        flat, sizes, runs, run_counts, trained_tokens = [], [], [], [], 0
        for sample in samples:
            sample_runs, trained = [0], False
            for token, flag in zip(sample.tokens, sample.trained):
                piece = self.pieces[-1 - token] if token < 0 else np.array([token], TOKEN_DTYPE)
                if not len(piece):
                    continue
                if flag != trained:
                    sample_runs.append(0)
                    trained = flag
                sample_runs[-1] += len(piece)
                trained_tokens += len(piece) if flag else 0
                flat.append(piece)
            sizes.append(sum(sample_runs))
            runs += sample_runs
            run_counts.append(len(sample_runs))
        tokens = np.concatenate(flat) if flat else np.zeros(0, TOKEN_DTYPE)
        lengths = np.array(sizes, np.int64)
        batch = SampleBatch(
            tokens,
            lengths,
            np.array(runs, TOKEN_DTYPE),
            np.array(run_counts, np.int64),
            vision_counts(tokens, lengths, self.tok),
        )
        return batch, trained_tokens


def vision_counts(tokens: np.ndarray, lengths: np.ndarray, tok: MultimodalTokenizer) -> np.ndarray:
    """Vision tokens per sample (the routing rule of spec §1)."""
    mask = vision_mask(tokens, tok.vq_offset, tok.boi_id, tok.separator_ids)
    cumulative = np.concatenate([[0], np.cumsum(mask)])
    return np.diff(cumulative[np.concatenate([[0], np.cumsum(lengths)])]).astype(TOKEN_DTYPE)
