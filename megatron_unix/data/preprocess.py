"""Preprocessing: jsonl(.gz) lines -> samples in the spec's layouts (§3) -> a dataset on disk.

:func:`preprocess` reads the inputs in blocks of whole lines, ``workers`` processes parse
(:mod:`~megatron_unix.data.jsonl_schema`) and tokenize (:mod:`~megatron_unix.data.batch_tokenizer`)
the blocks and the main process writes the results in input order, reporting as it goes
(:mod:`~megatron_unix.data.preprocess_report`). Every random choice comes from an RNG seeded with
``(seed, the line's bytes)``: the output is the same for any worker count and for any split of the
input into files, so merging the datasets of shards (:func:`merge`) gives the dataset of their
concatenation.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Sequence, TypeVar

from megatron_unix.data.batch_tokenizer import DeferredTokenizer
from megatron_unix.data.indexed import (
    DatasetWriter,
    MultimodalDocuments,
    check_dataset,
    remove_stale_partials,
)
from megatron_unix.data.jsonl_schema import BadLine, LineFormat, parse_line
from megatron_unix.data.preprocess_report import REPORTED_BAD_LINES, BadLineReport, BlockResult, Progress, Summary
from megatron_unix.data.tokenizer import MultimodalTokenizer
from megatron_unix.files import expand_inputs, open_input

T = TypeVar("T")
R = TypeVar("R")


class PreprocessError(RuntimeError):
    """Fatal: nothing is written."""


class NoDocuments(PreprocessError):
    """The input holds no sample (empty, or every line bad): an error, not an empty dataset."""


@dataclass
class Block:
    """Whole lines of one file; ``position`` is how far reading had come (on-disk bytes, all files)."""

    path: str
    first_line: int
    data: bytes
    position: int


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


def read_blocks(paths: Sequence[Path], block_bytes: int) -> Iterator[Block]:
    """Whole lines in blocks of up to about ``block_bytes`` (decompressed), file after file. A block holds
    what one read gave (plus the end of a line begun before), so lines that a pipe has delivered are
    yielded without waiting for more; a pipe's position counts as 0."""
    done = 0
    for path in paths:
        try:
            with open_input(path) as (raw, stream):
                seekable = raw.seekable()
                number, rest = 1, b""
                while chunk := stream.read1(block_bytes):
                    data = rest + chunk
                    cut = data.rfind(b"\n") + 1
                    data, rest = data[:cut], data[cut:]
                    if data:
                        yield Block(str(path), number, data, done + (raw.tell() if seekable else 0))
                        number += data.count(b"\n")
                if rest:
                    yield Block(str(path), number, rest, done + (raw.tell() if seekable else 0))
        except (OSError, EOFError) as e:
            raise PreprocessError(f"{path}: {e}") from e
        done += path.stat().st_size


_WORKER: dict[str, Any] = {}


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _init_worker(tok: MultimodalTokenizer, fmt: LineFormat, strict: bool) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: --workers is the CPU budget
    quiet_worker()
    _WORKER.update(tok=tok, fmt=fmt, strict=strict)


def quiet_worker() -> None:
    """Initializer of worker processes: a stop is the main process's to report. Ctrl-C reaches the whole
    process group, and a worker whose main process was killed would print a BrokenPipeError traceback;
    it ends quietly instead. SIGTERM (slurm's, or the pool's terminate) ends a worker at once, whatever
    handler the main process had when it forked. A worker starts with the stop signals blocked
    (:func:`new_pool`), so that one sent before these lines waits for them, not for the inherited handler
    (a SIGTERM caught by that handler and then dropped left a worker that the pool waits for forever)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def new_pool(
    workers: int, initializer: Callable[..., None] = quiet_worker, initargs: tuple = ()
) -> multiprocessing.pool.Pool:
    """Worker processes started (and their pool's threads, which start replacements) with the stop signals
    blocked: each unblocks them once its own handling is set (``initializer`` calls :func:`quiet_worker`).
    A stop sent meanwhile to this process is delivered when this returns."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return multiprocessing.Pool(workers, initializer, initargs)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _process_in_worker(block: Block) -> BlockResult:
    return process_block(block, **_WORKER)


def in_order(
    pool: multiprocessing.pool.Pool | None, func: Callable[[T], R], items: Iterable[T], depth: int
) -> Iterator[R]:
    """``func`` of each item, in input order: in ``pool`` with at most ``depth`` items in flight (bounded
    memory), or in this process when ``pool`` is None."""
    if pool is None:
        yield from map(func, items)
        return
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(func, (item,)))
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
    log: IO[str] | None = None,
    block_bytes: int = 1 << 20,
) -> Summary:
    """Write the samples of every line of ``inputs`` (files or globs) to ``output_prefix``.

    Bad lines are reported to ``log`` (the first few), skipped and counted; with ``strict`` the first
    one raises :class:`PreprocessError`, and an input without any sample :class:`NoDocuments`. Nothing
    is written unless the whole input is processed. ``log`` defaults to the stderr of the moment.
    """
    log = log or sys.stderr
    paths = expand_inputs(inputs)
    _remove_stale_partials(output_prefix, log)
    summary = Summary()
    progress = Progress(summary, sum(path.stat().st_size for path in paths), log_interval, log)
    with (
        new_pool(workers, _init_worker, (tok, fmt, strict)) as pool,
        DatasetWriter(output_prefix, vocabulary=tok.model_config_fields()) as writer,
    ):
        for result in in_order(pool, _process_in_worker, read_blocks(paths, block_bytes), 2 * workers):
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


def merge(prefixes: Sequence[str | Path], output_prefix: str | Path, log: IO[str] | None = None) -> MultimodalDocuments:
    """Concatenate complete datasets (e.g. of shards), in order, into ``output_prefix``."""
    log = log or sys.stderr
    for prefix in prefixes:
        check_dataset(prefix)  # complete and undamaged, or an error naming the file
    _remove_stale_partials(output_prefix, log)
    with DatasetWriter(output_prefix) as writer:
        for prefix in prefixes:
            writer.add_dataset(prefix)
        writer.commit()
    return MultimodalDocuments(output_prefix)
