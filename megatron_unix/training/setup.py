"""Model, DDP wrapper, optimizer and LR schedule of a training run, from its settings."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_unix.model import build_model
from megatron_unix.model.config import ModelArguments, UniXConfig

if TYPE_CHECKING:
    from megatron_unix.training.run_config import RunSettings


def model_config(args: RunSettings, model_args: ModelArguments) -> UniXConfig:
    """The architecture plus this run's parallelism, precision and recompute settings."""
    recompute = {}
    if args.recompute_granularity == "full":
        recompute = dict(
            recompute_granularity="full",
            recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers,
        )
    elif args.recompute_granularity == "selective":
        recompute = dict(recompute_granularity="selective")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return model_args.config(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        document_isolation=args.document_isolation,
        core_attention_backend=args.attention_backend,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        init_method_std=args.init_method_std,
        transformer_impl=args.transformer_impl,
        **recompute,
    )


def wrap_model(
    config: UniXConfig,
    model: torch.nn.Module,
    *,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    bucket_size: int | None = None,
) -> DistributedDataParallel:
    """Megatron DDP around one model chunk, hooked into the schedules (no_sync, finalize grads)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_grad_reduce=overlap_grad_reduce,
        bucket_size=bucket_size,
    )
    ddp = DistributedDataParallel(config, ddp_config, model)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return ddp


def build(args: RunSettings, config: UniXConfig, vocab_size: int) -> DistributedDataParallel:
    model = build_model(config, vocab_size, args.seq_length)
    return wrap_model(
        config,
        model,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_grad_reduce=args.overlap_grad_reduce,
    )


def build_optimizer(args: RunSettings, ddp: DistributedDataParallel):
    """Megatron's optimizer (Adam; bf16 and distributed on GPU, fp32 wrapping torch AdamW on CPU)
    and Megatron's LR/WD schedule, stepped in samples like Megatron-LM."""
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            bf16=args.bf16,
            params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        [ddp],
    )
    samples = args.global_batch_size
    warmup = args.lr_warmup_iters * samples
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(warmup + 1, (args.lr_decay_iters or args.train_iters) * samples),
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=max(1, args.train_iters * samples),
        wd_incr_style="constant",
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
    )
    return optimizer, scheduler


SCHEDULE_FLAGS = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-iters",
    "lr_decay_steps": "--lr-decay-iters (default --train-iters)",
    "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay",
    "end_wd": "--weight-decay",
    "wd_incr_steps": "--train-iters",
}
"""Megatron scheduler state -> the flag that sets it."""


def check_schedule(args: RunSettings, scheduler: OptimizerParamScheduler, common: dict[str, Any]) -> None:
    """Before resuming: Megatron's scheduler would assert on a changed schedule with values in samples
    and no flag named; say which flags differ, in iterations, and which flags accept the change.
    Steps are samples, so where a changed --global-batch-size changed them, it is named first."""
    if args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler:
        return
    stored, current = common.get("opt_param_scheduler", {}), scheduler.state_dict()
    stored_batch = (common.get("args") or {}).get("global_batch_size") or args.global_batch_size

    def show(key: str, value: Any, batch: int) -> str:
        return f"{value // batch} iterations ({value} samples)" if key.endswith("_steps") else str(value)

    differ = [
        f"{flag}: checkpoint {show(key, stored[key], stored_batch)}, this run "
        f"{show(key, current[key], args.global_batch_size)}"
        for key, flag in SCHEDULE_FLAGS.items()
        if key in stored and stored[key] != current[key]
    ]
    if differ and stored_batch != args.global_batch_size:
        differ.insert(0, f"--global-batch-size: checkpoint {stored_batch}, this run {args.global_batch_size}")
    if differ:
        raise ValueError(
            "the checkpoint's learning-rate schedule differs from this run's ("
            + "; ".join(differ)
            + "): pass --override-opt-param-scheduler to continue with this run's schedule, or "
            "--use-checkpoint-opt-param-scheduler to keep the checkpoint's"
        )
