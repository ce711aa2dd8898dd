"""Megatron's schedule over a rank's micro-batches, and its micro-batch step: forward through the model,
masked loss split by modality."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_unix import platform
from megatron_unix.model.config import UniXConfig
from megatron_unix.model.forward import Batch, stream_forward, unwrap
from megatron_unix.model.routing import UniXPackedSeqParams, build_routing


@dataclass(frozen=True)
class Routed:
    """A micro-batch on this rank's device with its routing, built once per micro-batch: the FLOP count
    reads the segments that :func:`forward_step` attends within. Every pipeline stage routes from the
    token ids, so middle stages need none in the activations."""

    batch: Batch
    routing: UniXPackedSeqParams

    @classmethod
    def of(cls, batch: Batch, config: UniXConfig) -> Routed:
        batch = {key: value.to(platform.device(), non_blocking=True) for key, value in batch.items()}
        return cls(batch, build_routing(batch["tokens"], batch.get("document_ids"), config))


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


def forward_step(data_iterator: Iterator[Routed], model: torch.nn.Module, part: str | None = None):
    """Megatron schedule step on a routed micro-batch."""
    routed = next(data_iterator)
    batch = routed.batch
    output = stream_forward(model, batch, batch["labels"], routed.routing)
    vision_targets = batch["labels"] >= unwrap(model).config.vq_offset
    return output, partial(loss_func, batch["loss_mask"], vision_targets, part=part)


def modality_forward_step(part: str):
    """:func:`forward_step` whose loss is the ``part`` (``text`` / ``vision``) share of the training loss."""

    def step(data_iterator: Iterator[Routed], model: torch.nn.Module):
        return forward_step(data_iterator, model, part)

    return step


def run_schedule(
    ddp: torch.nn.Module,
    micro_batches: list[Routed],
    step: Callable[..., Any] = forward_step,
    forward_only: bool = False,
) -> list[Any]:
    """Megatron's forward(-backward) schedule (pipelined under PP) over this rank's micro-batches, each
    run as one ``[1, b*s]`` stream; the loss outputs of the last stage's micro-batches."""
    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(micro_batches),
        model=[ddp],
        num_microbatches=len(micro_batches),
        seq_length=micro_batches[0].batch["tokens"].numel(),
        micro_batch_size=1,
        forward_only=forward_only,
    )
