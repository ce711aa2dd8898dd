"""Sample layouts and their loss masks (spec §3): text, T2I, I2T, SFT.

A sample is a token list plus, per token, whether it is *trained* as a target (the dataset turns
that into the loss mask of the shifted labels). With ignore-instruction (the paper's default) the
conditioning part of a pair is not trained.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

from megatron_unix.data.tokenizer import MultimodalTokenizer

T2I_PROMPTS = (
    "Generate an image based on this description.",
    "Draw a picture of this.",
    "Create an image that matches the text.",
)
I2T_PROMPTS = (
    "The caption of this image is:",
    "Describe this image.",
    "What does this image show?",
)
UNCONDITIONAL = "<unconditional>"


@dataclass
class Sample:
    tokens: list[int] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)

    def add(self, ids: Sequence[int], trained: bool) -> "Sample":
        self.tokens += list(ids)
        self.trained += [trained] * len(ids)
        return self


def text_sample(tok: MultimodalTokenizer, text: str, append_eos: bool = True) -> Sample:
    return Sample().add(tok.tokenize(text) + ([tok.eos_id] if append_eos else []), True)


def t2i_sample(
    tok: MultimodalTokenizer,
    caption: str,
    codes: Sequence[int],
    rng: random.Random,
    ignore_instruction: bool = True,
    unconditional_prob: float = 0.1,
) -> Sample:
    """``[caption + " " + prompt][BOI][codes][EOI][EOS]``; with probability ``unconditional_prob``
    the text is ``<unconditional>`` (the CFG branch)."""
    prompt = rng.choice(T2I_PROMPTS)
    text = UNCONDITIONAL if rng.random() < unconditional_prob else f"{caption} {prompt}"
    condition = not ignore_instruction
    return (
        Sample()
        .add(tok.tokenize(text) + [tok.boi_id], condition)
        .add(tok.image_tokens(codes) + [tok.eoi_id, tok.eos_id], True)
    )


def i2t_sample(
    tok: MultimodalTokenizer, caption: str, codes: Sequence[int], rng: random.Random, ignore_instruction: bool = True
) -> Sample:
    """``[BOI][codes][EOI][prompt][caption][EOS]``; everything before the caption is conditioning."""
    condition = not ignore_instruction
    head = [tok.boi_id] + tok.image_tokens(codes) + [tok.eoi_id] + tok.tokenize(rng.choice(I2T_PROMPTS))
    return Sample().add(head, condition).add(tok.tokenize(" " + caption) + [tok.eos_id], True)


def pair_sample(
    tok: MultimodalTokenizer,
    caption: str,
    codes: Sequence[int],
    rng: random.Random,
    t2i_ratio: float = 0.8,
    ignore_instruction: bool = True,
) -> Sample:
    """An image-text pair as T2I with probability ``t2i_ratio``, else as I2T (seeded ``rng``)."""
    if rng.random() < t2i_ratio:
        return t2i_sample(tok, caption, codes, rng, ignore_instruction)
    return i2t_sample(tok, caption, codes, rng, ignore_instruction)


def sft_sample(
    tok: MultimodalTokenizer,
    turns: Sequence[tuple[str, bool]],
    codes: Sequence[int] | None = None,
    newlines: int = 1,
    ignore_instruction: bool = True,
) -> Sample:
    """``[BOI][codes][EOI]`` (if an image), each turn as ``"\\n" * newlines + text`` (no role tags),
    then EOS. ``turns`` are ``(text, is_assistant)``; with ignore-instruction only the assistant
    turns and EOS are trained."""
    condition = not ignore_instruction
    sample = Sample()
    if codes is not None:
        sample.add([tok.boi_id] + tok.image_tokens(codes) + [tok.eoi_id], condition)
    for text, assistant in turns:
        sample.add(tok.tokenize("\n" * newlines + text), assistant or condition)
    return sample.add([tok.eos_id], True)
