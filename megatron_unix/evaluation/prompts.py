"""Understanding prompts: the text that follows the image (``[BOI][codes][EOI]`` + this, spec §3 I2T).

Two styles. ``"reference"`` (default) is what the reference's evaluation sent, as far as its public
code shows: VLMEvalKit builds the question text (MCQ: ``Hint: ...\\nQuestion: ...\\nOptions:\\nA. ...\\n``
``Please select the correct answer from the options above. \\n``; yes/no: the question as the TSV has
it), and the reference's API server puts the image first, then ``"\\n" + text + "\\n" + ANSWER_CUE``
and decodes at most 3 tokens greedily. Assumed, not confirmed: that its VLMEvalKit client
(``eval_vqa.py``, not public) keeps VLMEvalKit's default prompt. ``"llava"`` is the common LLaVA-style
alternative: question, ``A. ...`` lines and a short instruction.
"""

from __future__ import annotations

from collections.abc import Mapping

from megatron_unix.evaluation.benchmarks import BenchmarkSpec, Item

ANSWER_CUE = "Based on the image and the question, my final answer is: "
"""The reference server's text after every question (its ``api_server.py``)."""
VLMEVALKIT_MCQ_INSTRUCTION = "Please select the correct answer from the options above. \n"
LLAVA_MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
LLAVA_YES_NO_INSTRUCTION = "Please answer yes or no."
STYLES = ("reference", "llava")


def multiple_choice_prompt(question: str, options: Mapping[str, str], hint: str = "", style: str = "reference") -> str:
    """MMBench / SEED: question and lettered options, then the instruction of ``style``."""
    lines = "".join(f"{letter}. {text}\n" for letter, text in options.items())
    if style == "reference":
        text = (f"Hint: {hint}\n" if hint else "") + f"Question: {question}\nOptions:\n{lines}"
        return f"\n{text}{VLMEVALKIT_MCQ_INSTRUCTION}\n{ANSWER_CUE}"
    _check_style(style)
    return "\n" + (f"{hint}\n" if hint else "") + f"{question}\n{lines}{LLAVA_MCQ_INSTRUCTION}"


def yes_no_prompt(question: str, style: str = "reference") -> str:
    """MME / POPE. MME's questions already end with the yes/no instruction: it is not added twice."""
    if style == "reference":
        return f"\n{question}\n{ANSWER_CUE}"
    _check_style(style)
    if question.rstrip().endswith(LLAVA_YES_NO_INSTRUCTION):
        return f"\n{question}"
    return f"\n{question}\n{LLAVA_YES_NO_INSTRUCTION}"


def item_prompt(spec: BenchmarkSpec, item: Item, style: str = "reference") -> str:
    """The prompt of one benchmark question, by the benchmark's answer kind."""
    if spec.kind == "yes_no":
        return yes_no_prompt(item.question, style)
    return multiple_choice_prompt(item.question, item.options, item.hint, style)


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"prompt style must be one of {', '.join(STYLES)}, got {style!r}")
