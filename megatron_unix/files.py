"""Files in and out, as every tool of the stack handles them: inputs plain or gzip-compressed, outputs
written whole or not at all (a reader never sees half a file, a crash keeps the previous one)."""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from glob import glob
from pathlib import Path
from typing import IO, Any, BinaryIO


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


class WriteError(OSError):
    """A write that failed (a full disk, a missing folder), naming the file meant, not its temporary."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def write_error(error: OSError, path: str | Path) -> OSError:
    """``error`` (raised while writing ``path`` or its temporary) as a :class:`WriteError` naming ``path``;
    a missing folder is named as such."""
    if isinstance(error, WriteError):
        return error
    path = Path(path)
    if error.errno == errno.ENOENT and not path.parent.is_dir():
        return WriteError(error.errno, f"its folder {path.parent} does not exist", str(path))
    return WriteError(error.errno, error.strerror or str(error), str(path))


def default_mode() -> int:
    """The permissions a plain ``open`` gives a new file under this process's umask (0644 under 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


TEMPORARY = ".{name}.", ".tmp"
"""The temporary of a file ``NAME`` while it is written: ``.NAME.<PID>.tmp`` beside it."""


def temporary_name(path: str | Path) -> Path:
    """Where this process writes ``path`` before renaming it over ``path`` (:data:`TEMPORARY`)."""
    path = Path(path)
    prefix, suffix = TEMPORARY
    return path.with_name(f"{prefix.format(name=path.name)}{os.getpid()}{suffix}")


def remove_stale_temporaries(path: str | Path) -> None:
    """Remove the temporaries of ``path`` that killed writers left (their PID runs no more)."""
    from megatron_unix.platform import leftovers_of_dead_processes

    path = Path(path)
    prefix, suffix = TEMPORARY
    for stale in leftovers_of_dead_processes(path.parent, prefix.format(name=path.name), (suffix,)):
        stale.unlink(missing_ok=True)


def write_atomically(path: str | Path, write: Callable[[Path], None], durable: bool = False) -> None:
    """``write(temporary)`` then rename it to ``path``; the temporary (:func:`temporary_name`) is removed
    when ``write`` fails, and a failure names ``path`` (:func:`write_error`). ``durable`` flushes it to
    disk before the rename, for records that a resume trusts after a crash. The file gets the usual
    permissions (writers such as safetensors create theirs 0600)."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        write(temporary)
        os.chmod(temporary, default_mode())
        if durable:
            with open(temporary, "rb") as f:
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as error:
        if error.filename not in (None, str(temporary), temporary):
            raise  # about another file, which it names
        raise write_error(error, path) from None
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


class OutputBusy(ValueError):
    """Another process holds the lock of an output (:func:`lock_exclusively`)."""


def lock_exclusively(file: IO[Any] | int, path: str | Path, wait: bool = False) -> None:
    """Take the exclusive lock of ``file`` (an open file or folder descriptor of ``path``) for as long as it
    stays open, the one rule that keeps two writers off a resumable output: the second is refused
    (:class:`OutputBusy`), or with ``wait`` waits its turn (short merges such as results.json). The lock
    goes with the process: a killed writer leaves nothing to clean up."""
    try:
        fcntl.flock(file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        raise OutputBusy(
            f"{path}: another process is writing it (wait for it to finish, or use another output)"
        ) from None


@contextmanager
def exclusive(path: str | Path, wait: bool = False) -> Iterator[None]:
    """:func:`lock_exclusively` on an existing file or folder, held for the ``with`` block."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        lock_exclusively(descriptor, path, wait)
        yield
    finally:
        os.close(descriptor)
