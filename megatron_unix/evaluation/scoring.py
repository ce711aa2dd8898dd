"""Scores of the understanding benchmarks from raw model answers, as VLMEvalKit computes them with
its ``exact_matching`` judge (what the reference used): no LLM extracts answers, a free answer that
names no option (or both yes and no) counts as wrong. Accuracies are percentages, MME in its points.

Every scorer takes the benchmark's items and ``answers``: raw model text by item index.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

from megatron_unix.evaluation.benchmarks import Item

MME_PERCEPTION = (
    "OCR",
    "artwork",
    "celebrity",
    "color",
    "count",
    "existence",
    "landmark",
    "position",
    "posters",
    "scene",
)
MME_COGNITION = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")
CIRCULAR_STRIDE = 1_000_000
"""VLMEvalKit's MMBench: rotation k of question g has index ``k * 1e6 + g``; ``index % 1e6`` groups them."""
_OPTION_PUNCTUATION = re.compile(r"[.()\[\],:;!*#{}]")


def extract_yes_no(answer: str) -> str | None:
    """``"Yes"`` / ``"No"`` when the answer has exactly one of the words (VLMEvalKit's YOrN rule)."""
    words = set(re.findall(r"[a-z]+", answer.lower()))
    if ("yes" in words) == ("no" in words):
        return None
    return "Yes" if "yes" in words else "No"


def extract_option(answer: str, options: Mapping[str, str]) -> str | None:
    """The option letter of a free answer (VLMEvalKit's ``can_infer``): the one option letter standing
    as a word ("B", "(B)", "B. cat", "The answer is B"), else the one option whose text the answer
    contains (answers more than twice as long as all option texts are not read that way)."""
    words = _OPTION_PUNCTUATION.sub(" ", answer).split()
    letters = [letter for letter in options if letter in words]
    if len(letters) == 1:
        return letters[0]
    if len(answer) > 2 * sum(len(text) for text in options.values()):
        return None
    lowered = answer.lower()
    matches = [letter for letter, text in options.items() if text.lower() in lowered]
    return matches[0] if len(matches) == 1 else None


def score_mme(items: Sequence[Item], answers: Mapping[int, str]) -> dict:
    """Per category: acc (questions right, %), acc+ (images with every question right, %), score =
    acc + acc+; perception = sum over the 10 perception categories, cognition over the 4 others (a
    partial file sums the categories it has)."""
    right = _yes_no_hits(items, answers)
    by_category: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for item in items:
        by_category[item.category][item.image_key].append(right[item.index])
    categories = {}
    for category, images in sorted(by_category.items()):
        acc = _percent(hit for hits in images.values() for hit in hits)
        acc_plus = _percent(all(hits) for hits in images.values())
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    return {
        "perception": sum(categories[c]["score"] for c in MME_PERCEPTION if c in categories),
        "cognition": sum(categories[c]["score"] for c in MME_COGNITION if c in categories),
        "categories": categories,
    }


def score_pope(items: Sequence[Item], answers: Mapping[int, str]) -> dict:
    """Accuracy, precision, recall, F1 (of "Yes") and yes-ratio (%), overall and per split named by
    ``category``. As VLMEvalKit, a question whose category lists several splits ("adversarial,popular")
    counts in each of them, and in the overall figures once per split."""
    rows = [(split.strip(), item) for item in items for split in item.category.split(",")]
    predicted = {item.index: extract_yes_no(_answer(item, answers)) for item in items}
    splits: dict[str, list[Item]] = defaultdict(list)
    for split, item in rows:
        if split:
            splits[split].append(item)
    return {
        "overall": _binary_metrics([item for _, item in rows], predicted),
        "splits": {split: _binary_metrics(members, predicted) for split, members in sorted(splits.items())},
    }


def score_mmbench(items: Sequence[Item], answers: Mapping[int, str]) -> dict:
    """Circular evaluation: a question counts as right only if every rotation of it (items sharing
    ``index % 1e6``) is answered right. Accuracy (%) overall, per category and per l2-category, taken
    from the question's unrotated row (``index < 1e6``); rotations without that row are left out, as in
    VLMEvalKit. A file without rotations is scored question by question."""
    hits = _option_hits(items, answers)
    groups: dict[int, list[bool]] = defaultdict(list)
    for item in items:
        groups[item.index % CIRCULAR_STRIDE].append(hits[item.index])
    mains = [item for item in items if item.index < CIRCULAR_STRIDE]
    right = {item.index: all(groups[item.index]) for item in mains}
    return _accuracies(mains, right) | {"questions": len(mains), "rows": len(items)}


def score_seed(items: Sequence[Item], answers: Mapping[int, str]) -> dict:
    """Accuracy (%) overall and per category (SEED-Bench's dimensions)."""
    return _accuracies(items, _option_hits(items, answers))


SCORERS: dict[str, Callable[[Sequence[Item], Mapping[int, str]], dict]] = {
    "mme": score_mme,
    "pope": score_pope,
    "mmbench": score_mmbench,
    "seed": score_seed,
}
"""By ``BenchmarkSpec.scorer``."""


def _answer(item: Item, answers: Mapping[int, str]) -> str:
    if item.index not in answers:
        raise KeyError(f"no answer for index {item.index} ({item.origin or 'item'})")
    return answers[item.index]


def _yes_no_hits(items: Iterable[Item], answers: Mapping[int, str]) -> dict[int, bool]:
    return {item.index: extract_yes_no(_answer(item, answers)) == item.answer for item in items}


def _option_hits(items: Iterable[Item], answers: Mapping[int, str]) -> dict[int, bool]:
    return {item.index: extract_option(_answer(item, answers), item.options) == item.answer for item in items}


def _percent(values: Iterable[bool]) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else 0.0


def _accuracies(items: Sequence[Item], right: Mapping[int, bool]) -> dict:
    result = {"overall": _percent(right[item.index] for item in items)}
    for key, attribute in (("categories", "category"), ("l2_categories", "l2_category")):
        groups: dict[str, list[bool]] = defaultdict(list)
        for item in items:
            if name := getattr(item, attribute):
                groups[name].append(right[item.index])
        if groups:
            result[key] = {name: _percent(hits) for name, hits in sorted(groups.items())}
    return result


def _binary_metrics(items: Sequence[Item], predicted: Mapping[int, str | None]) -> dict:
    truth = [item.answer == "Yes" for item in items]
    guess = [predicted[item.index] == "Yes" for item in items]
    tp = sum(t and g for t, g in zip(truth, guess))
    precision = tp / sum(guess) if any(guess) else 0.0
    recall = tp / sum(truth) if any(truth) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": _percent(predicted[item.index] == item.answer for item in items),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "yes_ratio": _percent(guess),
        "count": len(items),
    }
