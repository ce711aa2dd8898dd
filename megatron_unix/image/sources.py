"""The inputs of ``encode_images`` as shards: ordered, resumable streams of records (:class:`Item`).

A shard is the unit that runs split and resume by: a jsonl(.gz) file, an image folder, one row group of a
parquet file, a webdataset tar. ``Shard.items(skip)`` yields its records after the first ``skip`` (those
a resumed run has done) and ``Shard.count()`` says how many it yields, so that :func:`chained` resumes
past whole shards without reading them. A record carries the image (a path, base64 or bytes), the text
fields of the output line (:mod:`~megatron_unix.image.records`) and where it came from (file and line,
row or member); a bad row is a record with its reason, so that every shard yields a row's record
whatever is wrong with it (a corrupt parquet row group: each of its unread rows; a corrupt tar: one
record where reading stopped).

Parquet is read ``batch_rows`` rows at a time (only the row group's column chunks are held, never the
file); the image column holds Hugging Face's ``{"bytes", "path"}`` structs, lists of them, bytes or
paths. Tars are read member by member, in order (stdlib ``tarfile``; the data of skipped samples is
seeked over, and a tar cut short or with an unreadable header, which tarfile takes for the end, is a
bad record): members ``KEY.EXT`` are grouped by key as webdataset does,
the image from an image extension, the caption from ``KEY.txt``, further fields from ``KEY.json``.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from megatron_unix.data.preprocess import PreprocessError, read_blocks
from megatron_unix.files import expand_inputs
from megatron_unix.image.records import BadRecord, RecordKeys, output_fields

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
BLOCK_BYTES = 1 << 20
"""jsonl read per block (whole lines; a longer line makes a longer block)."""
BLOCK = tarfile.BLOCKSIZE
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)
"""What reading a damaged tar (or its gzip stream) raises."""


class SourceError(RuntimeError):
    """Fatal: an input that cannot be read as asked (the message names the file and the flag)."""


@dataclass(frozen=True)
class Item:
    """One record: where it is from (``file`` and, within it, ``at``: a line number, ``row N`` or a tar
    member), the text fields of its output line, and the image as a path, base64 text or bytes; or why
    the record has none (``error``: reason, message)."""

    file: str
    fields: dict[str, Any]
    path: str | None = None
    base64: str | None = None
    data: bytes | None = None
    error: tuple[str, str] | None = None
    progress: float = 0.0
    """Share of the input read when this item was (for the ETA)."""
    at: int | str | None = None

    @property
    def where(self) -> str:
        """``file:at`` (or the file alone): how reports name the record."""
        return self.file if self.at is None else f"{self.file}:{self.at}"


ImageRef = dict[str, str | bytes]
"""One image of a row, as :class:`Item`'s keyword: ``{"path": ...}``, ``{"base64": ...}`` or ``{"data": ...}``."""


@dataclass(frozen=True)
class SourceOptions:
    """Which keys and columns hold what. Key options list alternatives: the first one a row has is used."""

    image_key: str = "image"
    """jsonl: an image path (relative to ``image_root``) or a ``data:`` URI, or a list of them."""
    base64_key: str = "image_base64"
    """jsonl: the image as base64."""
    image_root: Path | None = None
    """Folder of relative image paths (jsonl, parquet); default: the input file's folder."""
    image_columns: tuple[str, ...] = ("images", "image")
    """parquet: the image column."""
    text_columns: tuple[str, ...] = ()
    """parquet: the columns the output carries; none: every column of JSON types but the image's."""
    keys: RecordKeys = field(default_factory=RecordKeys)
    batch_rows: int = 64
    """parquet rows decoded at a time."""


class Shard(ABC):
    """An ordered, resumable stream of records; ``size`` (bytes on disk) weighs its share of the progress."""

    name: str
    size: int

    @abstractmethod
    def items(self, skip: int = 0) -> Iterator[Item]:
        """The records after the first ``skip``; each ``progress`` is the share of this shard read."""

    @abstractmethod
    def count(self) -> int:
        """How many records :meth:`items` yields (from metadata or headers where the format has them)."""


def shards(inputs: Sequence[str | Path], options: SourceOptions) -> list[Shard]:
    """The shards of files and globs (each glob sorted), in the order given: folders are image folders,
    ``.parquet`` files give a shard per row group, ``.tar``/``.tar.gz``/``.tgz`` are webdataset shards,
    anything else is jsonl(.gz)."""
    result: list[Shard] = []
    for path in expand_inputs(inputs):
        if path.is_dir():
            result.append(FolderShard(path, options))
        elif path.suffix == ".parquet":
            result += parquet_shards(path, options)
        elif path.name.endswith(TAR_SUFFIXES):
            result.append(TarShard(path, options))
        else:
            result.append(JsonlShard(path, options))
    return result


def resumed(shards: Sequence[Shard], skip: int = 0) -> Iterator[tuple[float, float, Iterator[Item]]]:
    """Each shard's records after the first ``skip`` of all (shards done whole are left out unread), with
    the share of the input (by size) before the shard and the shard's own share."""
    total = sum(shard.size for shard in shards) or 1
    done = 0
    for shard in shards:
        if skip:
            count = shard.count()
            if skip >= count:
                skip -= count
                done += shard.size
                continue
        yield done / total, shard.size / total, shard.items(skip)
        skip = 0
        done += shard.size


def chained(shards: Sequence[Shard], skip: int = 0) -> Iterator[Item]:
    """The records of all shards in order, after the first ``skip``; progress over all of them, by size."""
    for before, share, items in resumed(shards, skip):
        for item in items:
            yield replace(item, progress=before + share * item.progress)


def record_item(
    file: str,
    at: int | str | None,
    fields: dict[str, Any],
    images: Sequence[ImageRef],
    keys: RecordKeys,
    progress: float,
    no_image: str = "no image",
) -> Item:
    """The item of a row with ``images``; a bad row (``no_image`` says where its image was looked for)
    becomes an item with its reason."""
    try:
        if not images:
            raise BadRecord("missing_image", no_image)
        return Item(file, output_fields(fields, len(images), keys), progress=progress, at=at, **images[0])
    except BadRecord as e:
        return bad_item(file, at, e.reason, str(e), progress)


def bad_item(file: str, at: int | str | None, reason: str, message: str, progress: float = 0.0) -> Item:
    return Item(file, {}, error=(reason, message), progress=progress, at=at)


class JsonlShard(Shard):
    """A jsonl(.gz) file: a line per record, numbered from 1 (blank lines are not records)."""

    def __init__(self, path: Path, options: SourceOptions) -> None:
        self.path, self.options, self.name = path, options, str(path)
        self.size = path.stat().st_size

    def items(self, skip: int = 0) -> Iterator[Item]:
        """Skipped lines are not parsed; the progress of a line is where it ends in the file on disk."""
        position, total = 0, self.size or 1
        for block, lines in self._blocks():
            start, end, offset = position, block.position, 0
            position = block.position
            for number, line in enumerate(lines, block.first_line):
                offset = min(offset + len(line) + 1, len(block.data))
                if not line.strip():
                    continue
                if skip:
                    skip -= 1
                    continue
                progress = (start + (end - start) * offset / len(block.data)) / total
                yield self._line_item(line, number, progress)

    def count(self) -> int:
        return sum(1 for _, lines in self._blocks() for line in lines if line.strip())

    def _blocks(self) -> Iterator[tuple[Any, list[bytes]]]:
        try:
            for block in read_blocks([self.path], BLOCK_BYTES):
                lines = block.data.split(b"\n")
                if block.data.endswith(b"\n"):
                    lines.pop()
                yield block, lines
        except PreprocessError as e:
            raise SourceError(str(e)) from e

    def _line_item(self, line: bytes, number: int, progress: float) -> Item:
        o = self.options
        try:
            record = json.loads(line)
        except ValueError as e:
            return bad_item(self.name, number, "unparsable_json", str(e), progress)
        if not isinstance(record, dict):
            why = f"a JSON {type(record).__name__}, not an object"
            return bad_item(self.name, number, "unparsable_json", why, progress)
        fields = {k: v for k, v in record.items() if k not in (o.image_key, o.base64_key)}
        images = self._images(record.get(o.image_key), record.get(o.base64_key))
        why = f"no image: neither {o.image_key!r} (a path or data: URI) nor {o.base64_key!r} (base64) holds a string"
        return record_item(self.name, number, fields, images, o.keys, progress, why)

    def _images(self, paths: Any, data: Any) -> list[ImageRef]:
        if isinstance(data, str):
            return [{"base64": data}]
        root = self.options.image_root or self.path.parent
        paths = paths if isinstance(paths, list) else [paths]
        return [
            {"base64": p} if p.startswith("data:") else {"path": str(root / p)}
            for p in paths
            if isinstance(p, str) and p
        ]


class FolderShard(Shard):
    """The images under a folder (recursively, sorted by path), each captioned by its same-stem ``.txt``."""

    def __init__(self, directory: Path, options: SourceOptions) -> None:
        if not directory.is_dir():
            raise SourceError(f"--image-dir {directory}: no such directory")
        self.options, self.name = options, str(directory)
        self.paths = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        self.size = sum(p.stat().st_size for p in self.paths)

    def items(self, skip: int = 0) -> Iterator[Item]:
        """Skipped images' captions are not read."""
        caption_key = self.options.keys.caption_keys[0]
        for i, path in enumerate(self.paths[skip:], skip):
            text = path.with_suffix(".txt")
            fields = {caption_key: text.read_text(encoding="utf-8").strip()} if text.is_file() else {}
            progress = i / len(self.paths)
            yield record_item(str(path), None, fields, [{"path": str(path)}], self.options.keys, progress)

    def count(self) -> int:
        return len(self.paths)


def parquet_shards(path: Path, options: SourceOptions) -> list[Shard]:
    """A shard per row group of a parquet file; a file whose footer cannot be read is one bad record.
    A file without the image column (or a named text column) is refused: the flags do not fit it."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
        schema = metadata.schema.to_arrow_schema()
    except arrow_errors() as e:
        return [BrokenShard(path, "corrupt_file", f"not a readable parquet file ({one_line(e)})")]
    names = schema.names
    image = next((c for c in options.image_columns if c in names), None)
    if image is None:
        raise SourceError(f"{path}: no image column {'/'.join(options.image_columns)} (--image-column); it has {names}")
    missing = [c for c in options.text_columns if c not in names]
    if missing:
        raise SourceError(f"{path}: no column {missing[0]!r} (--text-column); it has {names}")
    texts = list(options.text_columns) or [c for c in names if c != image and _json_type(schema.field(c).type)]
    first_row, result = 0, []
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        size = sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        result.append(ParquetShard(path, index, first_row, group.num_rows, size, image, texts, options))
        first_row += group.num_rows
    return result


def arrow_errors() -> tuple[type[BaseException], ...]:
    """What pyarrow raises for a damaged file (imported late: pyarrow is slow to import)."""
    import pyarrow as pa

    return (pa.ArrowException, OSError, ValueError, EOFError)


def one_line(error: BaseException) -> str:
    """An error's message on one line (pyarrow's span several)."""
    return " ".join(str(error).split())


def _json_type(kind: Any) -> bool:
    """Whether values of an arrow type convert to JSON (strings, numbers, booleans, lists, structs)."""
    import pyarrow.types as t

    if t.is_dictionary(kind):
        return _json_type(kind.value_type)
    if t.is_list(kind) or t.is_large_list(kind) or t.is_fixed_size_list(kind):
        return _json_type(kind.value_type)
    if t.is_struct(kind):
        return all(_json_type(kind.field(i).type) for i in range(kind.num_fields))
    simple = (t.is_string, t.is_large_string, t.is_integer, t.is_floating, t.is_boolean, t.is_null)
    return any(is_kind(kind) for is_kind in simple)


class ParquetShard(Shard):
    """One row group of a parquet file; its rows are named ``row N``, counted from 0 in the file."""

    def __init__(
        self,
        path: Path,
        index: int,
        first_row: int,
        rows: int,
        size: int,
        image_column: str,
        text_columns: list[str],
        options: SourceOptions,
    ) -> None:
        self.path, self.index, self.first_row, self.rows, self.size = path, index, first_row, rows, size
        self.image_column, self.text_columns, self.options = image_column, text_columns, options
        self.name = f"{path}:row group {index}"

    def count(self) -> int:
        return self.rows

    def items(self, skip: int = 0) -> Iterator[Item]:
        """Rows ``batch_rows`` at a time; when the row group cannot be read on, its unread rows are bad
        records (``corrupt_row_group``)."""
        import pyarrow.parquet as pq

        done = 0
        try:
            with pq.ParquetFile(self.path) as file:
                columns = [self.image_column, *self.text_columns]
                batches = file.iter_batches(self.options.batch_rows, [self.index], columns)
                while (batch := next(batches, None)) is not None:
                    start = max(skip - done, 0)
                    rows = batch.slice(start).to_pylist() if start < batch.num_rows else []
                    for i, row in enumerate(rows, done + start):
                        yield self._row_item(row, i)
                    done += batch.num_rows
        except arrow_errors() as e:
            first = max(done, skip)
            why = f"row group {self.index} unreadable from row {self.first_row + first} on ({one_line(e)})"
            for i in range(first, self.rows):
                yield bad_item(str(self.path), f"row {self.first_row + i}", "corrupt_row_group", why, i / self.rows)

    def _row_item(self, row: dict[str, Any], i: int) -> Item:
        root = self.options.image_root or self.path.parent
        images = list(_parquet_images(row.pop(self.image_column), root))
        why = f"no image: column {self.image_column!r} is empty"
        at = f"row {self.first_row + i}"
        return record_item(str(self.path), at, row, images, self.options.keys, (i + 1) / self.rows, why)


def _parquet_images(value: Any, root: Path) -> Iterator[ImageRef]:
    """The images of an image cell: HF's ``{"bytes", "path"}`` struct (bytes first), bytes, a path, or a
    list of them."""
    if isinstance(value, list):
        for element in value:
            yield from _parquet_images(element, root)
    elif isinstance(value, dict):
        yield from _parquet_images(value.get("bytes") or value.get("path"), root)
    elif isinstance(value, bytes) and value:
        yield {"data": value}
    elif isinstance(value, str) and value:
        yield {"path": str(root / value)}


class BrokenShard(Shard):
    """A file that gives no records at all: one bad record naming it."""

    def __init__(self, path: Path, reason: str, message: str) -> None:
        self.name, self.reason, self.message = str(path), reason, message
        self.size = path.stat().st_size

    def items(self, skip: int = 0) -> Iterator[Item]:
        if not skip:
            yield bad_item(self.name, None, self.reason, self.message, 1.0)

    def count(self) -> int:
        return 1


WEBDATASET_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
"""webdataset's split of a member name into the sample key (folders and the name up to its first dot)
and the extension."""


@dataclass
class Sample:
    """A tar's members of one key; ``at`` names it in reports (its image member, else the key)."""

    key: str
    members: dict[str, bytes | None] = field(default_factory=dict)

    @property
    def at(self) -> str:
        return next((f"{self.key}.{e}" for e in self.members if f".{e.lower()}" in IMAGE_SUFFIXES), self.key)


class TarShard(Shard):
    """A webdataset tar(.gz), a member at a time: a record per key (members named ``KEY.EXT``, consecutive)."""

    def __init__(self, path: Path, options: SourceOptions) -> None:
        self.path, self.options, self.name = path, options, str(path)
        self.size = path.stat().st_size

    def items(self, skip: int = 0) -> Iterator[Item]:
        """Skipped samples' members are passed over unread."""
        for i, (sample, progress) in enumerate(self._samples(skip)):
            if i >= skip:
                yield self._item(sample, progress) if isinstance(sample, Sample) else sample

    def count(self) -> int:
        return sum(1 for _ in self._samples(None))

    def _samples(self, skip: int | None) -> Iterator[tuple[Sample | Item, float]]:
        """The samples in order, their members read from the ``skip``-th on (None: none read); where the
        tar cannot be read on, a bad record in place of the sample being read, and the end. The same
        number comes whether members are read or not: a failed read ends the sample, as the failed
        header it would otherwise meet next."""
        sample: Sample | None = None
        done, position, where = 0, 0.0, "the start"  # the member being read, or the last one read
        try:
            with open(self.path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
                for member in tar:
                    tar.members = []  # tarfile's list of members would grow with the tar
                    position = raw.tell() / (self.size or 1)
                    where = member.name
                    match = WEBDATASET_KEY.match(member.name)
                    if not member.isfile() or not match:
                        continue
                    key, extension = match.groups()
                    if sample is None or key != sample.key:
                        if sample is not None:
                            yield sample, position
                            done += 1
                        sample = Sample(key)
                    read = skip is not None and done >= skip
                    sample.members[extension] = tar.extractfile(member).read() if read else None
                    where = f"after {member.name}"
                if sample is not None:
                    yield sample, 1.0
                rest, length = _rest(tar.fileobj)
                if rest:
                    raise tarfile.ReadError(f"an unreadable member header at byte {tar.offset}: {rest!r}...")
                if length < BLOCK:  # tarfile reads a file's end as the end of the archive
                    raise tarfile.ReadError(f"no end-of-archive blocks after byte {tar.offset}: cut short?")
        except TAR_ERRORS as e:
            why = f"tar unreadable from here on ({one_line(e)})"
            yield bad_item(self.name, where, "corrupt_member", why, position), 1.0

    def _item(self, sample: Sample, progress: float) -> Item:
        keys = self.options.keys
        fields: dict[str, Any] = {}
        try:
            if (meta := sample.members.get("json")) is not None:
                fields = json.loads(meta)
                if not isinstance(fields, dict):
                    raise ValueError(f"a JSON {type(fields).__name__}, not an object")
        except ValueError as e:
            return bad_item(self.name, sample.at, "unparsable_json", f"{sample.key}.json: {e}", progress)
        if (caption := sample.members.get("txt")) is not None:
            try:
                fields[keys.caption_keys[0]] = caption.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                return bad_item(self.name, sample.at, "unreadable_text", f"{sample.key}.txt: {e}", progress)
        images = [{"data": data} for e, data in sample.members.items() if f".{e.lower()}" in IMAGE_SUFFIXES]
        why = f"no image: no member {sample.key}.{{{','.join(sorted(s[1:] for s in IMAGE_SUFFIXES))}}}"
        return record_item(self.name, sample.at, fields, images, keys, progress, why)


def _rest(stream: Any, chunk: int = 1 << 16) -> tuple[bytes, int]:
    """What is left of a tar after the block that tarfile took for its end: up to 16 bytes from the first
    non-zero one (b"" if all zeros, as a tar's end is: tarfile takes an unreadable header for the end,
    silently), and how many bytes are left (a whole tar has at least a second zero block)."""
    length = 0
    while data := stream.read(chunk):
        length += len(data)
        if stripped := data.lstrip(b"\0"):
            return stripped[:16], length
    return b"", length
