"""Runs a comparison's steps as subprocesses, resumably: a step that ends well is recorded in
``OUT/steps/NAME.json`` and not run again; one that was stopped is run again, and the programs resume
themselves (training from its last checkpoint, evaluations from their caches). A rerun with other
settings is refused before anything runs. Locally the stages run one after another; with slurm each
stage is a job, the variants side by side, the report after them."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from megatron_unix.comparison.plan import SOURCE_TREE, STAGES, VARIANTS, Layout, Settings, Step
from megatron_unix.files import lock_exclusively, settings_mismatch, write_text_atomically
from megatron_unix.signals import Interrupted, stop_on_signals

SETTINGS = "settings.json"


class StepFailed(RuntimeError):
    """A program of the comparison ended with an error; its log says why."""


def check_settings(layout: Layout, settings: Settings) -> None:
    """Record the settings in a new output folder; refuse (ValueError naming each setting that differs)
    an output folder written with others."""
    path = layout.root / SETTINGS
    if path.exists():
        try:
            recorded = json.loads(path.read_text())["settings"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a comparison's settings record ({error})") from None
        if message := settings_mismatch(path, recorded, settings.record()):
            raise ValueError(message)
        return
    layout.root.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps({"settings": settings.record()}, indent=1) + "\n")


def record_path(layout: Layout, step: Step) -> Path:
    return layout.root / "steps" / f"{step.name}.json"


def log_path(layout: Layout, step: Step) -> Path:
    return layout.root / "logs" / f"{step.name}.log"


def finished(layout: Layout, step: Step) -> bool:
    return record_path(layout, step).is_file()


def child_environment() -> dict[str, str]:
    """This process's environment, with this source tree first on PYTHONPATH (the programs run as
    ``python -m megatron_unix.cli.NAME``, whichever copy of the package this one is)."""
    paths = [str(SOURCE_TREE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


class Runner:
    """Runs steps in order, printing a line per step; ``current`` is the step running (for the line
    that a stop prints)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.current: Step | None = None

    def run_stage(self, stage: str, steps: Sequence[Step]) -> None:
        """The stage's steps, under the stage's lock (a second run of it is refused)."""
        folder = self.layout.root / "steps"
        folder.mkdir(parents=True, exist_ok=True)
        (self.layout.root / "logs").mkdir(exist_ok=True)
        lock = folder / f".{stage}.lock"
        with open(lock, "a") as held:
            lock_exclusively(held, lock)
            for step in steps:
                if step.stage == stage:
                    self.run_step(step)

    def run_step(self, step: Step) -> None:
        if finished(self.layout, step):
            print(f"== {step.name}: done before ({record_path(self.layout, step)})", flush=True)
            return
        if step.skip and (reason := step.skip()):
            print(f"== {step.name}: skipped: {reason}", flush=True)
            return
        log = log_path(self.layout, step)
        print(f"== {step.name}: {step.what} (log: {log})", flush=True)
        if step.fresh is not None:
            shutil.rmtree(step.fresh, ignore_errors=True)  # a previous attempt's, which the program refuses
        self.current = step
        start = time.monotonic()
        with open(log, "a") as out:
            out.write(f"== {datetime.datetime.now().isoformat(timespec='seconds')} {shlex.join(step.argv)}\n")
            out.flush()
            status = _wait(subprocess.Popen(step.argv, stdout=out, stderr=subprocess.STDOUT, env=child_environment()))
        self.current = None
        if status != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print("\n".join(tail), file=sys.stderr)
            raise StepFailed(f"{step.name} failed (exit status {status}); its log: {log}")
        seconds = time.monotonic() - start
        record = {"argv": list(step.argv), "seconds": seconds, "finished": datetime.datetime.now().isoformat()}
        write_text_atomically(record_path(self.layout, step), json.dumps(record, indent=1) + "\n", durable=True)
        print(f"   {step.name} done in {seconds:.1f} s", flush=True)


def _wait(child: subprocess.Popen) -> int:
    """The child's exit status. A SIGTERM or SIGINT meanwhile goes on to the child (training saves a
    checkpoint and stops), which is then waited for, and is raised (:class:`Interrupted`); a second
    one kills the child."""
    try:
        with stop_on_signals():
            return child.wait()
    except Interrupted as stop:
        if child.poll() is None:
            child.send_signal(stop.signum)
        try:
            with stop_on_signals():
                child.wait()
        except Interrupted:
            child.kill()
            child.wait()
        raise stop from None


def stopped_line(stop: Interrupted, runner: Runner, layout: Layout) -> str:
    """The one line a stop prints: what was running, what is kept."""
    done = len(list((layout.root / "steps").glob("*.json"))) if (layout.root / "steps").is_dir() else 0
    during = f" during {runner.current.name}" if runner.current else ""
    return (
        f"compare: {stop}{during}; the {done} finished steps are kept in {layout.root / 'steps'} "
        "(training resumes from its last checkpoint): the same command goes on from there"
    )


def slurm_script(stage: str, layout: Layout, argv: Sequence[str], sbatch_args: str) -> Path:
    """``OUT/slurm/STAGE.sbatch``: this comparison's command for one stage (``--only STAGE``)."""
    folder = layout.root / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "megatron_unix.cli.compare", *argv, "--only", stage]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=compare-{stage}",
        f"#SBATCH --output={folder}/{stage}-%j.out",
        *(f"#SBATCH {word}" for word in shlex.split(sbatch_args)),
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        f"export PYTHONPATH={shlex.quote(child_environment()['PYTHONPATH'])}",
        f"exec {shlex.join(command)}",
    ]
    path = folder / f"{stage}.sbatch"
    write_text_atomically(path, "\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def submit_slurm(layout: Layout, argv: Sequence[str], sbatch_args: str, stages: Sequence[str]) -> dict[str, str]:
    """A job per stage: the data first, the variants after it side by side, the report after them all.
    ``argv``: the comparison's flags without the slurm ones. Returns stage -> job id."""
    if shutil.which("sbatch") is None:
        raise ValueError("--slurm: no sbatch on PATH (run it on a slurm login node)")
    jobs: dict[str, str] = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        after = [jobs[s] for s in {"data": (), "report": VARIANTS}.get(stage, ("data",)) if s in jobs]
        dependency = [f"--dependency=afterok:{':'.join(after)}"] if after else []
        script = slurm_script(stage, layout, argv, sbatch_args)
        done = subprocess.run(
            ["sbatch", "--parsable", *dependency, str(script)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise ValueError(f"sbatch {script}: {done.stderr.strip() or done.stdout.strip()}")
        jobs[stage] = done.stdout.strip().split(";")[0]
        print(f"== {stage}: job {jobs[stage]} ({script})", flush=True)
    return jobs
