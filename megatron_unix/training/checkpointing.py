"""Atomic, resumable checkpoints through Megatron's ``dist_checkpointing``.

Layout (Megatron-LM's): ``SAVE/iter_0000100/`` is one distributed checkpoint, and
``SAVE/latest_checkpointed_iteration.txt`` names the latest *complete* one. A save writes into
``iter_0000100.partial`` and only after every rank has finished is that directory renamed and the
tracker replaced (both atomic renames), so a crash or kill during a save leaves the previous
checkpoint and the tracker untouched. Leftover ``.partial`` directories are removed at the next save.

A checkpoint holds the model, optionally the optimizer and LR scheduler, the RNG states of every
rank, the data position (consumed samples), the run's arguments, and the architecture
(``model_args``) from which a model can be rebuilt at any TP/PP, plus ``checksums.json`` (see
``checksums``), written before the commit and checked at load.

Failures are raised as ``CheckpointError`` naming the file or directory, on every rank: each step
of ours that one rank (or each rank) takes alone ends in an all-gather of its outcome, so no rank
waits in a later collective for one that stopped. Inside ``dist_checkpointing``, DCP raises a failed
shard read or write on every rank; only a failed ``common.pt`` write (rank 0) stops one rank alone,
and its exit ends the job under torchrun or srun.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import get_cuda_rng_tracker
from torch.distributed.checkpoint import CheckpointException

from megatron_unix.model.forward import unwrap
from megatron_unix.training import checksums
from megatron_unix.training.checksums import CheckpointError

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
FAULT_INJECTION = "MEGATRON_UNIX_KILL_DURING_SAVE"
"""Test hook: set to an iteration, the save of that iteration SIGKILLs its process group (the job and
the checkpoint writer's helper processes) after the shards are written and before the commit, as a
node failure would. Start the job in its own session when using it."""
COMMON_FILES = ("metadata.json", "common.pt")
"""What ``read_common`` reads; ``load`` also needs DCP's ``.metadata`` (the shards' names are in it)."""
SHARDED_INDEX = ".metadata"
T = TypeVar("T")


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


def _require(checkpoint: Path, names: tuple[str, ...]) -> None:
    """Name missing pieces up front (with or without a manifest), instead of a failure deep in DCP."""
    missing = [name for name in names if not (checkpoint / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete: {', '.join(missing)} missing")


def tokens_seen(common: dict[str, Any]) -> int | None:
    """Training tokens behind a checkpoint (consumed samples x packed row length), from its common part."""
    seq_length = (common.get("args") or {}).get("seq_length")
    return common.get("consumed_train_samples", 0) * seq_length if seq_length else None


def read_common(checkpoint: str | Path, verify: bool = True) -> dict[str, Any]:
    """The checkpoint's non-sharded part (iteration, args, model_args, ...), readable before start-up;
    with ``verify``, its files are checked against the manifest first (locally: no process group needed)."""
    checkpoint = Path(checkpoint)
    _require(checkpoint, COMMON_FILES)
    entries = checksums.read_manifest(checkpoint) if verify else None
    if entries is not None:
        checksums.verify(checkpoint, [name for name in COMMON_FILES if name in entries], entries)
    return dist_checkpointing.load_common_state_dict(str(checkpoint))


def _gathered(step: Callable[[], T], failure: str) -> list[T]:
    """Run ``step`` on this rank and all-gather every rank's result. An error on any rank is raised on
    every rank as a CheckpointError (``failure: error``, or a CheckpointError's own message); so is any
    other exception, since a rank that left would leave the others waiting in the all-gather."""
    try:
        outcome: tuple[T | None, str | None] = (step(), None)
    except Exception as error:  # noqa: BLE001 - every failure must reach the collective below
        message = str(error) if isinstance(error, CheckpointError) else f"{failure}: {_one_line(error)}"
        outcome = (None, message)
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    errors = [error for _, error in outcomes if error]
    if errors:
        raise CheckpointError(errors[0] + (f" (and {len(errors) - 1} more ranks failed)" if len(errors) > 1 else ""))
    return [result for result, _ in outcomes]


def _on_rank0(step: Callable[[], None], failure: str) -> None:
    """A step only rank 0 takes (directory bookkeeping), its outcome shared as ``_gathered`` does."""
    _gathered(lambda: step() if dist.get_rank() == 0 else None, failure)


def _my_share(names: list[str]) -> list[str]:
    """This rank's files to hash or check (the job reads each file once): DCP's shard ``__R_i.distcp``
    goes to rank R, which wrote it (at save it is still in that node's page cache), others round-robin."""
    rank, world = dist.get_rank(), dist.get_world_size()

    def owner(index: int, name: str) -> int:
        shard = re.fullmatch(r"__(\d+)_\d+\.distcp", name)
        return (int(shard[1]) if shard else index) % world

    return [name for index, name in enumerate(names) if owner(index, name) == rank]


def _one_line(error: BaseException) -> str:
    """The causes of a DCP failure on one line (its own message is every rank's traceback); DCP gives
    them to its coordinator (rank 0) only."""
    if isinstance(error, CheckpointException):
        causes = [f"rank {rank}: {_one_line(exc)}" for rank, (exc, _) in sorted(error.failures.items())]
        return "; ".join(causes) or "it failed on some rank (rank 0's message names the cause)"
    return f"{type(error).__name__}: {error}".replace("\n", " ")


def _rng_state() -> dict[str, Any]:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
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
    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _rng_sharded_object() -> ShardedObject:
    """Every data-parallel rank's RNG state, stored once per (PP, TP) rank as Megatron-LM does."""
    states: list[Any] = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(states, _rng_state(), group=ps.get_data_parallel_group())
    return ShardedObject(
        "rng_state",
        states,
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank(),
    )


def _state_dict(model: torch.nn.Module, optimizer, scheduler, with_rng: bool) -> dict[str, Any]:
    state: dict[str, Any] = {"model": unwrap(model).sharded_state_dict()}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state["model"], is_loading=False)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_sharded_object()
    return state


def save(
    root: str | Path,
    iteration: int,
    model: torch.nn.Module,
    *,
    optimizer=None,
    scheduler=None,
    model_args: dict[str, Any],
    run_args: dict[str, Any] | None = None,
    consumed_train_samples: int = 0,
    consumed_valid_samples: int = 0,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint ``iteration`` under ``root`` on all ranks; returns its final directory."""
    root = Path(root)
    final, partial = iteration_dir(root, iteration), root / f"iter_{iteration:07d}.partial"
    failure = f"could not save checkpoint {final} (written in {partial}; {root / TRACKER} names only complete ones)"
    _on_rank0(lambda: _prepare(root, partial), failure)
    state = _state_dict(model, optimizer, scheduler, with_rng=True)
    state.update(
        iteration=iteration,
        checkpoint_version=CHECKPOINT_VERSION,
        model_args=model_args,
        args=run_args or {},
        consumed_train_samples=consumed_train_samples,
        consumed_valid_samples=consumed_valid_samples,
        parallel=_parallel_sizes(),
        has_optimizer=optimizer is not None,
    )
    try:  # DCP raises a failed shard write on every rank; common.pt (rank 0) fails alone, ending the job
        dist_checkpointing.save(state, str(partial))
    except (OSError, RuntimeError, CheckpointException) as error:
        raise CheckpointError(f"{failure}: {_one_line(error)}") from error
    dist.barrier()
    if os.environ.get(FAULT_INJECTION) == str(iteration):
        os.killpg(os.getpgrp(), 9)
    names = _gathered(lambda: checksums.files(partial) if dist.get_rank() == 0 else [], failure)[0]
    shares = _gathered(lambda: checksums.describe(partial, _my_share(names)), failure)
    entries = {name: entry for share in shares for name, entry in share.items()}
    _on_rank0(lambda: _finish(root, partial, final, iteration, entries, keep_last), failure)
    return final


def _prepare(root: Path, partial: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob("iter_*.partial"), *root.glob("iter_*.replaced")]:
        shutil.rmtree(stale)
    partial.mkdir()


def _finish(
    root: Path, partial: Path, final: Path, iteration: int, entries: dict[str, Any], keep_last: int | None
) -> None:
    """Rank 0, after every rank has written and hashed its share: manifest, commit, prune."""
    checksums.write_manifest(partial, entries)
    _commit(root, partial, final, iteration)
    if keep_last:
        _prune(root, keep_last, iteration)


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
    older = sorted(
        p for p in root.glob("iter_*") if p.is_dir() and p.name[5:].isdigit() and int(p.name[5:]) < iteration
    )
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


def verify_checkpoint(checkpoint: Path, checked: tuple[str, ...] = ()) -> None:
    """Check every file the manifest lists (but those already ``checked``), each rank its share, before
    any other collective of the load; a bad file stops every rank. A checkpoint without a manifest gets
    one notice line."""

    def check_share() -> bool:
        entries = checksums.read_manifest(checkpoint)
        if entries is not None:
            checksums.verify(checkpoint, _my_share(sorted(set(entries) - set(checked))), entries)
        return entries is not None

    if not all(_gathered(check_share, f"could not verify checkpoint {checkpoint}")) and dist.get_rank() == 0:
        print(
            f" checkpoint {checkpoint} has no {checksums.MANIFEST} (written before checksums were recorded): "
            "its files cannot be verified",
            flush=True,
        )


def load(
    checkpoint: str | Path,
    model: torch.nn.Module,
    *,
    optimizer=None,
    scheduler=None,
    load_rng: bool = True,
    verify: bool = True,
    common: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load ``checkpoint`` (an ``iter_*`` directory) into the model and, when given and stored, the
    optimizer, scheduler and RNG states; returns the common part. Works at any TP/PP; RNG states
    are restored only at the TP/PP they were saved with; ``verify`` checks the files against the manifest.
    ``common``: the part the caller read with :func:`read_common` (as ``verify`` says), not read again."""
    checkpoint = Path(checkpoint)
    _require(checkpoint, (*COMMON_FILES, SHARDED_INDEX))
    if verify:
        verify_checkpoint(checkpoint, COMMON_FILES if common is not None else ())
    if common is None:
        common = read_common(checkpoint, verify=False)
    optimizer = optimizer if common.get("has_optimizer") else None
    same_layout = {k: common["parallel"][k] for k in ("tp", "pp")} == {
        k: v for k, v in _parallel_sizes().items() if k in ("tp", "pp")
    }
    with_rng = load_rng and same_layout and common["parallel"]["dp"] == ps.get_data_parallel_world_size()
    model = unwrap(model)
    request = {"model": model.sharded_state_dict()}
    if optimizer is not None:
        _give_fresh_adam_a_step(optimizer)
        request["optimizer"] = optimizer.sharded_state_dict(request["model"], is_loading=True)
    if with_rng:
        request["rng_state"] = _rng_sharded_object()
    try:
        loaded = dist_checkpointing.load(request, str(checkpoint))
    except CheckpointException as error:  # raised on every rank
        raise CheckpointError(f"could not load checkpoint {checkpoint}: {_one_line(error)}") from error
    model.load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "opt_param_scheduler" in common:
        scheduler.load_state_dict(common["opt_param_scheduler"])
    if with_rng:
        _set_rng_state(loaded["rng_state"][ps.get_data_parallel_rank()])
    return common
