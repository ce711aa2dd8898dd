"""The fault matrix's rule: how one run of a program against a fault is classed (``tools/fault_matrix.py``
tries the faults; this module, with no heavy import, is what its test checks).

- clear: refused with exit status 2, the message names what it should (the file, line or flag), no
  traceback; or, where the fault may be survived (a stop then a rerun, two runs at once), finished
  with status 0;
- unclear: failed without naming it (or with another status, or ran past its time);
- traceback: a Python traceback reached the user;
- silent: exit status 0 where it had to refuse;
- left-behind: temporary files or folders stayed after the run (and the rerun).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

CLASSES = ("clear", "unclear", "traceback", "silent", "left-behind")
TEMPORARY_MARKS = (".tmp", ".partial", ".progress.json", ".conditional-entropy-", ".entropy-progress")
"""What the names of uncommitted outputs hold, in this stack's programs."""


def leftovers(folder: Path, before: Iterable[Path] = ()) -> list[Path]:
    """The files and folders under ``folder`` (not in ``before``) named as temporaries are."""
    seen = set(before)
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            if path not in seen and any(mark in name for mark in TEMPORARY_MARKS):
                found.append(path)
    return sorted(found)


def classify(rc: int | None, stderr: str, names: Sequence[str], may_succeed: bool, left: Sequence[Path]) -> str:
    """The class of one outcome: exit status ``rc`` (None: timed out), what it printed to stderr, the
    strings a clear refusal names, whether finishing is a right answer, what it left behind."""
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    if left:
        return "left-behind"
    if rc == 0:
        return "clear" if may_succeed else "silent"
    if rc == 2 and names and all(name in stderr for name in names):
        return "clear"
    return "unclear"
