"""Logits of a converted checkpoint at TP=2 and at PP=2, under torchrun with 2 processes.

Used by tests/test_convert.py: the checkpoint is loaded with pretrain_unix.py's own functions
(its argument parser, the architecture from ``model_args``, ``setup.build`` with Megatron DDP,
``checkpointing.load``) and run with Megatron's pipeline schedule, forward only; the test compares
with the single-process TP=1 logits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from megatron_unix.training import distributed

LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}


def sample_batch(config) -> torch.Tensor:
    """The T2I and I2T verification samples as one [2, s] batch (both rows have the same length)."""
    from megatron_unix.conversion.verify import sample_inputs, sample_text_ids

    samples = sample_inputs(config, sample_text_ids(config))
    return torch.stack([samples["t2i"], samples["i2t"]])


def logits_at(checkpoint: Path, tp: int, pp: int) -> torch.Tensor | None:
    """Full-vocabulary logits [1, b*s, V] on the last stage's TP rank 0, else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_unix.conversion.convert import MAX_SEQUENCE_LENGTH
    from megatron_unix.model.config import ModelArguments
    from megatron_unix.model.forward import stream_forward
    from megatron_unix.training import checkpointing, setup
    from megatron_unix.training.arguments import architecture_flags, parse_args
    from megatron_unix.training.run_config import RunSettings

    distributed.initialize(tp, pp, seed=1)
    # pretrain_unix.py's own path: its arguments, the checkpoint's architecture, its model setup.
    args = parse_args(
        [
            "--pretrained-checkpoint",
            str(checkpoint),
            "--train-iters",
            "0",
            "--seq-length",
            str(MAX_SEQUENCE_LENGTH),
            "--tensor-model-parallel-size",
            str(tp),
            "--pipeline-model-parallel-size",
            str(pp),
        ]
    )
    shape = architecture_flags(args, checkpointing.read_common(checkpoint)["model_args"])
    arch = ModelArguments.from_dict(shape)
    run = RunSettings.from_flags(args, tp * pp, shape)
    config = setup.model_config(run, arch)
    model = setup.build(run, config, arch.vocab_size)
    checkpointing.load(checkpoint, model, load_rng=False)
    model.eval()
    batch = {"tokens": sample_batch(config)}

    def step(data_iterator, chunk):
        out = stream_forward(chunk, next(data_iterator))
        return out, lambda o, non_loss_data=True: gather_from_tensor_model_parallel_region(o)

    out = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter([batch]),
        model=[model],
        num_microbatches=1,
        seq_length=batch["tokens"].numel(),
        micro_batch_size=1,
        forward_only=True,
        collect_non_loss_data=True,
    )
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        return out[0][..., : arch.vocab_size].clone()
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", required=True, help="iter_* directory")
    parser.add_argument("--out", required=True, help="prefix: writes PREFIX.<layout>.pt")
    args = parser.parse_args()
    for name, (tp, pp) in LAYOUTS.items():
        logits = logits_at(Path(args.load), tp, pp)
        if logits is not None:
            torch.save(logits, f"{args.out}.{name}.pt")
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
