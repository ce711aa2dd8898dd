"""Generation loops on the HF Uni-X model (remote-code classes): text, text-to-image with
classifier-free guidance, image-to-text (spec §6).

One incremental decoder serves every mode: prompts are left-padded into one batch (the 2-D
attention mask hides the padding and the model counts rotary positions from each row's first real
token, so padding changes nothing), then each step forwards only the new tokens through the
per-modality KV cache (:class:`UniXCache`) or, with ``use_cache=False``, the whole sequence again
(the reference path that tests and the benchmark compare against).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from megatron_unix.conversion.hf_remote.modeling_unix import UniXCache
from megatron_unix.data.tokenizer import TextTokenizer
from megatron_unix.inference.sampling import SamplingParams, VocabLayout, draw, generators, image_logits, restrict

T2I_INSTRUCTION = " Generate an image based on this description."
UNCONDITIONAL = "<unconditional>"
"""Spec §3: the text that replaced 10% of captions in training; it conditions the CFG branch."""
I2T_QUESTION = "The caption of this image is:"

StepCallback = Callable[[], None]
"""Called once per generated token position (progress reporting)."""


def t2i_prompt(tokenizer: TextTokenizer, layout: VocabLayout, caption: str) -> list[int]:
    return [*tokenizer.encode(caption + T2I_INSTRUCTION), layout.boi_id]


def unconditional_prompt(tokenizer: TextTokenizer, layout: VocabLayout) -> list[int]:
    return [*tokenizer.encode(UNCONDITIONAL), layout.boi_id]


def i2t_prompt(tokenizer: TextTokenizer, layout: VocabLayout, codes: Sequence[int], question: str) -> list[int]:
    """Spec §3 I2T layout up to the answer: ``[BOI][codes][EOI][question]``."""
    return [layout.boi_id, *layout.image_tokens(codes), layout.eoi_id, *tokenizer.encode(question)]


class Decoder:
    """A left-padded batch of prompts growing by one token position per step.

    With the cache, only the tokens it has not seen yet are kept (and forwarded); without it, the
    whole sequence, which every step forwards again. The attention mask covers the whole sequence.
    """

    def __init__(self, model: torch.nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, use_cache: bool) -> None:
        if not prompts or not all(prompts):
            raise ValueError("every prompt needs at least one token")
        self.model, self.use_cache = model, use_cache
        self.device = next(model.parameters()).device
        width = max(len(p) for p in prompts)
        self.inputs = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        """What the next forward reads: the unseen tokens (cache) or the whole sequence (recompute)."""
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        self.cache = UniXCache() if use_cache else None

    def logits(self) -> torch.Tensor:
        """fp32 logits [rows, vocab] for the token after the current sequence."""
        out = self.model(
            input_ids=self.inputs,
            attention_mask=self.mask,
            past_key_values=self.cache,
            use_cache=self.use_cache,
            logits_to_keep=1,
        )
        if self.use_cache:
            self.inputs = self.inputs[:, :0]
        return out.logits[:, -1].float()

    def append(self, tokens: torch.Tensor) -> None:
        """Add one token [rows] to every row (forwarded by the next :meth:`logits`)."""
        tokens = tokens.to(self.device)[:, None]
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        self.inputs = torch.cat([self.inputs, tokens], dim=1)


@torch.inference_mode()
def generate_text(
    model: torch.nn.Module,
    layout: VocabLayout,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    seeds: Sequence[int],
    max_new_tokens: int,
    *,
    use_cache: bool = True,
    on_step: StepCallback | None = None,
) -> list[list[int]]:
    """Continue each prompt with text ids only, until EOS (not returned) or ``max_new_tokens``."""
    decoder = Decoder(model, prompts, layout.eos_id, use_cache)
    allowed = layout.text_ids(model.config.vocab_size, decoder.device)
    rngs = generators(seeds, decoder.device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=decoder.device)
    columns = []
    for step in range(max_new_tokens):
        tokens = draw(restrict(decoder.logits(), allowed), params, rngs)
        tokens = tokens.masked_fill(finished, layout.eos_id)
        finished |= tokens == layout.eos_id
        columns.append(tokens)
        if on_step:
            on_step()
        if finished.all() or step == max_new_tokens - 1:
            break
        decoder.append(tokens)
    if not columns:
        return [[] for _ in prompts]
    rows = torch.stack(columns, dim=1).tolist()
    return [row[: row.index(layout.eos_id)] if layout.eos_id in row else row for row in rows]


@torch.inference_mode()
def generate_images(
    model: torch.nn.Module,
    layout: VocabLayout,
    prompts: Sequence[Sequence[int]],
    unconditional: Sequence[int],
    params: SamplingParams,
    seeds: Sequence[int],
    *,
    cfg_scale: float,
    codes_per_image: int,
    use_cache: bool = True,
    on_step: StepCallback | None = None,
) -> list[list[int]]:
    """Spec §6 text-to-image: rows ``[prompts; unconditional x n]``; each step mixes the raw logits
    with guidance, keeps the VQ ids only, samples one token per image and appends it to both of its
    rows. A scale of 1 leaves the conditional logits as they are: the unconditional rows are not run
    (as the reference runs them only when s > 1), half the work. Returns per image the generated ids:
    ``codes_per_image`` codes (with the forced separators of the layout in place) and EOI."""
    if codes_per_image < 1:
        raise ValueError(f"--codes-per-image must be >= 1, got {codes_per_image}")
    n, guide = len(prompts), cfg_scale != 1
    rows = [*prompts, *[unconditional] * n] if guide else list(prompts)
    decoder = Decoder(model, rows, layout.eos_id, use_cache)
    rngs = generators(seeds, decoder.device)
    schedule = layout.image_schedule(codes_per_image)
    columns = []
    for step, forced in enumerate(schedule):
        if forced:
            tokens = torch.full((n,), layout.separator_id, device=decoder.device)
        else:
            logits = decoder.logits()
            cond, uncond = logits.split(n) if guide else (logits, None)
            tokens = layout.vq_offset + draw(image_logits(cond, uncond, cfg_scale, layout), params, rngs)
        columns.append(tokens)
        if on_step:
            on_step()
        if step < len(schedule) - 1:
            decoder.append(tokens.repeat(len(rows) // n))
    eoi = torch.full((n, 1), layout.eoi_id, device=decoder.device)
    return torch.cat([torch.stack(columns, dim=1), eoi], dim=1).tolist()
