"""The training loop of ``pretrain_unix.py``: set up, restore, train, evaluate, save, exit cleanly.

One iteration runs Megatron's forward-backward schedule over the global batch's micro-batches,
reduces the loss (and its text/vision parts, token and attention-pair counts) with one all-reduce
over the world, steps Megatron's optimizer and LR schedule, then logs, evaluates and saves on their
intervals (it also logs the run's first iteration, so that a run shows its loss at once; set-up steps
log as they start). SIGTERM, ``--exit-interval`` and ``--exit-duration-in-mins`` save and stop at the
end of an iteration, at the same iteration on every rank (the stop flags ride on the same all-reduce).
"""

from __future__ import annotations

import argparse
import datetime
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_unix import platform
from megatron_unix.data.dataset import build_datasets
from megatron_unix.data.indexed import check_dataset, check_vocabulary
from megatron_unix.data.tokenizer import MultimodalTokenizer
from megatron_unix.data.vocabulary import CODEBOOK_SIZE
from megatron_unix.model.builder import padded_vocab_size
from megatron_unix.model.config import ARCHITECTURE_FIELDS, UniXConfig, architecture
from megatron_unix.training import checkpointing, distributed, metrics, setup
from megatron_unix.training.arguments import (
    data_prefixes,
    fill_architecture_defaults,
    merge_model_args,
    validate,
    world_size_from_env,
)
from megatron_unix.training.data import micro_batches
from megatron_unix.training.step import forward_step


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    skipped_iterations: int = 0
    saved_iteration: int | None = None


@dataclass
class StepStats:
    """Global sums of one iteration (or one evaluation), identical on every rank after reduction."""

    values: torch.Tensor = field(default_factory=lambda: torch.zeros(11, dtype=torch.float64))
    FIELDS = (
        "loss_sum",
        "micro_batches",
        "text_sum",
        "text_n",
        "vision_sum",
        "vision_n",
        "tokens",
        "shared_pairs",
        "separated_pairs",
        "stop_signal",
        "stop_duration",
    )

    def __getitem__(self, name: str) -> float:
        return float(self.values[self.FIELDS.index(name)])

    def add(self, name: str, value: float) -> None:
        self.values[self.FIELDS.index(name)] += value

    @property
    def loss(self) -> float:
        return self["loss_sum"] / max(self["micro_batches"], 1)

    @property
    def text_loss(self) -> float | None:
        return self["text_sum"] / self["text_n"] if self["text_n"] else None

    @property
    def vision_loss(self) -> float | None:
        return self["vision_sum"] / self["vision_n"] if self["vision_n"] else None


class ExitSignal:
    """Remembers a SIGTERM (slurm preemption) so the loop can save and stop between iterations."""

    def __init__(self, enabled: bool) -> None:
        self.received = False
        if enabled:
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True


def log(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def _progress(start_time: float, message: str) -> None:
    """A set-up step about to run, with the seconds since start: the wait before iteration 1 is visible."""
    log(f"> [{time.time() - start_time:6.1f} s] {message}")


def _starting_checkpoint(args: argparse.Namespace) -> Path | None:
    """The checkpoint this run starts from: ``--load``'s, else ``--pretrained-checkpoint``'s."""
    source = checkpointing.find_checkpoint(args.load) if args.load else None
    if source is None and args.pretrained_checkpoint:
        source = checkpointing.find_checkpoint(args.pretrained_checkpoint)
        if source is None:
            raise FileNotFoundError(f"--pretrained-checkpoint {args.pretrained_checkpoint}: no checkpoint there")
    return source


def _starting_common(args: argparse.Namespace) -> dict[str, Any] | None:
    """The common part (architecture, args, LR schedule) of the checkpoint this run starts from, read
    once, before any process group."""
    source = _starting_checkpoint(args)
    return checkpointing.read_common(source, verify=args.verify_checkpoint) if source else None


def _architecture(args: argparse.Namespace, tokenizer: MultimodalTokenizer) -> dict[str, Any]:
    """Flags (already merged with the checkpoint's) plus the tokenizer's vocabulary layout."""
    layout = tokenizer.model_config_fields()
    arch = {name: getattr(args, name, None) for name in ARCHITECTURE_FIELDS}
    for name in ("vq_offset", "vq_codebook_size", "boi_id", "eoi_id", "eos_id"):
        if arch[name] is not None and arch[name] != layout[name]:
            raise ValueError(
                f"--tokenizer-model {args.tokenizer_model} gives {name}={layout[name]} but the "
                f"checkpoint {_starting_checkpoint(args)} was trained with {name}={arch[name]}: use the "
                "tokenizer of the checkpoint"
            )
        arch[name] = layout[name]
    if arch["separator_ids"] is None:
        arch["separator_ids"] = list(layout["separator_ids"])
    elif args.separator and list(arch["separator_ids"]) != list(layout["separator_ids"]):
        raise ValueError(
            f"--separator {args.separator} is id {list(layout['separator_ids'])} but the checkpoint "
            f"{_starting_checkpoint(args)} routes separators {list(arch['separator_ids'])} as vision"
        )
    stored_vocab = getattr(args, "vocab_size", None)
    if stored_vocab is not None and stored_vocab < tokenizer.vocab_size:
        raise ValueError(
            f"--tokenizer-model {args.tokenizer_model} needs {tokenizer.vocab_size} ids but the "
            f"checkpoint's vocabulary has {stored_vocab}"
        )
    arch["vocab_size"] = stored_vocab or tokenizer.vocab_size
    return arch


def _check_data(args: argparse.Namespace, tokenizer: MultimodalTokenizer) -> None:
    """Vocabulary record and damage of every ``--data-path`` prefix, before the model is built. Rank 0
    checks (every rank reading every index of a 10^8-sample dataset would multiply the reads by the
    job size) and shares the outcome, so every rank stops with the same message."""
    outcome: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            for prefix in data_prefixes(args.data_path):
                check_vocabulary(
                    prefix,
                    tokenizer.model_config_fields(),
                    args.tokenizer_model,
                    allow_unrecorded=args.allow_unrecorded_vocabulary,
                )
                check_dataset(prefix)
        except (ValueError, OSError) as error:
            outcome[0] = str(error)
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise ValueError(outcome[0])


def _restore(args: argparse.Namespace, ddp, optimizer, scheduler, starting: dict[str, Any] | None) -> TrainState:
    """Resume from ``--load`` (everything), or start from ``--pretrained-checkpoint`` (weights only);
    ``starting`` is the common part of that checkpoint (``_starting_common``: ``--load``'s when it has one)."""
    resume = checkpointing.find_checkpoint(args.load) if args.load else None
    if resume is not None and not args.finetune:
        setup.check_schedule(args, scheduler, starting)
        common = checkpointing.load(
            resume,
            ddp,
            optimizer=None if args.no_load_optim else optimizer,
            scheduler=scheduler,
            load_rng=not args.no_load_rng,
            verify=args.verify_checkpoint,
        )
        if args.no_load_optim or not common.get("has_optimizer"):
            optimizer.reload_model_params()
        log(f" loaded checkpoint {resume} at iteration {common['iteration']}")
        return TrainState(
            iteration=common["iteration"],
            consumed_train_samples=common["consumed_train_samples"],
            consumed_valid_samples=common["consumed_valid_samples"],
            saved_iteration=common["iteration"],
        )
    source = resume or (
        checkpointing.find_checkpoint(args.pretrained_checkpoint) if args.pretrained_checkpoint else None
    )
    if source is not None:
        checkpointing.load(source, ddp, load_rng=False, verify=args.verify_checkpoint)
        optimizer.reload_model_params()
        log(f" loaded weights from {source}; fresh optimizer, iteration 0")
    return TrainState()


def _save(args, state: TrainState, ddp, optimizer, scheduler, arch: dict[str, Any]) -> None:
    if not args.save or state.saved_iteration == state.iteration:
        return
    start = time.perf_counter()
    path = checkpointing.save(
        args.save,
        state.iteration,
        ddp,
        optimizer=optimizer,
        scheduler=scheduler,
        model_args=arch,
        run_args=vars(args),
        consumed_train_samples=state.consumed_train_samples,
        consumed_valid_samples=state.consumed_valid_samples,
        keep_last=args.keep_last_checkpoints,
    )
    state.saved_iteration = state.iteration
    log(f" saved checkpoint {path} at iteration {state.iteration} in {time.perf_counter() - start:.1f} s")


def _run_batches(
    ddp, data: Iterator, num_micro: int, seq_length: int, micro_batch_size: int, config: UniXConfig, forward_only: bool
) -> StepStats:
    """Forward(-backward) over ``num_micro`` micro-batches; local contributions to the stats."""
    batches = [next(data) for _ in range(num_micro)]
    stats = StepStats()
    if ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage():
        for batch in batches:
            shared, separated = metrics.attention_pairs(batch, config)
            stats.add("tokens", batch["tokens"].numel())
            stats.add("shared_pairs", shared)
            stats.add("separated_pairs", separated)
    results = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=[ddp],
        num_microbatches=num_micro,
        seq_length=seq_length * micro_batch_size,
        micro_batch_size=1,
        forward_only=forward_only,
    )
    if ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage():
        for result in results:
            stats.add("loss_sum", float(result["lm loss"]))
            stats.add("micro_batches", 1)
            for name, value in zip(("text_sum", "text_n", "vision_sum", "vision_n"), result["modality_sums"].tolist()):
                stats.add(name, value)
    return stats


def _grads_finite(ddp) -> bool:
    """Whether every rank's gradients are finite (checked before the optimizer touches the weights)."""
    bad = any(
        not torch.isfinite(p.main_grad).all() for p in ddp.parameters() if getattr(p, "main_grad", None) is not None
    )
    flag = torch.tensor([float(bad)], device=platform.device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not flag.item()


def _all_reduce(stats: StepStats) -> StepStats:
    values = stats.values.to(platform.device())
    dist.all_reduce(values)
    stats.values = values.cpu()
    return stats


def _format(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def pretrain(args: argparse.Namespace) -> TrainState:
    """Train as the arguments say; returns the final state (for tests and tools)."""
    start_time = time.time()
    starting = _starting_common(args)
    stored = starting["model_args"] if starting else None
    if stored:
        merge_model_args(args, stored)
    fill_architecture_defaults(args)
    validate(args, world_size_from_env())
    distributed.initialize(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.seed,
        timeout_minutes=args.distributed_timeout_minutes,
    )
    exit_signal = ExitSignal(args.exit_signal_handler)  # before any data-loader worker exists
    absent = platform.detect_accelerators().absent()
    log(f"> accelerators absent: {', '.join(absent) or 'none'}" + (" (torch fallbacks in use)" if absent else ""))
    _progress(start_time, f"loading the tokenizer {args.tokenizer_model}")
    tokenizer = MultimodalTokenizer.from_pretrained(
        args.tokenizer_model,
        codebook_size=args.vq_codebook_size or CODEBOOK_SIZE,
        boi=args.boi,
        eoi=args.eoi,
        eos=args.eos,
        separator=args.separator or None,
        vq_offset=getattr(args, "vq_offset", None),
    )
    requested = _architecture(args, tokenizer)  # checkpoint vs tokenizer first: then data vs tokenizer
    _progress(start_time, f"checking {len(data_prefixes(args.data_path))} dataset(s)")
    _check_data(args, tokenizer)
    config = setup.model_config(args, requested)
    arch = architecture(config, requested["vocab_size"])  # with Megatron's derived sizes: what checkpoints store
    arch.update({k: v for k, v in (stored or {}).items() if k not in arch})  # records of others (conversion's)
    _progress(start_time, "building the model and optimizer")
    ddp = setup.build(args, config, arch["vocab_size"])
    optimizer, scheduler = setup.build_optimizer(args, ddp)
    state = _restore(args, ddp, optimizer, scheduler, starting)

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    gbs, mbs = args.global_batch_size, args.micro_batch_size
    num_micro = gbs // (mbs * dp)
    log(
        f"> Uni-X {arch['num_layers']} layers ({arch['vision_encode_layers']}:{arch['vision_decode_layers']} "
        f"separated), {sum(p.numel() for p in ddp.parameters()):,} parameters on rank 0, "
        f"TP={args.tensor_model_parallel_size} PP={args.pipeline_model_parallel_size} DP={dp}, {num_micro} "
        f"micro-batches of {mbs} x {args.seq_length}"
    )
    evaluations = args.train_iters // args.eval_interval + 1 if args.eval_interval else 0
    _progress(start_time, "building the packed datasets (the packing is cached beside the data)")
    train_ds, valid_ds, _ = build_datasets(
        args.data_path,
        args.split,
        args.seq_length,
        args.seed,
        tokenizer,
        (args.train_iters * gbs, evaluations * args.eval_iters * gbs, 0),
        cache_dir=args.data_cache_path or str(Path(data_prefixes(args.data_path)[0]).parent / "cache"),
        long_text=args.long_text,
    )
    train_data = micro_batches(train_ds, state.consumed_train_samples, mbs, dp_rank, dp, args.num_workers)
    valid_data = (
        micro_batches(valid_ds, state.consumed_valid_samples, mbs, dp_rank, dp)
        if valid_ds is not None and evaluations
        else None
    )

    world = dist.get_world_size()
    padded_vocab = padded_vocab_size(arch["vocab_size"], args.tensor_model_parallel_size)
    peak = metrics.peak_tflops(args.peak_tflops)
    sinks = None
    if dist.get_rank() == 0:
        metrics_file = args.metrics_file or (f"{args.save}/metrics.jsonl" if args.save else None)
        sinks = metrics.MetricsSinks(
            metrics_file,
            args.tensorboard_dir,
            args.wandb_project,
            args.wandb_exp_name,
            args.wandb_save_dir,
            vars(args),
            state.iteration,
        )
    if state.iteration < args.train_iters:
        _progress(start_time, f"training iterations {state.iteration + 1} to {args.train_iters}")
    ddp.train()
    window = StepStats()
    window_start, window_iters = time.perf_counter(), 0
    train_start_iteration = state.iteration

    while state.iteration < args.train_iters:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        stats = _run_batches(ddp, train_data, num_micro, args.seq_length, mbs, config, forward_only=False)
        stats.add("stop_signal", float(exit_signal.received))
        minutes = (time.time() - start_time) / 60
        stats.add("stop_duration", float(bool(args.exit_duration_in_mins) and minutes > args.exit_duration_in_mins))
        stats = _all_reduce(stats)
        iteration = state.iteration + 1
        grad_norm = None
        problem = (
            f"lm loss is {stats.loss}"
            if not math.isfinite(stats.loss)
            else "a gradient is not finite"
            if args.skip_nonfinite_steps and not _grads_finite(ddp)
            else None
        )
        if problem is None:
            updated, grad_norm, _ = optimizer.step()
            if updated:
                scheduler.step(increment=gbs)
            else:
                state.skipped_iterations += 1
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise NonFiniteLoss(f"iteration {iteration}: grad norm is {grad_norm}")
        elif args.skip_nonfinite_steps:
            state.skipped_iterations += 1
            log(f" iteration {iteration}: {problem}; skipping the step (--skip-nonfinite-steps)")
        else:
            raise NonFiniteLoss(
                f"iteration {iteration}: {problem}; stopping (use --skip-nonfinite-steps to skip such steps)"
            )
        state.iteration = iteration
        state.consumed_train_samples += gbs
        step_end = time.perf_counter()
        window.values += stats.values
        window_iters += 1

        if iteration % args.log_interval == 0 or iteration in (train_start_iteration + 1, args.train_iters):
            elapsed = time.perf_counter() - window_start
            flops = metrics.training_flops(
                config, padded_vocab, int(window["tokens"]), int(window["shared_pairs"]), int(window["separated_pairs"])
            )
            tflops = flops / elapsed / world / 1e12
            record = {
                "iteration": iteration,
                "consumed_samples": state.consumed_train_samples,
                "loss": window.loss,
                "text_loss": window.text_loss,
                "vision_loss": window.vision_loss,
                "lr": scheduler.get_lr(optimizer.param_groups[0]),
                "grad_norm": grad_norm,
                "tokens_per_sec": window["tokens"] / elapsed,
                "tflops": tflops,
                "mfu": tflops / peak if peak else None,
                "mem_gib": metrics.memory_gib(),
                "iteration_ms": 1000 * elapsed / window_iters,
                "skipped_iterations": state.skipped_iterations,
            }
            eta = datetime.timedelta(seconds=round(elapsed / window_iters * (args.train_iters - iteration)))
            log(
                f" [{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] iteration {iteration:8d}/{args.train_iters:8d} | "
                f"consumed samples: {state.consumed_train_samples:12d} | elapsed time per iteration (ms): "
                f"{record['iteration_ms']:.1f} | tokens/s: {record['tokens_per_sec']:,.0f} | "
                f"TFLOP/s/device: {tflops:.3f} | MFU: {_format(record['mfu'], '.1%')} | "
                f"learning rate: {record['lr']:.6E} | global batch size: {gbs:5d} | lm loss: {window.loss:.6E} | "
                f"text loss: {_format(window.text_loss, '.6E')} | vision loss: {_format(window.vision_loss, '.6E')} | "
                f"grad norm: {_format(grad_norm, '.3f')} | mem (GiB): {record['mem_gib']:.2f} | "
                f"skipped iterations: {state.skipped_iterations:3d} | ETA: {eta}"
            )
            if sinks:
                sinks.write(record)
            window, window_start, window_iters = StepStats(), step_end, 0

        if valid_data is not None and iteration % args.eval_interval == 0:
            _evaluate(args, ddp, valid_data, num_micro, config, state, sinks)
        if args.save_interval and iteration % args.save_interval == 0:
            _save(args, state, ddp, optimizer, scheduler, arch)
        window_start += time.perf_counter() - step_end  # evaluation and saving are not training time
        reason = (
            "received SIGTERM"
            if stats["stop_signal"]
            else f"--exit-duration-in-mins {args.exit_duration_in_mins} reached"
            if stats["stop_duration"]
            else f"--exit-interval {args.exit_interval} reached"
            if args.exit_interval and iteration % args.exit_interval == 0
            else None
        )
        if reason:
            _save(args, state, ddp, optimizer, scheduler, arch)
            log(f" exiting at iteration {iteration}: {reason}")
            break
    else:
        _save(args, state, ddp, optimizer, scheduler, arch)
        log(f" training done: {state.iteration - train_start_iteration} iterations in {time.time() - start_time:.1f} s")
    if sinks:
        sinks.close()
    return state


def _evaluate(
    args,
    ddp,
    valid_data: Iterator,
    num_micro: int,
    config: UniXConfig,
    state: TrainState,
    sinks: metrics.MetricsSinks | None,
) -> None:
    ddp.eval()
    total = StepStats()
    with torch.no_grad():
        for _ in range(args.eval_iters):
            total.values += _run_batches(
                ddp, valid_data, num_micro, args.seq_length, args.micro_batch_size, config, forward_only=True
            ).values
            state.consumed_valid_samples += args.global_batch_size
    total = _all_reduce(total)
    ddp.train()
    log(
        f" validation loss at iteration {state.iteration} | lm loss: {total.loss:.6E} | "
        f"text loss: {_format(total.text_loss, '.6E')} | vision loss: {_format(total.vision_loss, '.6E')}"
    )
    if sinks:
        sinks.write(
            {
                "iteration": state.iteration,
                "valid_loss": total.loss,
                "valid_text_loss": total.text_loss,
                "valid_vision_loss": total.vision_loss,
            }
        )
