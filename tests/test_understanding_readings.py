"""The two readings of understanding answers on the answer forms real models give: VLMEvalKit's exact
matching (``scoring``) and the reference's ``eval_vqa.py`` (``scoring_reference``). Every expected reading
is derived by hand from the source's rules, in the comment beside it; the aggregates are checked against
sums done by hand on the same answers."""

from __future__ import annotations

import pytest

from megatron_unix.evaluation import scoring, scoring_reference
from megatron_unix.evaluation.benchmarks import BENCHMARKS, Item
from megatron_unix.evaluation.prompts import ANSWER_CUE, item_prompt

OPTIONS = {"A": "cat", "B": "dog", "C": "cow", "D": "horse"}  # option texts: 3 + 3 + 3 + 5 = 14 characters


# VLMEvalKit YOrN_Extraction: lower-case, process_punctuation (its 21 marks; not * : ' or a dash "—"; periods
# not before a digit are removed), split on white space, then yes-without-no / no-without-yes.
@pytest.mark.parametrize(
    "answer, expected",
    [
        ("**Yes**", None),  # "**yes**": "*" is not a mark -> one word "**yes**": neither -> Unknown
        ("Answer:no", None),  # "answer:no": ":" is not a mark -> one word -> Unknown
        ("'yes'", None),  # "'" is not a mark -> "'yes'" -> Unknown
        ("No—I am sure.", None),  # "." removed -> "no—i", "am", "sure": no word "no" -> Unknown
        ("Yes, it is.", "Yes"),  # ", " beside a space: "," removed; "." removed -> yes, it, is
        ("(yes)", "Yes"),  # "(" and ")" touch no space: made spaces -> " yes " -> yes
        ("yes-no", None),  # "-" made a space -> yes, no: both -> Unknown
        ("no.", "No"),
    ],
)
def test_vlmevalkit_yes_no(answer, expected):
    assert scoring.extract_yes_no(answer) == expected


# VLMEvalKit can_infer: can_infer_option ("Z" on a refusal; its marks .()[],:;!*#{} made spaces, the one option
# letter standing as a word when its position > words - 5; a lone "Z"; else "answer is X", any case), then
# can_infer_text (the one option text inside, unless the answer is longer than 2 x 14 = 28 characters).
@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", "B"),  # one word, position 0 > 1 - 5
        ("(B) dog", "B"),  # "B", "dog": position 0 > -3
        ("D answer yes. D answer yes yes", None),  # 7 words, one letter (D) at 0, not > 2; no "answer is";
        # 30 characters > 28: the text rule is not tried either
        ("Cannot determine the answer", "Z"),  # a refusal of the list
        ("The answer is B", "B"),  # 4 words, B at 3 > -1
        ("Looking closely, the answer is B since a dog is there", "B"),  # 11 words, B at 5, not > 6: the
        # verbose rule "answer is B" reads it
        ("The answer is a cat", "A"),  # no capital letter word; the verbose rule (any case) reads "a" -> A
        ("B or C", None),  # two letters; no option text in "b or c"
        ("Z", "Z"),  # no letter, a lone "Z"
        ("a cow", "C"),  # "a" is no option letter (capitals only); the text rule finds "cow" alone
    ],
)
def test_vlmevalkit_option(answer, expected):
    assert scoring.extract_option(answer, OPTIONS) == expected


# The reference's _process_yes_no_response: "(yes)" "[yes]" "<yes>" "yes)" first, then the same for no; else
# lower-case, every ASCII punctuation mark (and CJK ones) a space, split on " ": yes without no, no without
# yes, anything else "no".
@pytest.mark.parametrize(
    "answer, expected",
    [
        ("**Yes**", "yes"),  # "  yes  " -> words include "yes"
        ("Answer:no", "no"),  # "answer no"
        ("'yes'", "yes"),
        ("No—I am sure.", "no"),  # "no—i", "am", "sure", "": neither word -> the default "no"
        ("Maybe", "no"),  # neither -> "no"
        ("yes and no", "no"),  # both -> "no"
        ("no (yes)", "yes"),  # "(yes)" is looked for first
        ("是", "yes"),
    ],
)
def test_reference_yes_no(answer, expected):
    assert scoring_reference.read_yes_no(answer) == expected


# The reference's _process_mmbench_response: the first of A-D anywhere in the stripped answer, any case.
@pytest.mark.parametrize(
    "answer, expected",
    [
        (" D answer yes. D answer yes yes", "D"),
        ("Cannot determine the answer", "C"),  # the "C" of "Cannot"
        ("The answer is B", "A"),  # the "a" of "answer"
        ("(b)", "B"),
        ("Yes", "unknown"),
    ],
)
def test_reference_letter(answer, expected):
    assert scoring_reference.read_letter(answer) == expected


def mme_items() -> list[Item]:
    truths = ["Yes", "No", "Yes", "No", "Yes", "No", "Yes", "No"]
    categories = ["color"] * 4 + ["OCR"] * 2 + ["code_reasoning"] * 2
    return [Item(i, "q", t, category=c, image_key=str(i // 2)) for i, (t, c) in enumerate(zip(truths, categories))]


MME_ANSWERS = dict(enumerate(["**Yes**", "No", "Yes", "Answer:no", "'yes'", "No—I am sure.", "yes", "yes"]))


def test_mme_both_readings():
    # reference: every answer but the last is right. color: acc 4/4, pairs (0, 1), (2, 3) right -> acc+
    # 2 / (4 / 2) -> 100 + 100; OCR: 100 + 100; code_reasoning: acc 1/2, its pair wrong -> 50 + 0.
    # Perception (color, OCR, any case) = 400; code_reasoning is no perception category.
    reference = scoring_reference.score_mme(mme_items(), MME_ANSWERS)
    assert reference["perception"] == 400.0
    assert reference["categories"]["code_reasoning"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    assert reference["accuracy"] == 87.5  # 7 of 8
    # VLMEvalKit: **Yes**, Answer:no, 'yes', No—I am sure. are Unknown (wrong). color: right 1, 2 of 4 ->
    # 50, no image fully right -> 0; OCR: 0 + 0; code_reasoning: 50 + 0. Perception 50, cognition 50.
    vlmevalkit = scoring.score_mme(mme_items(), MME_ANSWERS)
    assert (vlmevalkit["perception"], vlmevalkit["cognition"]) == (50.0, 50.0)


def test_mme_reference_pairs_by_index_not_by_image():
    # rows 0 and 1 share no image_key, yet the reference pairs them (index 0 even, the next row): acc+ 100
    items = [Item(0, "q", "Yes", category="color", image_key="x"), Item(1, "q", "No", category="color", image_key="y")]
    result = scoring_reference.score_mme(items, {0: "yes", 1: "no"})
    assert result["categories"]["color"]["acc_plus"] == 100.0
    assert scoring.score_mme(items, {0: "yes", 1: "no"})["categories"]["color"]["acc_plus"] == 100.0
    # an odd first index pairs nothing: acc+ 0 under the reference
    shifted = [Item(1, "q", "Yes", category="color"), Item(2, "q", "No", category="color")]
    assert scoring_reference.score_mme(shifted, {1: "yes", 2: "no"})["categories"]["color"]["acc_plus"] == 0.0


def test_pope_both_readings():
    items = [Item(i, "q", t, category="random") for i, t in enumerate(["Yes", "No", "Yes", "No"])]
    answers = dict(enumerate(["**Yes**", "Answer:no", "Yes", "maybe"]))
    # reference: yes, no, yes, no -> all right; TP 2, FP 0, FN 0 -> P = R = F1 = 100
    assert scoring_reference.score_pope(items, answers)["overall"] == {
        "accuracy": 100.0, "precision": 100.0, "recall": 100.0, "f1": 100.0, "count": 4
    }  # fmt: skip
    # VLMEvalKit: Unknown, Unknown, Yes, Unknown -> 1 of 4 right; TP 1, FP 0, FN 1 -> P 1, R 1/2, F1 2/3
    overall = scoring.score_pope(items, answers)["overall"]
    assert overall["accuracy"] == 25.0 and overall["f1"] == pytest.approx(200 / 3)


def test_seed_both_readings():
    # category S: one question; I: four. Answers chosen so both readers agree on each right/wrong:
    items = [Item(0, "q", "A", category="S", options=OPTIONS)]
    items += [Item(i, "q", "B", category="I", options=OPTIONS) for i in range(1, 5)]
    answers = {0: "A", 1: "B", 2: "C", 3: "C", 4: "D"}
    # reference: mean of the categories (100 + 25) / 2 = 62.5; VLMEvalKit: 2 of 5 questions = 40
    assert scoring_reference.score_seed(items, answers) == {"overall": 62.5, "categories": {"I": 25.0, "S": 100.0}}
    assert scoring.score_seed(items, answers)["overall"] == 40.0
    # the answer form: the reference reads its first letter (right), VLMEvalKit nothing (wrong)
    form = {0: " A answer yes. A answer yes yes"}
    assert scoring_reference.score_seed(items[:1], form)["overall"] == 100.0
    assert scoring.score_seed(items[:1], form)["overall"] == 0.0


def test_mmbench_reference_is_regular_over_rows():
    items = [Item(1, "q", "A", options=OPTIONS), Item(1_000_001, "q", "C", options=OPTIONS), Item(2, "q", "B")]
    answers = {1: "A", 1_000_001: "B", 2: "The answer is B"}
    # reference: row 1 right, the rotation wrong, row 2 read "A" (of "answer"): 1 of 3 rows
    assert scoring_reference.score_mmbench(items, answers)["overall"] == pytest.approx(100 / 3)
    # VLMEvalKit circular: question 1 has a wrong rotation, question 2 reads B: 1 of 2 questions
    items[2] = Item(2, "q", "B", options=OPTIONS)
    assert scoring.score_mmbench(items, answers)["overall"] == 50.0


def test_reference_prompts_are_eval_vqa_s():
    mmb = Item(1, "What?", "A", options={"A": "cat", "B": "dog"}, hint="h")
    expected = "\nWhat? h\nA. cat\nB. dog\nPlease answer with the letter of the correct option.\n" + ANSWER_CUE
    assert item_prompt(BENCHMARKS["MMBench_DEV_EN"], mmb, "reference") == expected
    # SEED: no hint
    seed = item_prompt(BENCHMARKS["SEEDBench_IMG"], mmb, "reference")
    assert seed == expected.replace("What? h", "What?")
    assert item_prompt(BENCHMARKS["POPE"], Item(0, "Is it red?", "Yes"), "reference") == "\nIs it red?\n" + ANSWER_CUE
