"""The varlen backend's call under torch 2.11's ``varlen_attn`` signature (no ``enable_gqa``: the lent GPU
machine's torch) and 2.13's (``enable_gqa`` required for grouped-query heads), against the SDPA backend.

``varlen_attn`` runs only on a GPU, so both signatures are real functions here over a plain per-segment
softmax reference that serves grouped-query heads the way the flash kernel does (k/v head ``j`` for query
heads ``j*g .. j*g+g-1``) and reads ``window_size`` as the kernel does ((-1, 0) causal, (-1, -1) full): a
call that dropped the scale, the window or the GQA argument gives other numbers or an error.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_unix.model.attention import _accepts_enable_gqa, call_varlen, sdpa_backend
from megatron_unix.model.routing import segment_params


def _reference(q, k, v, cu, scale, window_size) -> torch.Tensor:
    assert window_size in ((-1, 0), (-1, -1)), window_size
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end]) * (scale or 1 / math.sqrt(q.shape[-1]))
        if window_size == (-1, 0):
            n = end - start
            scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[start:end])
    return out


def varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):  # fmt: skip
    """torch 2.11's signature: k/v go to the kernel as they are (it shares each k/v head over its group)."""
    assert torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    return _reference(query, key, value, cu_seq_q, scale, window_size)


def varlen_attn_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):  # fmt: skip
    """torch 2.13's signature and its check: fewer k/v heads than query heads need ``enable_gqa=True``."""
    if not enable_gqa and query.shape[1] != key.shape[1]:
        raise ValueError("Expect query and key/value to have the same number of heads; try enable_gqa=True")
    return varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale, window_size=window_size)


def test_signatures_are_told_apart():
    from torch.nn.attention.varlen import varlen_attn

    assert not _accepts_enable_gqa(varlen_attn_2_11)
    assert _accepts_enable_gqa(varlen_attn_2_13)
    assert _accepts_enable_gqa(varlen_attn) == ("enable_gqa" in varlen_attn.__doc__)


@pytest.mark.parametrize("varlen", [varlen_attn_2_11, varlen_attn_2_13], ids=["torch2.11", "torch2.13"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_varlen_call_equals_sdpa(varlen, kv_heads):
    g = torch.Generator().manual_seed(0)
    segments = torch.tensor([0] * 5 + [1] * 9 + [2] * 1 + [3] * 7)
    t, heads, dim = segments.numel(), 4, 8
    q = torch.randn(t, heads, dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(t, kv_heads, dim, generator=g, dtype=torch.float64) for _ in range(2))
    params = segment_params(segments, t)
    scale = 0.3  # not the default 1/sqrt(dim): a dropped scale shows
    expected = sdpa_backend(q, k, v, params, scale, 0.0)
    torch.testing.assert_close(call_varlen(varlen, q, k, v, params, scale), expected, rtol=1e-10, atol=1e-10)
