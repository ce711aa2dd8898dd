"""Stops asked by signals, raised where the program was: every program's and the comparison's one rule."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(BaseException):
    """A stop asked by SIGTERM (what slurm and ``kill`` send) or SIGINT (Ctrl-C), raised where the program
    was, so its ``with`` and ``finally`` blocks clean up (a BaseException, as KeyboardInterrupt: no
    ``except Exception`` catches it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's status of a process that a signal ended: 128 + its number (143, 130)."""
        return 128 + self.signum


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Interrupted` in the main thread."""

    def stop(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
