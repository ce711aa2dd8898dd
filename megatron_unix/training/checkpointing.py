"""Atomic, resumable checkpoints through Megatron's ``dist_checkpointing``.

Layout (Megatron-LM's): ``SAVE/iter_0000100/`` is one distributed checkpoint, and
``SAVE/latest_checkpointed_iteration.txt`` names the latest *complete* one. A save writes into
``iter_0000100.partial`` and only after every rank has finished is that directory renamed and the
tracker replaced (both atomic renames), so a crash or kill during a save leaves the previous
checkpoint and the tracker untouched. Leftover ``.partial`` directories are removed at the next save.

A checkpoint holds the model, optionally the optimizer and LR scheduler, the RNG states of every
rank, the data position (consumed samples), the run's arguments, and the architecture
(``model_args``) from which a model can be rebuilt at any TP/PP.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from megatron_unix.training.step import unwrap

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
FAULT_INJECTION = "MEGATRON_UNIX_KILL_DURING_SAVE"
"""Test hook: set to an iteration, the save of that iteration SIGKILLs its process group (the job and
the checkpoint writer's helper processes) after the shards are written and before the commit, as a
node failure would. Start the job in its own session when using it."""


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | Path) -> int | None:
    """The iteration the tracker names, or None when ``root`` holds no complete checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}")
    return int(text)


def find_checkpoint(path: str | Path) -> Path | None:
    """``path`` is a save directory (use its tracker) or one ``iter_*`` checkpoint directory."""
    path = Path(path)
    if (path / "metadata.json").is_file():
        return path
    iteration = latest_iteration(path)
    if iteration is None:
        return None
    found = iteration_dir(path, iteration)
    if not (found / "metadata.json").is_file():
        raise FileNotFoundError(f"{path / TRACKER} names iteration {iteration} but {found} is not a checkpoint")
    return found


def read_common(checkpoint: str | Path) -> dict[str, Any]:
    """The checkpoint's non-sharded part (iteration, args, model_args, ...), readable before start-up."""
    return dist_checkpointing.load_common_state_dict(str(checkpoint))


def _rng_state() -> dict[str, Any]:
    return {
        "random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _parallel_sizes() -> dict[str, int]:
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size()}


def _rng_sharded_object() -> ShardedObject:
    """Every data-parallel rank's RNG state, stored once per (PP, TP) rank as Megatron-LM does."""
    states: list[Any] = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(states, _rng_state(), group=ps.get_data_parallel_group())
    return ShardedObject("rng_state", states,
                         (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
                         (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank())


def _state_dict(model: torch.nn.Module, optimizer, scheduler, with_rng: bool) -> dict[str, Any]:
    state: dict[str, Any] = {"model": unwrap(model).sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=False)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_sharded_object()
    return state


def save(root: str | Path, iteration: int, model: torch.nn.Module, *, optimizer=None, scheduler=None,
         model_args: dict[str, Any], run_args: dict[str, Any] | None = None,
         consumed_train_samples: int = 0, consumed_valid_samples: int = 0, keep_last: int | None = None) -> Path:
    """Write checkpoint ``iteration`` under ``root`` on all ranks; returns its final directory."""
    root = Path(root)
    final, partial = iteration_dir(root, iteration), root / f"iter_{iteration:07d}.partial"
    rank0 = dist.get_rank() == 0
    if rank0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in [*root.glob("iter_*.partial"), *root.glob("iter_*.replaced")]:
            shutil.rmtree(stale)
        partial.mkdir()
    dist.barrier()
    state = _state_dict(model, optimizer, scheduler, with_rng=True)
    state.update(iteration=iteration, checkpoint_version=CHECKPOINT_VERSION, model_args=model_args,
                 args=run_args or {}, consumed_train_samples=consumed_train_samples,
                 consumed_valid_samples=consumed_valid_samples, parallel=_parallel_sizes(),
                 has_optimizer=optimizer is not None)
    dist_checkpointing.save(state, str(partial))
    dist.barrier()
    if os.environ.get(FAULT_INJECTION) == str(iteration):
        os.killpg(os.getpgrp(), 9)
    if rank0:
        _commit(root, partial, final, iteration)
        if keep_last:
            _prune(root, keep_last, iteration)
    dist.barrier()
    return final


def _commit(root: Path, partial: Path, final: Path, iteration: int) -> None:
    old = root / f"{final.name}.replaced"
    if final.exists():  # re-saving an iteration: keep the old one until the new one is in place
        os.replace(final, old)
    os.replace(partial, final)
    tracker_tmp = root / (TRACKER + ".tmp")
    tracker_tmp.write_text(f"{iteration}\n")
    with open(tracker_tmp) as f:
        os.fsync(f.fileno())
    os.replace(tracker_tmp, root / TRACKER)
    if old.exists():
        shutil.rmtree(old)


def _prune(root: Path, keep_last: int, iteration: int) -> None:
    """Delete the oldest checkpoints before ``iteration`` (never the one just saved, which the
    tracker names), keeping ``keep_last`` in all."""
    older = sorted(p for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit() and int(p.name[5:]) < iteration)
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old)


def _give_fresh_adam_a_step(optimizer) -> None:
    """megatron-core 0.16.1's DistributedOptimizer over torch's Adam (no TE/apex) asserts that every
    parameter's state has one common ``step`` while building its loading request; a freshly built
    optimizer has no state yet. Initialise it (zeros, step 0) as the TE/apex path would."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE, DistributedOptimizer

    if HAVE_APEX_OR_TE:
        return
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer) and inner.init_state_fn is not None:
            inner.init_state_fn(inner.optimizer, inner.config)
            for group in inner.optimizer.param_groups:
                for param in group["params"]:
                    inner.optimizer.state[param].setdefault("step", torch.tensor(0.0))


def load(checkpoint: str | Path, model: torch.nn.Module, *, optimizer=None, scheduler=None,
         load_rng: bool = True) -> dict[str, Any]:
    """Load ``checkpoint`` (an ``iter_*`` directory) into the model and, when given and stored, the
    optimizer, scheduler and RNG states; returns the common part. Works at any TP/PP; RNG states
    are restored only at the TP/PP they were saved with."""
    common = read_common(checkpoint)
    optimizer = optimizer if common.get("has_optimizer") else None
    same_layout = {k: common["parallel"][k] for k in ("tp", "pp")} == \
        {k: v for k, v in _parallel_sizes().items() if k in ("tp", "pp")}
    with_rng = load_rng and same_layout and common["parallel"]["dp"] == ps.get_data_parallel_world_size()
    model = unwrap(model)
    request = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        _give_fresh_adam_a_step(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(request["model"], is_loading=True)
    if with_rng:
        request["rng_state"] = _rng_sharded_object()
    loaded = dist_checkpointing.load(request, str(checkpoint))
    model.load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if with_rng:
        _set_rng_state(loaded["rng_state"][ps.get_data_parallel_rank()])
    return common
