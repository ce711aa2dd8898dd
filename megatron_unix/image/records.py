"""A source's row -> the text fields of its output line (the codes are added once encoded): an image-text
pair as it is, or a conversation in the form ``preprocess_data.py`` lays out as SFT.

preprocess_data's SFT sample (:func:`megatron_unix.data.layouts.sft_sample`) holds one image, before the
first turn, and trains the answers only. The conversations that put their image there are taken:

- FineVision / the Cauldron rows: one image and ``texts``, turns of ``{"user", "assistant"}`` (their chat
  template puts the images before the first question) -> LLaVA ``conversations`` (``human``/``gpt``);
- LLaVA ``conversations`` (``{"from", "value"}``) and chat ``messages`` (``{"role", "content"}``; a content
  of Hugging Face's parts, ``{"type": "text" | "image"}``, becomes the texts joined by newlines, the image
  part an ``<image>``) with one image and no ``<image>`` placeholder or one in the first turn (LLaVA moves
  it to the front of the turn).

Other layouts (several images, several placeholders, a placeholder in a later turn) are refused by row,
as ``unsupported_layout``: laying them out image-first would train on a conversation that is not theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_unix.data.jsonl_schema import IMAGE_PLACEHOLDER

ONE_IMAGE_FIRST = "the SFT layout holds one image, before the first turn"


class BadRecord(ValueError):
    """A row that makes no sample; ``reason`` is the short code the summary counts it under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RecordKeys:
    """Which keys of a row hold what (the first one a row has is used)."""

    caption_keys: tuple[str, ...] = ("caption", "text")
    """preprocess_data's ``--caption-key``: a pair needs one; captions of ``.txt`` files go under the first."""
    conversation_keys: tuple[str, ...] = ("conversations", "messages")
    """preprocess_data's ``--conversation-key``: LLaVA or chat turns; FineVision turns go under the first."""
    turns_keys: tuple[str, ...] = ("texts",)
    """FineVision's turns of ``{"user", "assistant"}``."""


def output_fields(fields: dict[str, Any], images: int, keys: RecordKeys) -> dict[str, Any]:
    """The fields of a row with ``images`` images (at least one) as the output line carries them, or
    :class:`BadRecord`: no text, a malformed conversation or an unsupported layout."""
    conversation_key = _first_key(fields, keys.conversation_keys)
    turns_key = _first_key(fields, keys.turns_keys)
    if conversation_key is not None:
        conversation = text_turns(fields[conversation_key], conversation_key)
        _check_placeholders([turn.get("value", turn.get("content")) for turn in conversation], conversation_key)
        fields = {**fields, conversation_key: conversation}
    elif turns_key is not None:
        conversation = finevision_conversation(fields[turns_key], turns_key)
        _check_placeholders([turn["value"] for turn in conversation], turns_key)
        fields = {k: v for k, v in fields.items() if k != turns_key}
        fields[keys.conversation_keys[0]] = conversation
    else:
        if images > 1:
            raise BadRecord("unsupported_layout", f"{images} images beside a caption: a pair holds one image")
        caption = fields.get(_first_key(fields, keys.caption_keys))  # preprocess_data's: the first key present
        if not (isinstance(caption, str) and caption.strip()):
            conversations = "/".join(keys.conversation_keys + keys.turns_keys)
            raise BadRecord(
                "missing_text",
                f"no text: no caption under {'/'.join(keys.caption_keys)} (--caption-key) and no conversation "
                f"under {conversations} (--conversation-key, --turns-key)",
            )
        return fields
    if images > 1:
        raise BadRecord("unsupported_layout", f"{images} images in a conversation: {ONE_IMAGE_FIRST}")
    return fields


def finevision_conversation(turns: Any, key: str) -> list[dict[str, str]]:
    """FineVision's ``[{"user", "assistant"}, ...]`` as LLaVA's ``[{"from": "human"}, {"from": "gpt"}, ...]``."""
    if not isinstance(turns, list) or not turns:
        raise BadRecord("bad_conversation", f"{key!r} is not a non-empty list of turns")
    conversation = []
    for i, turn in enumerate(turns):
        texts = [turn.get(role) if isinstance(turn, dict) else None for role in ("user", "assistant")]
        if not all(isinstance(text, str) and text.strip() for text in texts):
            raise BadRecord("bad_conversation", f"{key}[{i}] is not a turn of non-empty 'user' and 'assistant' texts")
        conversation += [{"from": "human", "value": texts[0]}, {"from": "gpt", "value": texts[1]}]
    return conversation


def text_turns(turns: Any, key: str) -> list[dict[str, Any]]:
    """LLaVA or chat turns with text (their roles and emptiness are preprocess_data's to check); a content
    of parts as one text (:func:`parts_text`)."""
    if not isinstance(turns, list) or not turns:
        raise BadRecord("bad_conversation", f"{key!r} is not a non-empty list of turns")
    result = []
    for i, turn in enumerate(turns):
        text_key = "value" if isinstance(turn, dict) and "value" in turn else "content"
        text = turn.get(text_key) if isinstance(turn, dict) else None
        if isinstance(text, list):
            turn = {**turn, text_key: parts_text(text, f"{key}[{i}]")}
        elif not isinstance(text, str):
            raise BadRecord("bad_conversation", f"{key}[{i}] has no text ('value' or 'content')")
        result.append(turn)
    return result


def parts_text(parts: list[Any], where: str) -> str:
    """Hugging Face's content parts as one text: the texts joined by newlines, an image part as ``<image>``."""
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image":
            texts.append(IMAGE_PLACEHOLDER)
        else:
            raise BadRecord("bad_conversation", f"{where}.content[{j}] is no text or image part")
    return "\n".join(texts)


def _check_placeholders(texts: list[str], key: str) -> None:
    """At most one ``<image>``, in the first turn: where the SFT layout puts the image."""
    counts = [text.count(IMAGE_PLACEHOLDER) for text in texts]
    if sum(counts) > 1:
        raise BadRecord("unsupported_layout", f"{key} has {sum(counts)} {IMAGE_PLACEHOLDER} places: {ONE_IMAGE_FIRST}")
    if sum(counts[1:]):
        turn = next(i for i, n in enumerate(counts) if n)
        raise BadRecord("unsupported_layout", f"{key}[{turn}] holds the {IMAGE_PLACEHOLDER}: {ONE_IMAGE_FIRST}")


def _first_key(fields: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((key for key in keys if key in fields), None)
