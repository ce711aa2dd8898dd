"""Exact token sequences and trained flags of the spec's layouts (§3)."""

from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="module")
def tok(hf_tokenizer_dir):
    from megatron_unix.data.tokenizer import MultimodalTokenizer

    return MultimodalTokenizer.from_pretrained(hf_tokenizer_dir, codebook_size=16)


class FixedRng(random.Random):
    """random() answers from a list; choice() takes the first option."""

    def __init__(self, *draws: float) -> None:
        super().__init__(0)
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0)

    def choice(self, seq):
        return seq[0]


def test_text(tok):
    from megatron_unix.data.layouts import text_sample

    s = text_sample(tok, "a red bicycle")
    assert s.tokens == tok.tokenize("a red bicycle") + [tok.eos_id] and all(s.trained)
    assert text_sample(tok, "a red bicycle", append_eos=False).tokens == tok.tokenize("a red bicycle")


def test_t2i_masks_the_condition(tok):
    from megatron_unix.data.layouts import T2I_PROMPTS, t2i_sample

    s = t2i_sample(tok, "a red bicycle", [3, 4], FixedRng(0.5))
    cond = tok.tokenize(f"a red bicycle {T2I_PROMPTS[0]}") + [tok.boi_id]
    assert s.tokens == cond + [tok.vq_offset + 3, tok.vq_offset + 4, tok.eoi_id, tok.eos_id]
    assert s.trained == [False] * len(cond) + [True] * 4
    assert all(t2i_sample(tok, "a red bicycle", [3, 4], FixedRng(0.5), ignore_instruction=False).trained)


def test_t2i_unconditional(tok):
    from megatron_unix.data.layouts import t2i_sample

    s = t2i_sample(tok, "a red bicycle", [3], FixedRng(0.05))
    assert s.tokens[:-4] == tok.tokenize("<unconditional>")
    assert s.tokens[-4:] == [tok.boi_id, tok.vq_offset + 3, tok.eoi_id, tok.eos_id]


def test_i2t_trains_only_the_caption(tok):
    from megatron_unix.data.layouts import I2T_PROMPTS, i2t_sample

    s = i2t_sample(tok, "a red bicycle", [7], FixedRng())
    head = [tok.boi_id, tok.vq_offset + 7, tok.eoi_id] + tok.tokenize(I2T_PROMPTS[0])
    tail = tok.tokenize(" a red bicycle") + [tok.eos_id]
    assert s.tokens == head + tail
    assert s.trained == [False] * len(head) + [True] * len(tail)


def test_pair_ratio_is_seeded(tok):
    from megatron_unix.data.layouts import pair_sample

    def kinds(seed):
        rng = random.Random(seed)
        return [pair_sample(tok, "x", [1], rng).tokens[0] == tok.boi_id for _ in range(2000)]

    assert kinds(1) == kinds(1)
    i2t_share = sum(kinds(1)) / 2000
    assert 0.17 < i2t_share < 0.23
