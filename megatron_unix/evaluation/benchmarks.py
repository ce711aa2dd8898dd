"""VLMEvalKit benchmark files (MME, POPE, MMBench, SEEDBench_IMG) read from a local folder.

The files are VLMEvalKit's TSVs as downloaded: a header row, then one question per row with
``index``, ``image`` (base64), ``question``, ``answer``, ``category`` and, for multiple choice, option
columns ``A``, ``B``, ... (empty where a question has fewer options), ``hint`` and ``l2-category``
where present. As in VLMEvalKit, an ``image`` field of at most 64 characters is not an image but the
``index`` of the row that holds it (MME's second question of an image, MMBench's circular variants).
Rows are checked when the file is read; images are decoded only when asked for (a full MMBench is
hundreds of MB of base64), and a bad one is then reported with its file and row too.
"""

from __future__ import annotations

import base64
import binascii
import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from megatron_unix.image.transforms import BadImage, open_image, whiten

IMAGE_REFERENCE_MAX_LEN = 64
"""VLMEvalKit's rule: an ``image`` value this short names another row's ``index``."""

csv.field_size_limit(2**31 - 1)  # one base64 image is far above csv's default 128 KiB field limit


class BenchmarkError(ValueError):
    """A benchmark file that is missing or has a bad row; the message names the file (and row)."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """One VLMEvalKit dataset: its file name, answer kind and the scorer that reads its answers."""

    name: str
    kind: str  # "yes_no" or "multiple_choice"
    scorer: str  # key of scoring.SCORERS
    required: tuple[str, ...]

    @property
    def filename(self) -> str:
        return f"{self.name}.tsv"


_YES_NO = ("index", "image", "question", "answer")
_CHOICE = ("index", "image", "question", "A", "B", "answer")
BENCHMARKS = {
    spec.name: spec
    for spec in (
        BenchmarkSpec("MME", "yes_no", "mme", (*_YES_NO, "category")),
        BenchmarkSpec("POPE", "yes_no", "pope", _YES_NO),
        BenchmarkSpec("MMBench_DEV_EN", "multiple_choice", "mmbench", (*_CHOICE, "category")),
        BenchmarkSpec("MMBench_DEV_CN", "multiple_choice", "mmbench", (*_CHOICE, "category")),
        BenchmarkSpec("SEEDBench_IMG", "multiple_choice", "seed", (*_CHOICE, "category")),
    )
}
"""The reference evaluated MMBench_DEV_EN/CN, POPE and MME through VLMEvalKit; SEED is added here."""


@dataclass(frozen=True)
class Item:
    """One question. ``image_key`` groups the questions about one image (MME's acc+): VLMEvalKit's
    ``image_path`` when the file has it, else the index of the row holding the image."""

    index: int
    question: str
    answer: str
    category: str = ""
    options: dict[str, str] = field(default_factory=dict)
    hint: str = ""
    l2_category: str = ""
    image_key: str = ""
    image_b64: str = field(default="", repr=False)
    origin: str = ""  # "FILE: row N", for errors

    def image(self) -> Image.Image:
        """The decoded RGB image, transparency on white as for training images (``image.transforms.whiten``);
        a bad one is a :class:`BenchmarkError` naming file and row."""
        try:
            with open_image(base64.b64decode(self.image_b64, validate=True)) as image:
                rgb = whiten(image)
                return rgb.copy() if rgb is image else rgb
        except binascii.Error as error:
            raise BenchmarkError(f"{self.origin}: image is not a readable base64 image ({error})") from None
        except BadImage as error:
            raise BenchmarkError(f"{self.origin}: image is not a readable base64 image: {error}") from None
        except OSError as error:  # a truncated image fails while decoding
            raise BenchmarkError(
                f"{self.origin}: image is not a readable base64 image (cannot decode: {error})"
            ) from None


@dataclass
class Benchmark:
    spec: BenchmarkSpec
    path: Path
    items: list[Item]
    skipped: list[str] = field(default_factory=list)
    """Why each skipped row was skipped (``skip_bad=True``), file and row included."""

    def with_images(self, skip_bad: bool = False) -> Iterator[tuple[Item, Image.Image]]:
        """Items with their decoded images, one at a time; with ``skip_bad`` a bad image is recorded in
        :attr:`skipped` and its item left out instead of stopping the run."""
        for item in self.items:
            try:
                image = item.image()
            except BenchmarkError as error:
                if not skip_bad:
                    raise
                self.skipped.append(str(error))
                continue
            yield item, image


def load_benchmark(folder: str | Path, name: str, skip_bad: bool = False) -> Benchmark:
    """Read ``folder/<name>.tsv``. Bad rows raise :class:`BenchmarkError`, or with ``skip_bad`` are
    recorded in ``Benchmark.skipped`` and left out."""
    if name not in BENCHMARKS:
        raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    path = Path(folder) / spec.filename
    if not path.is_file():
        raise BenchmarkError(f"{name}: {path} not found (expected VLMEvalKit's {spec.filename} in {folder})")
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows:
        raise BenchmarkError(f"{path}: empty file, expected a header row")
    header, body = rows[0], rows[1:]
    missing = [c for c in spec.required if c not in header]
    if missing:
        raise BenchmarkError(f"{path}: header lacks column(s) {', '.join(missing)} (VLMEvalKit's {spec.filename})")
    benchmark = _parse_rows(spec, path, header, body, skip_bad)
    if not benchmark.items:  # a score of nothing would read as 0% beside the paper
        skipped = f" ({len(benchmark.skipped)} bad rows skipped)" if benchmark.skipped else ""
        raise BenchmarkError(f"{path}: no questions{skipped}")
    return benchmark


def _parse_rows(spec: BenchmarkSpec, path: Path, header: list[str], body: list[list[str]], skip_bad: bool) -> Benchmark:
    benchmark = Benchmark(spec, path, [])
    records: list[tuple[str, dict[str, str]]] = []
    for number, row in enumerate(body, start=1):
        origin = f"{path}: row {number}"
        try:
            records.append((origin, _check_row(spec, header, row, origin)))
        except BenchmarkError as error:
            _reject(benchmark, error, skip_bad)
    images = {record["index"]: record["image"] for _, record in records}
    seen: set[str] = set()
    for origin, record in records:
        try:
            if record["index"] in seen:
                raise BenchmarkError(f"{origin}: index {record['index']} appears twice")
            seen.add(record["index"])
            benchmark.items.append(_item(spec, record, images, origin))
        except BenchmarkError as error:
            _reject(benchmark, error, skip_bad)
    return benchmark


def _reject(benchmark: Benchmark, error: BenchmarkError, skip_bad: bool) -> None:
    if not skip_bad:
        raise error
    benchmark.skipped.append(str(error))


def _check_row(spec: BenchmarkSpec, header: list[str], row: list[str], origin: str) -> dict[str, str]:
    if len(row) != len(header):
        raise BenchmarkError(f"{origin}: {len(row)} fields, the header has {len(header)}")
    record = dict(zip(header, row))
    for column in spec.required:
        if not record[column].strip():
            raise BenchmarkError(f"{origin}: empty {column!r}")
    try:
        int(record["index"])
    except ValueError:
        raise BenchmarkError(f"{origin}: index {record['index']!r} is not an integer") from None
    return record


def _item(spec: BenchmarkSpec, record: dict[str, str], images: dict[str, str], origin: str) -> Item:
    image, source = record["image"], record["index"]
    if len(image) <= IMAGE_REFERENCE_MAX_LEN:  # a reference to the row holding the image
        source, image = image, images.get(image, "")
        if len(image) <= IMAGE_REFERENCE_MAX_LEN:
            raise BenchmarkError(f"{origin}: image refers to index {source!r}, which holds no image")
    options = {k: v for k in "ABCDEFGHIJ" if (v := record.get(k, "").strip())}
    answer = _answer(spec, record["answer"].strip(), options, origin)
    return Item(
        index=int(record["index"]),
        question=record["question"],
        answer=answer,
        category=record.get("category", ""),
        options=options,
        hint=record.get("hint", "").strip(),
        l2_category=record.get("l2-category", ""),
        image_key=record.get("image_path", "") or source,
        image_b64=image,
        origin=origin,
    )


def _answer(spec: BenchmarkSpec, answer: str, options: dict[str, str], origin: str) -> str:
    if spec.kind == "yes_no":
        if answer.lower() not in ("yes", "no"):
            raise BenchmarkError(f"{origin}: answer {answer!r} is not Yes or No")
        return answer.capitalize()
    if answer not in options:
        raise BenchmarkError(f"{origin}: answer {answer!r} is not one of the options {', '.join(options)}")
    return answer
