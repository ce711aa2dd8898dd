"""The training loop of ``pretrain_unix.py``: a :class:`Trainer` that sets up, restores, trains, evaluates,
saves and exits cleanly.

One iteration (:meth:`Trainer.train_step`) runs Megatron's forward-backward schedule over the global
batch's micro-batches, reduces the loss (and its text/vision parts, token and attention-pair counts)
with one all-reduce over the world and steps Megatron's optimizer and LR schedule; :meth:`Trainer.train`
then logs, evaluates and saves on their intervals (it also logs the run's first iteration, so that a
run shows its loss at once; set-up steps log as they start). SIGTERM, ``--exit-interval`` and
``--exit-duration-in-mins`` save and stop at the end of an iteration, at the same iteration on every
rank (the stop flags ride on the same all-reduce).
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_unix import platform
from megatron_unix.data.dataset import build_datasets
from megatron_unix.model.builder import padded_vocab_size, parameter_counts
from megatron_unix.training import checkpointing, distributed, metrics, setup
from megatron_unix.training.arguments import architecture_flags, validate, world_size_from_env
from megatron_unix.training.data import micro_batches
from megatron_unix.training.from_checkpoint import StartingPoint, check_data
from megatron_unix.training.gradient_conflict import GradientProbe, group_means, metric_key, modality_products
from megatron_unix.training.metrics import StepStats
from megatron_unix.training.run_config import RunSettings, load_tokenizer, model_arguments
from megatron_unix.training.step import Routed, run_schedule


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0
    skipped_iterations: int = 0
    saved_iteration: int | None = None


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


def pretrain(args: argparse.Namespace) -> TrainState:
    """Train as the parsed flags say; returns the final state (for tests and tools)."""
    return build_trainer(args).train()


def build_trainer(args: argparse.Namespace) -> Trainer:
    """The run the parsed flags describe, set up and ready to train (tools/gpu_check.py profiles its steps)."""
    start_time = time.time()
    start = StartingPoint.of(args)
    shape = architecture_flags(args, start.model_args)
    world_size = world_size_from_env()
    validate(args, world_size, shape)
    run = RunSettings.from_flags(args, world_size, shape)
    return Trainer(run, shape, start, start_time)


class Trainer:
    """One training run: :meth:`__init__` sets everything up, :meth:`train` runs the loop."""

    def __init__(
        self,
        run: RunSettings,
        shape: dict[str, Any],
        start: StartingPoint,
        start_time: float,
    ) -> None:
        """``shape``: the architecture flags merged with the starting checkpoint's."""
        self.run, self.start_time = run, start_time
        distributed.initialize(
            run.tensor_model_parallel_size,
            run.pipeline_model_parallel_size,
            run.seed,
            timeout_minutes=run.distributed_timeout_minutes,
        )
        self.exit_signal = ExitSignal(run.exit_signal_handler)  # before any data-loader worker exists
        log(
            f"> world size {dist.get_world_size()} ({distributed.launcher()}), "
            f"rendezvous at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        )
        absent = platform.detect_accelerators().absent()
        log(f"> accelerators absent: {', '.join(absent) or 'none'}" + (" (torch fallbacks in use)" if absent else ""))
        self._progress(f"loading the tokenizer {run.tokenizer_model}")
        tokenizer = load_tokenizer(run, shape)
        # checkpoint vs tokenizer first: then data vs tokenizer
        self.model_args = model_arguments(shape, tokenizer, run, start.checkpoint)
        self._progress(f"checking {len(run.data_prefixes)} dataset(s)")
        check_data(run.data_prefixes, tokenizer, run.tokenizer_model, run.allow_unrecorded_vocabulary)
        self.config = setup.model_config(run, self.model_args)
        self.stored_model_args = self.model_args.to_dict(carried=start.model_args)
        self._progress("building the model and optimizer")
        self.ddp = setup.build(run, self.config, self.model_args.vocab_size)
        self.optimizer, self.scheduler = setup.build_optimizer(run, self.ddp)
        self.state = self._restore(start)

        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mbs = run.micro_batch_size
        self.num_micro = run.global_batch_size // (mbs * dp)
        arch = self.model_args
        total, vision = parameter_counts(self.ddp)
        log(
            f"> {self.config.layer_description}, {arch.num_layers} layers, {total:,} parameters on rank 0 "
            f"({vision:,} in vision copies), "
            f"TP={run.tensor_model_parallel_size} PP={run.pipeline_model_parallel_size} DP={dp}, {self.num_micro} "
            f"micro-batches of {mbs} x {run.seq_length}"
        )
        evaluations = run.train_iters // run.eval_interval + 1 if run.eval_interval else 0
        self._progress("building the packed datasets (the packing is cached beside the data)")
        gbs = run.global_batch_size
        train_ds, valid_ds, _ = build_datasets(
            run.data_path,
            run.split,
            run.seq_length,
            run.seed,
            tokenizer,
            (run.train_iters * gbs, evaluations * run.eval_iters * gbs, 0),
            cache_dir=run.data_cache_dir,
            long_text=run.long_text,
        )
        if train_ds is None and run.train_iters > self.state.iteration:
            raise ValueError(f"--split {run.split!r} leaves no training data")
        self.train_data = (
            micro_batches(train_ds, self.state.consumed_train_samples, mbs, dp_rank, dp, run.num_workers)
            if train_ds is not None
            else None
        )
        self.valid_data = (
            micro_batches(valid_ds, self.state.consumed_valid_samples, mbs, dp_rank, dp)
            if valid_ds is not None and evaluations
            else None
        )
        self.padded_vocab = padded_vocab_size(arch.vocab_size, run.tensor_model_parallel_size)
        self.peak = metrics.peak_tflops(run.peak_tflops)
        self.sinks = None
        if dist.get_rank() == 0:
            self.sinks = metrics.MetricsSinks(
                run.metrics_path,
                run.tensorboard_dir,
                run.wandb_project,
                run.wandb_exp_name,
                run.wandb_save_dir,
                {**run.to_dict(), **arch.to_dict()},
                self.state.iteration,
            )
        self.gradient_probe = None
        if run.grad_conflict_interval:
            self.gradient_probe = GradientProbe(self.ddp, self.config)
            log(
                f"> --grad-conflict-interval {run.grad_conflict_interval}: those iterations run 2 extra "
                "forward-backward passes (text-target and vision-target loss) before the training pass"
            )

    def _progress(self, message: str) -> None:
        """A set-up step about to run, with the seconds since start: the wait before iteration 1 is visible."""
        log(f"> [{time.time() - self.start_time:6.1f} s] {message}")

    def _restore(self, start: StartingPoint) -> TrainState:
        """Resume from ``--load`` (everything), or start from its or ``--pretrained-checkpoint``'s weights."""
        run = self.run
        if start.resume and not run.finetune:
            setup.check_schedule(run, self.scheduler, start.common)
            common = checkpointing.load(
                start.checkpoint,
                self.ddp,
                optimizer=None if run.no_load_optim else self.optimizer,
                scheduler=self.scheduler,
                load_rng=not run.no_load_rng,
                verify=run.verify_checkpoint,
                common=start.common,
            )
            if run.no_load_optim or not common.get("has_optimizer"):
                self.optimizer.reload_model_params()
            log(f" loaded checkpoint {start.checkpoint} at iteration {common['iteration']}")
            return TrainState(
                iteration=common["iteration"],
                consumed_train_samples=common["consumed_train_samples"],
                consumed_valid_samples=common["consumed_valid_samples"],
                saved_iteration=common["iteration"],
            )
        if start.checkpoint is not None:
            checkpointing.load(
                start.checkpoint, self.ddp, load_rng=False, verify=run.verify_checkpoint, common=start.common
            )
            self.optimizer.reload_model_params()
            log(f" loaded weights from {start.checkpoint}; fresh optimizer, iteration 0")
        return TrainState()

    def save(self) -> None:
        """A checkpoint of the current iteration, unless there is one already (or no ``--save``)."""
        state = self.state
        if not self.run.save or state.saved_iteration == state.iteration:
            return
        start = time.perf_counter()
        path = checkpointing.save(
            self.run.save,
            state.iteration,
            self.ddp,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            model_args=self.stored_model_args,
            run_args=self.run.to_dict(),
            consumed_train_samples=state.consumed_train_samples,
            consumed_valid_samples=state.consumed_valid_samples,
            keep_last=self.run.keep_last_checkpoints,
        )
        state.saved_iteration = state.iteration
        log(f" saved checkpoint {path} at iteration {state.iteration} in {time.perf_counter() - start:.1f} s")

    def _run_batches(self, data: Iterator, forward_only: bool) -> StepStats:
        """Forward(-backward) over the iteration's micro-batches; local contributions to the stats."""
        batches = [Routed.of(next(data), self.config) for _ in range(self.num_micro)]
        stats = StepStats()
        if not forward_only and ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_first_stage():
            for routed in batches:  # throughput and FLOPs of training iterations
                shared, separated = metrics.attention_pairs(routed.routing)
                stats.add("tokens", routed.batch["tokens"].numel())
                stats.add("shared_pairs", shared)
                stats.add("separated_pairs", separated)
                stats.add("vision_tokens", metrics.vision_token_count(routed.batch, self.config))
        results = run_schedule(self.ddp, batches, forward_only=forward_only)
        if ps.get_tensor_model_parallel_rank() == 0 and ps.is_pipeline_last_stage():
            for result in results:
                stats.add("loss_sum", float(result["lm loss"]))
                stats.add("micro_batches", 1)
                for name, value in zip(
                    ("text_sum", "text_n", "vision_sum", "vision_n"), result["modality_sums"].tolist()
                ):
                    stats.add(name, value)
        return stats

    def _grads_finite(self) -> bool:
        """Whether every rank's gradients are finite (checked before the optimizer touches the weights)."""
        bad = any(
            not torch.isfinite(p.main_grad).all()
            for p in self.ddp.parameters()
            if getattr(p, "main_grad", None) is not None
        )
        flag = torch.tensor([float(bad)], device=platform.device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not flag.item()

    def train_step(self, batches: list) -> tuple[StepStats, float | None]:
        """One iteration on this rank's micro-``batches``: forward-backward over the global batch, one
        all-reduce of the stats and stop flags, then the optimizer step (or a skip, or
        :class:`NonFiniteLoss`); returns the reduced stats and the grad norm."""
        run, state = self.run, self.state
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        stats = self._run_batches(iter(batches), forward_only=False)
        stats.add("stop_signal", float(self.exit_signal.received))
        minutes = (time.time() - self.start_time) / 60
        stats.add("stop_duration", float(bool(run.exit_duration_in_mins) and minutes > run.exit_duration_in_mins))
        stats = stats.all_reduce()
        iteration = state.iteration + 1
        grad_norm = None
        problem = (
            f"lm loss is {stats.loss}"
            if not math.isfinite(stats.loss)
            else "a gradient is not finite"
            if run.skip_nonfinite_steps and not self._grads_finite()
            else None
        )
        if problem is None:
            updated, grad_norm, _ = self.optimizer.step()
            if updated:
                self.scheduler.step(increment=run.global_batch_size)
            else:
                state.skipped_iterations += 1
            if grad_norm is not None and not math.isfinite(grad_norm):
                raise NonFiniteLoss(f"iteration {iteration}: grad norm is {grad_norm}")
        elif run.skip_nonfinite_steps:
            state.skipped_iterations += 1
            log(f" iteration {iteration}: {problem}; skipping the step (--skip-nonfinite-steps)")
        else:
            raise NonFiniteLoss(
                f"iteration {iteration}: {problem}; stopping (use --skip-nonfinite-steps to skip such steps)"
            )
        state.iteration = iteration
        state.consumed_train_samples += run.global_batch_size
        return stats, grad_norm

    def _measure_grad_conflict(self, iteration: int, batches: list) -> None:
        """Per layer and group, cos(gradient of the text-target loss, of the vision-target loss) on this
        iteration's batch, logged and recorded; weights, random states and data position are untouched."""
        products = modality_products(self.gradient_probe, self.ddp, batches)
        means = " | ".join(f"{group} {value:.3f}" for group, value in group_means(products).items())
        log(f" iteration {iteration}: gradient cosine text vs vision loss, mean over layers: {means or 'n/a'}")
        if self.sinks:
            layers = self.model_args.num_layers
            self.sinks.write({"iteration": iteration, **{metric_key(k, layers): v.cosine for k, v in products.items()}})

    def log(self, window: StepStats, window_iters: int, elapsed: float, grad_norm: float | None) -> None:
        """The iteration line and its metrics record, over the ``window`` of iterations since the last."""
        run, state = self.run, self.state
        flops = metrics.training_flops(
            self.config,
            self.padded_vocab,
            int(window["tokens"]),
            int(window["shared_pairs"]),
            int(window["separated_pairs"]),
            int(window["vision_tokens"]),
        )
        tflops = flops / elapsed / dist.get_world_size() / 1e12
        record = {
            "iteration": state.iteration,
            "consumed_samples": state.consumed_train_samples,
            "loss": window.loss,
            "text_loss": window.text_loss,
            "vision_loss": window.vision_loss,
            "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]),
            "grad_norm": grad_norm,
            "tokens_per_sec": window["tokens"] / elapsed,
            "tflops": tflops,
            "mfu": tflops / self.peak if self.peak else None,
            "mem_gib": metrics.memory_gib(),
            "iteration_ms": 1000 * elapsed / window_iters,
            "skipped_iterations": state.skipped_iterations,
        }
        eta = elapsed / window_iters * (run.train_iters - state.iteration)
        log(metrics.iteration_line(record, run.train_iters, run.global_batch_size, eta))
        if self.sinks:
            self.sinks.write(record)

    def evaluate(self) -> StepStats:
        """``--eval-iters`` batches of the validation split, reduced, logged and recorded; returns the sums."""
        self.ddp.eval()
        total = StepStats()
        with torch.no_grad():
            for _ in range(self.run.eval_iters):
                total.values += self._run_batches(self.valid_data, forward_only=True).values
                self.state.consumed_valid_samples += self.run.global_batch_size
        total = total.all_reduce()
        self.ddp.train()
        log(metrics.validation_line(total, self.state.iteration))
        if self.sinks:
            self.sinks.write(
                {
                    "iteration": self.state.iteration,
                    "valid_loss": total.loss,
                    "valid_text_loss": total.text_loss,
                    "valid_vision_loss": total.vision_loss,
                }
            )
        return total

    def _stop_reason(self, stats: StepStats) -> str | None:
        run, iteration = self.run, self.state.iteration
        if stats["stop_signal"]:
            return "received SIGTERM"
        if stats["stop_duration"]:
            return f"--exit-duration-in-mins {run.exit_duration_in_mins} reached"
        if run.exit_interval and iteration % run.exit_interval == 0:
            return f"--exit-interval {run.exit_interval} reached"
        return None

    def train(self) -> TrainState:
        """Iterate to ``--train-iters`` (or a stop), logging, evaluating and saving on their intervals."""
        run, state = self.run, self.state
        if state.iteration < run.train_iters:
            self._progress(f"training iterations {state.iteration + 1} to {run.train_iters}")
        self.ddp.train()
        window, window_iters = StepStats(), 0
        window_start = time.perf_counter()
        first_iteration = state.iteration + 1
        while state.iteration < run.train_iters:
            batches = [next(self.train_data) for _ in range(self.num_micro)]
            if self.gradient_probe and (state.iteration + 1) % run.grad_conflict_interval == 0:
                measure_start = time.perf_counter()
                self._measure_grad_conflict(state.iteration + 1, batches)
                window_start += time.perf_counter() - measure_start  # not training time either
            stats, grad_norm = self.train_step(batches)
            step_end = time.perf_counter()
            window.values += stats.values
            window_iters += 1
            iteration = state.iteration
            if iteration % run.log_interval == 0 or iteration in (first_iteration, run.train_iters):
                self.log(window, window_iters, time.perf_counter() - window_start, grad_norm)
                window, window_start, window_iters = StepStats(), step_end, 0
            if self.valid_data is not None and iteration % run.eval_interval == 0:
                self.evaluate()
            if run.save_interval and iteration % run.save_interval == 0:
                self.save()
            window_start += time.perf_counter() - step_end  # evaluation and saving are not training time
            reason = self._stop_reason(stats)
            if reason:
                self.save()
                log(f" exiting at iteration {iteration}: {reason}")
                break
        else:
            self.save()
            log(
                f" training done: {state.iteration - first_iteration + 1} iterations in "
                f"{time.time() - self.start_time:.1f} s"
            )
        if self.sinks:
            self.sinks.close()
        return state
