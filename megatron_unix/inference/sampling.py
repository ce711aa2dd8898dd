"""Logits processing for generation, pure tensor functions (spec §6).

The order matters and is the reference's: classifier-free guidance mixes the *raw* logits, then
the ids the mode may not emit are masked, then temperature, top-k and top-p shape the distribution
that is sampled. Sampling draws each row from its own ``torch.Generator``, so a sample's tokens
depend on its seed only, not on which other samples share its batch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_unix.data.vocabulary import vision_mask

NEG_INF = float("-inf")


@dataclass(frozen=True)
class VocabLayout:
    """Where each kind of id lies (spec §2) and how generated images are laid out.

    ``separator_every`` > 0 (config ``add_sep_for_vis`` with ``vis_sep_lens``): after every that
    many codes of an image, ``separator_id`` is appended instead of sampled (not after the last code).
    """

    vq_offset: int
    codebook_size: int
    boi_id: int
    eoi_id: int
    eos_id: int
    separator_id: int | None = None
    separator_every: int = 0

    def __post_init__(self) -> None:
        if (self.separator_id is None) != (self.separator_every == 0):
            raise ValueError(
                f"separator id {self.separator_id} with vis_sep_lens {self.separator_every}: "
                "a separator needs a positive interval and an interval needs a separator"
            )

    def text_ids(self, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bool [vocab_size]: ids text generation may emit, the text side of the routing rule (no codes,
        BOI or separator: those start or continue an image, which text mode cannot finish)."""
        separators = [self.separator_id] if self.separator_id is not None else []
        return ~vision_mask(torch.arange(vocab_size, device=device), self.vq_offset, self.boi_id, separators)

    def image_schedule(self, codes_per_image: int) -> list[bool]:
        """One entry per generated image token: True where a separator is forced, False for a code."""
        schedule: list[bool] = []
        for code in range(codes_per_image):
            if self.separator_every and code and code % self.separator_every == 0:
                schedule.append(True)
            schedule.append(False)
        return schedule

    def image_tokens(self, codes: Sequence[int]) -> list[int]:
        """Codes (0-based) -> token ids with the separators in place, as a prompt's image."""
        tokens, remaining = [], iter(codes)
        for forced in self.image_schedule(len(codes)):
            tokens.append(self.separator_id if forced else self.vq_offset + next(remaining))
        return tokens

    def codes(self, tokens: Sequence[int]) -> list[int]:
        """The 0-based codes among generated image tokens (separators and EOI dropped)."""
        return [t - self.vq_offset for t in tokens if self.vq_offset <= t < self.vq_offset + self.codebook_size]


@dataclass(frozen=True)
class SamplingParams:
    """Temperature, top-k (0: off) and top-p (1: off), or ``greedy`` argmax; messages name the flags."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"--temperature must be > 0, got {self.temperature} (use --greedy for argmax)")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1] (1: off), got {self.top_p}")


def derived_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of prompt ``prompt_index``: a hash, so that neighbouring
    run seeds do not share samples, and independent of batching."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(seed) for seed in seeds]


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on raw logits: ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def image_logits(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float, layout: VocabLayout) -> torch.Tensor:
    """Spec §6 image step up to sampling: guidance on the raw logits (none without ``uncond``: a scale of
    1 leaves ``cond``), then the VQ ids only, as the ``[rows, codebook]`` columns of code 0.. (every other
    id masked to -inf could never be drawn: dropping its column samples the same, and spares top-k/top-p
    a vocabulary 20x the codebook)."""
    mixed = cond if uncond is None else guided(cond, uncond, scale)
    return mixed[:, layout.vq_offset : layout.vq_offset + layout.codebook_size]


def restrict(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits of ids outside ``allowed`` (bool [vocab]) set to -inf."""
    return logits.masked_fill(~allowed, NEG_INF)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties at the k-th value kept); 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely ids whose probability reaches p (the top id always)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    drop = cumulative > p
    drop[..., 1:] = drop[..., :-1].clone()  # keep the id that crosses p
    drop[..., 0] = False
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), NEG_INF)


def shape(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (fp32)."""
    logits = logits.float() / params.temperature
    return top_p_filter(top_k_filter(logits, params.top_k), params.top_p)


def draw(logits: torch.Tensor, params: SamplingParams, rngs: Sequence[torch.Generator]) -> torch.Tensor:
    """Next token per row [rows] from masked logits [rows, vocab]; row i draws from ``rngs[i]``."""
    if params.greedy:
        return logits.argmax(-1)
    probs = shape(logits, params).softmax(-1)
    return torch.cat([torch.multinomial(row, 1, generator=rng) for row, rng in zip(probs, rngs)])
