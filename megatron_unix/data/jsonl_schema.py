"""The jsonl line schema of preprocessing: which keys hold what, and one line -> one sample.

A line is one sample: a text (``{"text": ...}``), an image-text pair (a caption and VQ codes, laid
out as T2I or I2T) or a conversation (SFT), usually with an image. :func:`parse_line` turns a line
into a :class:`Sample` or raises :class:`BadLine` with a reason code. The T2I-or-I2T choice comes
from an RNG seeded with ``(seed, the line's bytes)``, so a line's sample does not depend on where
it is read (identical lines therefore get identical layouts).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from megatron_unix.data.layouts import Sample, pair_sample, sft_sample, text_sample
from megatron_unix.data.tokenizer import MultimodalTokenizer

ASSISTANT_ROLES = {"human": False, "user": False, "system": False, "gpt": True, "assistant": True}
"""Conversation roles (LLaVA's ``from`` and chat ``role`` names): is the turn trained?"""
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class LineFormat:
    """Which keys hold what, and how samples are laid out. Each key option lists alternatives: the
    first one a line has is used."""

    text_keys: tuple[str, ...] = ("text",)
    caption_keys: tuple[str, ...] = ("caption", "text")
    vqcode_keys: tuple[str, ...] = ("vqcode", "vqcode_512")
    conversation_keys: tuple[str, ...] = ("conversations", "messages")
    metadata_keys: tuple[str, ...] = ()
    """Keys to ignore even though they hold what looks like image codes (other unknown keys, such as
    ``id``, ``url`` or an image path, are ignored anyway)."""
    image_tokens: int = 1024
    t2i_ratio: float = 0.8
    seed: int = 1234
    ignore_instruction: bool = True
    append_eod: bool = False
    """EOS after a text sample: Megatron's convention; the reference appends none (spec §3)."""
    sft_newlines: int = 1

    @cached_property
    def known_keys(self) -> frozenset[str]:
        return frozenset(
            self.text_keys + self.caption_keys + self.vqcode_keys + self.conversation_keys + self.metadata_keys
        )


class BadLine(ValueError):
    """A line that is not a sample; ``reason`` is the short code the summary counts it under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def parse_line(line: bytes, tok: MultimodalTokenizer, fmt: LineFormat) -> Sample:
    """One jsonl line as a sample: a conversation key makes it SFT, else a VQ-code key a pair, else text."""
    line = line.strip()
    if not line:
        raise BadLine("blank_line", "the line is empty")
    try:
        record = json.loads(line)
    except ValueError as e:
        raise BadLine("unparsable_json", str(e)) from None
    if not isinstance(record, dict):
        raise BadLine("not_an_object", f"the line is a JSON {type(record).__name__}, not an object")
    hidden_codes = sorted(k for k in record if k not in fmt.known_keys and _looks_like_codes(record[k], fmt))
    if hidden_codes:
        raise BadLine(
            "unknown_codes_key",
            f"key {hidden_codes[0]!r} holds what looks like image codes (at least "
            f"{fmt.image_tokens} integers) but is no --vqcode-key: name it with "
            "--vqcode-key, or with --metadata-key to ignore it",
        )
    codes_key = _first_key(record, fmt.vqcode_keys)
    codes = None if codes_key is None else _codes(record[codes_key], codes_key, tok.codebook_size, fmt.image_tokens)
    conversation_key = _first_key(record, fmt.conversation_keys)
    if conversation_key is not None:
        turns = _turns(record[conversation_key], conversation_key, codes is not None)
        return sft_sample(tok, turns, codes, fmt.sft_newlines, fmt.ignore_instruction)
    if codes is not None:
        rng = random.Random(int.from_bytes(hashlib.blake2b(b"%d\n%s" % (fmt.seed, line), digest_size=8).digest()))
        return pair_sample(tok, _text(record, fmt.caption_keys), codes, rng, fmt.t2i_ratio, fmt.ignore_instruction)
    return text_sample(tok, _text(record, fmt.text_keys), fmt.append_eod)


def _looks_like_codes(value: object, fmt: LineFormat) -> bool:
    """A list of at least an image's worth of integers, or a JSON string of one: image codes under a key
    the format does not know would otherwise make a text-only sample silently."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            return False
    return (
        isinstance(value, list)
        and len(value) >= fmt.image_tokens
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def _first_key(record: dict, keys: Sequence[str]) -> str | None:
    return next((key for key in keys if key in record), None)


def _text(record: dict, keys: Sequence[str]) -> str:
    key = _first_key(record, keys)
    if key is None:
        raise BadLine("missing_key", f"no key {' or '.join(map(repr, keys))}; the line has {sorted(record)}")
    value = record[key]
    if not isinstance(value, str):
        raise BadLine("wrong_type", f"{key!r} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise BadLine("empty_text", f"{key!r} is empty")
    return value


def _codes(value: Any, key: str, codebook_size: int, count: int) -> np.ndarray:
    """A list of codes, or a JSON string of one, checked for length and range."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadLine("wrong_type", f"{key!r} is a string but not a JSON list") from None
    if not isinstance(value, list):
        raise BadLine("wrong_type", f"{key!r} is a {type(value).__name__}, not a list of codes")
    if len(value) != count:
        raise BadLine("wrong_code_count", f"{key!r} has {len(value)} codes, expected {count} (--image-tokens)")
    codes = np.asarray(value)
    if codes.ndim != 1 or codes.dtype.kind not in "iu":
        raise BadLine("wrong_type", f"{key!r} holds something other than integers")
    bad = np.flatnonzero((codes < 0) | (codes >= codebook_size))
    if bad.size:
        raise BadLine(
            "code_out_of_range",
            f"{key!r}[{bad[0]}] = {codes[bad[0]]} is outside the codebook 0..{codebook_size - 1} (--vq-codebook-size)",
        )
    return codes


def _turns(value: Any, key: str, has_image: bool) -> list[tuple[str, bool]]:
    """LLaVA ``{"from", "value"}`` or chat ``{"role", "content"}`` turns as ``(text, is_assistant)``.
    As in LLaVA, an ``<image>`` placeholder is dropped (with the whitespace around the text): the
    image always comes first."""
    if not isinstance(value, list) or not value:
        raise BadLine("bad_conversation", f"{key!r} is not a non-empty list of turns")
    turns = []
    for i, turn in enumerate(value):
        role = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        if role not in ASSISTANT_ROLES:
            raise BadLine("bad_conversation", f"{key}[{i}] has no known role ({'/'.join(ASSISTANT_ROLES)})")
        text = turn.get("value", turn.get("content"))
        if not isinstance(text, str):
            raise BadLine("wrong_type", f"{key}[{i}] text is a {type(text).__name__}, not a string")
        if IMAGE_PLACEHOLDER in text:
            if not has_image:
                raise BadLine("missing_key", f"{key}[{i}] refers to {IMAGE_PLACEHOLDER} but the line has no VQ codes")
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
        if not text.strip():
            raise BadLine("empty_text", f"{key}[{i}] is empty")
        turns.append((text, ASSISTANT_ROLES[role]))
    if not any(assistant for _, assistant in turns):
        raise BadLine("bad_conversation", f"{key!r} has no assistant turn: nothing to train")
    return turns
