"""Preprocessing: jsonl(.gz) lines -> samples in the spec's layouts (§3) -> a dataset on disk.

A line is one sample: a text (``{"text": ...}``), an image-text pair (a caption and VQ codes, laid
out as T2I or I2T) or a conversation (SFT), usually with an image. :func:`parse_line` turns a line
into a :class:`Sample` or raises :class:`BadLine` with a reason code.

:func:`preprocess` reads the inputs in blocks of whole lines, ``workers`` processes tokenize the
blocks (all texts of a block in one batch call) and the main process writes the results in input
order. Every random choice (T2I or I2T, the prompt, ``<unconditional>``) comes from an RNG seeded
with ``(seed, the line's bytes)``: the output is the same for any worker count and for any split
of the input into files, so merging the datasets of shards (:func:`merge`) gives the dataset of
their concatenation. (Identical lines therefore get identical layouts.)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import multiprocessing.pool
import os
import random
import sys
import time
from collections import Counter, deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from glob import glob
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import numpy as np

from megatron_unix.data.indexed import (
    TOKEN_DTYPE,
    DatasetWriter,
    MultimodalDocuments,
    SampleBatch,
    check_dataset,
    remove_stale_partials,
)
from megatron_unix.data.layouts import Sample, pair_sample, sft_sample, text_sample
from megatron_unix.data.tokenizer import HuggingFaceText, MultimodalTokenizer, SentencePieceText, TextTokenizer
from megatron_unix.data.vocabulary import vision_mask

ASSISTANT_ROLES = {"human": False, "user": False, "system": False, "gpt": True, "assistant": True}
"""Conversation roles (LLaVA's ``from`` and chat ``role`` names): is the turn trained?"""
IMAGE_PLACEHOLDER = "<image>"
REPORTED_BAD_LINES = 10


@dataclass(frozen=True)
class LineFormat:
    """Which keys hold what, and how samples are laid out. Each key option lists alternatives: the
    first one a line has is used."""

    text_keys: tuple[str, ...] = ("text",)
    caption_keys: tuple[str, ...] = ("caption", "text")
    vqcode_keys: tuple[str, ...] = ("vqcode", "vqcode_512")
    conversation_keys: tuple[str, ...] = ("conversations", "messages")
    metadata_keys: tuple[str, ...] = ()
    """Keys to ignore even though they hold what looks like image codes (other unknown keys, such as
    ``id``, ``url`` or an image path, are ignored anyway)."""
    image_tokens: int = 1024
    t2i_ratio: float = 0.8
    seed: int = 1234
    ignore_instruction: bool = True
    append_eod: bool = False
    """EOS after a text sample: Megatron's convention; the reference appends none (spec §3)."""
    sft_newlines: int = 1

    @cached_property
    def known_keys(self) -> frozenset[str]:
        return frozenset(
            self.text_keys + self.caption_keys + self.vqcode_keys + self.conversation_keys + self.metadata_keys
        )


class BadLine(ValueError):
    """A line that is not a sample; ``reason`` is the short code the summary counts it under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


class PreprocessError(RuntimeError):
    """Fatal: nothing is written."""


class NoDocuments(PreprocessError):
    """The input holds no sample (empty, or every line bad): an error, not an empty dataset."""


def parse_line(line: bytes, tok: MultimodalTokenizer, fmt: LineFormat) -> Sample:
    """One jsonl line as a sample: a conversation key makes it SFT, else a VQ-code key a pair, else text."""
    line = line.strip()
    if not line:
        raise BadLine("blank_line", "the line is empty")
    try:
        record = json.loads(line)
    except ValueError as e:
        raise BadLine("unparsable_json", str(e)) from None
    if not isinstance(record, dict):
        raise BadLine("not_an_object", f"the line is a JSON {type(record).__name__}, not an object")
    hidden_codes = sorted(k for k in record if k not in fmt.known_keys and _looks_like_codes(record[k], fmt))
    if hidden_codes:
        raise BadLine(
            "unknown_codes_key",
            f"key {hidden_codes[0]!r} holds what looks like image codes (at least "
            f"{fmt.image_tokens} integers) but is no --vqcode-key: name it with "
            "--vqcode-key, or with --metadata-key to ignore it",
        )
    codes_key = _first_key(record, fmt.vqcode_keys)
    codes = None if codes_key is None else _codes(record[codes_key], codes_key, tok.codebook_size, fmt.image_tokens)
    conversation_key = _first_key(record, fmt.conversation_keys)
    if conversation_key is not None:
        turns = _turns(record[conversation_key], conversation_key, codes is not None)
        return sft_sample(tok, turns, codes, fmt.sft_newlines, fmt.ignore_instruction)
    if codes is not None:
        rng = random.Random(int.from_bytes(hashlib.blake2b(b"%d\n%s" % (fmt.seed, line), digest_size=8).digest()))
        return pair_sample(tok, _text(record, fmt.caption_keys), codes, rng, fmt.t2i_ratio, fmt.ignore_instruction)
    return text_sample(tok, _text(record, fmt.text_keys), fmt.append_eod)


def _looks_like_codes(value: object, fmt: LineFormat) -> bool:
    """A list of at least an image's worth of integers, or a JSON string of one: image codes under a key
    the format does not know would otherwise make a text-only sample silently."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            return False
    return (
        isinstance(value, list)
        and len(value) >= fmt.image_tokens
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def _first_key(record: dict, keys: Sequence[str]) -> str | None:
    return next((key for key in keys if key in record), None)


def _text(record: dict, keys: Sequence[str]) -> str:
    key = _first_key(record, keys)
    if key is None:
        raise BadLine("missing_key", f"no key {' or '.join(map(repr, keys))}; the line has {sorted(record)}")
    value = record[key]
    if not isinstance(value, str):
        raise BadLine("wrong_type", f"{key!r} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise BadLine("empty_text", f"{key!r} is empty")
    return value


def _codes(value: Any, key: str, codebook_size: int, count: int) -> np.ndarray:
    """A list of codes, or a JSON string of one, checked for length and range."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadLine("wrong_type", f"{key!r} is a string but not a JSON list") from None
    if not isinstance(value, list):
        raise BadLine("wrong_type", f"{key!r} is a {type(value).__name__}, not a list of codes")
    if len(value) != count:
        raise BadLine("wrong_code_count", f"{key!r} has {len(value)} codes, expected {count} (--image-tokens)")
    codes = np.asarray(value)
    if codes.ndim != 1 or codes.dtype.kind not in "iu":
        raise BadLine("wrong_type", f"{key!r} holds something other than integers")
    bad = np.flatnonzero((codes < 0) | (codes >= codebook_size))
    if bad.size:
        raise BadLine(
            "code_out_of_range",
            f"{key!r}[{bad[0]}] = {codes[bad[0]]} is outside the codebook 0..{codebook_size - 1} (--vq-codebook-size)",
        )
    return codes


def _turns(value: Any, key: str, has_image: bool) -> list[tuple[str, bool]]:
    """LLaVA ``{"from", "value"}`` or chat ``{"role", "content"}`` turns as ``(text, is_assistant)``.
    As in LLaVA, an ``<image>`` placeholder is dropped (with the whitespace around the text): the
    image always comes first."""
    if not isinstance(value, list) or not value:
        raise BadLine("bad_conversation", f"{key!r} is not a non-empty list of turns")
    turns = []
    for i, turn in enumerate(value):
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        if role not in ASSISTANT_ROLES:
            raise BadLine("bad_conversation", f"{key}[{i}] has no known role ({'/'.join(ASSISTANT_ROLES)})")
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            raise BadLine("wrong_type", f"{key}[{i}] text is a {type(text).__name__}, not a string")
        if IMAGE_PLACEHOLDER in text:
            if not has_image:
                raise BadLine("missing_key", f"{key}[{i}] refers to {IMAGE_PLACEHOLDER} but the line has no VQ codes")
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        if not text.strip():
            raise BadLine("empty_text", f"{key}[{i}] is empty")
        turns.append((text, ASSISTANT_ROLES[role]))
    if not any(assistant for _, assistant in turns):
        raise BadLine("bad_conversation", f"{key!r} has no assistant turn: nothing to train")
    return turns


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


@dataclass
class Block:
    """Whole lines of one file; ``position`` is how far reading had come (on-disk bytes, all files)."""

    path: str
    first_line: int
    data: bytes
    position: int


@dataclass
class BadLineReport:
    path: str
    line: int
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


@dataclass
class BlockResult:
    batch: SampleBatch
    trained_tokens: int
    input_bytes: int
    position: int
    skipped: Counter[str]
    bad_lines: list[BadLineReport]
    """The first few of the skipped lines."""


def process_block(block: Block, tok: MultimodalTokenizer, fmt: LineFormat, strict: bool) -> BlockResult:
    """Parse and tokenize a block; with ``strict`` stop at its first bad line."""
    deferred = DeferredTokenizer(tok)
    samples, skipped, reports = [], Counter(), []
    lines = block.data.split(b"\n")
    if block.data.endswith(b"\n"):
        lines.pop()
    for number, line in enumerate(lines, block.first_line):
        try:
            samples.append(parse_line(line, deferred, fmt))
        except BadLine as e:
            skipped[e.reason] += 1
            if len(reports) < REPORTED_BAD_LINES:
                reports.append(BadLineReport(block.path, number, e.reason, str(e)))
            if strict:
                break
    batch, trained_tokens = deferred.resolve(samples)
    return BlockResult(batch, trained_tokens, len(block.data), block.position, skipped, reports)


def expand_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """Files and globs (each sorted) in the order given; a pattern that matches nothing is an error."""
    paths = []
    for pattern in map(str, patterns):
        matches = sorted(glob(pattern, recursive=True))
        if not matches:
            raise FileNotFoundError(f"--input {pattern}: no such file")
        paths += map(Path, matches)
    return paths


def read_blocks(paths: Sequence[Path], block_bytes: int) -> Iterator[Block]:
    """Whole lines in blocks of about ``block_bytes`` (decompressed), file after file."""
    done = 0
    for path in paths:
        try:
            with (
                open(path, "rb") as raw,
                gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else nullcontext(raw) as stream,
            ):
                number, rest = 1, b""
                while chunk := stream.read(block_bytes):
                    data = rest + chunk
                    cut = data.rfind(b"\n") + 1
                    data, rest = data[:cut], data[cut:]
                    if data:
                        yield Block(str(path), number, data, done + raw.tell())
                        number += data.count(b"\n")
                if rest:
                    yield Block(str(path), number, rest, done + raw.tell())
        except (OSError, EOFError) as e:
            raise PreprocessError(f"{path}: {e}") from e
        done += path.stat().st_size


_WORKER: dict[str, Any] = {}


def _init_worker(tok: MultimodalTokenizer, fmt: LineFormat, strict: bool) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: --workers is the CPU budget
    _WORKER.update(tok=tok, fmt=fmt, strict=strict)


def _process_in_worker(block: Block) -> BlockResult:
    return process_block(block, **_WORKER)


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    vision_tokens: int = 0
    trained_tokens: int = 0
    input_bytes: int = 0
    seconds: float = 0.0
    skipped: Counter[str] = field(default_factory=Counter)
    bad_lines: list[BadLineReport] = field(default_factory=list)

    def add(self, result: BlockResult) -> list[BadLineReport]:
        """Count a block in; returns its bad lines that are among the first few reported."""
        new = result.bad_lines[: REPORTED_BAD_LINES - len(self.bad_lines)]
        self.documents += len(result.batch.lengths)
        self.tokens += int(result.batch.lengths.sum())
        self.vision_tokens += int(result.batch.vision_tokens.sum())
        self.trained_tokens += result.trained_tokens
        self.input_bytes += result.input_bytes
        self.skipped += result.skipped
        self.bad_lines += new
        return new

    def rates(self) -> str:
        seconds = max(self.seconds, 1e-9)
        return f"{self.documents / seconds:,.0f} docs/s, {self.input_bytes / seconds / 1e6:.1f} MB/s"

    def report(self) -> str:
        lines = [
            f"documents       {self.documents:,} in {self.seconds:.1f} s ({self.rates()})",
            (
                f"tokens          {self.tokens:,}: text {self.tokens - self.vision_tokens:,}, "
                f"vision {self.vision_tokens:,}; trained {self.trained_tokens:,}"
            ),
            f"skipped lines   {sum(self.skipped.values()):,}"
            + "".join(f", {reason} {count:,}" for reason, count in sorted(self.skipped.items())),
        ]
        shown = [f"  {report}" for report in self.bad_lines]
        if sum(self.skipped.values()) > len(shown):
            shown.append(f"  (the first {len(shown)} shown)")
        return "\n".join(lines + shown)


class Progress:
    """A line every ``interval`` documents: rates so far and the ETA from the share of input read."""

    def __init__(self, summary: Summary, total_bytes: int, interval: int, log: IO[str]) -> None:
        self.summary, self.total_bytes, self.interval, self.log = summary, total_bytes, interval, log
        self.start = time.perf_counter()
        self.next = interval

    def update(self, position: int) -> None:
        self.summary.seconds = time.perf_counter() - self.start
        if self.summary.documents < self.next:
            return
        self.next = self.summary.documents + self.interval
        done = position / max(self.total_bytes, 1)
        eta = self.summary.seconds * (1 - done) / max(done, 1e-9)
        print(
            f"{self.summary.documents:,} documents ({self.summary.rates()}), {done:.0%} of the input, ETA {eta:.0f} s",
            file=self.log,
            flush=True,
        )


def _in_order(pool: multiprocessing.pool.Pool, blocks: Iterator[Block], depth: int) -> Iterator[BlockResult]:
    """Results in input order, with at most ``depth`` blocks in flight (bounded memory)."""
    pending: deque = deque()
    for block in blocks:
        pending.append(pool.apply_async(_process_in_worker, (block,)))
        if len(pending) >= depth:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def preprocess(
    inputs: Sequence[str | Path],
    output_prefix: str | Path,
    tok: MultimodalTokenizer,
    fmt: LineFormat = LineFormat(),
    workers: int = 1,
    strict: bool = False,
    log_interval: int = 10000,
    log: IO[str] = sys.stderr,
    block_bytes: int = 1 << 20,
) -> Summary:
    """Write the samples of every line of ``inputs`` (files or globs) to ``output_prefix``.

    Bad lines are reported to ``log`` (the first few), skipped and counted; with ``strict`` the first
    one raises :class:`PreprocessError`, and an input without any sample :class:`NoDocuments`. Nothing
    is written unless the whole input is processed.
    """
    paths = expand_inputs(inputs)
    _remove_stale_partials(output_prefix, log)
    summary = Summary()
    progress = Progress(summary, sum(path.stat().st_size for path in paths), log_interval, log)
    with (
        multiprocessing.Pool(workers, _init_worker, (tok, fmt, strict)) as pool,
        DatasetWriter(output_prefix, vocabulary=tok.model_config_fields()) as writer,
    ):
        for result in _in_order(pool, read_blocks(paths, block_bytes), 2 * workers):
            if strict and result.bad_lines:
                raise PreprocessError(f"{result.bad_lines[0]} (--strict: nothing written)")
            for report in summary.add(result):
                print(f"skipped {report}", file=log)
            writer.add_batch(result.batch)
            progress.update(result.position)
        if not summary.documents:
            raise NoDocuments(_no_documents(paths, summary))
        writer.commit()
    summary.seconds = time.perf_counter() - progress.start
    return summary


def _no_documents(paths: Sequence[Path], summary: Summary) -> str:
    """Why the input gave no sample, naming it and what its lines were."""
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in sorted(summary.skipped.items()))
    why = f"all {sum(summary.skipped.values()):,} lines are bad ({reasons})" if reasons else "the input is empty"
    return f"--input {' '.join(map(str, paths))}: no document to write, {why}; nothing written"


def _remove_stale_partials(output_prefix: str | Path, log: IO[str]) -> None:
    """Clean what earlier runs for this prefix left when they were killed, saying so."""
    removed = remove_stale_partials(output_prefix)
    if removed:
        print(
            f"removed the partial files of earlier runs that did not finish: {', '.join(map(str, removed))}", file=log
        )


def merge(prefixes: Sequence[str | Path], output_prefix: str | Path, log: IO[str] = sys.stderr) -> MultimodalDocuments:
    """Concatenate complete datasets (e.g. of shards), in order, into ``output_prefix``."""
    for prefix in prefixes:
        check_dataset(prefix)  # complete and undamaged, or an error naming the file
    _remove_stale_partials(output_prefix, log)
    with DatasetWriter(output_prefix) as writer:
        for prefix in prefixes:
            writer.add_dataset(prefix)
        writer.commit()
    return MultimodalDocuments(output_prefix)
