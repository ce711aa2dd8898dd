"""Core attention over segments: causal, within a document (and a modality in separated layers).

One module, ``UniXCoreAttention``, takes Megatron's ``core_attention`` slot. It receives q/k/v as
``[s, 1, heads, dim]`` (rotary already applied at the tokens' original positions) and the
:class:`UniXPackedSeqParams` of the stream those tokens form, and dispatches to a backend:

- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash attention in torch, GPU; torch 2.11's signature
  without ``enable_gqa`` too).
- ``flash_attn``: ``flash_attn_varlen_func`` when flash-attn is installed (GPU).
- ``te``: Transformer Engine's fused attention in THD format when TE is installed (GPU).
- ``sdpa``: ``scaled_dot_product_attention`` with an explicit segment-causal mask (anywhere).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule

from megatron_unix import platform
from megatron_unix.model.config import UniXConfig
from megatron_unix.model.routing import UniXPackedSeqParams, segment_params

# A backend maps q [t, hq, d], k/v [t, hkv, d], params, softmax scale -> out [t, hq, d].
Backend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, UniXPackedSeqParams, float, float], torch.Tensor]


def segment_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """``[t, t]`` bool: query i may attend key j iff same segment and j <= i."""
    same = segment_ids.unsqueeze(1) == segment_ids.unsqueeze(0)
    return torch.tril(same)


def sdpa_backend(q, k, v, params: UniXPackedSeqParams, scale: float, dropout: float) -> torch.Tensor:
    mask = segment_causal_mask(params.segment_ids)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.transpose(0, 1),
        v.transpose(0, 1),
        attn_mask=mask,
        dropout_p=dropout,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(0, 1)


@functools.cache
def _accepts_enable_gqa(varlen: Callable) -> bool:
    """torch 2.13's ``varlen_attn`` takes ``enable_gqa`` and refuses fewer k/v heads without it; torch 2.11's
    has no such argument and hands k/v to the flash kernel as they are, which serves grouped-query heads
    itself (each k/v head shared by ``hq / hkv`` query heads)."""
    return "enable_gqa" in inspect.signature(varlen).parameters


def call_varlen(varlen: Callable, q, k, v, params: UniXPackedSeqParams, scale: float) -> torch.Tensor:
    """Causal attention within the segments through ``varlen`` (``torch.nn.attention.varlen.varlen_attn``
    of the installed torch), with the arguments its signature has."""
    gqa = {"enable_gqa": q.shape[1] != k.shape[1]} if _accepts_enable_gqa(varlen) else {}
    cu = params.cu_seqlens_q
    return varlen(
        q,
        k,
        v,
        cu,
        cu,
        params.max_segment_len,
        params.max_segment_len,
        scale=scale,
        window_size=(-1, 0),
        **gqa,
    )


def varlen_backend(q, k, v, params: UniXPackedSeqParams, scale: float, dropout: float) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    if dropout:
        raise ValueError(
            "the varlen attention backend has no dropout; use --attention-dropout 0 or --attention-backend sdpa"
        )
    return call_varlen(varlen_attn, q, k, v, params, scale)


def flash_attn_backend(q, k, v, params: UniXPackedSeqParams, scale: float, dropout: float) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = params.cu_seqlens_q
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu,
        cu,
        params.max_segment_len,
        params.max_segment_len,
        dropout_p=dropout,
        softmax_scale=scale,
        causal=True,
    )


class _TEBackend:
    """Transformer Engine fused attention in THD format (built lazily, one per attention)."""

    def __init__(self, config: UniXConfig, heads: int, kv_heads: int, head_dim: int) -> None:
        from transformer_engine.pytorch import DotProductAttention

        self.attention = DotProductAttention(
            heads,
            head_dim,
            num_gqa_groups=kv_heads,
            attention_dropout=config.attention_dropout,
            qkv_format="thd",
            attn_mask_type="padding_causal",
        )

    def __call__(self, q, k, v, params: UniXPackedSeqParams, scale: float, dropout: float) -> torch.Tensor:
        cu = params.cu_seqlens_q
        out = self.attention(
            q,
            k,
            v,
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            max_seqlen_q=params.max_segment_len,
            max_seqlen_kv=params.max_segment_len,
        )
        return out.view(q.shape)


def select_backend(requested: str, on_gpu: bool) -> str:
    """Resolve "auto" and check that an explicit request can be served, saying why not."""
    found = platform.detect_accelerators()
    available = {
        "sdpa": (True, ""),
        "varlen": (on_gpu and found.torch_varlen, "needs a CUDA GPU and torch.nn.attention.varlen"),
        "flash_attn": (on_gpu and found.flash_attn, "needs a CUDA GPU and the flash-attn package"),
        "te": (on_gpu and found.transformer_engine, "needs a CUDA GPU and Transformer Engine"),
    }
    if requested == "auto":
        for name in ("te", "flash_attn", "varlen", "sdpa"):
            if available[name][0]:
                return name
    ok, why = available[requested]
    if not ok:
        raise RuntimeError(f"attention backend {requested!r} cannot run here: it {why}")
    return requested


_FUNCTIONS: dict[str, Backend] = {"sdpa": sdpa_backend, "varlen": varlen_backend, "flash_attn": flash_attn_backend}


class UniXCoreAttention(MegatronModule):
    """Drop-in for Megatron's ``DotProductAttention`` that honours Uni-X segments."""

    def __init__(
        self,
        config: UniXConfig,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        **_: object,
    ) -> None:
        super().__init__(config=config)
        from megatron.core import parallel_state as ps

        tp = ps.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.kv_heads = (config.num_query_groups or config.num_attention_heads) // tp
        self.head_dim = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.backend_name = select_backend(config.core_attention_backend, torch.cuda.is_available())
        self._te: _TEBackend | None = None

    def _backend(self) -> Backend:
        if self.backend_name != "te":
            return _FUNCTIONS[self.backend_name]
        if self._te is None:
            self._te = _TEBackend(self.config, self.heads, self.kv_heads, self.head_dim)
        return self._te

    def forward(
        self,
        query,
        key,
        value,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params: UniXPackedSeqParams | None = None,
    ) -> torch.Tensor:
        t, b = query.shape[:2]
        if packed_seq_params is None or packed_seq_params.segment_ids is None:
            # No routing given (e.g. a plain causal batch): each row is one segment.
            rows = torch.arange(b, device=query.device).repeat_interleave(t)
            packed_seq_params = segment_params(rows, t * b)
            query, key, value = (x.transpose(0, 1).reshape(b * t, 1, *x.shape[2:]) for x in (query, key, value))
        elif b != 1:
            raise ValueError("Uni-X attention expects the micro-batch as one stream ([s, 1, ...])")
        dropout = self.dropout if self.training else 0.0
        # Heads differ across TP ranks: dropout draws from the model-parallel RNG state.
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if dropout else contextlib.nullcontext()
        with rng:
            out = self._backend()(
                query.squeeze(1), key.squeeze(1), value.squeeze(1), packed_seq_params, self.scale, dropout
            )
        out = out.reshape(t * b, 1, -1)
        if b != 1:
            out = out.view(b, t, -1).transpose(0, 1)
        return out
