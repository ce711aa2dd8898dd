"""examples/pretrain_3b.sh through ``sbatch`` on a real one-node slurm cluster (.ci/slurm_cluster.sh),
unchanged, on CPU: a tiny Qwen3 converted with ``import-hf``, the quickstart data, 2 tasks (gloo).

The job runs to its end with its ranks from srun; a job with a short time limit stops on the
--exit-duration-in-mins its script derived from the job's end, saving; ``scancel --signal=TERM`` saves
and exits 0, and submitting the script again resumes with the same losses as the job run to its end;
a missing data prefix fails the job with the message in its output. 3 min on 2 cores shared with other
jobs (6 min when they were busier), most of it each job's start-up (torch, megatron-core imports). The
cluster fixture skips these tests, with the reason, where no cluster can be had (not root, no apt-get,
a daemon fails). The first test here needs no cluster: the rank variables a batch script and an srun
step see.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pretrain_3b.sh"
CPU_NODE = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]
"""sbatch's command line in place of the script's 8-GPU nodes (the script itself is unchanged)."""
ITERS = 10
T = TypeVar("T")


def wait_for(condition: Callable[[], T], seconds: float, what: str) -> T:
    """Poll ``condition`` until it returns something true; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {seconds} s")
        time.sleep(0.2)
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Cluster:
    folder: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.folder / "slurm.conf")}

    def record(self, job: str) -> dict[str, str] | None:
        """The finished job's line of the completion log (JobState, ExitCode, StartTime...), else None."""
        log = self.folder / "log" / "jobcomp.txt"
        lines = log.read_text().splitlines() if log.is_file() else []
        line = next((line for line in lines if line.startswith(f"JobId={job} ")), None)
        return dict(re.findall(r"(\w+)=(\S*)", line)) if line else None

    def finished(self, job: str, seconds: float = 600) -> dict[str, str]:
        return wait_for(lambda: self.record(job), seconds, f"end of job {job}")


@pytest.fixture(scope="module")
def cluster():
    # not under pytest's tmp_path: its 0700 parent would keep munged (the munge user) from its socket
    folder = tempfile.mkdtemp(prefix="unix-slurm-")
    start = subprocess.run(
        ["bash", str(ROOT / ".ci" / "slurm_cluster.sh"), "start", folder, str(os.getpid())],
        capture_output=True,
        text=True,
        timeout=900,
    )
    try:
        if start.returncode:
            pytest.skip((start.stderr.strip().splitlines() or [f"exit status {start.returncode}"])[-1])
        yield Cluster(Path(folder))
    finally:
        subprocess.run(["bash", str(ROOT / ".ci" / "slurm_cluster.sh"), "stop", folder], timeout=300)
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Files:
    tokenizer: Path
    data: Path
    init: Path


@pytest.fixture(scope="module")
def files(cluster, tmp_path_factory) -> Files:
    """The quickstart's tokenizer and datasets; a tiny Qwen3 with that tokenizer, converted by import-hf."""
    from test_convert import make_source
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("inputs")
    subprocess.run(
        ["bash", "-c", f'source "{ROOT}/examples/quickstart_data.sh" && prepare_quickstart_data "{root}"'],
        env={**os.environ, "REPO": str(ROOT), "PYTHON": sys.executable},
        check=True,
        capture_output=True,
        timeout=600,
    )
    vocab = len(AutoTokenizer.from_pretrained(root / "tokenizer"))
    make_source(root / "hf", root / "tokenizer", style="qwen3", vocab=vocab)
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), "import-hf", "--hf-dir", str(root / "hf")]
        + ["--save", str(root / "init"), "--vision-encode-layers", "1", "--vision-decode-layers", "1"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return Files(root / "tokenizer", root / "data", root / "init")


def job_env(cluster: Cluster, files: Files, save: Path, **values: str) -> dict[str, str]:
    """The script's "edit me" values for the tiny CPU run, through the environment sbatch passes on."""
    return {
        **cluster.env,
        "REPO": str(ROOT),
        "VENV": sys.prefix,
        "QWEN_DIR": str(files.tokenizer),
        "INIT": str(files.init),
        "SAVE": str(save),
        "DATA_PATH": f"0.5 {files.data}/text 0.5 {files.data}/image_text",
        "SPLIT": "90,10,0",
        "WANDB_PROJECT": "",
        "SEQ_LENGTH": "1152",  # a quickstart image is 1024 codes
        "GLOBAL_BATCH": "2",
        "TRAIN_ITERS": str(ITERS),
        "LR": "2e-3",
        "MIN_LR": "2e-4",
        "WARMUP_ITERS": "2",
        "LOG_INTERVAL": "1",
        "EVAL_ITERS": "1",
        "GPU_FLAGS": "",
        "MASTER_PORT": str(free_port()),
        **values,
    }


def submit(cluster: Cluster, env: dict[str, str], folder: Path, *options: str) -> str:
    """sbatch the example script from ``folder`` (where its --output=%x-%j.out goes); the job id."""
    proc = subprocess.run(
        ["sbatch", "--parsable", *CPU_NODE, *options, str(SCRIPT)],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def output(folder: Path, job: str) -> str:
    return (folder / f"unix-3b-{job}.out").read_text()


def losses(save: Path) -> dict[int, dict]:
    metrics = save / "metrics.jsonl"
    records = map(json.loads, metrics.read_text().splitlines()) if metrics.is_file() else []
    return {r["iteration"]: r for r in records if "loss" in r}


def latest(save: Path) -> int:
    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert (save / f"iter_{iteration:07d}" / "metadata.json").is_file()
    return iteration


def assert_completed(record: dict[str, str], text: str) -> None:
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), text[-3000:]


@pytest.fixture(scope="module")
def reference(cluster, files, tmp_path_factory) -> tuple[Path, str, dict[str, str]]:
    """The job run to its end (ITERS iterations, every one logged): folder, job id, completion record."""
    folder = tmp_path_factory.mktemp("reference")
    job = submit(cluster, job_env(cluster, files, folder / "save"), folder)
    return folder, job, cluster.finished(job)


BATCH_SCRIPT = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "n[1-4]"}
"""What the batch script of a 2-task job sees (slurm 22.05): the job's tasks, no step."""
SRUN_TASK = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "n[3-4]"}
"""Rank 1 of an srun step on the allocation's last two nodes."""


@pytest.mark.parametrize("task, world, rank, master", [({}, 1, None, None), (SRUN_TASK, 2, "1", "n3")])
def test_ranks_come_from_the_srun_step_not_the_batch_script(monkeypatch, task, world, rank, master):
    """python run by the batch script itself is one process (not a rank waiting for a partner that never
    comes); srun's tasks are the step's ranks and meet at the step's first node."""
    from megatron_unix import distributed
    from megatron_unix.training.arguments import world_size_from_env

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.setenv(name, "")  # restored (or removed) after the test, also when env_from_slurm sets it
        monkeypatch.delenv(name)
    for name, value in {**BATCH_SCRIPT, **task}.items():
        monkeypatch.setenv(name, value)
    launched = distributed.launched_world()
    assert world_size_from_env() == launched.size == world and launched.rank == int(rank or 0)
    assert (os.environ.get("RANK"), os.environ.get("LOCAL_RANK"), os.environ.get("MASTER_ADDR")) == (rank, rank, master)
    assert distributed.launcher() == (
        "srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID" if task else "no launcher"
    )


@pytest.mark.slurm
@pytest.mark.slow
def test_job_runs_to_the_end_with_ranks_from_srun(reference):
    folder, job, record = reference
    text = output(folder, job)  # the script's --output=%x-%j.out, in the folder sbatch ran in
    assert_completed(record, text)
    port = re.search(r"^MASTER_PORT=(\d+)$", text, re.M)[1]
    node = socket.gethostname().split(".")[0]
    assert (
        f"> world size 2 (srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID), rendezvous at {node}:{port}" in text
    )
    assert "TP=1 PP=1 DP=2, 1 micro-batches of 1 x 1152" in text
    exit_minutes = float(re.search(r"^EXIT_MINUTES=(\S+)$", text, re.M)[1])
    assert 48 * 60 - 30 - 1 < exit_minutes <= 48 * 60 - 30  # the script's 48 h limit less its 30 min margin
    assert f"training done: {ITERS} iterations" in text
    save = folder / "save"  # SAVE
    assert latest(save) == ITERS
    assert sorted(losses(save)) == list(range(1, ITERS + 1))
    assert list((save / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_stops_the_job_in_time_saving(cluster, files, tmp_path):
    """A 4-minute job: its script sets --exit-duration-in-mins from the job's end less a 3.5 min margin (half
    a minute after pretrain_unix.py starts); the run stops there, saves and exits 0, before the limit and
    before the TERM signal 30 s ahead of it (the margin leaves slow start-ups on busy machines 3 minutes)."""
    env = job_env(cluster, files, tmp_path / "save", TRAIN_ITERS="10000", EXIT_MARGIN_MINUTES="3.5")
    job = submit(cluster, env, tmp_path, "--time=4", "--signal=TERM@30")
    record = cluster.finished(job, 300)
    text = output(tmp_path, job)
    assert_completed(record, text)
    exit_minutes = float(re.search(r"^EXIT_MINUTES=(\S+)$", text, re.M)[1])
    assert 0.3 < exit_minutes <= 0.5, text[:2000]  # the job's 4 min less the margin and its start
    stop = re.search(r"^ exiting at iteration (\d+): --exit-duration-in-mins (\S+) reached$", text, re.M)
    assert stop and float(stop[2]) == exit_minutes, text[-3000:]
    assert latest(tmp_path / "save") == int(stop[1])
    assert "received SIGTERM" not in text
    elapsed = time.mktime(time.strptime(record["EndTime"], "%Y-%m-%dT%H:%M:%S")) - time.mktime(
        time.strptime(record["StartTime"], "%Y-%m-%dT%H:%M:%S")
    )
    assert elapsed < 4 * 60 - 30


@pytest.mark.slurm
@pytest.mark.slow
def test_sigterm_saves_and_the_resubmitted_job_resumes_exactly(cluster, files, reference, tmp_path):
    save = tmp_path / "save"
    env = job_env(cluster, files, save)
    job = submit(cluster, env, tmp_path)
    wait_for(lambda: losses(save) or cluster.record(job), 600, "first iteration")  # SIGTERM is handled by then
    assert cluster.record(job) is None, "the job ended before it was signalled"
    subprocess.run(["scancel", "--signal=TERM", job], env=cluster.env, check=True, timeout=60)
    record = cluster.finished(job)
    text = output(tmp_path, job)
    assert_completed(record, text)
    assert re.search(r"^ exiting at iteration \d+: received SIGTERM$", text, re.M), text[-3000:]
    stopped = latest(save)
    assert 1 <= stopped < ITERS

    job = submit(cluster, {**env, "MASTER_PORT": str(free_port())}, tmp_path)  # the same script again
    record = cluster.finished(job)
    text = output(tmp_path, job)
    assert_completed(record, text)
    assert f" loaded checkpoint {save}/iter_{stopped:07d} at iteration {stopped}" in text
    assert f"training done: {ITERS - stopped} iterations" in text
    expected, resumed = losses(reference[0] / "save"), losses(save)
    assert sorted(resumed) == list(range(1, ITERS + 1))
    for iteration in range(stopped + 1, ITERS + 1):
        for key in ("loss", "text_loss", "vision_loss", "grad_norm", "lr"):
            assert resumed[iteration][key] == expected[iteration][key], (iteration, key)


@pytest.mark.slurm
@pytest.mark.slow
def test_missing_data_prefix_fails_the_job(cluster, files, tmp_path):
    missing = tmp_path / "missing"
    env = job_env(cluster, files, tmp_path / "save", DATA_PATH=f"0.5 {files.data}/text 0.5 {missing}")
    proc = subprocess.run(
        ["sbatch", "--parsable", "--wait", *CPU_NODE, str(SCRIPT)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    job = proc.stdout.strip().split(";")[0]
    text = output(tmp_path, job)
    # sbatch --wait: the job's exit status, srun's: the highest of its tasks', pretrain_unix.py's 2 for bad
    # input, or 143 where --kill-on-bad-exit terminated the other rank before it had exited with its 2
    assert proc.returncode in (2, 143), text[-3000:]
    record = cluster.finished(job, 60)
    assert (record["JobState"], record["ExitCode"]) == ("FAILED", f"{proc.returncode}:0")
    assert f"error: --data-path {missing}: dataset {missing} is incomplete" in text, text[-3000:]
    assert "Traceback" not in text
