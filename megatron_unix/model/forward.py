"""The model's forward over a packed ``[b, s]`` batch: route it, run it as one ``[1, b*s]`` stream.

Training's schedule step, conversion's logits checks and the tools all call the model this way, so
it lives with the model (conversion does not depend on training for it).
"""

from __future__ import annotations

import torch

from megatron_unix.model.routing import UniXPackedSeqParams, build_routing

Batch = dict[str, torch.Tensor]
"""tokens, labels, loss_mask, document_ids: each [b, s]."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def stream_forward(
    model: torch.nn.Module,
    batch: Batch,
    labels: torch.Tensor | None = None,
    routing: UniXPackedSeqParams | None = None,
) -> torch.Tensor:
    """Route a ``[b, s]`` batch (unless its ``routing`` is given) and run it as one ``[1, b*s]`` stream
    (rows are segments, so nothing crosses rows): logits ``[1, b*s, V]``, or per-token losses ``[1, b*s]``
    when ``labels`` are given."""
    routing = routing or build_routing(batch["tokens"], batch.get("document_ids"), unwrap(model).config)
    flat_labels = None if labels is None else labels.reshape(1, -1)
    return model(batch["tokens"].reshape(1, -1), None, None, labels=flat_labels, packed_seq_params=routing)
