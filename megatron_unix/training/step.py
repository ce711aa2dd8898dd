"""The schedule's micro-batch step: forward through the model, masked loss split by modality."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch

from megatron_unix import platform
from megatron_unix.model.forward import Batch, stream_forward, unwrap


def loss_func(
    loss_mask: torch.Tensor, vision_targets: torch.Tensor, output_tensor: torch.Tensor, part: str | None = None
):
    """Mean cross-entropy over unmasked targets; text/vision sums for per-modality reporting.

    A target is vision when the token to predict is a VQ code (the first code predicted from BOI
    included); EOI and EOS targets are text. ``part`` (``text`` / ``vision``) keeps only that
    modality's share of the loss (same denominator: the two parts sum to the loss), for the
    gradient-conflict measurement.
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    vision = vision_targets.reshape(-1) & (mask > 0)
    text = ~vision & (mask > 0)
    weights = mask if part is None else (vision if part == "vision" else text).float()
    loss = torch.sum(losses * weights) / mask.sum().clamp(min=1)
    report = torch.stack(
        [
            (losses * text).sum(),
            text.sum().float(),
            (losses * vision).sum(),
            vision.sum().float(),
        ]
    ).detach()
    # The schedule divides the returned loss in place: report a clone.
    return loss, {"lm loss": loss.detach().clone(), "modality_sums": report}


def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module, part: str | None = None):
    """Megatron schedule step. Every stage reads the batch, so every stage can route."""
    batch = {key: value.to(platform.device(), non_blocking=True) for key, value in next(data_iterator).items()}
    output = stream_forward(model, batch, batch["labels"])
    vision_targets = batch["labels"] >= unwrap(model).config.vq_offset
    return output, partial(loss_func, batch["loss_mask"], vision_targets, part=part)


def modality_forward_step(part: str):
    """:func:`forward_step` whose loss is the ``part`` (``text`` / ``vision``) share of the training loss."""

    def step(data_iterator: Iterator[Batch], model: torch.nn.Module):
        return forward_step(data_iterator, model, part)

    return step
