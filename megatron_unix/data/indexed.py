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
whole dataset is complete, so a failure leaves nothing behind (a killed writer's are removed by
:func:`remove_stale_partials`). :func:`check_dataset` refuses a damaged dataset when it is opened.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, IndexedDataset, IndexedDatasetBuilder

from megatron_unix import platform
from megatron_unix.files import changed_keys

LOSSMASK_SUFFIX = "_lossmask"
VISION_SUFFIX = "_vision.npy"
VOCABULARY_SUFFIX = "_vocab.json"
DATA_SUFFIXES = (".bin", ".idx", LOSSMASK_SUFFIX + ".bin", LOSSMASK_SUFFIX + ".idx", VISION_SUFFIX)
"""The files of every dataset, after its prefix (``VOCABULARY_SUFFIX`` is optional)."""
TOKEN_DTYPE = np.int32
INDEX_HEADER = struct.Struct("<9sQBQQ")
"""Megatron's ``.idx`` header (``_IndexReader``): magic, version 1, dtype code, sequence and document
counts; then int32 lengths and int64 byte pointers per sequence, int64 document boundaries."""
PARTIAL_INFIX = ".partial-"
"""A writer's files are ``PREFIX.partial-PID`` + a suffix until it commits."""
CHECK_CHUNK = 1 << 22
"""Samples per vectorised step of :func:`check_dataset`: bounds its memory whatever the dataset's size."""


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
    return [Path(str(prefix) + suffix) for suffix in DATA_SUFFIXES]


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


def check_vocabulary(
    prefix: str | Path, vocabulary: dict[str, Any], tokenizer_name: str, allow_unrecorded: bool = False
) -> None:
    """Refuse training on samples tokenized with another vocabulary layout than the run's, or with an
    unrecorded one (unless ``allow_unrecorded``): a wrong VQ offset trains silently on wrong ids."""
    stored, expected = read_vocabulary(prefix), _canonical(vocabulary)
    if stored is None and not allow_unrecorded:
        raise ValueError(
            f"--data-path {prefix}: {prefix}{VOCABULARY_SUFFIX} is missing, so nothing records which "
            f"vocabulary its samples were tokenized with: preprocess it again with "
            f"tools/preprocess_data.py, or pass --allow-unrecorded-vocabulary if it was made with "
            f"--tokenizer-model {tokenizer_name}"
        )
    if stored is not None and stored != expected:
        keys = changed_keys(stored, expected)
        differ = ", ".join(f"{k} {stored.get(k)} vs {expected.get(k)}" for k in keys)
        remedy = (
            "pass --separator with the token the data routes as vision (earlier versions made "
            "<|vision_pad|> one by default)"
            if keys == ["separator_ids"]
            else "use the tokenizer it was made with, or preprocess again"
        )
        raise ValueError(
            f"--data-path {prefix} was preprocessed with another vocabulary than --tokenizer-model "
            f"{tokenizer_name} gives ({differ}): {remedy}"
        )


def remove_stale_partials(prefix: str | Path) -> list[Path]:
    """Remove the partial files that writers of ``prefix`` killed by a signal left (tens of MB a run);
    a live process's are kept, it may still be writing them. PIDs are this machine's: never write one
    prefix from several machines at once. Returns the removed files."""
    prefix = Path(prefix)
    stale = platform.leftovers_of_dead_processes(
        prefix.parent, prefix.name + PARTIAL_INFIX, DATA_SUFFIXES + (VOCABULARY_SUFFIX,)
    )
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class DatasetWriter:
    """Appends samples (or whole datasets) and publishes the files atomically on :meth:`commit`.

    Used as a context manager: leaving the block with an exception removes every partial file.
    """

    def __init__(self, prefix: str | Path, vocabulary: dict[str, Any] | None = None) -> None:
        self.prefix = str(prefix)
        self.vocabulary = _canonical(vocabulary)
        self.partial = f"{self.prefix}{PARTIAL_INFIX}{os.getpid()}"
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self.tokens = IndexedDatasetBuilder(self.partial + ".bin", dtype=TOKEN_DTYPE)
        self.masks = IndexedDatasetBuilder(self.partial + LOSSMASK_SUFFIX + ".bin", dtype=TOKEN_DTYPE)
        self.vision_counts: list[np.ndarray] = []

    def add(self, tokens: Sequence[int], trained: Sequence[bool], vision_tokens: int) -> None:
        runs = run_lengths(trained)
        self.add_batch(
            SampleBatch(
                np.asarray(tokens, TOKEN_DTYPE),
                np.array([len(tokens)]),
                np.asarray(runs, TOKEN_DTYPE),
                np.array([len(runs)]),
                np.array([vision_tokens], TOKEN_DTYPE),
            )
        )

    def add_batch(self, batch: SampleBatch) -> None:
        """Append many samples with one write per file (no per-sample Python work)."""
        for builder, flat, lengths in (
            (self.tokens, batch.tokens, batch.lengths),
            (self.masks, batch.runs, batch.run_counts),
        ):
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
            raise ValueError(
                f"{prefix} was tokenized with {theirs}, the datasets before it with {self.vocabulary}: "
                "merge only datasets made with one tokenizer"
            )
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
        require_files(self.prefix)
        self.tokens = IndexedDataset(self.prefix, mmap=mmap)
        self.masks = IndexedDataset(self.prefix + LOSSMASK_SUFFIX, mmap=mmap)
        self.vision_tokens = np.load(self.prefix + VISION_SUFFIX, mmap_mode="r" if mmap else None)
        if not len(self.tokens) == len(self.masks) == len(self.vision_tokens):
            raise ValueError(
                f"dataset {self.prefix}: {len(self.tokens)} token sequences, {len(self.masks)} "
                f"loss masks and {len(self.vision_tokens)} vision counts do not match"
            )

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return self.tokens.sequence_lengths

    def sample(self, index: int, offset: int = 0, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and trained flags of a sample, or of ``length`` tokens from ``offset``."""
        trained = expand_runs(self.masks[index])
        if len(trained) != self.lengths[index]:
            raise ValueError(
                f"dataset {self.prefix}: sample {index} has {self.lengths[index]} tokens "
                f"but its loss mask covers {len(trained)}"
            )
        stop = None if length is None else offset + length
        return self.tokens.get(index, offset, length), trained[offset:stop]


def require_files(prefix: str | Path) -> None:
    """Every file of the dataset exists (the vocabulary record is checked by :func:`check_vocabulary`)."""
    missing = [str(p) for p in output_files(prefix) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"dataset {prefix} is incomplete: missing {', '.join(missing)} (write it with tools/preprocess_data.py)"
        )


@dataclass
class _Index:
    """A Megatron ``.idx`` whose header and size are checked; the arrays are views of its memory map."""

    path: Path
    bin_path: Path
    lengths: np.ndarray
    pointers: np.ndarray
    documents: np.ndarray


def _read_index(prefix: str) -> _Index:
    """The header as Megatron's ``_IndexReader`` reads it (which asserts, or reads past the end)."""
    path = Path(prefix + ".idx")
    with open(path, "rb") as f:
        header = f.read(INDEX_HEADER.size)
    if len(header) < INDEX_HEADER.size:
        raise ValueError(
            f"{path}: {len(header)} bytes, shorter than the {INDEX_HEADER.size}-byte header of a Megatron index"
        )
    magic, version, code, sequences, documents = INDEX_HEADER.unpack(header)
    token_code = DType.code_from_dtype(TOKEN_DTYPE)
    for what, value, expected in (
        ("magic", magic, _INDEX_HEADER),
        ("version", version, 1),
        ("dtype code", code, token_code),
    ):
        if value != expected:
            raise ValueError(f"{path}: {what} {value!r}, expected {expected!r}")
    size, need = path.stat().st_size, INDEX_HEADER.size + 12 * sequences + 8 * documents
    if size != need:
        raise ValueError(
            f"{path}: {size} bytes, but its header's {sequences} sequences and {documents} document "
            f"boundaries need {need}"
        )
    buffer = np.memmap(path, np.uint8, "r")
    lengths = np.frombuffer(buffer, np.int32, sequences, INDEX_HEADER.size)
    pointers = np.frombuffer(buffer, np.int64, sequences, INDEX_HEADER.size + lengths.nbytes)
    bounds = np.frombuffer(buffer, np.int64, documents, INDEX_HEADER.size + lengths.nbytes + pointers.nbytes)
    return _Index(path, Path(prefix + ".bin"), lengths, pointers, bounds)


def _chunks(count: int) -> Iterator[slice]:
    return (slice(start, min(start + CHECK_CHUNK, count)) for start in range(0, count, CHECK_CHUNK))


def _first(flags: np.ndarray) -> int | None:
    hits = np.flatnonzero(flags)
    return int(hits[0]) if hits.size else None


def _check_index(index: _Index) -> None:
    """Non-negative lengths, pointers where the lengths put them, the ``.bin`` exactly their total,
    document boundaries from 0 to the sequence count without going back."""
    itemsize, total = np.dtype(TOKEN_DTYPE).itemsize, 0
    for part in _chunks(len(index.lengths)):
        lengths = index.lengths[part].astype(np.int64)
        if (bad := _first(lengths < 0)) is not None:
            raise ValueError(f"{index.path}: sample {part.start + bad} has length {lengths[bad]}")
        starts = (total + np.cumsum(lengths) - lengths) * itemsize
        if (bad := _first(index.pointers[part] != starts)) is not None:
            raise ValueError(
                f"{index.path}: sample {part.start + bad} starts at byte {index.pointers[part][bad]}, "
                f"but the lengths before it end at byte {starts[bad]}"
            )
        total += int(lengths.sum())
    size = index.bin_path.stat().st_size
    if size != total * itemsize:
        raise ValueError(
            f"{index.bin_path}: {size} bytes, but the lengths in {index.path} add up to {total} "
            f"tokens ({total * itemsize} bytes)"
        )
    bounds = index.documents
    ends = (int(bounds[0]), int(bounds[-1])) if len(bounds) else None
    if ends != (0, len(index.lengths)):
        raise ValueError(
            f"{index.path}: the document boundaries run over sequences {ends}, not (0, {len(index.lengths)})"
        )
    for part in _chunks(len(bounds) - 1):
        if (bad := _first(np.diff(bounds[part.start : part.stop + 1]) < 0)) is not None:
            raise ValueError(f"{index.path}: document {part.start + bad + 1} starts before the one before it")


def _tokens(path: Path) -> np.ndarray:
    """A ``.bin`` as ints, memory-mapped (an empty file cannot be mapped)."""
    return np.memmap(path, TOKEN_DTYPE, "r") if path.stat().st_size else np.zeros(0, TOKEN_DTYPE)


def _check_loss_masks(lengths: np.ndarray, masks: _Index) -> None:
    """One loss mask per sample, its run lengths non-negative and covering exactly the sample."""
    if len(masks.lengths) != len(lengths):
        raise ValueError(f"{masks.path}: {len(masks.lengths)} loss masks for {len(lengths)} samples")
    runs, first = _tokens(masks.bin_path), 0
    for part in _chunks(len(lengths)):
        ends = np.cumsum(masks.lengths[part], dtype=np.int64)
        chunk = runs[first : first + ends[-1]]
        if (bad := _first(chunk < 0)) is not None:
            sample = part.start + int(np.searchsorted(ends, bad, side="right"))
            raise ValueError(f"{masks.bin_path}: sample {sample} has a run of length {chunk[bad]}")
        covered = np.diff(np.concatenate([[0], np.cumsum(chunk, dtype=np.int64)])[np.concatenate([[0], ends])])
        if (bad := _first(covered != lengths[part])) is not None:
            raise ValueError(
                f"{masks.bin_path}: the loss mask of sample {part.start + bad} covers {covered[bad]} "
                f"tokens, the sample has {lengths[part][bad]}"
            )
        first += int(ends[-1])


def _check_vision(path: Path, lengths: np.ndarray) -> None:
    """One vision count per sample, within its length."""
    try:
        counts = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a numpy array ({e})") from None
    if counts.ndim != 1 or counts.dtype.kind not in "iu":
        raise ValueError(f"{path}: a {counts.dtype} array of shape {counts.shape}, not one count per sample")
    if len(counts) != len(lengths):
        raise ValueError(f"{path}: {len(counts)} vision counts for {len(lengths)} samples")
    for part in _chunks(len(lengths)):
        vision, length = counts[part], lengths[part]
        if (bad := _first((vision < 0) | (vision > length))) is not None:
            raise ValueError(
                f"{path}: sample {part.start + bad} has {vision[bad]} vision tokens but length {length[bad]}"
            )


def check_dataset(prefix: str | Path) -> None:
    """Refuse a damaged dataset before training (or merging) starts, with a ValueError naming the file
    and the damage, instead of a failure naming no file when the bad sample is reached. Vectorised
    over the memory-mapped files in chunks of :data:`CHECK_CHUNK` samples: seconds for 10^8 samples."""
    prefix = str(prefix)
    require_files(prefix)
    tokens = _read_index(prefix)
    _check_index(tokens)
    masks = _read_index(prefix + LOSSMASK_SUFFIX)
    _check_index(masks)
    _check_loss_masks(tokens.lengths, masks)
    _check_vision(Path(prefix + VISION_SUFFIX), tokens.lengths)
