"""Images -> VQ codes, as jsonl lines that ``tools/preprocess_data.py`` reads (``vqcode`` plus the texts).

Images come as records of the input shards (:mod:`~megatron_unix.image.sources`: jsonl, image folders,
parquet, webdataset tars), in batches that the caller makes (:func:`~megatron_unix.image.ranks.batches`:
never across a shard's end, so that any split over ranks batches alike). Worker processes decode and
crop a batch each (:func:`load_chunk`), a few batches ahead; the main process encodes the batches in
input order and appends the lines to ``OUT.partial``. After every batch the partial is flushed and a progress record (inputs
consumed, output bytes, counts) replaces the previous one, so a killed run resumes where the record
says: the partial is cut to the recorded length and the consumed inputs are skipped. The output is
the same for any worker count and any number of interruptions. The VQGAN encodes in fp32 on every
device (:meth:`VQGAN.encode`), so codes equal those of an image prompt at inference.

Bad images (missing, unreadable, truncated, of more than 8 bits a channel, smaller than ``min_size`` on
the short side, more elongated than ``max_aspect``) and bad records (their reasons come from the
sources) are skipped and counted by reason, named by file and line, row or member, or, with
``strict``, stop the run. Palette, CMYK and grey images are converted to RGB as the reference does.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct
import sys
from collections import Counter, deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from megatron_unix.data.preprocess import in_order, new_pool
from megatron_unix.data.preprocess_report import ProgressLine, first_reported, reported_lines, skipped_text
from megatron_unix.files import lock_exclusively, settings_mismatch, write_error, write_text_atomically
from megatron_unix.image.sources import Item, SourceError
from megatron_unix.image.transforms import BadImage, crop_bytes, normalize, open_image
from megatron_unix.image.vqgan import VQGAN
from megatron_unix.platform import leftovers_of_dead_processes

PROGRESS_SUFFIX = ".progress.json"
PARTIAL_SUFFIX = ".partial"
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
"""What Pillow's decoders raise for damaged files (PNG chunk errors are SyntaxErrors)."""
HIGH_BIT_DEPTH = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
"""Pillow's modes of 16- and 32-bit pixels (16-bit grey PNGs, float TIFFs): converting them to RGB clips."""


class EncodeError(SourceError):
    """Fatal: the message names the file (and line) or the flag."""


class Batch(NamedTuple):
    """Items encoded together, and the share of the process's input read with them (for the ETA)."""

    items: list[Item]
    share: float


@dataclass(frozen=True)
class Filters:
    size: int
    min_size: int
    max_aspect: float


def load(item: Item, filters: Filters) -> np.ndarray:
    """The item's ``[size, size, 3]`` uint8 crop, or :class:`BadImage`. Size and aspect are checked from
    the header, before decoding."""
    if item.error:
        raise BadImage(*item.error)
    try:
        source = _base64_bytes(item.base64) if item.base64 is not None else item.data or item.path
    except ValueError as e:
        raise BadImage("unreadable", f"not an image ({e})") from None
    with open_image(source) as image:
        width, height = image.size
        if image.mode in HIGH_BIT_DEPTH:
            raise BadImage("high_bit_depth", f"{image.mode} pixels: more than 8 bits a channel, which RGB would clip")
        if min(width, height) < filters.min_size:
            raise BadImage("too_small", f"{width}x{height}: the short side is below --min-size {filters.min_size}")
        if max(width, height) / min(width, height) > filters.max_aspect:
            raise BadImage(
                "aspect_ratio", f"{width}x{height}: the aspect ratio is above --max-aspect {filters.max_aspect}"
            )
        try:
            image.load()
            return crop_bytes(image, filters.size)
        except DECODE_ERRORS as e:
            raise BadImage("truncated" if "truncated" in str(e) else "unreadable", f"cannot decode: {e}") from None


def _base64_bytes(text: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"invalid base64: {e}") from None


@dataclass
class Chunk:
    """A batch of items loaded: the crops of the good ones (``good`` indexes the items) and the bad."""

    crops: np.ndarray
    good: list[int]
    bad: list[tuple[int, str, str]]
    """(item index, reason, message)"""


def load_chunk(items: Sequence[Item], filters: Filters) -> Chunk:
    crops, good, bad = [], [], []
    for i, item in enumerate(items):
        try:
            crops.append(load(item, filters))
            good.append(i)
        except BadImage as e:
            bad.append((i, e.reason, str(e)))
    shape = (0, filters.size, filters.size, 3)
    return Chunk(np.stack(crops) if crops else np.zeros(shape, np.uint8), good, bad)


@dataclass
class Summary:
    """Counts over the whole output, earlier (resumed) runs included; rates over this run."""

    codebook_size: int
    encoded: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    bad_images: list[str] = field(default_factory=list)
    """The first few skipped inputs, ``where: reason: message``."""
    used: np.ndarray | None = None
    resumed_after: int = 0
    encoded_now: int = 0
    seconds: float = 0.0
    share: float = 0.0
    """Of the input read (this run's progress line, other ranks' total line)."""
    eta: float | None = None

    def __post_init__(self) -> None:
        if self.used is None:
            self.used = np.zeros(self.codebook_size, bool)

    def record(self) -> dict[str, Any]:
        return {
            "encoded": self.encoded,
            "skipped": dict(self.skipped),
            "bad_images": self.bad_images,
            "codes_used": base64.b64encode(np.packbits(self.used)).decode(),
            "codebook_size": self.codebook_size,
            "encoded_now": self.encoded_now,
            "seconds": self.seconds,
            "share": self.share,
            "eta": self.eta,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any], codebook_size: int, consumed: int) -> Summary:
        used = np.unpackbits(np.frombuffer(base64.b64decode(record["codes_used"]), np.uint8))[:codebook_size]
        return cls(
            codebook_size,
            record["encoded"],
            Counter(record["skipped"]),
            record["bad_images"],
            used.astype(bool),
            consumed,
        )

    def skip(self, where: str, reason: str, message: str) -> None:
        """Count a bad input in (the first few are named in the report)."""
        self.skipped[reason] += 1
        first_reported(self.bad_images, [f"{where}: {reason}: {message}"])

    def rate(self) -> str:
        return f"{self.encoded_now / max(self.seconds, 1e-9):,.1f} images/s"

    def skipped_text(self) -> str:
        return skipped_text(self.skipped)

    def report(self) -> str:
        used = int(self.used.sum())
        resumed = f"; resumed after {self.resumed_after:,} inputs" if self.resumed_after else ""
        lines = [
            f"images encoded  {self.encoded:,} ({self.encoded_now:,} in {self.seconds:.1f} s, {self.rate()}{resumed})",
            f"skipped         {self.skipped_text()}",
            *reported_lines(self.skipped, self.bad_images),
            f"codebook usage: {used} / {self.codebook_size} codes ({100 * used / max(self.codebook_size, 1):.1f}%)",
        ]
        return "\n".join(lines)


class ResumableOutput:
    """``OUT.partial`` plus ``OUT.progress.json`` until :meth:`finish` renames the partial to ``OUT``.
    The record names the settings it was written with; resuming with others is refused. An exclusive
    lock on the partial keeps a second process off the same output."""

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        self.path, self.settings = path, settings
        self.partial = path.with_name(path.name + PARTIAL_SUFFIX)
        self.progress = path.with_name(path.name + PROGRESS_SUFFIX)
        self.file: IO[bytes] | None = None
        self.created = False
        """Whether this run created the partial (a failure before its first batch removes it again)."""

    def open(self) -> dict[str, Any] | None:
        """Open for appending; the progress record of an interrupted run, or None for a fresh start.
        Temporary records that killed runs left (named after their PIDs) are removed."""
        if self.path.exists() and not self.partial.exists():
            raise EncodeError(f"{self.path} exists already (a finished run): remove it to encode again")
        if not self.path.parent.is_dir():
            raise EncodeError(f"--output {self.path}: its folder {self.path.parent} does not exist")
        self.created = not self.partial.exists()
        self.file = os.fdopen(os.open(self.partial, os.O_RDWR | os.O_CREAT, 0o644), "r+b")
        lock_exclusively(self.file, self.partial)
        for stale in leftovers_of_dead_processes(self.progress.parent, f".{self.progress.name}.", (".tmp",)):
            stale.unlink(missing_ok=True)
        record = self._read_record()
        length = record["bytes"] if record else 0
        if self.file.seek(0, os.SEEK_END) < length:
            raise EncodeError(f"{self.partial} is shorter than its progress record {self.progress} says: remove both")
        self.file.seek(length)
        self.file.truncate()
        return record

    def _read_record(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.progress.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise EncodeError(f"{self.progress}: unreadable progress record ({e}): remove it and the partial") from e
        if message := settings_mismatch(
            self.partial, record["settings"], self.settings, f"resume with those, or remove it and {self.progress}"
        ):
            raise EncodeError(message)
        return record

    def commit(self, data: bytes, consumed: int, summary: Summary) -> None:
        """Append ``data`` and record how far the input and output have come, durably and in that order."""
        try:
            self.file.write(data)
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as error:  # a full disk: the record still says where the partial was whole
            raise write_error(error, self.partial) from None
        record = {"settings": self.settings, "consumed": consumed, "bytes": self.file.tell(), **summary.record()}
        text = json.dumps(record)
        write_text_atomically(self.progress, text, durable=True)

    def finish(self, keep_record: bool = False) -> None:
        """Rename the partial to the output; ``keep_record`` keeps the progress record (a rank's summary,
        read when the ranks' outputs are joined)."""
        self.file.close()
        os.replace(self.partial, self.path)
        if not keep_record:
            self.progress.unlink()

    def discard(self) -> None:
        self.file.close()
        self.partial.unlink()
        self.progress.unlink(missing_ok=True)

    def close(self) -> None:
        """Close; a partial this run created and never committed to (a fatal first batch) is removed."""
        if self.file and not self.file.closed:
            if self.created and not self.progress.exists():
                self.partial.unlink(missing_ok=True)
            self.file.close()


def encode_images(
    inputs: Callable[[int], Iterable[Batch]],
    output: Path,
    model: VQGAN,
    filters: Filters,
    settings: dict[str, Any],
    workers: int = 0,
    strict: bool = False,
    log: IO[str] | None = None,
    log_interval: int = 1000,
    rank_output: bool = False,
) -> Summary:
    """Encode every item into ``output`` (jsonl), resuming an interrupted run of the same ``settings``.
    ``inputs(skip)`` gives the batches after the first ``skip`` items (those a resumed run has done).
    ``workers`` 0 loads images in this process. ``log`` (default stderr) gets the progress lines. An
    output without any image is an error, unless it is one rank's (``rank_output``: the ranks are joined
    later, with the progress record, which is kept)."""
    log = log or sys.stderr
    out = ResumableOutput(output, settings)
    progress = ProgressLine("images", log_interval, log, baseline=None)
    try:
        record = out.open()
        consumed = record["consumed"] if record else 0
        summary = Summary(model.config.n_embed)
        if record:
            summary = Summary.from_record(record, model.config.n_embed, consumed)
            print(f"resuming {out.partial}: {consumed:,} inputs done, {summary.encoded:,} images", file=log)
        submitted: deque[Batch] = deque()
        with new_pool(workers) if workers else nullcontext() as pool:
            chunks = _submitted(iter(inputs(consumed)), submitted)
            for chunk in in_order(pool, partial(load_chunk, filters=filters), chunks, 2 * workers):
                batch = submitted.popleft()
                consumed += len(batch.items)
                data = _encode_chunk(model, batch.items, chunk, summary, strict)
                summary.seconds, summary.share = progress.elapsed(), batch.share
                summary.eta = progress.eta(batch.share)
                out.commit(data, consumed, summary)
                progress.update(summary.encoded_now, summary.encoded, summary.rate, batch.share)
        if rank_output and not out.progress.exists():  # an empty rank: its record says so
            out.commit(b"", consumed, summary)
        if not summary.encoded and not rank_output:
            out.discard()
            raise EncodeError(
                f"{output}: no image to write (inputs skipped: {summary.skipped_text()}); nothing written"
            )
        out.finish(keep_record=rank_output)
    finally:
        out.close()
    summary.seconds = progress.elapsed()
    return summary


def _submitted(batches: Iterator[Batch], submitted: deque[Batch]) -> Iterator[list[Item]]:
    """The items of ``batches``, each batch kept in ``submitted`` too: its results come in the same
    order, without them."""
    for batch in batches:
        submitted.append(batch)
        yield batch.items


def _encode_chunk(model: VQGAN, items: list[Item], chunk: Chunk, summary: Summary, strict: bool) -> bytes:
    """The output lines of a chunk, in item order; counts its bad items (the first few reported)."""
    for index, reason, message in chunk.bad:
        if strict:
            raise EncodeError(f"{items[index].where}: {message} (--strict)")
        summary.skip(items[index].where, reason, message)
    if not chunk.good:
        return b""
    codes = encode_crops(model, chunk.crops)
    summary.used[np.unique(codes)] = True
    summary.encoded += len(chunk.good)
    summary.encoded_now += len(chunk.good)
    lines = (
        json.dumps({**items[i].fields, "vqcode": row}, ensure_ascii=False, separators=(",", ":")) + "\n"
        for i, row in zip(chunk.good, codes.tolist())
    )
    return "".join(lines).encode()


def encode_crops(model: VQGAN, crops: np.ndarray) -> np.ndarray:
    """``[n, size, size, 3]`` uint8 crops -> ``[n, codes_per_image]`` codes, on the model's device (in fp32,
    as :meth:`VQGAN.encode` always computes)."""
    device = next(model.parameters()).device
    return model.encode(normalize(crops).to(device)).cpu().numpy()
