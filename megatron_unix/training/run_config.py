"""One form for a run: the flags, the starting checkpoint and the tokenizer resolved once into two typed,
frozen objects that the rest of training reads.

- :class:`~megatron_unix.model.config.ModelArguments`: the architecture (what a checkpoint stores).
  Its shape comes from flags < the checkpoint's ``model_args`` < Qwen's defaults
  (:func:`~megatron_unix.training.arguments.architecture_flags`), its vocabulary layout from the
  tokenizer (:func:`model_arguments`), with every contradiction an error naming the flag.
- :class:`RunSettings`: everything else, with machine- and world-dependent defaults filled in
  (``global_batch_size``), so that the checkpoint's ``args`` record what ran.

Nothing here mutates the parsed flags; :func:`~megatron_unix.training.arguments.validate` checks them
first, without side effects.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_unix.data.tokenizer import LAYOUT_FIELDS, MultimodalTokenizer, check_checkpoint_tokenizer
from megatron_unix.data.vocabulary import CODEBOOK_SIZE
from megatron_unix.model.config import ModelArguments
from megatron_unix.training.arguments import data_prefixes, transformer_impl


@dataclass(frozen=True)
class RunSettings:
    """The run's settings besides the architecture, one field per flag of ``pretrain_unix.py --help``."""

    # model execution
    document_isolation: bool
    attention_backend: str
    transformer_impl: str
    recompute_granularity: str | None
    recompute_method: str
    recompute_num_layers: int
    init_method_std: float
    # tokenizer and data
    tokenizer_model: str
    boi: str
    eoi: str
    eos: str
    separator: str | None
    data_path: list[str]
    split: str
    data_cache_path: str | None
    allow_unrecorded_vocabulary: bool
    long_text: str
    seq_length: int
    num_workers: int
    # parallelism
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    sequence_parallel: bool
    use_distributed_optimizer: bool
    overlap_grad_reduce: bool
    distributed_timeout_minutes: int
    # training
    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    lr: float
    min_lr: float
    lr_warmup_iters: int
    lr_decay_iters: int | None
    lr_decay_style: str
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    clip_grad: float
    bf16: bool
    seed: int
    skip_nonfinite_steps: bool
    # checkpointing
    save: str | None
    load: str | None
    pretrained_checkpoint: str | None
    save_interval: int | None
    keep_last_checkpoints: int | None
    no_load_optim: bool
    no_load_rng: bool
    verify_checkpoint: bool
    finetune: bool
    override_opt_param_scheduler: bool
    use_checkpoint_opt_param_scheduler: bool
    exit_interval: int | None
    exit_duration_in_mins: float | None
    exit_signal_handler: bool
    # logging
    log_interval: int
    eval_interval: int | None
    eval_iters: int
    metrics_file: str | None
    tensorboard_dir: str | None
    wandb_project: str | None
    wandb_exp_name: str | None
    wandb_save_dir: str | None
    peak_tflops: float | None
    grad_conflict_interval: int

    @classmethod
    def from_flags(cls, args: argparse.Namespace, world_size: int, shape: dict[str, Any]) -> RunSettings:
        """The settings of parsed flags, with the data-parallel default of ``--global-batch-size`` and the
        layer modules' default for the merged architecture ``shape`` (:func:`architecture_flags`)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
        values["transformer_impl"] = transformer_impl(args, shape)
        data_parallel = world_size // (args.tensor_model_parallel_size * args.pipeline_model_parallel_size)
        values["global_batch_size"] = args.global_batch_size or args.micro_batch_size * data_parallel
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly, as checkpoints and metrics sinks record it."""
        return dataclasses.asdict(self)

    @property
    def data_prefixes(self) -> list[str]:
        return data_prefixes(self.data_path)

    @property
    def data_cache_dir(self) -> str:
        return self.data_cache_path or str(Path(self.data_prefixes[0]).parent / "cache")

    @property
    def metrics_path(self) -> str | None:
        return self.metrics_file or (f"{self.save}/metrics.jsonl" if self.save else None)


def load_tokenizer(run: RunSettings, shape: dict[str, Any]) -> MultimodalTokenizer:
    """The tokenizer with the codebook (and, for a checkpoint, the VQ offset) the architecture has."""
    return MultimodalTokenizer.from_pretrained(
        run.tokenizer_model,
        codebook_size=shape.get("vq_codebook_size") or CODEBOOK_SIZE,
        boi=run.boi,
        eoi=run.eoi,
        eos=run.eos,
        separator=run.separator or None,
        vq_offset=shape.get("vq_offset"),
    )


def model_arguments(
    shape: dict[str, Any], tokenizer: MultimodalTokenizer, run: RunSettings, checkpoint: Path | None
) -> ModelArguments:
    """The architecture: ``shape`` (flags merged with the checkpoint's) plus the tokenizer's vocabulary
    layout. A checkpoint trained with another layout than the tokenizer gives is an error."""
    layout = tokenizer.model_config_fields()
    arch = dict(shape)
    check_checkpoint_tokenizer(tokenizer, arch, "--tokenizer-model", checkpoint)
    arch.update({name: layout[name] for name in LAYOUT_FIELDS})
    if arch.get("separator_ids") is None:
        arch["separator_ids"] = list(layout["separator_ids"])
    elif run.separator and list(arch["separator_ids"]) != list(layout["separator_ids"]):
        raise ValueError(
            f"--separator {run.separator} is id {list(layout['separator_ids'])} but the checkpoint "
            f"{checkpoint} routes separators {list(arch['separator_ids'])} as vision"
        )
    stored_vocab = arch.get("vocab_size")
    if stored_vocab is not None and stored_vocab < tokenizer.vocab_size:
        raise ValueError(
            f"--tokenizer-model {run.tokenizer_model} needs {tokenizer.vocab_size} ids but the "
            f"checkpoint's vocabulary has {stored_vocab}"
        )
    arch["vocab_size"] = stored_vocab or tokenizer.vocab_size
    return ModelArguments.from_dict(arch)
