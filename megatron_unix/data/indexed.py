"""The preprocessed dataset on disk: Megatron's indexed token dataset plus two companions.

- ``PREFIX.bin/.idx``: the tokens (int32), one sequence and one document per sample, in input order;
  ``megatron.core.datasets.indexed_dataset.IndexedDataset(PREFIX)`` opens it.
- ``PREFIX_lossmask.bin/.idx``: per sample, the run lengths of its trained flags, alternating
  untrained / trained and starting with untrained (possibly 0): ``[0, n]`` for a fully trained
  text sample, ``[k, n-k]`` for an ignore-instruction pair. Two or three ints per sample.
- ``PREFIX_vision.npy``: per sample, the number of vision tokens, so packing knows which samples
  hold an image (never split) without reading the tokens.
- ``PREFIX_vocab.json`` (optional): the vocabulary layout the samples were tokenized with (VQ
  offset, codebook, BOI/EOI/EOS, separators), so training and merging can refuse a mismatch.

:class:`DatasetWriter` writes all of them under temporary names and renames them only when the
whole dataset is complete, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

LOSSMASK_SUFFIX = "_lossmask"
VISION_SUFFIX = "_vision.npy"
VOCABULARY_SUFFIX = "_vocab.json"
TOKEN_DTYPE = np.int32


def run_lengths(trained: Sequence[bool]) -> list[int]:
    """Alternating untrained/trained run lengths, starting with untrained."""
    runs, current, count = [], False, 0
    for flag in trained:
        if bool(flag) != current:
            runs.append(count)
            current, count = not current, 0
        count += 1
    runs.append(count)
    return runs


def expand_runs(runs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`run_lengths`: a bool array."""
    flags = np.zeros(len(runs), dtype=bool)
    flags[1::2] = True
    return np.repeat(flags, runs)


def output_files(prefix: str | Path) -> list[Path]:
    prefix = str(prefix)
    return [Path(prefix + ext) for ext in (".bin", ".idx")] + \
        [Path(prefix + LOSSMASK_SUFFIX + ext) for ext in (".bin", ".idx")] + [Path(prefix + VISION_SUFFIX)]


@dataclass
class SampleBatch:
    """Consecutive samples in the on-disk layout: flat tokens and loss-mask runs, cut by lengths."""

    tokens: np.ndarray
    lengths: np.ndarray
    runs: np.ndarray
    run_counts: np.ndarray
    vision_tokens: np.ndarray


def _canonical(vocabulary: dict[str, Any] | None) -> dict[str, Any] | None:
    """As stored in JSON (tuples become lists), so records compare equal however they were made."""
    return None if vocabulary is None else json.loads(json.dumps(vocabulary, sort_keys=True))


def read_vocabulary(prefix: str | Path) -> dict[str, Any] | None:
    path = Path(str(prefix) + VOCABULARY_SUFFIX)
    return json.loads(path.read_text()) if path.is_file() else None


def check_vocabulary(prefix: str | Path, vocabulary: dict[str, Any], tokenizer_name: str) -> None:
    """Refuse training on samples tokenized with another vocabulary layout than the run's."""
    stored, expected = read_vocabulary(prefix), _canonical(vocabulary)
    if stored is not None and stored != expected:
        differ = ", ".join(f"{k} {stored.get(k)} vs {expected.get(k)}" for k in sorted(set(stored) | set(expected))
                           if stored.get(k) != expected.get(k))
        raise ValueError(f"--data-path {prefix} was preprocessed with another vocabulary than --tokenizer-model "
                         f"{tokenizer_name} gives ({differ}): use the tokenizer it was made with, or preprocess again")


class DatasetWriter:
    """Appends samples (or whole datasets) and publishes the files atomically on :meth:`commit`.

    Used as a context manager: leaving the block with an exception removes every partial file.
    """

    def __init__(self, prefix: str | Path, vocabulary: dict[str, Any] | None = None) -> None:
        self.prefix = str(prefix)
        self.vocabulary = _canonical(vocabulary)
        self.partial = f"{self.prefix}.partial-{os.getpid()}"
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self.tokens = IndexedDatasetBuilder(self.partial + ".bin", dtype=TOKEN_DTYPE)
        self.masks = IndexedDatasetBuilder(self.partial + LOSSMASK_SUFFIX + ".bin", dtype=TOKEN_DTYPE)
        self.vision_counts: list[np.ndarray] = []

    def add(self, tokens: Sequence[int], trained: Sequence[bool], vision_tokens: int) -> None:
        runs = run_lengths(trained)
        self.add_batch(SampleBatch(np.asarray(tokens, TOKEN_DTYPE), np.array([len(tokens)]),
                                   np.asarray(runs, TOKEN_DTYPE), np.array([len(runs)]),
                                   np.array([vision_tokens], TOKEN_DTYPE)))

    def add_batch(self, batch: SampleBatch) -> None:
        """Append many samples with one write per file (no per-sample Python work)."""
        for builder, flat, lengths in ((self.tokens, batch.tokens, batch.lengths),
                                       (self.masks, batch.runs, batch.run_counts)):
            builder.data_file.write(np.ascontiguousarray(flat, TOKEN_DTYPE).tobytes())
            start = len(builder.sequence_lengths)
            builder.sequence_lengths.extend(lengths.tolist())
            builder.document_indices.extend(range(start + 1, start + len(lengths) + 1))
        self.vision_counts.append(np.asarray(batch.vision_tokens, TOKEN_DTYPE))

    def add_dataset(self, prefix: str | Path) -> None:
        """Append a complete dataset written by another writer (a shard)."""
        prefix = str(prefix)
        theirs = read_vocabulary(prefix)
        if theirs is not None and self.vocabulary not in (None, theirs):
            raise ValueError(f"{prefix} was tokenized with {theirs}, the datasets before it with {self.vocabulary}: "
                             "merge only datasets made with one tokenizer")
        self.vocabulary = self.vocabulary or theirs
        self.tokens.add_index(prefix)
        self.masks.add_index(prefix + LOSSMASK_SUFFIX)
        self.vision_counts.append(np.load(prefix + VISION_SUFFIX))

    def commit(self) -> None:
        self.tokens.finalize(self.partial + ".idx")
        self.masks.finalize(self.partial + LOSSMASK_SUFFIX + ".idx")
        counts = np.concatenate(self.vision_counts) if self.vision_counts else np.zeros(0, TOKEN_DTYPE)
        with open(self.partial + VISION_SUFFIX, "wb") as f:
            np.save(f, counts)
        if self.vocabulary is not None:
            Path(self.partial + VOCABULARY_SUFFIX).write_text(json.dumps(self.vocabulary, indent=1) + "\n")
            os.replace(self.partial + VOCABULARY_SUFFIX, self.prefix + VOCABULARY_SUFFIX)
        for partial, final in zip(output_files(self.partial), output_files(self.prefix)):
            os.replace(partial, final)

    def abort(self) -> None:
        for builder in (self.tokens, self.masks):
            builder.data_file.close()
        for path in [*output_files(self.partial), Path(self.partial + VOCABULARY_SUFFIX)]:
            path.unlink(missing_ok=True)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class MultimodalDocuments:
    """Read side: tokens, trained flags and vision counts of each sample of ``PREFIX``."""

    def __init__(self, prefix: str | Path, mmap: bool = True) -> None:
        self.prefix = str(prefix)
        missing = [str(p) for p in output_files(self.prefix) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"dataset {self.prefix} is incomplete: missing {', '.join(missing)} "
                                    "(write it with tools/preprocess_data.py)")
        self.tokens = IndexedDataset(self.prefix, mmap=mmap)
        self.masks = IndexedDataset(self.prefix + LOSSMASK_SUFFIX, mmap=mmap)
        self.vision_tokens = np.load(self.prefix + VISION_SUFFIX, mmap_mode="r" if mmap else None)
        if not len(self.tokens) == len(self.masks) == len(self.vision_tokens):
            raise ValueError(f"dataset {self.prefix}: {len(self.tokens)} token sequences, {len(self.masks)} "
                             f"loss masks and {len(self.vision_tokens)} vision counts do not match")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return self.tokens.sequence_lengths

    def sample(self, index: int, offset: int = 0, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and trained flags of a sample, or of ``length`` tokens from ``offset``."""
        trained = expand_runs(self.masks[index])
        if len(trained) != self.lengths[index]:
            raise ValueError(f"dataset {self.prefix}: sample {index} has {self.lengths[index]} tokens "
                             f"but its loss mask covers {len(trained)}")
        stop = None if length is None else offset + length
        return self.tokens.get(index, offset, length), trained[offset:stop]
