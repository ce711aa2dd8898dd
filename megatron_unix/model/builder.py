"""Build a Uni-X GPTModel for this pipeline stage."""

from __future__ import annotations

import torch
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel

from megatron_unix.model.config import UniXConfig
from megatron_unix.model.spec import block_spec


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int = 1, divisible_by: int = 128) -> int:
    """Megatron's padding: a multiple of ``divisible_by * TP`` (stripped again on export)."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple


class UniXGPTModel(GPTModel):
    """GPTModel whose loss ignores the vocabulary rows added for tensor parallelism, so the loss
    is the cross-entropy over the real vocabulary, as in the exported HF model."""

    def __init__(self, *args, real_vocab_size: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.real_vocab_size = real_vocab_size

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        width = logits.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * width
        padded = torch.arange(start, start + width, device=logits.device) >= self.real_vocab_size
        if padded.any():
            logits = logits.masked_fill(padded, torch.finfo(logits.dtype).min)
        return super().compute_language_model_loss(labels, logits)


def build_model(
    config: UniXConfig,
    vocab_size: int,
    max_sequence_length: int,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
) -> UniXGPTModel:
    """A Megatron GPTModel whose decoder layers follow the Uni-X spec (``vocab_size`` unpadded)."""
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return UniXGPTModel(
        real_vocab_size=vocab_size,
        config=config,
        transformer_layer_spec=block_spec(config, vp_stage=vp_stage),
        vocab_size=padded_vocab_size(vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=config.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(config.rotary_base),
        vp_stage=vp_stage,
    )


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, those of the vision copies: Uni-X's vision layers, the baselines' vision parts)
    of this rank's model; a tied output head is counted once."""
    params = dict(model.named_parameters())
    return sum(p.numel() for p in params.values()), sum(p.numel() for n, p in params.items() if ".vision." in n)
