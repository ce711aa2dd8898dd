"""What preprocessing tells its user: the bad lines (file:line), the summary and periodic progress. The
skip bookkeeping and the progress lines serve ``encode_images`` too."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import IO

from megatron_unix.data.indexed import SampleBatch
from megatron_unix.progress import Clock, per_second

REPORTED_BAD_LINES = 10
"""Bad lines (or images) printed with file:line; the rest are only counted by reason."""


def first_reported(reported: list, new: Iterable) -> list:
    """Those of ``new`` that fit among the first :data:`REPORTED_BAD_LINES` (appended to ``reported``)."""
    fit = list(islice(new, max(REPORTED_BAD_LINES - len(reported), 0)))
    reported += fit
    return fit


def skipped_text(skipped: Counter[str]) -> str:
    """``total, reason count, ...`` (reasons sorted)."""
    return f"{sum(skipped.values()):,}" + "".join(f", {reason} {count:,}" for reason, count in sorted(skipped.items()))


def reported_lines(skipped: Counter[str], reported: list) -> list[str]:
    """The reported bad inputs, indented, and a note when they are not all that were skipped."""
    lines = [f"  {report}" for report in reported]
    if sum(skipped.values()) > len(reported):
        lines.append(f"  (the first {len(reported)} shown)")
    return lines


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
        self.documents += len(result.batch.lengths)
        self.tokens += int(result.batch.lengths.sum())
        self.vision_tokens += int(result.batch.vision_tokens.sum())
        self.trained_tokens += result.trained_tokens
        self.input_bytes += result.input_bytes
        self.skipped += result.skipped
        return first_reported(self.bad_lines, result.bad_lines)

    def rates(self) -> str:
        megabytes = self.input_bytes / 1e6
        return f"{per_second(self.documents, self.seconds):,.0f} docs/s, {per_second(megabytes, self.seconds):.1f} MB/s"

    def report(self) -> str:
        lines = [
            f"documents       {self.documents:,} in {self.seconds:.1f} s ({self.rates()})",
            (
                f"tokens          {self.tokens:,}: text {self.tokens - self.vision_tokens:,}, "
                f"vision {self.vision_tokens:,}; trained {self.trained_tokens:,}"
            ),
            f"skipped lines   {skipped_text(self.skipped)}",
        ]
        return "\n".join(lines + reported_lines(self.skipped, self.bad_lines))


class ProgressLine(Clock):
    """A line every ``interval`` units done in this run: the count, the rates and the ETA from the share
    of the input read since ``baseline`` (None: the share at the first update, for a run that resumes
    where the share before it is unknown); "?" until the share has grown."""

    def __init__(self, unit: str, interval: int, log: IO[str], baseline: float | None = 0.0) -> None:
        super().__init__()
        self.unit, self.interval, self.log, self.baseline = unit, interval, log, baseline
        self.next = interval

    def update(self, done_now: int, done: int, rates: Callable[[], str], share: float) -> None:
        """``done_now`` units in this run (``done`` in all) at ``share`` of the input read."""
        if self.baseline is None:
            self.baseline = share
        if done_now < self.next:
            return
        self.next = done_now + self.interval
        print(
            f"{done:,} {self.unit} ({rates()}), {share:.0%} of the input, ETA {eta_text(self.eta(share))}",
            file=self.log,
            flush=True,
        )

    def eta(self, share: float) -> float | None:
        """Seconds left at ``share`` of the input read, at this run's pace; None until the share has grown."""
        if self.baseline is None or share <= self.baseline:
            return None
        return self.elapsed() * (1 - share) / (share - self.baseline)


def eta_text(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.0f} s"


class Progress:
    """Preprocessing's progress: a line every ``interval`` documents with the rates so far and the ETA
    from the share of input bytes read."""

    def __init__(self, summary: Summary, total_bytes: int, interval: int, log: IO[str]) -> None:
        self.summary, self.total_bytes = summary, total_bytes
        self.line = ProgressLine("documents", interval, log)
        self.start = self.line.start

    def update(self, position: int) -> None:
        self.summary.seconds = self.line.elapsed()
        documents = self.summary.documents
        self.line.update(documents, documents, self.summary.rates, position / max(self.total_bytes, 1))
