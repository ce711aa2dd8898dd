"""Per-micro-batch routing: which tokens are vision, and which tokens each attention may see.

A micro-batch of ``b`` rows of ``s`` tokens is processed as one stream of ``b*s`` tokens (rows
never attend to each other, so this changes nothing but makes every layer see ``[b*s, 1, h]``).
Attention happens within *segments*: maximal runs of one document (or one row, with document
isolation off). A separated layer gathers each modality into its own stream, keeping order, and
attends within the segments of that stream. Everything here is derived from token ids and document
ids alone, so every pipeline stage computes the same routing from the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_unix.data.vocabulary import vision_mask
from megatron_unix.model.config import UniXConfig


@dataclass
class UniXPackedSeqParams(PackedSeqParams):
    """What one attention call needs: the segment of every token of the stream it sees.

    ``cu_seqlens_q``/``cu_seqlens_kv`` bound contiguous segments (int32, for varlen kernels);
    ``segment_ids`` labels every token (for masks). ``max_seqlen_q`` is the stream length, which
    Megatron uses to size rotary tables; ``max_segment_len`` is what varlen kernels need.
    For the whole stream, ``routes`` holds the per-modality streams of separated layers.
    """

    segment_ids: torch.Tensor | None = None
    max_segment_len: int = 0
    routes: "Routes | None" = None


@dataclass
class ModalityRoute:
    """One modality's stream inside a separated layer.

    ``index`` lists the stream positions of this modality's tokens in order; the gathered stream
    is right-padded to ``padded_len`` (a multiple of the TP size under sequence parallelism, and
    never zero) and the padding forms its own segment; its outputs are discarded. ``positions`` indexes rotary tables (padding at 0).
    """

    index: torch.Tensor
    padded_len: int
    positions: torch.Tensor
    params: UniXPackedSeqParams

    @property
    def length(self) -> int:
        return int(self.index.numel())


@dataclass
class Routes:
    """The two modality streams of a layer with vision weights."""

    text: ModalityRoute
    vision: ModalityRoute

    def __iter__(self):  # text, vision: unpacks as a pair
        return iter((self.text, self.vision))


def segment_params(segment_ids: torch.Tensor, stream_len: int, pad: int = 0) -> UniXPackedSeqParams:
    """Params for a stream whose tokens carry run-labelled ``segment_ids``, plus ``pad`` tokens."""
    device = segment_ids.device
    if segment_ids.numel():
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[1:] = segment_ids[1:] != segment_ids[:-1]
        start_pos = torch.nonzero(starts).flatten()
        ends = torch.cat([start_pos[1:], torch.tensor([segment_ids.numel()], device=device)])
        lengths = ends - start_pos
        run_ids = torch.cumsum(starts.long(), 0) - 1
    else:
        lengths = torch.zeros(0, dtype=torch.long, device=device)
        run_ids = torch.zeros(0, dtype=torch.long, device=device)
    if pad:
        lengths = torch.cat([lengths, torch.tensor([pad], device=device)])
        run_ids = torch.cat([run_ids, torch.full((pad,), int(lengths.numel()) - 1, device=device)])
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(lengths, 0)
    return UniXPackedSeqParams(
        qkv_format="sbhd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=stream_len,
        max_seqlen_kv=stream_len,
        segment_ids=run_ids,
        max_segment_len=int(lengths.max()) if lengths.numel() else 0,
    )


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def build_routing(
    tokens: torch.Tensor,
    document_ids: torch.Tensor | None,
    config: UniXConfig,
) -> UniXPackedSeqParams:
    """Routing for a ``[b, s]`` micro-batch (``document_ids`` ``[b, s]``, runs of equal ids).

    Returns the params of the whole ``b*s`` stream with the two modality routes attached when some
    layer holds vision weights (Uni-X's separated layers, HardMoE's vision MLPs, MoT's every layer).
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
    b, s = tokens.shape
    rows = torch.arange(b, device=tokens.device).unsqueeze(1).expand(b, s)
    if config.document_isolation and document_ids is not None:
        if document_ids.shape != tokens.shape:
            raise ValueError(f"document_ids shape {tuple(document_ids.shape)} != tokens shape {tuple(tokens.shape)}")
        docs = document_ids.long() - document_ids.min()
        key = rows * (int(docs.max()) + 1) + docs
    else:
        key = rows
    key = key.reshape(-1)
    stream = segment_params(key, b * s)
    if config.num_vision_copy_layers == 0:
        return stream
    tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
    is_vision = vision_mask(tokens, config.vq_offset, config.boi_id, config.separator_ids).reshape(-1)

    def route(selected: torch.Tensor) -> ModalityRoute:
        index = torch.nonzero(selected).flatten()
        # Never an empty stream: Megatron's layers cannot run on zero tokens, and DDP needs every
        # copy to produce (here exactly zero) gradients, so an absent modality runs on padding only.
        padded = max(_round_up(index.numel(), tp), tp)
        pad = padded - index.numel()
        positions = torch.cat([index, torch.zeros(pad, dtype=index.dtype, device=index.device)])
        return ModalityRoute(index, padded, positions, segment_params(key[index], padded, pad))

    stream.routes = Routes(text=route(~is_vision), vision=route(is_vision))
    return stream
