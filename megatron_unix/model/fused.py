"""How Megatron fuses projections into one tensor: q/k/v interleaved per query group in ``linear_qkv``,
``[gate; up]`` in ``linear_fc1``. Conversion merges and splits whole tensors with these; the gradient
analysis splits one tensor-parallel shard (a shard holds whole query groups and ``[gate_r; up_r]``)."""

from __future__ import annotations

import torch


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, per_group: int, dim: int) -> torch.Tensor:
    """``[q heads of group g, k_g, v_g]`` for each of the ``groups`` query groups (``per_group`` query
    heads of ``dim`` channels each)."""
    tail = q.shape[1:]
    q = q.reshape(groups, per_group * dim, *tail)
    k = k.reshape(groups, dim, *tail)
    v = v.reshape(groups, dim, *tail)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail)


def split_qkv(
    qkv: torch.Tensor, groups: int, per_group: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`merge_qkv`."""
    tail = qkv.shape[1:]
    grouped = qkv.reshape(groups, (per_group + 2) * dim, *tail)
    q, k, v = torch.split(grouped, [per_group * dim, dim, dim], dim=1)
    return q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = torch.chunk(fc1, 2, dim=0)
    return gate, up
