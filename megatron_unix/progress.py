"""The clock of every progress line (preprocessing, encoding, entropy counts, generation, evaluation,
the gradient analysis): rates and ETAs computed one way."""

from __future__ import annotations

import datetime
import time


def per_second(count: float, seconds: float) -> float:
    """``count`` per second over ``seconds`` (a zero interval, as on a coarse clock, divides by 1 ns)."""
    return count / max(seconds, 1e-9)


class Clock:
    """Seconds since it was made, and what they give: rates and the time left at the rate so far."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self, count: float) -> float:
        """``count`` done since the start, per second."""
        return per_second(count, self.elapsed())

    def eta(self, done: float, total: float) -> datetime.timedelta:
        """The time ``total - done`` more will take at the rate of the ``done`` so far (``done`` > 0)."""
        return datetime.timedelta(seconds=round((total - done) / self.rate(done)))
