"""Image folders laid out as the text-to-image scorers read them, the commands that score them, and
readers of their score files. Checked against the scorers' code (see ``geneval_commands`` and
``dpg_commands``):

- GenEval (djghosh13/geneval): prompts from its ``prompts/evaluation_metadata.jsonl``; per prompt
  ``OUT/<00000>/metadata.jsonl`` (that prompt's metadata line, which ``evaluate_images.py`` reads with
  ``json.load``) and ``OUT/<00000>/samples/<0000>.png``; it scores every digit-named folder.
- DPG-Bench (ELLA's ``dpg_bench``): one prompt per ``prompts/<stem>.txt``; per prompt one PNG
  ``OUT/<stem>.png`` (the stem is its key in ``dpg_bench.csv``), the samples as a 2x2 grid, which
  ``compute_dpg_bench.py --pic-num 4`` crops back into tiles of ``--resolution`` pixels. It opens every
  file of the folder as an image, so nothing else goes there.

The model is a ``Painter`` passed in, so this module knows nothing about generation. Every file is
written under a temporary name and renamed, and a prompt whose files exist is not painted again, so
a killed run resumes. The settings and the seeds of each prompt's samples go to ``OUT.record.json``
beside the folder; resuming with other settings is refused.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import IO, Any

from PIL import Image

from megatron_unix.data.preprocess_report import ProgressLine
from megatron_unix.evaluation.report import write_results
from megatron_unix.files import exclusive, settings_mismatch, write_atomically, write_text_atomically
from megatron_unix.inference.images import image_grid
from megatron_unix.platform import has_module

Painting = tuple[list[Image.Image], list[int]]
"""One prompt's sample images and the seed of each."""
Painter = Callable[[Sequence[tuple[str, int]]], list[Painting]]
"""[(prompt, prompt number)] -> each prompt's painting, in order; several prompts per call, so that a
model fills its batch. The number lets the painter derive per-sample seeds that do not depend on
batching (``sampling.derived_seed``)."""
SAMPLES_PER_PROMPT = 4
GRID_COLUMNS = 2
DPG_MAX_SAMPLES = 4
"""compute_dpg_bench.py crops at most the four tiles of a 2x2 grid."""
GENEVAL_PACKAGES = ("mmdet", "open_clip", "clip_benchmark", "pandas")
DPG_PACKAGES = ("modelscope", "accelerate", "pandas")


@dataclass
class GenerationRun:
    outdir: Path
    painted: int = 0
    resumed: int = 0
    commands: list[str] = field(default_factory=list)
    """Shell commands that score the folder (each starts with ``cd`` into the scorer's checkout)."""
    scores: Path | None = None
    """Where the scorer writes its results (beside the folder)."""
    missing: list[str] = field(default_factory=list)
    """Python packages of the scorer that are not importable here: run ``commands`` where they are."""


def record_path(outdir: Path) -> Path:
    """The settings and seeds of a folder, beside it (DPG's scorer reads every file inside as an image)."""
    return outdir.with_name(outdir.name + ".record.json")


def read_geneval_prompts(path: str | Path) -> list[dict]:
    """GenEval's ``evaluation_metadata.jsonl``: one JSON object with a ``prompt`` per line."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError("no 'prompt' string")
        except ValueError as error:
            raise ValueError(f"{path}:{number}: not a GenEval metadata line ({error})") from None
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no prompts")
    return records


def read_dpg_prompts(folder: str | Path) -> dict[str, str]:
    """DPG-Bench's prompt folder: ``{stem: prompt}`` of its ``*.txt`` files, sorted by stem."""
    files = sorted(Path(folder).glob("*.txt"))
    if not files:
        raise ValueError(f"{folder}: no DPG-Bench prompt files (*.txt)")
    return {f.stem: f.read_text(encoding="utf-8").strip() for f in files}


@dataclass(frozen=True)
class _Job:
    key: str
    prompt: str
    number: int
    write: Callable[[Painting], None]
    done: bool


def write_geneval(
    metadata: Sequence[dict],
    outdir: str | Path,
    painter: Painter,
    samples: int = SAMPLES_PER_PROMPT,
    batch: int = 1,
    settings: Mapping[str, Any] | None = None,
    log: IO[str] | None = None,
    checkout: str = "<geneval-checkout>",
    detector: str = "<object-detector-folder>",
) -> GenerationRun:
    """Paint the prompts missing from ``outdir`` (``batch`` prompts per painter call); the scoring
    commands name the GenEval ``checkout`` and its ``detector`` folder."""
    run = GenerationRun(Path(outdir))
    jobs = []
    for number, record in enumerate(metadata):
        folder = run.outdir / f"{number:05d}"
        pngs = [folder / "samples" / f"{i:04d}.png" for i in range(samples)]
        write = partial(_write_geneval_prompt, folder, pngs, record)
        jobs.append(_Job(folder.name, record["prompt"], number, write, all(p.is_file() for p in pngs)))
    _paint_all(run, jobs, painter, samples, batch, settings or {}, log or sys.stderr)
    run.scores = run.outdir.with_name(run.outdir.name + "_results.jsonl")
    run.commands, run.missing = geneval_commands(run.outdir, run.scores, checkout, detector), _missing(GENEVAL_PACKAGES)
    return run


def _write_geneval_prompt(folder: Path, pngs: list[Path], record: dict, painting: Painting) -> None:
    (folder / "samples").mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / "metadata.jsonl", json.dumps(record) + "\n")
    for image, png in zip(painting[0], pngs):
        write_atomically(png, partial(image.save, format="PNG"))


def check_dpg_samples(samples: int) -> None:
    """DPG-Bench's scorer crops a fixed 2x2 grid: 1 to 4 samples per prompt."""
    if not 1 <= samples <= DPG_MAX_SAMPLES:
        raise ValueError(
            f"--samples-per-prompt {samples}: DPG-Bench takes at most {DPG_MAX_SAMPLES} (a 2x2 grid), at least 1"
        )


def write_dpg(
    prompts: Mapping[str, str],
    outdir: str | Path,
    painter: Painter,
    samples: int = SAMPLES_PER_PROMPT,
    batch: int = 1,
    settings: Mapping[str, Any] | None = None,
    log: IO[str] | None = None,
    checkout: str = "<ELLA-checkout>",
) -> GenerationRun:
    """Paint the prompts missing from ``outdir``, one 2x2 grid PNG each (at most 4 samples); the scoring
    command names ELLA's ``checkout``."""
    check_dpg_samples(samples)
    run = GenerationRun(Path(outdir))
    jobs = []
    for number, (stem, prompt) in enumerate(prompts.items()):
        png = run.outdir / f"{stem}.png"
        write = partial(_write_dpg_prompt, png)
        jobs.append(_Job(stem, prompt, number, write, png.is_file()))
    _paint_all(run, jobs, painter, samples, batch, settings or {}, log or sys.stderr)
    run.scores = run.outdir.with_name(run.outdir.name + "_results.txt")
    run.commands = dpg_commands(run.outdir, run.scores, samples, _tile_size(run.outdir, prompts), checkout)
    run.missing = _missing(DPG_PACKAGES)
    return run


def _tile_size(outdir: Path, prompts: Mapping[str, str]) -> int:
    """One sample's width in the grids (the scorer's ``--resolution``), from the first grid."""
    with Image.open(outdir / f"{next(iter(prompts))}.png") as grid:
        return grid.width // GRID_COLUMNS


def _write_dpg_prompt(png: Path, painting: Painting) -> None:
    write_atomically(png, partial(image_grid(painting[0], GRID_COLUMNS).save, format="PNG"))


def _paint_all(
    run: GenerationRun,
    jobs: list[_Job],
    painter: Painter,
    samples: int,
    batch: int,
    settings: Mapping[str, Any],
    log: IO[str],
) -> None:
    """Paint the jobs not done (or done without recorded seeds, or for another prompt text: a prompt file
    that changed), ``batch`` at a time, recording seeds and prompts after each batch so that a kill loses
    one batch at most."""
    run.outdir.mkdir(parents=True, exist_ok=True)
    with exclusive(run.outdir):  # a second run on the folder would paint the same prompts again
        _paint_locked(run, jobs, painter, samples, batch, settings, log)


def _paint_locked(
    run: GenerationRun,
    jobs: list[_Job],
    painter: Painter,
    samples: int,
    batch: int,
    settings: Mapping[str, Any],
    log: IO[str],
) -> None:
    path = record_path(run.outdir)
    record = {"settings": json.loads(json.dumps(dict(settings))), "seeds": {}, "prompts": {}}
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            stored["settings"], stored["seeds"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a record of this program ({error}): remove it to paint again") from None
        if message := settings_mismatch(run.outdir, stored["settings"], record["settings"]):
            raise ValueError(message)
        record["seeds"], record["prompts"] = stored["seeds"], stored.get("prompts", {})
    todo = [
        job
        for job in jobs
        if not (job.done and job.key in record["seeds"] and record["prompts"].get(job.key) == job.prompt)
    ]
    run.resumed = len(jobs) - len(todo)
    progress = ProgressLine(f"{run.outdir.name} prompts", max(batch, len(todo) // 20), log)
    pending = iter(todo)
    while chunk := list(islice(pending, batch)):
        paintings = painter([(job.prompt, job.number) for job in chunk])
        for job, painting in zip(chunk, paintings, strict=True):
            images, seeds = painting
            if len(images) != samples or len(seeds) != samples:
                raise ValueError(
                    f"painter gave {len(images)} images and {len(seeds)} seeds for prompt {job.number}, want {samples}"
                )
            job.write(painting)
            record["seeds"][job.key] = list(seeds)
            record["prompts"][job.key] = job.prompt
        write_results(path, record)
        run.painted += len(chunk)
        rate = progress.rate(run.painted)
        progress.update(
            run.painted, run.resumed + run.painted, lambda rate=rate: f"{rate:.3f} prompts/s", run.painted / len(todo)
        )
    if not path.is_file():
        write_results(path, record)


def geneval_commands(
    outdir: Path, scores: Path, checkout: str = "<geneval-checkout>", detector: str = "<object-detector-folder>"
) -> list[str]:
    """GenEval's scoring (its README's two steps): ``evaluate_images.py IMAGEDIR --outfile --model-path``
    from the checkout's root (detector weights: ``evaluation/download_models.sh``; it asserts CUDA), then
    ``summary_scores.py``, which opens ``object_names.txt`` from the working directory: run it from
    ``evaluation/``."""
    outdir, scores = outdir.resolve(), scores.resolve()
    return [
        f"cd {shlex.quote(checkout)} && python evaluation/evaluate_images.py {shlex.quote(str(outdir))} "
        f"--outfile {shlex.quote(str(scores))} --model-path {shlex.quote(detector)}",
        f"cd {shlex.quote(checkout)}/evaluation && python summary_scores.py {shlex.quote(str(scores))}",
    ]


def dpg_commands(
    outdir: Path, scores: Path, samples: int, resolution: int, checkout: str = "<ELLA-checkout>"
) -> list[str]:
    """DPG-Bench's scoring as ELLA's ``dpg_bench/dist_eval.sh`` runs it, on one process: from the checkout's
    root (``--csv`` defaults to ``./dpg_bench/dpg_bench.csv``); ``--resolution`` is one tile's size;
    ``--res-path`` outside the image folder (its default lies inside, where the scorer lists images)."""
    outdir, scores = outdir.resolve(), scores.resolve()
    return [
        f"cd {shlex.quote(checkout)} && accelerate launch --num_machines 1 --num_processes 1 "
        '--mixed_precision "fp16" dpg_bench/compute_dpg_bench.py '
        f"--image-root-path {shlex.quote(str(outdir))} --resolution {resolution} --pic-num {samples} "
        f"--vqa-model mplug --res-path {shlex.quote(str(scores))}"
    ]


class ScorerError(RuntimeError):
    """A scorer command failed (the images are complete: run it again by hand or with --run-scorers)."""


def run_commands(commands: Sequence[str], log: IO[str] | None = None) -> None:
    """Run scorer commands in a shell, in order; a failing one is an error naming it."""
    for command in commands:
        print(f"[scorer] {command}", file=log or sys.stderr, flush=True)
        if subprocess.run(command, shell=True).returncode:
            raise ScorerError(f"scorer command failed: {command}")


def read_geneval_scores(path: Path) -> dict:
    """GenEval's summary from ``evaluate_images.py``'s jsonl, computed as ``summary_scores.py`` does:
    per task (``tag``) the share of correct images, ``overall`` the mean over tasks, in [0, 1]."""
    by_tag: dict[str, list[bool]] = defaultdict(list)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
                by_tag[record["tag"]].append(bool(record["correct"]))
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not a GenEval result line ({error})") from None
    if not by_tag:
        raise ValueError(f"{path}: no GenEval results")
    tasks = {tag: sum(hits) / len(hits) for tag, hits in by_tag.items()}
    return {"overall": sum(tasks.values()) / len(tasks), "tasks": tasks, "images": sum(map(len, by_tag.values()))}


def read_dpg_scores(path: Path) -> dict:
    """``compute_dpg_bench.py``'s summary at the end of its ``--res-path`` file: ``DPG-Bench score`` and the
    L1/L2 category scores (percent)."""
    result: dict[str, Any] = {"l1": {}, "l2": {}}
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("DPG-Bench score:"):
            result["score"] = float(line.partition(":")[2])
        elif line.startswith(("L1 category scores:", "L2 category scores:")):
            section = line[:2].lower()
        elif section and line.startswith("\t"):
            name, _, value = line.strip().rpartition(":")
            result[section][name] = float(value)
        else:
            section = None
    if "score" not in result:
        raise ValueError(f"{path}: no 'DPG-Bench score:' line (did compute_dpg_bench.py finish?)")
    return result


def _missing(modules: Sequence[str]) -> list[str]:
    return [m for m in modules if not has_module(m)]
