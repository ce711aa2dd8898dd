"""Files in and out, as every tool of the stack handles them: inputs plain or gzip-compressed, outputs
written whole or not at all (a reader never sees half a file, a crash keeps the previous one)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from glob import glob
from pathlib import Path
from typing import Any, BinaryIO


def expand_inputs(patterns: Sequence[str | Path]) -> list[Path]:
    """Files and globs (each sorted) in the order given; a pattern that matches nothing is an error."""
    paths = []
    for pattern in map(str, patterns):
        matches = sorted(glob(pattern, recursive=True))
        if not matches:
            raise FileNotFoundError(f"--input {pattern}: no such file")
        paths += map(Path, matches)
    return paths


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
    records that a resume trusts after a crash. A failure to write the temporary (a missing folder, a
    full disk) is raised naming ``path``, the file the user asked for, never the temporary."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        if durable:
            with open(temporary, "rb") as f:
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if error.filename not in (None, str(temporary), temporary) or error.errno is None:
            raise  # about another file, which it names
        raise OSError(error.errno, error.strerror, str(path)) from error
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: str | Path, text: str, durable: bool = False) -> None:
    """``text`` (UTF-8) as the whole content of ``path``, or nothing (:func:`write_atomically`)."""
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"), durable)


def changed_keys(recorded: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two settings records (a key missing on one side differs)."""
    return sorted(k for k in recorded.keys() | wanted.keys() if recorded.get(k) != wanted.get(k))


def settings_mismatch(
    path: Path,
    recorded: Mapping[str, Any],
    wanted: Mapping[str, Any],
    remedy: str = "use another --output-dir, or remove it to start over",
) -> str | None:
    """Why ``path``, written with ``recorded`` settings, must not be resumed with ``wanted``; None if it may."""
    changed = changed_keys(recorded, wanted)
    if not changed:
        return None
    diffs = "; ".join(f"{k}: {recorded.get(k)!r} there, {wanted.get(k)!r} now" for k in changed)
    return f"{path} was written with other settings ({diffs}): {remedy}"


def stat_digest(files: Iterable[Path]) -> str:
    """A digest of the files' resolved names, sizes and modification times: what tells a resumed output
    that the model or data behind it was rewritten in place (reading every byte of a checkpoint would
    cost more than the check is worth)."""
    stats = sorted((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]
