"""Data-parallel encoding: each rank of a torchrun/srun job encodes a block of the input's shards into
its own resumable output; the outputs are joined in input order.

A shard is a whole unit of input (a jsonl file, an image folder, a parquet row group, a tar file), in
input order. Rank r of W takes the contiguous block ``shards[r*n//W : (r+1)*n//W]``, so the ranks'
outputs in rank order are in input order; batches end at every shard's end, so a rank batches its
shards exactly as one process does, and the joined output is byte-identical to one process's whatever
W. Each rank writes ``OUT.rank-<r>-of-<W>`` through encode.py's partial and progress record (a killed job
run again resumes every rank where it stopped; a finished rank is left as it is) and keeps the record,
its summary. When every rank is done, rank 0 joins them into OUT (:func:`join`), or ``--merge`` does
later; a rank that failed leaves the others' outputs finished and the join undone.
"""

from __future__ import annotations

import glob
import json
import re
import shutil
import threading
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import IO, Any, Iterator, Sequence, TypeVar

from megatron_unix.data.preprocess_report import eta_text, first_reported
from megatron_unix.files import write_atomically
from megatron_unix.image.encode import PARTIAL_SUFFIX, PROGRESS_SUFFIX, Batch, EncodeError, Summary
from megatron_unix.image.sources import Shard, resumed

S = TypeVar("S")


def rank_block(shards: Sequence[S], rank: int, world: int) -> Sequence[S]:
    """Rank ``rank``'s contiguous block of ``shards`` (block sizes differ by one at most)."""
    n = len(shards)
    return shards[rank * n // world : (rank + 1) * n // world]


def batches(shards: Sequence[Shard], skip: int, size: int) -> Iterator[Batch]:
    """The records of ``shards`` after the first ``skip``, in batches of up to ``size`` that never cross a
    shard's end (:func:`~megatron_unix.image.sources.resumed`); the share read weighs shards by size."""
    for before, share, items in resumed(shards, skip):
        while chunk := list(islice(items, size)):
            yield Batch(chunk, before + share * chunk[-1].progress)


def rank_output(output: Path, rank: int, world: int) -> Path:
    return output.with_name(f"{output.name}.rank-{rank}-of-{world}")


def rank_prefix(prefix: str | Path, rank: int, world: int) -> str:
    return f"{prefix}.rank-{rank}-of-{world}"


def record_path(output: Path) -> Path:
    return output.with_name(output.name + PROGRESS_SUFFIX)


def finished(output: Path) -> bool:
    """Whether a rank's output is whole (renamed from its partial, its record kept)."""
    return output.is_file() and record_path(output).is_file()


def read_record(output: Path) -> dict[str, Any]:
    try:
        return json.loads(record_path(output).read_text())
    except (OSError, ValueError) as e:
        raise EncodeError(f"{record_path(output)}: unreadable record of a finished rank ({e})") from None


def job_sizes(output: Path) -> dict[int, list[Path]]:
    """The files of ``OUT.rank-*`` by the world size of the job that wrote them."""
    pattern = re.compile(re.escape(output.name) + r"\.rank-\d+-of-(\d+)(\.|$)")
    found: dict[int, list[Path]] = {}
    for path in sorted(output.parent.glob(f"{glob.escape(output.name)}.rank-*-of-*")):
        if match := pattern.match(path.name):
            found.setdefault(int(match[1]), []).append(path)
    return found


def refuse_other_jobs(output: Path, world: int) -> None:
    """A job of another size would leave the outputs of this one beside those of the other, never joined."""
    for size, paths in job_sizes(output).items():
        if size != world:
            raise EncodeError(
                f"{paths[0]} (and {len(paths) - 1} more) left by a job of {size} ranks: run it again with {size} "
                f"ranks (it resumes) or --merge it if it finished, or remove them"
            )


def world_of_leftovers(output: Path) -> int:
    """The size of the job whose rank outputs ``--merge`` joins (exactly one must have left some)."""
    sizes = job_sizes(output)
    if len(sizes) != 1:
        found = "none" if not sizes else f"jobs of {', '.join(map(str, sorted(sizes)))} ranks"
        raise EncodeError(f"--merge {output}: no single job's rank outputs {output.name}.rank-*-of-* ({found})")
    return next(iter(sizes))


def unfinished_ranks(output: Path, world: int) -> str | None:
    """Which ranks have not finished, and where each stands; None when all have."""
    waiting = []
    for rank in range(world):
        part = rank_output(output, rank, world)
        if finished(part):
            continue
        partial = part.with_name(part.name + PARTIAL_SUFFIX)
        try:
            state = f"{json.loads(record_path(part).read_text())['consumed']:,} inputs done"
        except (OSError, ValueError, KeyError):
            state = "started" if partial.exists() else "not started"
        waiting.append(f"rank {rank} ({state})")
    if not waiting:
        return None
    return (
        f"{output}: {len(waiting)} of {world} ranks have not finished: {', '.join(waiting)}; "
        f"run the job again with {world} ranks: each resumes where it stopped"
    )


def joined_summary(records: Sequence[dict[str, Any]]) -> Summary:
    """The ranks' summaries as one: counts added, codes used merged, the first bad inputs in rank order,
    this run's images over the slowest rank's time."""
    size = records[0]["codebook_size"]
    summary = Summary(size)
    for record in records:
        part = Summary.from_record(record, size, 0)
        summary.encoded += part.encoded
        summary.skipped += Counter(part.skipped)
        first_reported(summary.bad_images, part.bad_images)
        summary.used |= part.used
        summary.encoded_now += record["encoded_now"]
        summary.seconds = max(summary.seconds, record["seconds"])
    return summary


def joinable(output: Path, world: int) -> Summary:
    """The joined summary of ``world`` finished ranks; an error names the unfinished ones, or says that
    there is no image to join or that ``output`` exists already."""
    if output.exists():
        raise EncodeError(f"{output} exists already (a finished run): remove it to encode again")
    if message := unfinished_ranks(output, world):
        raise EncodeError(message)
    summary = joined_summary([read_record(rank_output(output, rank, world)) for rank in range(world)])
    if not summary.encoded:
        raise EncodeError(f"{output}: no image to write (inputs skipped: {summary.skipped_text()}); nothing written")
    return summary


def concatenate(output: Path, world: int) -> None:
    """The finished ranks' outputs in rank order (= input order) as ``output``, written atomically; the
    rank files stay until :func:`remove_rank_files`."""

    def write(temporary: Path) -> None:
        with temporary.open("wb") as out:
            for rank in range(world):
                with rank_output(output, rank, world).open("rb") as part:
                    shutil.copyfileobj(part, out, 1 << 24)

    write_atomically(output, write, durable=True)


def remove_rank_files(output: Path, world: int) -> None:
    for rank in range(world):
        part = rank_output(output, rank, world)
        part.unlink(missing_ok=True)
        record_path(part).unlink(missing_ok=True)


class TotalProgress:
    """Rank 0's line every ``seconds``, and once at the end, over all ranks, from their progress records
    (written after every batch, atomically): images, images/s (the ranks' rates added), the share of
    the input read and the slowest rank's ETA."""

    def __init__(self, output: Path, world: int, shards: Sequence[int], seconds: float, log: IO[str]) -> None:
        self.parts = [rank_output(output, rank, world) for rank in range(world)]
        self.shards, self.seconds, self.log = shards, seconds, log
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="total-progress", daemon=True)

    def __enter__(self) -> TotalProgress:
        self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
        if exc_type is None:
            print(self.line(), file=self.log, flush=True)

    def _run(self) -> None:
        while not self.stopped.wait(self.seconds):
            print(self.line(), file=self.log, flush=True)

    def line(self) -> str:
        images, rate, read, etas = 0, 0.0, 0.0, []
        for part, shards in zip(self.parts, self.shards):
            try:
                record = json.loads(record_path(part).read_text())
            except (OSError, ValueError):  # not started, or a record being replaced: counted as nothing yet
                etas.append(None if shards else 0.0)
                continue
            done = finished(part)
            images += record["encoded"]
            rate += record["encoded_now"] / max(record["seconds"], 1e-9)
            read += shards * (1.0 if done else record["share"])
            etas.append(0.0 if done else record["eta"])
        share = read / max(sum(self.shards), 1)
        eta = None if None in etas else max(etas)
        return (
            f"total: {images:,} images over {len(self.parts)} ranks ({rate:,.1f} images/s), "
            f"{share:.0%} of the input, ETA {eta_text(eta)}"
        )


def shard_counts(n: int, world: int) -> list[int]:
    """How many shards each rank gets (:func:`rank_block`)."""
    return [len(rank_block(range(n), rank, world)) for rank in range(world)]
