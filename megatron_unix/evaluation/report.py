"""Results: the paper's Table 4, ``results.json``, a markdown table of checkpoints beside the paper,
and the per-item answer cache that lets an interrupted evaluation resume."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_unix.files import lock_exclusively, settings_mismatch, write_error, write_text_atomically

TABLE4_METRICS = ("MMLU", "GenEval", "MMB")
PAPER: dict[str, dict[str, float]] = {
    "Shared (paper)": {"MMLU": 50.0, "GenEval": 33.6, "MMB": 30.3, "avg": 38.0},
    "MoT (paper)": {"MMLU": 48.0, "GenEval": 26.0, "MMB": 30.0, "avg": 34.6},
    "HardMoE (paper)": {"MMLU": 50.3, "GenEval": 42.8, "MMB": 30.7, "avg": 41.3},
    "Uni-X 9:5 (paper)": {"MMLU": 50.1, "GenEval": 43.3, "MMB": 31.5, "avg": 41.6},
}
"""Spec §9: paper Table 4, 1.5B models trained on identical data (percent; avg as printed there)."""


def write_results(path: str | Path, results: Mapping) -> None:
    """Write JSON atomically (a temporary file in the same folder, then a rename), so a reader never
    sees half a file and a crash keeps the previous results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(results, indent=2, sort_keys=True) + "\n")


PAPER_READING = "reference"
"""How the paper's MMB numbers were read: by the reference's own ``eval_vqa.py`` (spec §10)."""


def markdown_table(
    checkpoints: Mapping[str, Mapping[str, float]],
    paper: Mapping[str, Mapping[str, float]] = PAPER,
    metrics: Sequence[str] = TABLE4_METRICS,
    readings: Mapping[str, str | None] | None = None,
) -> str:
    """One row per paper model, then one per checkpoint; ``avg`` of a checkpoint is the mean of
    ``metrics`` when it has them all. Missing numbers show as "-". ``readings``: the ``--scoring`` that
    read each checkpoint's MMB (None: not recorded). The header names the reading; an MMB read otherwise
    than the paper's is marked "†" and said so under the table, never set silently beside the paper's."""
    readings = readings or {}
    other = {
        name: readings.get(name) or "not recorded"
        for name, values in checkpoints.items()
        if "MMB" in values and readings.get(name) != PAPER_READING
    }
    kinds = ", ".join(sorted(set(other.values())))
    labels = {m: m for m in metrics} | {
        "MMB": f"MMB [{PAPER_READING} reading]" if not other else f"MMB [paper: {PAPER_READING} reading; †: {kinds}]"
    }
    rows = [f"| model | {' | '.join(labels[m] for m in metrics)} | avg |", "|---" * (len(metrics) + 2) + "|"]
    for name, values in [*paper.items(), *checkpoints.items()]:
        average = values.get("avg")
        if average is None and all(m in values for m in metrics):
            average = sum(values[m] for m in metrics) / len(metrics)
        cells = [_cell(values.get(m)) + (" †" if m == "MMB" and name in other else "") for m in metrics]
        rows.append(f"| {name} | {' | '.join(cells + [_cell(average)])} |")
    if other:
        rows += [
            "",
            f"† MMB reading {kinds}, not the paper's (the reference's eval_vqa.py): not comparable with the "
            "paper's rows; tools/evaluate.py understanding --scoring reference reads answers as the paper did.",
        ]
    return "\n".join(rows) + "\n"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


Key = tuple[str, int | str]
"""(benchmark, item index)."""


def _key(key: Key) -> tuple[str, str]:
    return key[0], str(key[1])


class AnswerCache:
    """Model answers by (benchmark, index) in a jsonl file, one line flushed per item, so a killed
    evaluation resumes where it stopped. The first line records the settings the answers were made
    with (checkpoint, prompt style, VQGAN...): answers of another checkpoint or prompt must not be
    mixed into a score, so opening the file with other settings is refused, naming the keys that differ;
    so is a second process while one holds it (:func:`lock_exclusively`).
    A torn last line (the kill came mid-write) is dropped and cut from the file; a bad line elsewhere
    is an error naming the file and line."""

    def __init__(self, path: str | Path, settings: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.settings = json.loads(json.dumps(dict(settings)))  # as read back: tuples become lists
        self.answers: dict[tuple[str, str], str] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        try:
            lock_exclusively(self._file, self.path)  # a second run on the folder would answer everything again
            headed = self._read()
        except BaseException:
            self._file.close()
            raise
        if not headed:
            self._write({"settings": self.settings})

    def _read(self) -> bool:
        """Load the answers; whether the file has its settings line (not when empty or torn there)."""
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" after a final newline; else a line cut mid-write: dropped, redone
        if torn:
            os.truncate(self.path, len(data) - len(torn))
        if not lines:
            return False
        try:
            recorded = json.loads(lines[0])["settings"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{self.path}:1: no settings record: not an answer cache of this version") from None
        if message := settings_mismatch(self.path, recorded, self.settings):
            raise ValueError(message)
        for number, line in enumerate(lines[1:], start=2):
            if not line:
                continue
            try:
                record = json.loads(line)
                self.answers[_key((record["benchmark"], record["index"]))] = record["answer"]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{self.path}:{number}: not an answer record ({error})") from None
        return True

    def _write(self, record: Mapping[str, Any]) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as error:  # a full disk: a torn last line is cut on the next open
            raise write_error(error, self.path) from None

    def done(self, key: Key) -> bool:
        return _key(key) in self.answers

    def get(self, key: Key) -> str:
        return self.answers[_key(key)]

    def add(self, key: Key, answer: str) -> None:
        benchmark, index = key
        self.answers[_key(key)] = answer
        self._write({"benchmark": benchmark, "index": index, "answer": answer})

    def for_benchmark(self, benchmark: str) -> dict[int, str]:
        """Answers of one benchmark by integer index, as the scorers take them."""
        return {int(index): answer for (name, index), answer in self.answers.items() if name == benchmark}

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> AnswerCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
