"""Start torch.distributed and Megatron's parallel state, from torchrun or from slurm alone."""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_unix import platform
from megatron_unix.distributed import init_process_group, launcher

__all__ = ["initialize", "launcher"]


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 1234,
    context_parallel: int = 1,
    timeout_minutes: int = 10,
) -> None:
    """Initialise the process group (single process when no launcher variables are set)."""
    platform.setup()
    if context_parallel > 1:
        raise ValueError(
            "--context-parallel-size > 1 is not supported (Uni-X's per-modality segments are not split over CP ranks)"
        )
    init_process_group(timeout_minutes)
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world} is not divisible by --tensor-model-parallel-size ({tensor_parallel}) "
            f"x --pipeline-model-parallel-size ({pipeline_parallel})"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel
    )
    platform.seed_model_parallel(seed)
