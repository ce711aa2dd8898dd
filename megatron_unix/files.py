"""Files in and out, as every tool of the stack handles them: inputs plain or gzip-compressed, outputs
written whole or not at all (a reader never sees half a file, a crash keeps the previous one)."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import BinaryIO


@contextmanager
def open_input(path: Path) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """``(raw, stream)``: ``stream`` reads ``path`` decompressed when it ends in ``.gz``; ``raw.tell()``
    says how much of the file on disk has been read (progress and ETA)."""
    with (
        open(path, "rb") as raw,
        gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else nullcontext(raw) as stream,
    ):
        yield raw, stream


def write_atomically(path: str | Path, write: Callable[[Path], None], durable: bool = False) -> None:
    """``write(temporary)`` then rename it to ``path``; the temporary (named after ``path`` and this
    process) is removed when ``write`` fails. ``durable`` flushes it to disk before the rename, for
    records that a resume trusts after a crash."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        if durable:
            with open(temporary, "rb") as f:
                os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) as the whole content of ``path``, or nothing (:func:`write_atomically`)."""
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
