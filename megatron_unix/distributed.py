"""Which process of a launched job this is (torchrun or srun alone), and its process group.

Light on purpose (torch only): programs that merely split work over ranks, as ``encode_images.py``,
start a group without megatron-core; training adds Megatron's parallel state on top
(:mod:`megatron_unix.training.distributed`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_unix import platform


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    launcher: str


def env_from_slurm() -> None:
    """In a task of an ``srun`` step without torchrun, map SLURM_* onto the torch.distributed variables.
    The step's variables, not the job's: the batch script itself (no step) runs one process even in a job of
    many tasks, and rank 0 runs on the step's first node."""
    if "RANK" in os.environ or "SLURM_STEP_NUM_TASKS" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_STEP_NUM_TASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        os.environ["MASTER_ADDR"] = first_slurm_node(nodes)
    os.environ.setdefault("MASTER_PORT", "29500")


def launcher() -> str:
    """Who started the processes, for the start-up log: torchrun, srun alone, or nobody (one process)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun"
    if "SLURM_STEP_NUM_TASKS" in os.environ and os.environ.get("RANK") == os.environ.get("SLURM_PROCID"):
        return "srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID"
    return "no launcher"


def launched_world() -> World:
    """This process's place in the job, from torchrun's variables or an srun step's (mapped onto
    torchrun's); rank 0 of 1 without a launcher."""
    env_from_slurm()
    rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if not 0 <= rank < size:
        raise ValueError(f"RANK {rank} is not within WORLD_SIZE {size}")
    return World(rank, size, int(os.environ.get("LOCAL_RANK", "0")), launcher())


def first_slurm_node(nodelist: str) -> str:
    """First host of a slurm nodelist such as ``gpu[012-015,020],cpu1`` -> ``gpu012``."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def free_port() -> int:
    """A port nobody listens on, for a single process started without a launcher."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def init_process_group(timeout_minutes: float = 10, backend: str | None = None) -> World:
    """Join the launched job's process group (a group of one without a launcher), on this node's
    ``LOCAL_RANK``-th GPU when there are GPUs. ``backend`` defaults to nccl on GPUs, gloo on CPU."""
    world = launched_world()
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        if torch.cuda.is_available():
            # modulo: clusters that bind one GPU per task show each task a single device
            torch.cuda.set_device(world.local_rank % torch.cuda.device_count())
        backend = backend or platform.distributed_backend()
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return world
