"""Scores of the understanding benchmarks read as VLMEvalKit's ``exact_matching`` judge reads them (no
LLM extracts answers; an answer its rules cannot read is wrong). Accuracies are percentages, MME in its
points. The reference's own reading (the paper's numbers) is :mod:`scoring_reference`.

Ported from open-compass/VLMEvalKit, commit d21c5e969983dea6741a98eb2f7ec566ab82ee91 (the version whose
``can_infer_option`` has both the last-five-words rule and the verbose "answer is X" rule). Files read:
``vlmeval/utils/matching_util.py`` (stored copies at 18fc37a5 and 134b4ea6; the two d21c5e96 rules as
quoted by ports of that commit), ``vlmeval/dataset/utils/yorn.py`` (0c7163c9: ``YOrN_Extraction``,
``MME_rating``, ``POPE_rating``), ``vlmeval/smp/misc.py`` (06d45c58: ``process_punctuation``) and
``vlmeval/dataset/utils/multiple_choice.py`` (028a6e77: ``prefetch_circular_group``,
``extract_answer_from_item``, ``report_acc``).

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
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
"""``can_infer_option``'s ``reject_to_answer``: an answer containing one reads as "Z" (never right)."""
_OPTION_PUNCTUATION = ".()[],:;!*#{}"
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_YES_NO_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
"""``process_punctuation``'s ``punct`` list, in its order."""
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)
"""``periodStrip.sub('', outText, re.UNICODE)`` passes re.UNICODE (32) as ``count``: at most 32 periods go."""


def process_punctuation(text: str) -> str:
    """VLMEvalKit's ``process_punctuation``: its 21 marks removed (when one stands beside a space, or the
    text has a digit-comma-digit) or else made spaces; periods not before a digit removed. Not ``*``,
    ``:``, ``'`` nor non-ASCII dashes: ``**yes**`` stays one word."""
    out = text
    glued = _COMMA_STRIP.search(text) is not None
    for mark in _YES_NO_PUNCTUATION:
        out = out.replace(mark, "" if (mark + " " in text or " " + mark in text or glued) else " ")
    return _PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


def extract_yes_no(answer: str) -> str | None:
    """``YOrN_Extraction``: lower-cased, :func:`process_punctuation`, split on white space; ``"Yes"`` /
    ``"No"`` when exactly one of the words is there, else None (VLMEvalKit's "Unknown")."""
    words = process_punctuation(answer.lower()).split()
    if ("yes" in words) == ("no" in words):
        return None
    return "Yes" if "yes" in words else "No"


def can_infer_option(answer: str, options: Mapping[str, str]) -> str | None:
    """``can_infer_option``: "Z" on a refusal; the one option letter standing as a word (after its
    punctuation became spaces) when it is among the last five words; "Z" when no letter but a lone "Z";
    else the letter of "answer is X" (the verbose rule); else None."""
    if "Failed to obtain answer via API" in answer:
        return None
    if any(refusal in answer for refusal in REFUSALS):
        return "Z"
    spaced = answer
    for mark in _OPTION_PUNCTUATION:
        spaced = spaced.replace(mark, " ")
    words = spaced.split()
    count = sum(letter in words for letter in options)
    if count == 1:
        for letter in options:
            if letter in words and words.index(letter) > len(words) - 5:
                return letter
    elif count == 0 and sum(mark in words for mark in ("Z", "")) == 1:
        return "Z"
    match = _VERBOSE_ANSWER.search(answer)
    if match and match.group(1).upper() in options:
        return match.group(1).upper()
    return None


def can_infer_text(answer: str, options: Mapping[str, str]) -> str | None:
    """``can_infer_text``: the one option whose text (lower-cased) the answer contains, unless the answer
    is more than twice as long as all option texts together."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(text)) for text in options.values()):
        return None
    matches = [letter for letter, text in options.items() if str(text).lower() in answer]
    return matches[0] if len(matches) == 1 else None


def extract_option(answer: str, options: Mapping[str, str]) -> str | None:
    """``can_infer``: :func:`can_infer_option`, else :func:`can_infer_text`."""
    return can_infer_option(answer, options) or can_infer_text(answer, options)


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
        acc = percent(hit for hits in images.values() for hit in hits)
        acc_plus = percent(all(hits) for hits in images.values())
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
    predicted = {item.index: extract_yes_no(answer_of(item, answers)) for item in items}
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
    hits = _option_hits(items, answers, strip=False)  # prefetch_circular_group reads the raw prediction
    groups: dict[int, list[bool]] = defaultdict(list)
    for item in items:
        groups[item.index % CIRCULAR_STRIDE].append(hits[item.index])
    mains = [item for item in items if item.index < CIRCULAR_STRIDE]
    right = {item.index: all(groups[item.index]) for item in mains}
    return _accuracies(mains, right) | {"questions": len(mains), "rows": len(items)}


def score_seed(items: Sequence[Item], answers: Mapping[int, str]) -> dict:
    """Accuracy (%) over all questions (``report_acc``'s Overall) and per category (SEED's dimensions)."""
    return _accuracies(items, _option_hits(items, answers, strip=True))  # extract_answer_from_item strips


SCORERS: dict[str, Callable[[Sequence[Item], Mapping[int, str]], dict]] = {
    "mme": score_mme,
    "pope": score_pope,
    "mmbench": score_mmbench,
    "seed": score_seed,
}
"""VLMEvalKit's reading, by ``BenchmarkSpec.scorer``."""


def answer_of(item: Item, answers: Mapping[int, str]) -> str:
    if item.index not in answers:
        raise KeyError(f"no answer for index {item.index} ({item.origin or 'item'})")
    return answers[item.index]


def _yes_no_hits(items: Iterable[Item], answers: Mapping[int, str]) -> dict[int, bool]:
    return {item.index: extract_yes_no(answer_of(item, answers)) == item.answer for item in items}


def _option_hits(items: Iterable[Item], answers: Mapping[int, str], strip: bool) -> dict[int, bool]:
    def read(item: Item) -> str | None:
        text = answer_of(item, answers)
        return extract_option(text.strip() if strip else text, item.options)

    return {item.index: read(item) == item.answer for item in items}


def percent(values: Iterable[bool]) -> float:
    values = list(values)
    return 100.0 * sum(values) / len(values) if values else 0.0


def _accuracies(items: Sequence[Item], right: Mapping[int, bool]) -> dict:
    result = {"overall": percent(right[item.index] for item in items)}
    for key, attribute in (("categories", "category"), ("l2_categories", "l2_category")):
        groups: dict[str, list[bool]] = defaultdict(list)
        for item in items:
            if name := getattr(item, attribute):
                groups[name].append(right[item.index])
        if groups:
            result[key] = {name: percent(hits) for name, hits in sorted(groups.items())}
    return result


def _binary_metrics(items: Sequence[Item], predicted: Mapping[int, str | None]) -> dict:
    truth = [item.answer == "Yes" for item in items]
    guess = [predicted[item.index] == "Yes" for item in items]
    tp = sum(t and g for t, g in zip(truth, guess))
    precision = tp / sum(guess) if any(guess) else 0.0
    recall = tp / sum(truth) if any(truth) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": percent(predicted[item.index] == item.answer for item in items),
        "precision": 100 * precision,
        "recall": 100 * recall,
        "f1": 100 * f1,
        "yes_ratio": percent(guess),
        "count": len(items),
    }
