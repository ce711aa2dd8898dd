"""The multimodal tokenizer: a text tokenizer with the VQ codebook placed after it (spec §2).

The text side is a Hugging Face tokenizer directory or a SentencePiece ``.model``; VQ code ``c`` is
token ``vq_offset + c`` with ``vq_offset`` = the text tokenizer's length. BOI, EOI, EOS and the
optional separator are existing text tokens looked up by name (Qwen's names by default). The object
also offers what ``megatron.core.datasets`` needs: ``vocab_size``, ``eod``, ``pad`` and
``unique_identifiers``.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

from megatron_unix.data.vocabulary import CODEBOOK_SIZE


class TextTokenizer(Protocol):
    path: str

    def __len__(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def token_id(self, name: str) -> int | None: ...
    def token_text(self, index: int) -> str: ...


class SentencePieceText:
    def __init__(self, path: str) -> None:
        import sentencepiece

        self.path = path
        self.model = sentencepiece.SentencePieceProcessor(model_file=path)

    def __len__(self) -> int:
        return self.model.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.model.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))

    def token_id(self, name: str) -> int | None:
        index = self.model.piece_to_id(name)
        return None if index == self.model.unk_id() and name != self.model.id_to_piece(index) else index

    def token_text(self, index: int) -> str:
        return self.model.id_to_piece(index)


class HuggingFaceText:
    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.path = path
        self.model = AutoTokenizer.from_pretrained(path, local_files_only=True)

    def __len__(self) -> int:
        return len(self.model)

    def encode(self, text: str) -> list[int]:
        return self.model.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))

    def token_id(self, name: str) -> int | None:
        index = self.model.convert_tokens_to_ids(name)
        return None if index is None or index == self.model.unk_token_id and name != self.model.unk_token else index

    def token_text(self, index: int) -> str:
        return self.model.convert_ids_to_tokens(index)


def load_text_tokenizer(path: str | Path) -> TextTokenizer:
    """A HF tokenizer directory, or a SentencePiece ``.model`` file."""
    path = Path(path)
    if path.is_dir():
        return HuggingFaceText(str(path))
    if path.is_file():
        return SentencePieceText(str(path))
    raise FileNotFoundError(f"--tokenizer-model {path}: no such tokenizer directory or SentencePiece model")


class MultimodalTokenizer:
    """Text ids below ``vq_offset``, VQ codes from ``vq_offset`` on."""

    def __init__(
        self,
        text: TextTokenizer,
        codebook_size: int = CODEBOOK_SIZE,
        boi: str = "<|vision_start|>",
        eoi: str = "<|vision_end|>",
        eos: str = "<|endoftext|>",
        separator: str | None = None,
        vq_offset: int | None = None,
    ) -> None:
        self.text = text
        self.codebook_size = codebook_size
        self.vq_offset = len(text) if vq_offset is None else vq_offset
        if self.vq_offset < len(text):
            raise ValueError(
                f"vq_offset {self.vq_offset} overlaps the text vocabulary of {text.path} ({len(text)} tokens)"
            )
        self.boi_id, self.eoi_id, self.eos_id = (
            self._require(name, role) for name, role in ((boi, "BOI"), (eoi, "EOI"), (eos, "EOS"))
        )
        self.separator_id = self._require(separator, "separator") if separator else None

    def _require(self, name: str, role: str) -> int:
        index = self.text.token_id(name)
        if index is None:
            raise ValueError(f"tokenizer {self.text.path} has no {role} token {name!r}; name it with the {role} option")
        return index

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "MultimodalTokenizer":
        return cls(load_text_tokenizer(path), **kwargs)

    @property
    def separator_ids(self) -> tuple[int, ...]:
        return (self.separator_id,) if self.separator_id is not None else ()

    @property
    def vocab_size(self) -> int:
        return self.vq_offset + self.codebook_size

    @property
    def eod(self) -> int:
        return self.eos_id

    @property
    def pad(self) -> int:
        return self.eos_id

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(
            class_name=type(self).__name__,
            text=self.text.path,
            vq_offset=self.vq_offset,
            codebook_size=self.codebook_size,
            boi=self.boi_id,
            eoi=self.eoi_id,
            eos=self.eos_id,
        )

    def tokenize(self, text: str) -> list[int]:
        return self.text.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of the text ids (VQ codes are skipped)."""
        return self.text.decode([i for i in ids if i < self.vq_offset])

    def image_tokens(self, codes: Sequence[int]) -> list[int]:
        """VQ codes -> token ids; a code outside the codebook is an error naming it."""
        bad = next((c for c in codes if not 0 <= int(c) < self.codebook_size), None)
        if bad is not None:
            raise ValueError(f"VQ code {bad} is outside the codebook 0..{self.codebook_size - 1}")
        return [self.vq_offset + int(c) for c in codes]

    def model_config_fields(self) -> dict[str, object]:
        """The UniXConfig fields this tokenizer fixes."""
        return dict(
            vq_offset=self.vq_offset,
            vq_codebook_size=self.codebook_size,
            boi_id=self.boi_id,
            eoi_id=self.eoi_id,
            eos_id=self.eos_id,
            separator_ids=self.separator_ids,
        )


LAYOUT_FIELDS = ("vq_offset", "vq_codebook_size", "boi_id", "eoi_id", "eos_id")
"""What a checkpoint was trained with that its tokenizer must give again (``model_config_fields``)."""


def same_vocabulary(a: TextTokenizer, b: TextTokenizer) -> bool:
    """Whether two text tokenizers map every id to the same token (a copy in another folder does)."""
    return len(a) == len(b) and all(a.token_text(i) == b.token_text(i) for i in range(len(a)))


def check_checkpoint_tokenizer(
    tokenizer: MultimodalTokenizer,
    recorded: Mapping[str, Any],
    flag: str,
    checkpoint: object,
    own: TextTokenizer | None = None,
) -> None:
    """The one rule pairing a tokenizer (given with ``flag``) with a checkpoint, for every program that
    does (pretrain, generate, evaluate): the vocabulary layout the checkpoint was ``recorded`` with
    (:data:`LAYOUT_FIELDS`; those it lacks are not checked) must be the tokenizer's, and where the
    checkpoint's ``own`` tokenizer is at hand, the vocabularies must be the same: a model read through
    another vocabulary runs and answers garbage. ValueError naming both."""
    layout = tokenizer.model_config_fields()
    for name in LAYOUT_FIELDS:
        if recorded.get(name) is not None and recorded[name] != layout[name]:
            raise ValueError(
                f"{flag} {tokenizer.text.path} gives {name}={layout[name]} but the checkpoint {checkpoint} "
                f"was trained with {name}={recorded[name]}: use the tokenizer of the checkpoint"
            )
    if own is not None and not same_vocabulary(own, tokenizer.text):
        raise ValueError(
            f"{flag} {tokenizer.text.path}: its vocabulary ({len(tokenizer.text)} tokens) is not that of the "
            f"tokenizer of {checkpoint} ({own.path}, {len(own)} tokens): use the tokenizer of the checkpoint"
        )


QWEN_SPECIALS = ("<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, output_dir: str | Path, specials: Sequence[str] = QWEN_SPECIALS
) -> Path:
    """A byte-level BPE tokenizer (Qwen's kind) trained on ``texts``, saved as a HF tokenizer dir.

    For quickstarts, tests and benchmarks, where no pretrained tokenizer can be downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    output_dir = Path(output_dir)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=specials[0]).save_pretrained(output_dir)
    return output_dir
