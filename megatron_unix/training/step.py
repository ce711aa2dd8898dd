"""One micro-batch: routing, forward, masked loss split by modality; and the global grad norm."""

from __future__ import annotations

from functools import partial
from typing import Iterator

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.transformer.module import param_is_not_shared

from megatron_unix import platform
from megatron_unix.model.routing import build_routing

Batch = dict[str, torch.Tensor]
"""tokens, labels, loss_mask, document_ids: each [b, s]."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def loss_func(loss_mask: torch.Tensor, vision_targets: torch.Tensor, output_tensor: torch.Tensor):
    """Mean cross-entropy over unmasked targets; text/vision sums for per-modality reporting.

    A target is vision when the token to predict is a VQ code (the first code predicted from BOI
    included); EOI and EOS targets are text.
    """
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    vision = vision_targets.reshape(-1) & (mask > 0)
    text = ~vision & (mask > 0)
    loss = torch.sum(losses * mask) / mask.sum().clamp(min=1)
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


def stream_forward(model: torch.nn.Module, batch: Batch, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Route a ``[b, s]`` batch and run it as one ``[1, b*s]`` stream: logits ``[1, b*s, V]``,
    or per-token losses ``[1, b*s]`` when ``labels`` are given."""
    routing = build_routing(batch["tokens"], batch.get("document_ids"), unwrap(model).config)
    flat_labels = None if labels is None else labels.reshape(1, -1)
    return model(batch["tokens"].reshape(1, -1), None, None, labels=flat_labels, packed_seq_params=routing)


def forward_step(data_iterator: Iterator[Batch], model: torch.nn.Module):
    """Megatron schedule step. Every stage reads the batch, so every stage can route."""
    batch = {key: value.to(platform.device(), non_blocking=True) for key, value in next(data_iterator).items()}
    output = stream_forward(model, batch, batch["labels"])
    vision_targets = batch["labels"] >= unwrap(model).config.vq_offset
    return output, partial(loss_func, batch["loss_mask"], vision_targets)


def grad_norm(model_chunks: list[torch.nn.Module]) -> float:
    """L2 norm of all gradients, each parameter counted once across TP, PP and tied copies."""
    grads = []
    for chunk in model_chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is None or not param_is_not_shared(param):
                continue
            if tensor_parallel.param_is_not_tensor_parallel_duplicate(param):
                grads.append(grad.float())
    return get_grad_norm_fp32(grads, grad_stats_parallel_group=ps.get_model_parallel_group())
