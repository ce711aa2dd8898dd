"""The checksum manifest of a checkpoint: written at save, checked at load, so damage is caught at the door.

A garbled shard otherwise loads silently (DCP reads raw tensor bytes unchecked) and changes the run.
``checksums.json`` records the size and CRC-32 of every file in an ``iter_*`` directory. It is written
into ``iter_*.partial`` after every rank has finished writing and before the commit rename, so it is
part of the atomic commit.

CRC-32 (``zlib.crc32``), streamed in 8 MiB chunks through one reused buffer: about 2.5 GB/s per
core on a page-cached 200 MB file here, against 1.4 GB/s for sha256 and 0.85 GB/s for blake2b, and
the threat is accidental damage (bit rot, truncated or partial copies, a file from another
checkpoint), not tampering. A CRC-32 misses a random corruption with probability 2^-32; the exact
size is checked first, which catches truncation without reading the file. Every rank hashes a share
of the files, so a save or load reads the checkpoint once more in all, spread over the job.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable
from pathlib import Path

MANIFEST = "checksums.json"
ALGORITHM = "crc32"
CHUNK_BYTES = 8 << 20
SKIP_HINT = "pass --no-verify-checkpoint to load it anyway"


class CheckpointError(OSError):
    """A checkpoint that cannot be written or read as it should; the message names the file or directory."""


def crc32(path: Path) -> str:
    """The file's CRC-32 as 8 hex digits, read in chunks (a multi-GB shard never sits in memory)."""
    value = 0
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as stream:
        while size := stream.readinto(buffer):
            value = zlib.crc32(view[:size], value)
    return f"{value:08x}"


def files(directory: Path) -> list[str]:
    """Every file under ``directory`` but the manifest, as sorted relative POSIX paths."""
    return sorted(
        p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def describe(directory: Path, names: Iterable[str]) -> dict[str, dict[str, int | str]]:
    """Manifest entries (size, CRC-32) of the named files."""
    return {name: {"size": (directory / name).stat().st_size, ALGORITHM: crc32(directory / name)} for name in names}


def write_manifest(directory: Path, entries: dict[str, dict[str, int | str]]) -> None:
    """Write the manifest and fsync it, so a committed checkpoint never holds an empty one."""
    path = directory / MANIFEST
    with open(path, "w") as stream:
        json.dump({"algorithm": ALGORITHM, "files": dict(sorted(entries.items()))}, stream, indent=1)
        stream.flush()
        os.fsync(stream.fileno())


def read_manifest(directory: Path) -> dict[str, dict[str, int | str]] | None:
    """The manifest's entries by file name; None for a checkpoint written before manifests existed."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        algorithm, entries = manifest["algorithm"], manifest["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is unreadable ({error}); {SKIP_HINT}") from error
    if algorithm != ALGORITHM:
        raise CheckpointError(f"{path} uses checksum {algorithm!r}; this version checks {ALGORITHM!r}")
    well_formed = isinstance(entries, dict) and all(
        isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get(ALGORITHM), str)
        for e in entries.values()
    )
    if not well_formed:
        raise CheckpointError(f"{path} is malformed (each file needs a size and a {ALGORITHM}); {SKIP_HINT}")
    return entries


def verify(directory: Path, names: Iterable[str], entries: dict[str, dict[str, int | str]]) -> None:
    """Raise CheckpointError naming the first of ``names`` (manifest entries) that is missing, has another
    size, or another checksum. The size is checked before anything is read."""
    for name in names:
        path, expected = directory / name, entries[name]
        if not path.is_file():
            raise CheckpointError(f"{path} is missing ({MANIFEST} lists it)")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(
                f"{path} has {size} bytes but {MANIFEST} records {expected['size']}: truncated or "
                f"overwritten; {SKIP_HINT}"
            )
        actual = crc32(path)
        if actual != expected[ALGORITHM]:
            raise CheckpointError(
                f"{path} is damaged: its CRC-32 is {actual} but {MANIFEST} records {expected[ALGORITHM]}; {SKIP_HINT}"
            )
