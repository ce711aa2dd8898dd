"""Shared fixtures: one single-process gloo group with Megatron's parallel state (TP=PP=1)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def megatron_single():
    from megatron_unix.training import distributed

    before = set(os.environ)
    distributed.initialize(1, 1, seed=1)
    for key in set(os.environ) - before:  # RANK, MASTER_PORT...: subprocesses must not inherit them
        if key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            del os.environ[key]
    yield


@pytest.fixture(autouse=True)
def _clear_nvte_env():
    """TransformerConfig writes NVTE_* variables into os.environ; keep tests independent."""
    before = {k for k in os.environ if k.startswith("NVTE_")}
    yield
    for key in [k for k in os.environ if k.startswith("NVTE_")]:
        if key not in before:
            del os.environ[key]


SPECIALS = ["<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"]
CORPUS = [
    "The caption of this image is: a red bicycle leaning on a wall.",
    "Generate an image based on this description.",
    "Uni-X separates the first and last layers by modality and shares the middle ones.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
] * 20


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    import sentencepiece

    root = tmp_path_factory.mktemp("sp")
    (root / "corpus.txt").write_text("\n".join(CORPUS))
    sentencepiece.SentencePieceTrainer.train(
        input=str(root / "corpus.txt"),
        model_prefix=str(root / "sp"),
        vocab_size=120,
        user_defined_symbols=SPECIALS,
        model_type="bpe",
        minloglevel=2,
    )
    return root / "sp.model"


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    root = tmp_path_factory.mktemp("hf")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(root)
    return root
