"""N-gram conditional entropy (bits) of text tokens and of image codes over a preprocessed dataset
(spec §7, the paper's Figure 3), exact and in bounded memory.

``H_1`` is the unigram entropy; for n > 1, ``H_n = -sum p(w1..wn) log2 p(wn | w1..wn-1)`` with
``p(wn | w1..wn-1) = c(w1..wn) / c(w1..wn-1)``, the prefix counted as the prefix of a counted n-gram.
So ``H_n = H(n-grams) - H(their prefixes)``, which needs only ``sum c log2 c`` over the distinct
n-grams and over their distinct prefixes (with ``T`` n-grams: ``H_n = (S_prefix - S_joint) / T``).
Prefixes are the leading part of the n-gram's key, so one pass over the sorted n-grams gives both.

Which n-grams count (documents as the ``.idx`` stores them, tokens in order):

- The token stream is cut into segments: a segment never crosses a document boundary, ends where
  ``vocabulary.vision_mask`` changes between text and vision, and a BOI starts a new one (two images
  without text between them are two segments).
- Text tokens are those the model routes as text (``vision_mask`` false: EOI and EOS included). Image
  codes are the VQ ids only (``vq_offset .. vq_offset + codebook - 1``, counted as code 0..codebook-1);
  BOI, separators and unused ids above the codebook belong to no stream. Separators inside an image do
  not cut it: its codes form one stream in raster order.
- An n-gram is n consecutive tokens of one modality's stream within one segment: text n-grams never
  reach across an image or a document, image n-grams never across images.

The reference's ``tools/cal_entropy.py`` (what the paper's Figure 3 was computed with) has no such
segments: both its functions concatenate all the sequences given (text documents; images' code lists)
into one stream, so its n-grams run across documents and across images. Its first function
(``calculate_ngram_conditional_entropy``) counts a prefix as every (n-1)-gram of that stream, the last
one too, which starts no n-gram; its ``_optimized`` variant counts the prefixes of the n-grams, as here.
``reference_definition`` reproduces the first: each modality's stream as one segment over the whole
dataset, and the last (n-1)-gram's prefix count one higher.

Streaming: documents are read from the memory-mapped ``.bin`` in chunks; each chunk's n-grams are
packed into fixed-width keys (ids big-endian in uint64 words, ``64 // bits`` ids a word, so the words'
lexicographic order is the n-grams' and no two n-grams share a key), sorted (two words folded into one
uint64 of the same order when they fit) and counted. The counted
runs stay in memory until half the memory budget is used, then are written to a temporary directory
as one sorted run per (modality, n); at the end the runs are merged block by block. Entropies come from
the counts of counts (how many n-grams occur c times), integers, so the result is exactly the same
whatever the budget. Memory: about the budget (a quarter for a chunk's work, half for the counted runs,
merge blocks within half). Disk: the distinct n-grams of every spilled run, ``8 * words + 8`` bytes
each (words = ceil(n / (64 // bits)): 1 for text n <= 3 with a Qwen2.5 vocabulary (18 bits), image n <=
4 (13 bits)); at most ``tokens * max_n * 24`` bytes when nearly every n-gram is distinct (image codes).
Time: ``tokens * max_n * log`` (sorting), plus the merge.
"""

from __future__ import annotations

import math
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_unix.data.indexed import TOKEN_DTYPE, VOCABULARY_SUFFIX, check_dataset, read_vocabulary
from megatron_unix.data.vocabulary import vision_mask
from megatron_unix.plotting import Curve, render_lines

MODALITIES = ("text", "image")
DEFAULT_MEMORY_BUDGET = 1 << 30
CHUNK_BYTES_PER_TOKEN = 512
"""A chunk's work (ids, segments, keys, sort order for each n) is well under 128 bytes a token: a
chunk of budget / 512 tokens keeps it within a quarter of the budget."""
MIN_BLOCK = 16
"""Fewest tokens in a chunk, entries in a merge block (absurdly small budgets still progress)."""

Run = tuple[np.ndarray, np.ndarray]
"""Sorted distinct keys (``[words, count]`` uint64) and their counts (int64)."""


@dataclass(frozen=True)
class Layout:
    """What tells text tokens from image codes: the dataset's vocabulary record (spec §10)."""

    vq_offset: int
    codebook: int
    boi_id: int
    separator_ids: tuple[int, ...]

    @classmethod
    def of_dataset(cls, prefix: str) -> Layout:
        record = read_vocabulary(prefix)
        if record is None:
            raise ValueError(
                f"{prefix}{VOCABULARY_SUFFIX} is missing: it says which ids are image codes "
                "(write the dataset with tools/preprocess_data.py)"
            )
        return cls(record["vq_offset"], record["vq_codebook_size"], record["boi_id"], tuple(record["separator_ids"]))

    def bits(self, modality: str) -> int:
        """Bits of one id in a key: text ids are below the VQ offset, image codes below the codebook size."""
        return max(1, ((self.vq_offset if modality == "text" else self.codebook) - 1).bit_length())


@dataclass(frozen=True)
class Entropy:
    n: int
    ngrams: int
    distinct: int
    bits: float | None
    """None when no n-gram of this length was counted (no token of the modality, or every run shorter)."""


class _CountsOfCounts(Counter):
    """How many distinct keys occur c times, for each c: exact, and enough for ``sum c log2 c``."""

    def add(self, counts: np.ndarray) -> None:
        values, times = np.unique(counts, return_counts=True)
        self.update(dict(zip(values.tolist(), times.tolist())))

    def total_count(self) -> int:
        return sum(c * times for c, times in self.items())

    def c_log2_c(self) -> float:
        return math.fsum(times * c * math.log2(c) for c, times in sorted(self.items()))


def _words(values: np.ndarray, n: int, bits: int) -> np.ndarray:
    """The n-gram starting at every position of ``values`` (uint64) as ``[words, positions]`` keys."""
    per_word, count = 64 // bits, len(values) - n + 1
    words = np.zeros((-(-n // per_word), count), np.uint64)
    for j in range(n):
        words[j // per_word] |= values[j : j + count] << np.uint64(bits * (per_word - 1 - j % per_word))
    return words


def _prefix_mask(n: int, bits: int) -> np.uint64:
    """Clears the n-th id from the last word of a key, leaving the key of its (n-1)-prefix."""
    per_word = 64 // bits
    return ~np.uint64(((1 << bits) - 1) << (bits * (per_word - 1 - (n - 1) % per_word)))


def _group_starts(keys: np.ndarray) -> np.ndarray:
    """Where a new key starts in sorted ``keys`` (``[words, count]``)."""
    return np.flatnonzero(np.concatenate([[True], (keys[:, 1:] != keys[:, :-1]).any(axis=0)]))


def _one_word(keys: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]] | None:
    """Keys as single uint64s of the same order, and the way back; None if they do not fit. Two words
    fold into one as the first word's rank among its distinct values above the used bits of the second
    (at most 2**28 distinct first words for text 5-grams): one sort of uint64s is ~5x faster than lexsort."""
    if len(keys) == 1:
        return keys[0], lambda flat: flat[None]
    if len(keys) > 2:
        return None
    order = np.argsort(keys[0])
    first = keys[0][order]
    new = np.concatenate([[True], first[1:] != first[:-1]])
    rank = np.empty(len(first), np.uint64)
    rank[order] = np.cumsum(new) - 1
    first = first[new]
    used = int(np.bitwise_or.reduce(keys[1]))
    low = (used & -used).bit_length() - 1 if used else 0
    span = (used >> low).bit_length()
    if (len(first) - 1).bit_length() + span > 64 or span == 64:
        return None
    low_, span_, mask = np.uint64(low), np.uint64(span), np.uint64((1 << span) - 1)
    flat = (rank << span_) | (keys[1] >> low_)
    return flat, lambda flat: np.stack([first[(flat >> span_).astype(np.intp)], (flat & mask) << low_])


def _reduce(keys: np.ndarray, counts: np.ndarray | None = None) -> Run:
    """Sorted distinct keys with their counts: occurrences, or the sum of ``counts``."""
    if not keys.shape[1]:
        return keys, np.zeros(0, np.int64)
    folded = _one_word(keys)
    if folded is None:  # three words or more, or two too wide to fold
        order = np.lexsort(keys[::-1])
        keys = keys[:, order]
        starts = _group_starts(keys)
        unique = keys[:, starts]
    else:
        flat, unfold = folded
        if counts is None:
            unique, occurrences = np.unique(flat, return_counts=True)
            return unfold(unique), occurrences.astype(np.int64)
        order = np.argsort(flat)
        flat = flat[order]
        starts = np.flatnonzero(np.concatenate([[True], flat[1:] != flat[:-1]]))
        unique = unfold(flat[starts])
    if counts is None:
        return unique, np.diff(np.append(starts, keys.shape[1])).astype(np.int64)
    return unique, np.add.reduceat(counts[order], starts).astype(np.int64)


def _at_most(keys: np.ndarray, bound: tuple[int, ...]) -> int:
    """How many of sorted ``keys`` are <= ``bound`` in lexicographic order of the words."""
    below = keys[-1] <= np.uint64(bound[-1])
    for word, limit in zip(keys[-2::-1], bound[-2::-1]):
        below = (word < np.uint64(limit)) | ((word == np.uint64(limit)) & below)
    return int(below.sum())


def _merged(runs: list[Run], block: int) -> Iterator[Run]:
    """The union of sorted ``runs`` (memory-mapped or not), counts summed, in sorted blocks: each
    block takes from every run the keys up to the smallest last key read of the runs not yet read to
    their end, so every occurrence of a key lands in one block."""
    positions = [0] * len(runs)
    while True:
        live = [i for i, (keys, _) in enumerate(runs) if positions[i] < keys.shape[1]]
        if not live:
            return
        read = [(i, np.asarray(runs[i][0][:, positions[i] : positions[i] + block])) for i in live]
        unfinished = [
            tuple(keys[:, -1].tolist()) for i, keys in read if positions[i] + keys.shape[1] < runs[i][0].shape[1]
        ]
        bound = min(unfinished) if unfinished else None
        taken_keys, taken_counts = [], []
        for i, keys in read:
            take = keys.shape[1] if bound is None else _at_most(keys, bound)
            if take:
                taken_keys.append(keys[:, :take])
                taken_counts.append(np.asarray(runs[i][1][positions[i] : positions[i] + take]))
                positions[i] += take
        if len(taken_keys) == 1:  # already sorted and distinct
            yield taken_keys[0], taken_counts[0]
        else:
            yield _reduce(np.concatenate(taken_keys, axis=1), np.concatenate(taken_counts))


class NgramCounter:
    """Exact counts of the n-grams (n = 1..max_n) of segmented id streams, one per modality, in memory up
    to half of ``memory_budget`` bytes and in sorted runs under ``spill_dir`` beyond it."""

    def __init__(self, max_n: int, bits: dict[str, int], memory_budget: int, spill_dir: Path) -> None:
        self.max_n, self.bits, self.memory_budget, self.spill_dir = max_n, bits, memory_budget, spill_dir
        empty = (np.zeros(0, np.uint64), np.zeros(0, np.int64))
        self.tails = {modality: empty for modality in bits}
        """The last max_n - 1 ids and segments of each stream: the n-grams reaching into the next chunk."""
        self.pending: dict[tuple[str, int], list[Run]] = {}
        self.pending_bytes = 0
        self.runs: dict[tuple[str, int], list[Path]] = {}
        self.spills = 0

    def add(self, modality: str, values: np.ndarray, segments: np.ndarray) -> None:
        """Count the n-grams ending in ``values`` (ids of ``modality`` in stream order, after those added
        before) that lie within one segment (``segments``: non-decreasing segment numbers)."""
        tail_values, tail_segments = self.tails[modality]
        stream = np.concatenate([tail_values, values.astype(np.uint64)])
        segment = np.concatenate([tail_segments, segments])
        for n in range(1, self.max_n + 1):
            first = max(0, len(tail_values) - n + 1)  # earlier windows ended in an earlier chunk
            ids, groups = stream[first:], segment[first:]
            if len(ids) < n:
                continue
            keys = _words(ids, n, self.bits[modality])[:, groups[: len(ids) - n + 1] == groups[n - 1 :]]
            if keys.shape[1]:
                run = _reduce(keys)
                self.pending.setdefault((modality, n), []).append(run)
                self.pending_bytes += run[0].nbytes + run[1].nbytes
        keep = max(0, len(stream) - self.max_n + 1)
        self.tails[modality] = (stream[keep:], segment[keep:])
        if self.pending_bytes > self.memory_budget // 2:
            self._spill()

    def _combined(self, key: tuple[str, int]) -> Run | None:
        runs = self.pending.pop(key, [])
        if len(runs) <= 1:
            return runs[0] if runs else None
        return _reduce(np.concatenate([k for k, _ in runs], axis=1), np.concatenate([c for _, c in runs]))

    def _spill(self) -> None:
        for key in list(self.pending):
            keys, counts = self._combined(key)
            path = self.spill_dir / f"{key[0]}-{key[1]}-{self.spills}"
            np.save(path.with_suffix(".keys.npy"), keys)
            np.save(path.with_suffix(".counts.npy"), counts)
            self.runs.setdefault(key, []).append(path)
        self.pending_bytes, self.spills = 0, self.spills + 1

    def entropy(self, modality: str, n: int, every_prefix: bool = False) -> Entropy:
        """Merge what was counted of ``modality``'s n-grams (its runs are deleted after). ``every_prefix``:
        a prefix's count is that of every (n-1)-gram of the stream, the stream's last (n-1)-gram (which
        starts no n-gram) included, as the reference's first function counts (its n-grams in one segment)."""
        paths = self.runs.pop((modality, n), [])
        runs = [
            (
                np.load(path.with_suffix(".keys.npy"), mmap_mode="r"),
                np.load(path.with_suffix(".counts.npy"), mmap_mode="r"),
            )
            for path in paths
        ]
        runs += self.pending.pop((modality, n), [])
        words = -(-n // (64 // self.bits[modality]))
        block = max(MIN_BLOCK, self.memory_budget // 2 // (3 * max(1, len(runs)) * (8 * words + 8)))
        joint, prefixes = _CountsOfCounts(), _CountsOfCounts()
        mask, last, last_count = _prefix_mask(n, self.bits[modality]), None, 0
        final = self._final_prefix(modality, n, mask) if every_prefix else None
        final_count = 0
        for keys, counts in _merged(runs, block):
            joint.add(counts)
            prefix = keys.copy()
            prefix[-1] &= mask  # sorted keys have sorted prefixes: one prefix's n-grams are adjacent
            starts = _group_starts(prefix)
            sums = np.add.reduceat(counts, starts)
            if final is not None:
                final_count += int(sums[(prefix[:, starts] == final[:, None]).all(axis=0)].sum())
            if last is not None and last == tuple(prefix[:, 0].tolist()):
                sums[0] += last_count
            elif last is not None:
                prefixes[last_count] += 1
            prefixes.add(sums[:-1])  # the last prefix may go on in the next block
            last, last_count = tuple(prefix[:, starts[-1]].tolist()), int(sums[-1])
        if last is not None:
            prefixes[last_count] += 1
        for path in paths:
            path.with_suffix(".keys.npy").unlink()
            path.with_suffix(".counts.npy").unlink()
        total = joint.total_count()
        # every_prefix: the n-grams after the final (n-1)-gram divide by its count + 1, not its count
        extra = final_count * math.log2((final_count + 1) / final_count) if final_count else 0.0
        bits = (prefixes.c_log2_c() - joint.c_log2_c() + extra) / total if total else None
        return Entropy(n, total, sum(joint.values()), bits)

    def _final_prefix(self, modality: str, n: int, mask: np.uint64) -> np.ndarray | None:
        """The key (as a prefix key of n-grams) of the stream's last n-1 ids, if it has that many."""
        tail = self.tails[modality][0]
        if n < 2 or len(tail) < n - 1:
            return None
        key = _words(np.concatenate([tail[len(tail) - n + 1 :], np.zeros(1, np.uint64)]), n, self.bits[modality])
        key[-1] &= mask
        return key[:, 0]


class _Segmenter:
    """Splits the token stream, chunk by chunk, into each modality's ids with their segment numbers
    (the module docstring's rules); remembers the last token's segment across chunks."""

    def __init__(self, layout: Layout) -> None:
        self.layout, self.segment, self.vision = layout, 0, None

    def split(self, tokens: np.ndarray, document_starts: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        layout = self.layout
        vision = vision_mask(tokens, layout.vq_offset, layout.boi_id, layout.separator_ids)
        new = document_starts | (tokens == layout.boi_id)
        new[1:] |= vision[1:] != vision[:-1]
        new[0] |= self.vision is None or bool(vision[0]) != self.vision
        segments = self.segment + np.cumsum(new)
        self.segment, self.vision = int(segments[-1]), bool(vision[-1])
        codes = (tokens >= layout.vq_offset) & (tokens < layout.vq_offset + layout.codebook)
        return {
            "text": (tokens[~vision], segments[~vision]),
            "image": (tokens[codes] - layout.vq_offset, segments[codes]),
        }


def _document_starts(index: IndexedDataset, block: int) -> Iterator[tuple[np.ndarray, int]]:
    """Token offsets where the documents start, ``block`` documents at a time, with the offset where
    the last of them ends (sequences are contiguous in the ``.bin``: ``check_dataset`` verified it)."""
    lengths, bounds = index.sequence_lengths, index.document_indices
    offset, first = 0, 0
    for start in range(0, len(bounds) - 1, block):
        documents = np.asarray(bounds[start : start + block + 1], np.int64)
        sequence_starts = offset + np.concatenate([[0], np.cumsum(lengths[first : documents[-1]], dtype=np.int64)])
        yield sequence_starts[documents[:-1] - first], int(sequence_starts[-1])
        offset, first = int(sequence_starts[-1]), int(documents[-1])


def _chunks(prefix: str, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The dataset's tokens (int64) in order, at most ``size`` at a time, each with a flag on the tokens
    that start a document; read from the memory-mapped ``.bin``, a long document over several chunks."""
    tokens = np.memmap(prefix + ".bin", TOKEN_DTYPE, "r")
    for starts, end in _document_starts(IndexedDataset(prefix, mmap=True), size):
        for low in range(int(starts[0]), end, size):
            high = min(low + size, end)
            flags = np.zeros(high - low, bool)
            flags[starts[np.searchsorted(starts, low) : np.searchsorted(starts, high)] - low] = True
            chunk = np.asarray(tokens[low:high], np.int64)
            if chunk.min() < 0:
                raise ValueError(f"{prefix}.bin: token {low + int(np.argmin(chunk))} has the negative id {chunk.min()}")
            yield chunk, flags


@dataclass
class DatasetEntropy:
    prefix: str
    tokens: int
    modality_tokens: dict[str, int]
    """Text tokens and image codes counted (the rest are BOI, separators and unused vision ids)."""
    entropies: dict[str, list[Entropy]] = field(default_factory=dict)
    spilled_runs: int = 0


def open_dataset(prefix: str) -> tuple[Layout, int]:
    """The vocabulary layout and token count of a dataset, refusing (ValueError, FileNotFoundError) a
    missing or damaged file, a missing vocabulary record and a dataset without tokens."""
    check_dataset(prefix)
    tokens = Path(prefix + ".bin").stat().st_size // np.dtype(TOKEN_DTYPE).itemsize
    if tokens == 0:
        raise ValueError(f"dataset {prefix} has no tokens")
    return Layout.of_dataset(prefix), tokens


def dataset_entropy(
    prefix: str,
    max_n: int,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    spill_dir: str | Path | None = None,
    on_chunk: Callable[[int], None] | None = None,
    opened: tuple[Layout, int] | None = None,
    reference_definition: bool = False,
) -> DatasetEntropy:
    """H_1..H_max_n of text tokens and of image codes of dataset ``prefix`` (:func:`open_dataset`
    refuses bad input); runs are spilled under a temporary directory in ``spill_dir`` (default: the
    system's), removed at the end; ``on_chunk`` is told each chunk's token count (progress); ``opened``:
    what :func:`open_dataset` gave the caller (its checks read every index once, not twice);
    ``reference_definition``: count as the reference's first function does (module docstring)."""
    prefix = str(prefix)
    layout, tokens = opened or open_dataset(prefix)
    result = DatasetEntropy(prefix, tokens, dict.fromkeys(MODALITIES, 0))
    with tempfile.TemporaryDirectory(prefix=".conditional-entropy-", dir=spill_dir) as temporary:
        counter = NgramCounter(max_n, {m: layout.bits(m) for m in MODALITIES}, memory_budget, Path(temporary))
        segmenter = _Segmenter(layout)
        for chunk, starts in _chunks(prefix, max(MIN_BLOCK, memory_budget // CHUNK_BYTES_PER_TOKEN)):
            for modality, (values, segments) in segmenter.split(chunk, starts).items():
                counter.add(modality, values, np.zeros_like(segments) if reference_definition else segments)
                result.modality_tokens[modality] += len(values)
            if on_chunk:
                on_chunk(len(chunk))
        result.entropies = {
            m: [counter.entropy(m, n, reference_definition) for n in range(1, max_n + 1)] for m in MODALITIES
        }
        result.spilled_runs = counter.spills
    return result


PALETTES = {
    "text": [(31, 119, 180), (23, 190, 207), (60, 60, 200), (100, 160, 220)],
    "image": [(214, 39, 40), (230, 110, 0), (148, 30, 90), (230, 110, 150)],
}
"""Text in blues, images in reds, as in the paper's Figure 3; one shade per dataset."""
STYLES = {"text": "solid", "image": "dashed"}


def render_png(results: dict[str, DatasetEntropy], output: str | Path, size: tuple[int, int] = (720, 540)) -> None:
    """Entropy against n, one curve per dataset (keyed by label) and modality; written atomically."""
    curves = [
        Curve(
            f"{modality}: {label}",
            [(e.n, e.bits) for e in result.entropies[modality] if e.bits is not None],
            PALETTES[modality][i % len(PALETTES[modality])],
            STYLES[modality],
        )
        for modality in MODALITIES
        for i, (label, result) in enumerate(results.items())
    ]
    curves = [curve for curve in curves if curve.points]
    render_lines(curves, output, "n-gram conditional entropy", "n", "conditional entropy (bits)", size, whole_x=True)
