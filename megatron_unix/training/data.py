"""Micro-batches for this rank, from a consumed-samples count (so a resume continues exactly).

Iteration ``i`` consumes global-batch samples ``[c, c + G)``; they are cut into micro-batches of
``b * dp`` samples, and data-parallel rank ``r`` takes its ``b`` consecutive samples of each, as
Megatron-LM's pretraining sampler does. Tensor- and pipeline-parallel ranks of one replica draw the
same indices from the same deterministic dataset, so they see identical batches without a broadcast.
"""

from __future__ import annotations

import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from megatron_unix.model.forward import Batch


class PretrainingSampler:
    """Index lists of this rank's micro-batches, from ``consumed_samples`` on."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        self.total, self.consumed = total_samples, consumed_samples
        self.micro, self.rank, self.size = micro_batch_size, data_parallel_rank, data_parallel_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.micro * self.size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro * self.size
        for start in range(self.consumed, self.total - step + 1, step):
            first = start + self.rank * self.micro
            yield list(range(first, first + self.micro))


def _ignore_termination(worker_id: int) -> None:
    """Workers leave SIGTERM/SIGINT to the training process, which saves before exiting (slurm
    signals every process of the job step)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def micro_batches(
    dataset: Dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
) -> Iterator[Batch]:
    """An endless-enough iterator over this rank's micro-batches (``tokens``, ``labels``, ...)."""
    sampler = PretrainingSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_termination,
    )
    return iter(loader)
