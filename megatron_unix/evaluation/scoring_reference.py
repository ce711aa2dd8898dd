"""Scores of the understanding benchmarks read and aggregated as the reference's own
``evaluation/eval_vqa.py`` does (CURRENTF/Uni-X, commit db80150e163d57356b7e089bbf8d870793de8c36): the
paper's MMB/MME/POPE numbers are these (spec §10). Its rules differ from VLMEvalKit's (:mod:`scoring`):
a letter is the first of A-D anywhere in the answer, any case; an unclear yes/no is "no"; SEED is the
mean of its categories' accuracies; MME pairs rows by index. Percentages, MME in its points.

MMBench is scored regular (each TSV row a question), as ``eval_template.py`` runs ``eval_vqa.py``
(without ``--circular``). Every scorer takes the benchmark's items and ``answers``: raw text by index.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence

from megatron_unix.evaluation.benchmarks import Item
from megatron_unix.evaluation.scoring import MME_PERCEPTION, answer_of, percent

_PUNCTUATION = string.punctuation + "，。？！“”‘’｜、·～"
_LETTER = re.compile(r"[A-D]", re.IGNORECASE)
_PERCEPTION = {name.lower() for name in MME_PERCEPTION}


def read_yes_no(answer: str) -> str:
    """``_process_yes_no_response``: "yes" for ``(yes)``, ``[yes]``, ``<yes>`` or ``yes)``, then the same
    for no; else the words (lower-cased, ASCII and CJK punctuation made spaces, split on spaces): yes
    (or 是) without no/否/不 -> "yes", the reverse -> "no", anything else -> "no"."""
    if any(mark in answer for mark in ("(yes)", "[yes]", "<yes>", "yes)")):
        return "yes"
    if any(mark in answer for mark in ("(no)", "[no]", "<no>", "no)")):
        return "no"
    text = answer.strip().lower()
    for mark in _PUNCTUATION:
        text = text.replace(mark, " ")
    words = text.split(" ")
    yes = "yes" in words or "是" in words
    no = "no" in words or "否" in words or "不" in words
    return "yes" if yes and not no else "no"


def read_letter(answer: str) -> str:
    """``_process_mmbench_response``: the first of A-D anywhere (any case), upper-cased, else "unknown"."""
    match = _LETTER.search(answer.strip())
    return match.group(0).upper() if match else "unknown"


def score_mme(items: Sequence[Item], answers: Mapping[int, str]) -> dict:
    """Rows sorted by index; a row of even index and the next row form a pair, right when both are.
    Per category acc = share right, acc+ = right pairs / (rows / 2) (percent, score = their sum);
    perception = sum of the scores of the perception categories (any case). No cognition: the
    reference computes none. Accuracy, precision, recall and F1 of "yes" over all rows."""
    rows = sorted(items, key=lambda item: item.index)
    right = [_yes_no_right(item, answers) for item in rows]
    groups: dict[str, list[bool]] = defaultdict(list)
    pairs: dict[str, int] = defaultdict(int)
    for position, item in enumerate(rows):
        groups[item.category].append(right[position])
        if item.index % 2 == 0 and position + 1 < len(rows):
            pairs[item.category] += right[position] and right[position + 1]
    categories = {}
    for category, hits in sorted(groups.items()):
        acc, acc_plus = percent(hits), 100.0 * pairs[category] / (len(hits) / 2)
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    perception = sum(value["score"] for name, value in categories.items() if name.lower() in _PERCEPTION)
    return {"perception": perception, "categories": categories} | _binary_metrics(rows, answers)


def score_pope(items: Sequence[Item], answers: Mapping[int, str]) -> dict:
    """Accuracy, precision, recall and F1 of "yes" over all rows (the reference does not split POPE)."""
    return {"overall": _binary_metrics(items, answers)}


def score_mmbench(items: Sequence[Item], answers: Mapping[int, str]) -> dict:
    """Share of rows whose first letter is the answer (rotated copies in the TSV count as rows)."""
    right = [read_letter(answer_of(item, answers)) == item.answer for item in items]
    return {"overall": percent(right), "questions": len(items), "rows": len(items)}


def score_seed(items: Sequence[Item], answers: Mapping[int, str]) -> dict:
    """The mean of the per-category accuracies (not the share of all questions), and those accuracies."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for item in items:
        groups[item.category].append(read_letter(answer_of(item, answers)) == item.answer)
    categories = {name: percent(hits) for name, hits in sorted(groups.items())}
    overall = sum(categories.values()) / len(categories) if categories else 0.0
    return {"overall": overall, "categories": categories}


SCORERS: dict[str, Callable[[Sequence[Item], Mapping[int, str]], dict]] = {
    "mme": score_mme,
    "pope": score_pope,
    "mmbench": score_mmbench,
    "seed": score_seed,
}
"""The reference's reading, by ``BenchmarkSpec.scorer``."""


def _yes_no_right(item: Item, answers: Mapping[int, str]) -> bool:
    return read_yes_no(answer_of(item, answers)) == item.answer.lower()


def _binary_metrics(items: Sequence[Item], answers: Mapping[int, str]) -> dict:
    """``calculate_yes_no_metrics`` and the accuracy beside it (every reading is yes or no: all valid)."""
    truth = [item.answer.lower() == "yes" for item in items]
    guess = [read_yes_no(answer_of(item, answers)) == "yes" for item in items]
    tp = sum(t and g for t, g in zip(truth, guess))
    precision = tp / sum(guess) if any(guess) else 0.0
    recall = tp / sum(truth) if any(truth) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": percent(t == g for t, g in zip(truth, guess)),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "count": len(items),
    }
