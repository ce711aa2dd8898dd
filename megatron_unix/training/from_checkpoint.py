"""The one path by which a run or a tool opens a Megatron checkpoint, so that a tool applies every rule
training applies (a rule fixed here holds for all of them):

    StartingPoint.of(flags)                 find the checkpoint, read (and checksum) its common part once
    parse_args(argv, defaults=recorded)     the run it records, overridden by what the tool was given
    architecture_flags / validate           the merged shape; every flag checked (--split, batch sizes, data files)
    RunSettings.from_flags                  the data-parallel default of --global-batch-size filled
    CheckpointRun.tokenizer()               the tokenizer, refused where it contradicts the checkpoint
    check_data(...)                         vocabulary record and damage of every dataset prefix (rank 0)
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_unix.training import checkpointing

if TYPE_CHECKING:
    from megatron_unix.data.tokenizer import MultimodalTokenizer
    from megatron_unix.model.config import ModelArguments
    from megatron_unix.training.run_config import RunSettings

RECORDED = (
    "tokenizer_model",
    "boi",
    "eoi",
    "eos",
    "separator",
    "document_isolation",
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
"""Settings of a checkpoint's recorded run that a tool takes as its defaults: what decides its data, its
batches and the numbers the model computes on them."""


@dataclass(frozen=True)
class StartingPoint:
    """The checkpoint a run starts from, found and its common part read once, before any process group."""

    checkpoint: Path | None = None
    resume: bool = False
    """Found under ``--load``: the whole state is restored (unless ``--finetune``); else weights only."""
    common: dict[str, Any] | None = None
    """Its architecture, args and LR schedule."""

    @classmethod
    def of(cls, args: argparse.Namespace) -> StartingPoint:
        """``--load``'s checkpoint, else ``--pretrained-checkpoint``'s, else none."""
        resume = checkpointing.find_checkpoint(args.load) if args.load else None
        source = resume
        if source is None and args.pretrained_checkpoint:
            source = checkpointing.find_checkpoint(args.pretrained_checkpoint)
            if source is None:
                raise FileNotFoundError(f"--pretrained-checkpoint {args.pretrained_checkpoint}: no checkpoint there")
        if source is None:
            return cls()
        return cls(source, resume is not None, checkpointing.read_common(source, args.verify_checkpoint))

    @classmethod
    def required(cls, load: str | Path, verify: bool = True) -> StartingPoint:
        """A tool's ``--load``: a checkpoint this stack wrote, else an error naming the flag."""
        start = cls.of(argparse.Namespace(load=str(load), pretrained_checkpoint=None, verify_checkpoint=verify))
        if start.checkpoint is None:
            raise FileNotFoundError(f"--load {load}: no checkpoint there")
        if "model_args" not in start.common:
            raise ValueError(f"--load {load}: {start.checkpoint} has no model_args (not written by this stack)")
        return start

    @property
    def model_args(self) -> dict[str, Any] | None:
        return self.common["model_args"] if self.common else None

    @property
    def recorded(self) -> dict[str, Any]:
        """The settings of the run that wrote it (empty when it records none)."""
        return (self.common or {}).get("args") or {}


@dataclass(frozen=True)
class CheckpointRun:
    """A checkpoint with the run settings a tool works with: its recorded run's, overridden by the tool's
    flags, merged and validated as training merges and validates them."""

    start: StartingPoint
    flags: argparse.Namespace
    """pretrain_unix.py's flags (for a ``Trainer``)."""
    shape: dict[str, Any]
    """The architecture flags merged with the checkpoint's."""
    run: RunSettings

    def tokenizer(self, checkpoint: StartingPoint | None = None) -> tuple[MultimodalTokenizer, ModelArguments]:
        """``(MultimodalTokenizer, ModelArguments)`` of ``checkpoint`` (default: this run's), the tokenizer
        refused where its vocabulary layout contradicts the checkpoint's, as training refuses it."""
        from megatron_unix.training.arguments import architecture_flags
        from megatron_unix.training.run_config import load_tokenizer, model_arguments

        checkpoint = checkpoint or self.start
        shape = self.shape if checkpoint is self.start else architecture_flags(self.flags, checkpoint.model_args)
        tokenizer = load_tokenizer(self.run, shape)
        return tokenizer, model_arguments(shape, tokenizer, self.run, checkpoint.checkpoint)


def open_run(start: StartingPoint, given: Mapping[str, Any], verify: bool = True) -> CheckpointRun:
    """The run of a tool on ``start``'s checkpoint: its :data:`RECORDED` settings, overridden by the
    ``given`` values (None: not given), weights only (``--finetune``), no training. Refuses what
    training refuses (the world size from the launcher's environment)."""
    from megatron_unix.training.arguments import architecture_flags, parse_args, validate, world_size_from_env
    from megatron_unix.training.run_config import RunSettings

    defaults = {key: start.recorded[key] for key in RECORDED if key in start.recorded}
    defaults.update({key: value for key, value in given.items() if value is not None})
    argv = ["--load", str(start.checkpoint), "--finetune", "--train-iters", "0", "--eval-interval", "1"]
    if not verify:
        argv.append("--no-verify-checkpoint")
    flags = parse_args(argv, defaults)
    shape = architecture_flags(flags, start.model_args)
    world_size = world_size_from_env()
    validate(flags, world_size, shape)
    return CheckpointRun(start, flags, shape, RunSettings.from_flags(flags, world_size, shape))


def check_data(
    prefixes: Iterable[str], tokenizer: MultimodalTokenizer, tokenizer_model: str, allow_unrecorded: bool
) -> None:
    """Vocabulary record and damage of every dataset prefix, before a model is built. Rank 0 checks
    (every rank reading every index of a 10^8-sample dataset would multiply the reads by the job size)
    and shares the outcome, so every rank stops with the same message."""
    import torch.distributed as dist

    from megatron_unix.data.indexed import check_dataset, check_vocabulary

    outcome: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            for prefix in prefixes:
                check_vocabulary(prefix, tokenizer.model_config_fields(), tokenizer_model, allow_unrecorded)
                check_dataset(prefix)
        except (ValueError, OSError) as error:
            outcome[0] = str(error)
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise ValueError(outcome[0])
