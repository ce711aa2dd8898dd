"""What preprocessing tells its user: the bad lines (file:line), the summary and periodic progress."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO

from megatron_unix.data.indexed import SampleBatch

REPORTED_BAD_LINES = 10
"""Bad lines printed with file:line; the rest are only counted by reason."""


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
        new = result.bad_lines[: REPORTED_BAD_LINES - len(self.bad_lines)]
        self.documents += len(result.batch.lengths)
        self.tokens += int(result.batch.lengths.sum())
        self.vision_tokens += int(result.batch.vision_tokens.sum())
        self.trained_tokens += result.trained_tokens
        self.input_bytes += result.input_bytes
        self.skipped += result.skipped
        self.bad_lines += new
        return new

    def rates(self) -> str:
        seconds = max(self.seconds, 1e-9)
        return f"{self.documents / seconds:,.0f} docs/s, {self.input_bytes / seconds / 1e6:.1f} MB/s"

    def report(self) -> str:
        lines = [
            f"documents       {self.documents:,} in {self.seconds:.1f} s ({self.rates()})",
            (
                f"tokens          {self.tokens:,}: text {self.tokens - self.vision_tokens:,}, "
                f"vision {self.vision_tokens:,}; trained {self.trained_tokens:,}"
            ),
            f"skipped lines   {sum(self.skipped.values()):,}"
            + "".join(f", {reason} {count:,}" for reason, count in sorted(self.skipped.items())),
        ]
        shown = [f"  {report}" for report in self.bad_lines]
        if sum(self.skipped.values()) > len(shown):
            shown.append(f"  (the first {len(shown)} shown)")
        return "\n".join(lines + shown)


class Progress:
    """A line every ``interval`` documents: rates so far and the ETA from the share of input read."""

    def __init__(self, summary: Summary, total_bytes: int, interval: int, log: IO[str]) -> None:
        self.summary, self.total_bytes, self.interval, self.log = summary, total_bytes, interval, log
        self.start = time.perf_counter()
        self.next = interval

    def update(self, position: int) -> None:
        self.summary.seconds = time.perf_counter() - self.start
        if self.summary.documents < self.next:
            return
        self.next = self.summary.documents + self.interval
        done = position / max(self.total_bytes, 1)
        eta = self.summary.seconds * (1 - done) / max(done, 1e-9)
        print(
            f"{self.summary.documents:,} documents ({self.summary.rates()}), {done:.0%} of the input, ETA {eta:.0f} s",
            file=self.log,
            flush=True,
        )
