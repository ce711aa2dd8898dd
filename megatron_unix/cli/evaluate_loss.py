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
from typing import Any

from megatron_unix.cli import out_of_range
from megatron_unix.cli.evaluate import add_output_arguments, checkpoint_record

HELP = "validation loss and perplexity per modality of a Megatron checkpoint (any TP/PP)"
KEPT = "nothing written ({output_dir}/results.json as it was)"

CARRIED = (
    "tokenizer_model",
    "boi",
    "eoi",
    "eos",
    "separator",
    "data_path",
    "split",
    "data_cache_path",
    "allow_unrecorded_vocabulary",
    "long_text",
    "seq_length",
    "micro_batch_size",
    "global_batch_size",
    "seed",
    "eval_iters",
    "attention_backend",
    "bf16",
)
"""Settings of the checkpoint's recorded run that decide the validation batches and their numbers."""

PASSED = (
    "data_path",
    "split",
    "data_cache_path",
    "seq_length",
    "micro_batch_size",
    "global_batch_size",
    "eval_iters",
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "sequence_parallel",
    "tokenizer_model",
    "transformer_impl",
    "attention_backend",
)
"""This subcommand's flags that go to the training flags when given."""


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
    parser.add_argument(
        "--no-verify-checkpoint",
        action="store_false",
        dest="verify_checkpoint",
        help="load without checking the checkpoint's files against its checksums.json",
    )
    data = parser.add_argument_group("data (default: the checkpoint's recorded run)")
    data.add_argument("--data-path", nargs="+", help="dataset prefixes, optionally weighted: 0.7 a 0.3 b")
    data.add_argument("--split", help="train,valid,test weights; the valid part is evaluated (e.g. 0,1,0: all of it)")
    data.add_argument("--data-cache-path", help="where packing indices are cached (default: beside the data)")
    data.add_argument("--tokenizer-model", help="the tokenizer the data was made with")
    data.add_argument("--seq-length", type=int)
    data.add_argument("--micro-batch-size", type=int)
    data.add_argument("--global-batch-size", type=int)
    data.add_argument("--eval-iters", type=int, help="global batches evaluated")
    run = parser.add_argument_group("parallelism and kernels")
    run.add_argument("--tensor-model-parallel-size", type=int)
    run.add_argument("--pipeline-model-parallel-size", type=int)
    run.add_argument("--sequence-parallel", action="store_true", default=None)
    run.add_argument("--transformer-impl", choices=["local", "transformer_engine"])
    run.add_argument("--attention-backend", help="as pretrain_unix.py's flag (default: the checkpoint's)")
    add_output_arguments(parser)


def training_flags(args: argparse.Namespace, recorded: dict[str, Any]) -> argparse.Namespace:
    """pretrain_unix.py's flags for a validation-only run of ``args.load``: its recorded data settings,
    overridden by the flags given here; weights only (``--finetune``), no training, no files written."""
    from megatron_unix.training.arguments import parse_args

    defaults = {key: recorded[key] for key in CARRIED if key in recorded}
    defaults.update({key: getattr(args, key) for key in PASSED if getattr(args, key) is not None})
    argv = ["--load", args.load, "--finetune", "--train-iters", "0", "--eval-interval", "1"]
    if not args.verify_checkpoint:
        argv.append("--no-verify-checkpoint")
    return parse_args(argv, defaults)


def perplexity(loss: float | None) -> float | None:
    return math.exp(loss) if loss is not None else None


def run(args: argparse.Namespace) -> int:
    import time

    import torch.distributed as dist

    from megatron_unix.evaluation.results import update_results
    from megatron_unix.training.arguments import architecture_flags, validate, world_size_from_env
    from megatron_unix.training.run_config import RunSettings
    from megatron_unix.training.trainer import StartingPoint, Trainer

    owned = not dist.is_initialized()  # the process group this run starts, and so ends (not a caller's)
    try:
        values = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in POSITIVE}
        if message := out_of_range(args, [(flag, v is None or v >= 1) for flag, v in values.items()]):
            raise ValueError(message)
        start = StartingPoint.of(
            argparse.Namespace(load=args.load, pretrained_checkpoint=None, verify_checkpoint=args.verify_checkpoint)
        )
        if start.checkpoint is None:
            raise ValueError(f"--load {args.load}: no checkpoint there")
        record = checkpoint_record(args, start.checkpoint, start.common)
        flags = training_flags(args, start.common.get("args") or {})
        if not flags.data_path:
            raise ValueError("--data-path is required: the checkpoint records no data")
        shape = architecture_flags(flags, start.model_args)
        world_size = world_size_from_env()
        validate(flags, world_size, shape)
        trainer = Trainer(RunSettings.from_flags(flags, world_size, shape), shape, start, time.time())
        if trainer.valid_data is None:
            raise ValueError(f"--split {flags.split!r} leaves no validation data")
        trainer.state.iteration = record["iteration"]  # (a weights-only start counts from 0) for the log line
        total = trainer.evaluate()
        if dist.get_rank() == 0:
            values = {
                "loss": total.loss,
                "text_loss": total.text_loss,
                "vision_loss": total.vision_loss,
                "text_perplexity": perplexity(total.text_loss),
                "vision_perplexity": perplexity(total.vision_loss),
                "text_tokens": int(total["text_n"]),
                "vision_tokens": int(total["vision_n"]),
                "samples": flags.eval_iters * trainer.run.global_batch_size,
                "data_path": flags.data_path,
                "split": flags.split,
                "seq_length": flags.seq_length,
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
