"""Understanding prompts: the text that follows the image (``[BOI][codes][EOI]`` + this, spec §3 I2T).

Three styles. ``"reference"`` is what the paper's numbers were answered to (spec §10): the reference's
``evaluation/eval_vqa.py`` builds ``question`` (+ ``" " + hint``) + ``"\\n"`` + ``"X. option"`` lines +
``"\\nPlease answer with the letter of the correct option."`` (MMBench; SEED without the hint; MME and
POPE: the question as it is), and its ``api_server.py`` puts the image first, then ``"\\n" + text + "\\n"
+ ANSWER_CUE``. ``"vlmevalkit"`` is VLMEvalKit's own MCQ prompt (``Hint: ...\\nQuestion: ...\\nOptions:``
``\\nA. ...\\nPlease select the correct answer from the options above. \\n``) behind the same server
framing. ``"llava"`` is the common LLaVA-style alternative: question, ``A. ...`` lines and an instruction.
"""

from __future__ import annotations

from collections.abc import Mapping

from megatron_unix.evaluation.benchmarks import BenchmarkSpec, Item

ANSWER_CUE = "Based on the image and the question, my final answer is: "
"""The reference server's text after every question (its ``api_server.py``)."""
REFERENCE_MCQ_INSTRUCTION = "Please answer with the letter of the correct option."
"""``eval_vqa.py``'s MMBench and SEED instruction."""
VLMEVALKIT_MCQ_INSTRUCTION = "Please select the correct answer from the options above. \n"
LLAVA_MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LLAVA_YES_NO_INSTRUCTION = "Please answer yes or no."
STYLES = ("reference", "vlmevalkit", "llava")


def multiple_choice_prompt(question: str, options: Mapping[str, str], hint: str = "", style: str = "reference") -> str:
    """MMBench / SEED: question and lettered options, then the instruction of ``style``."""
    lines = "".join(f"{letter}. {text}\n" for letter, text in options.items())
    if style == "reference":
        text = question + (f" {hint}" if hint else "") + f"\n{lines}{REFERENCE_MCQ_INSTRUCTION}"
        return f"\n{text}\n{ANSWER_CUE}"
    if style == "vlmevalkit":
        text = (f"Hint: {hint}\n" if hint else "") + f"Question: {question}\nOptions:\n{lines}"
        return f"\n{text}{VLMEVALKIT_MCQ_INSTRUCTION}\n{ANSWER_CUE}"
    _check_style(style)
    return "\n" + (f"{hint}\n" if hint else "") + f"{question}\n{lines}{LLAVA_MCQ_INSTRUCTION}"


def yes_no_prompt(question: str, style: str = "reference") -> str:
    """MME / POPE. MME's questions already end with the yes/no instruction: it is not added twice."""
    if style in ("reference", "vlmevalkit"):
        return f"\n{question}\n{ANSWER_CUE}"
    _check_style(style)
    if question.rstrip().endswith(LLAVA_YES_NO_INSTRUCTION):
        return f"\n{question}"
    return f"\n{question}\n{LLAVA_YES_NO_INSTRUCTION}"


def item_prompt(spec: BenchmarkSpec, item: Item, style: str = "reference") -> str:
    """The prompt of one benchmark question, by the benchmark's answer kind (the reference's SEED prompt
    has no hint)."""
    if spec.kind == "yes_no":
        return yes_no_prompt(item.question, style)
    hint = "" if style == "reference" and spec.scorer == "seed" else item.hint
    return multiple_choice_prompt(item.question, item.options, hint, style)


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"prompt style must be one of {', '.join(STYLES)}, got {style!r}")
