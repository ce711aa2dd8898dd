"""``--verify``: the Megatron model and an HF model on the same sample inputs (spec §8 gate).

Samples are one text row, one T2I row ``[text, BOI, codes, EOI, EOS]`` and one I2T row
``[BOI, codes, EOI, text, EOS]`` (spec §3 layouts; the codes random but fixed). Each comparison
prints max and mean absolute logit difference, cosine similarity and greedy-token agreement.

Gates: ``FP32`` for fp32 weights on both sides; ``BF16`` (spec §8: cosine >= 0.99, same greedy
tokens) when the HF side holds the exported bf16 weights. Greedy agreement is judged tie-aware: a
position where the HF side picks another token than the reference (Megatron) fails only if the
reference prefers its own token by more than ``tie`` x the position's largest |logit|; rounding
the weights legitimately flips tokens that are tied that closely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_unix.data.tokenizer import TextTokenizer
from megatron_unix.model.config import UniXConfig
from megatron_unix.model.forward import stream_forward

TEXT = "The caption of this image is: a red bicycle leaning on a wall, next to a blue door."
IMAGE_CODES = 64
"""Codes per sample image (a real image has 1024; the layout, not the length, is what is checked)."""


@dataclass(frozen=True)
class Gate:
    min_cosine: float
    tie: float


FP32 = Gate(min_cosine=0.9999, tie=1e-6)
BF16 = Gate(min_cosine=0.99, tie=2**-7)


class VerificationFailed(RuntimeError):
    """The converted model's logits are beyond tolerance."""


@dataclass(frozen=True)
class Comparison:
    sample: str
    tokens: int
    max_diff: float
    mean_diff: float
    cosine: float
    agreement: float
    passed: bool


def sample_inputs(config: UniXConfig, text_ids: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """``{"text", "t2i", "i2t"}`` -> token ids [s] in this model's vocabulary layout."""
    g = torch.Generator().manual_seed(seed)
    codes = (config.vq_offset + torch.randint(0, config.vq_codebook_size, (IMAGE_CODES,), generator=g)).tolist()
    boi, eoi, eos = config.boi_id, config.eoi_id, config.eos_id
    rows = {"text": text_ids, "t2i": [*text_ids, boi, *codes, eoi, eos], "i2t": [boi, *codes, eoi, *text_ids, eos]}
    return {name: torch.tensor(ids, dtype=torch.long) for name, ids in rows.items()}


def sample_text_ids(
    config: UniXConfig, tokenizer: TextTokenizer | None = None, length: int = 24, seed: int = 0
) -> list[int]:
    """The sample sentence through the text ``tokenizer`` when there is one, else fixed random text ids."""
    if tokenizer is not None:
        return tokenizer.encode(TEXT)
    vision = {config.boi_id, *config.separator_ids}
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vq_offset, (4 * length,), generator=g).tolist()
    return [i for i in ids if i not in vision][:length]


@torch.no_grad()
def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 logits [s, vocab_size] of a TP1/PP1 Megatron model (padding columns dropped)."""
    model.eval()
    return stream_forward(model, {"tokens": tokens[None]})[0, :, :vocab_size].float()


@torch.no_grad()
def hf_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [s, V] of an HF causal LM, computed in the model's dtype, returned as fp32."""
    model.eval()
    return model(input_ids=tokens[None], use_cache=False).logits[0].float()


def compare(sample: str, reference: torch.Tensor, other: torch.Tensor, gate: Gate) -> Comparison:
    """``reference`` (Megatron) against ``other`` (HF), both [s, V] over the same columns."""
    diff = (reference - other).abs()
    cosine = torch.nn.functional.cosine_similarity(reference.double().flatten(), other.double().flatten(), dim=0).item()
    ref_pick, other_pick = reference.argmax(-1), other.argmax(-1)
    margin = reference.gather(-1, ref_pick[:, None]) - reference.gather(-1, other_pick[:, None])
    real_flips = (margin[:, 0] > gate.tie * reference.abs().amax(-1)) & (ref_pick != other_pick)
    agreement = (ref_pick == other_pick).float().mean().item()
    passed = cosine >= gate.min_cosine and not real_flips.any().item()
    return Comparison(sample, reference.shape[0], diff.max().item(), diff.mean().item(), cosine, agreement, passed)


def report(comparisons: list[Comparison], gate: Gate) -> None:
    """Print the table; raise VerificationFailed when any comparison is beyond ``gate``."""
    print(f"{'sample':<44} {'tokens':>6} {'max|diff|':>10} {'mean|diff|':>10} {'cosine':>10} {'greedy':>8}  result")
    for c in comparisons:
        print(
            f"{c.sample:<44} {c.tokens:>6} {c.max_diff:>10.3e} {c.mean_diff:>10.3e} {c.cosine:>10.6f} "
            f"{100 * c.agreement:>7.1f}%  {'ok' if c.passed else 'FAIL'}",
            flush=True,
        )
    failed = [c.sample for c in comparisons if not c.passed]
    if failed:
        raise VerificationFailed(
            f"verification failed for {', '.join(failed)} (gate: cosine >= {gate.min_cosine} "
            f"and the same greedy tokens up to ties of {gate.tie:g} x max|logit|)"
        )
