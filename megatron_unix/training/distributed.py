"""Start torch.distributed and Megatron's parallel state, from torchrun or from slurm alone."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_unix import platform


def _env_from_slurm() -> None:
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


def first_slurm_node(nodelist: str) -> str:
    """First host of a slurm nodelist such as ``gpu[012-015,020],cpu1`` -> ``gpu012``."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in head:
        return head
    prefix, ranges = head.split("[", 1)
    return prefix + ranges.rstrip("]").split(",")[0].split("-")[0]


def _free_port() -> int:
    """A port nobody listens on, for a single process started without a launcher."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 1234,
    context_parallel: int = 1,
    timeout_minutes: int = 10,
) -> None:
    """Initialise the process group (single process when no launcher variables are set)."""
    platform.setup()
    if context_parallel > 1:
        raise ValueError(
            "--context-parallel-size > 1 is not supported (Uni-X's per-modality segments are not split over CP ranks)"
        )
    _env_from_slurm()
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if torch.cuda.is_available():
            # modulo: clusters that bind one GPU per task show each task a single device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(platform.distributed_backend(), timeout=timedelta(minutes=timeout_minutes))
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(
            f"world size {world} is not divisible by --tensor-model-parallel-size ({tensor_parallel}) "
            f"x --pipeline-model-parallel-size ({pipeline_parallel})"
        )
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel
    )
    platform.seed_model_parallel(seed)
