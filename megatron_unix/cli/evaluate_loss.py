"""``tools/evaluate.py loss``: validation loss and perplexity per modality of a Megatron checkpoint.

It is the training loop's own validation (``Trainer.evaluate``) on the checkpoint's weights: the packed
validation split of the same data, the same batches, the same reduction. It evaluates the split's first
``--eval-iters`` global batches, the same for every checkpoint, so checkpoints compare; these are the
batches a run validates on first, so for the checkpoint of that iteration (the first ``--eval-interval``)
it prints the number the run logged. Data, split, sequence length, batch sizes, seed and tokenizer
default to the checkpoint's record; any of them can be given (``--split 0,1,0`` validates on a
held-out prefix of its own). Runs at any TP/PP (``torchrun --nproc-per-node N tools/evaluate.py loss ...``).
"""

from __future__ import annotations

import argparse
import math
import sys

from megatron_unix.cli import RUN_FLAGS, add_run_arguments, add_verify_argument, given_run_flags, out_of_range
from megatron_unix.cli.evaluate import add_output_arguments, checkpoint_record

HELP = "validation loss and perplexity per modality of a Megatron checkpoint (any TP/PP)"
KEPT = "nothing written ({output_dir}/results.json as it was)"

DATA_FLAGS = (
    "data_path",
    "split",
    "data_cache_path",
    "tokenizer_model",
    "seq_length",
    "micro_batch_size",
    "global_batch_size",
    "eval_iters",
)
"""This subcommand's data flags; given, they replace the checkpoint's recorded run's."""

POSITIVE = (
    "--eval-iters",
    "--seq-length",
    "--micro-batch-size",
    "--global-batch-size",
    "--tensor-model-parallel-size",
    "--pipeline-model-parallel-size",
)
"""Flags refused below 1 (``--eval-iters 0`` would evaluate nothing and record a loss of 0.0)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--load", required=True, help="Megatron checkpoint: save directory or iter_* directory")
    add_verify_argument(parser)
    data = parser.add_argument_group("data (default: the checkpoint's recorded run)")
    data.add_argument("--data-path", nargs="+", help="dataset prefixes, optionally weighted: 0.7 a 0.3 b")
    data.add_argument("--split", help="train,valid,test weights; the valid part is evaluated (e.g. 0,1,0: all of it)")
    data.add_argument("--data-cache-path", help="where packing indices are cached (default: beside the data)")
    data.add_argument("--tokenizer-model", help="the tokenizer the data was made with")
    data.add_argument("--seq-length", type=int)
    data.add_argument("--micro-batch-size", type=int)
    data.add_argument("--global-batch-size", type=int)
    data.add_argument("--eval-iters", type=int, help="global batches evaluated")
    add_run_arguments(parser)
    add_output_arguments(parser)


def perplexity(loss: float | None) -> float | None:
    return math.exp(loss) if loss is not None else None


def run(args: argparse.Namespace) -> int:
    import time

    import torch.distributed as dist

    from megatron_unix.evaluation.results import update_results
    from megatron_unix.training.from_checkpoint import StartingPoint, open_run
    from megatron_unix.training.trainer import Trainer

    owned = not dist.is_initialized()  # the process group this run starts, and so ends (not a caller's)
    try:
        values = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in POSITIVE}
        if message := out_of_range(args, [(flag, v is None or v >= 1) for flag, v in values.items()]):
            raise ValueError(message)
        start = StartingPoint.required(args.load, args.verify_checkpoint)
        record = checkpoint_record(args, start.checkpoint, start.common)
        if not (args.data_path or start.recorded.get("data_path")):
            raise ValueError("--data-path is required: the checkpoint records no data")
        opened = open_run(start, given_run_flags(args, DATA_FLAGS + RUN_FLAGS), args.verify_checkpoint)
        trainer = Trainer(opened.run, opened.shape, start, time.time())
        if trainer.valid_data is None:
            raise ValueError(f"--split {opened.run.split!r} leaves no validation data")
        trainer.state.iteration = record["iteration"]  # (a weights-only start counts from 0) for the log line
        total = trainer.evaluate()
        if dist.get_rank() == 0:
            run = opened.run
            values = {
                "loss": total.loss,
                "text_loss": total.text_loss,
                "vision_loss": total.vision_loss,
                "text_perplexity": perplexity(total.text_loss),
                "vision_perplexity": perplexity(total.vision_loss),
                "text_tokens": int(total["text_n"]),
                "vision_tokens": int(total["vision_n"]),
                "samples": run.eval_iters * run.global_batch_size,
                "data_path": run.data_path,
                "split": run.split,
                "seq_length": run.seq_length,
            }
            update_results(args.output_dir, "loss", values, record)
            print(f" results in {args.output_dir}", flush=True)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()
    return 0
