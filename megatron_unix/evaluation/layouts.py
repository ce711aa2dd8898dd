"""Image folders laid out as the text-to-image scorers read them, and the commands that score them.

- GenEval (djghosh13/geneval): prompts from its ``prompts/evaluation_metadata.jsonl``; per prompt
  ``OUT/<00000>/metadata.jsonl`` (that prompt's metadata line) and ``OUT/<00000>/samples/<0000>.png``.
- DPG-Bench (ELLA's ``dpg_bench``): one prompt per ``prompts/<stem>.txt``; per prompt one PNG
  ``OUT/<stem>.png``, the samples as a 2x2 grid (the reference's ``--pic-num 4``).

The model is a ``Painter`` passed in, so this module knows nothing about generation. Every file is
written under a temporary name and renamed, and a prompt whose files exist is not painted again, so
a killed run resumes. The seeds of each prompt's samples go to ``OUT/seeds.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image

from megatron_unix.evaluation.report import write_results
from megatron_unix.files import write_atomically, write_text_atomically
from megatron_unix.inference.images import image_grid
from megatron_unix.platform import has_module

Painter = Callable[[str, int], tuple[list[Image.Image], list[int]]]
"""(prompt, prompt number) -> the prompt's sample images and the seed of each; the number lets the
painter derive per-sample seeds that do not depend on batching (``sampling.derived_seed``)."""
SAMPLES_PER_PROMPT = 4
GRID_COLUMNS = 2


@dataclass
class GenerationRun:
    outdir: Path
    painted: int = 0
    resumed: int = 0
    commands: list[str] = field(default_factory=list)
    """How to score the folder (run from the scorer's checkout)."""
    missing: list[str] = field(default_factory=list)
    """Python packages of the scorer that are not importable here: run ``commands`` where they are."""


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
    return records


def read_dpg_prompts(folder: str | Path) -> dict[str, str]:
    """DPG-Bench's prompt folder: ``{stem: prompt}`` of its ``*.txt`` files, sorted by stem."""
    files = sorted(Path(folder).glob("*.txt"))
    if not files:
        raise ValueError(f"{folder}: no DPG-Bench prompt files (*.txt)")
    return {f.stem: f.read_text(encoding="utf-8").strip() for f in files}


def write_geneval(
    metadata: Sequence[dict], outdir: str | Path, painter: Painter, samples: int = SAMPLES_PER_PROMPT
) -> GenerationRun:
    run = GenerationRun(Path(outdir))
    seeds = _read_seeds(run.outdir)
    for number, record in enumerate(metadata):
        folder = run.outdir / f"{number:05d}"
        pngs = [folder / "samples" / f"{i:04d}.png" for i in range(samples)]
        if folder.name in seeds and all(p.is_file() for p in pngs):
            run.resumed += 1
            continue
        images, seeds[folder.name] = _paint(painter, record["prompt"], number, samples)
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        write_text_atomically(folder / "metadata.jsonl", json.dumps(record) + "\n")
        for image, png in zip(images, pngs):
            write_atomically(png, partial(image.save, format="PNG"))
        write_results(run.outdir / "seeds.json", seeds)
        run.painted += 1
    run.commands, run.missing = geneval_commands(run.outdir), _missing(("mmdet", "open_clip", "clip_benchmark"))
    return run


def write_dpg(
    prompts: dict[str, str], outdir: str | Path, painter: Painter, samples: int = SAMPLES_PER_PROMPT
) -> GenerationRun:
    run = GenerationRun(Path(outdir))
    run.outdir.mkdir(parents=True, exist_ok=True)
    seeds = _read_seeds(run.outdir)
    for number, (stem, prompt) in enumerate(prompts.items()):
        png = run.outdir / f"{stem}.png"
        if stem in seeds and png.is_file():
            run.resumed += 1
            continue
        images, seeds[stem] = _paint(painter, prompt, number, samples)
        write_atomically(png, partial(image_grid(images, GRID_COLUMNS).save, format="PNG"))
        write_results(run.outdir / "seeds.json", seeds)
        run.painted += 1
    run.commands, run.missing = dpg_commands(run.outdir, samples), _missing(("modelscope",))
    return run


def geneval_commands(outdir: Path, detector: str = "<object-detector-folder>") -> list[str]:
    """GenEval's scoring, from its checkout (detector weights: its ``evaluation/download_models.sh``)."""
    return [
        f'python evaluation/evaluate_images.py "{outdir}" --outfile "{outdir}/results.jsonl" --model-path "{detector}"',
        f'python evaluation/summary_scores.py "{outdir}/results.jsonl"',
    ]


def dpg_commands(outdir: Path, samples: int = SAMPLES_PER_PROMPT, resolution: int = 512) -> list[str]:
    """DPG-Bench's scoring, from ELLA's ``dpg_bench`` folder (the reference's flags)."""
    return [
        "accelerate launch --num_processes 1 --mixed_precision fp16 compute_dpg_bench.py "
        f'--image-root-path "{outdir}" --resolution {resolution} --pic-num {samples}'
    ]


def _paint(painter: Painter, prompt: str, number: int, samples: int) -> tuple[list[Image.Image], list[int]]:
    images, seeds = painter(prompt, number)
    if len(images) != samples or len(seeds) != samples:
        raise ValueError(
            f"painter gave {len(images)} images and {len(seeds)} seeds for prompt {number}, want {samples}"
        )
    return images, list(seeds)


def _read_seeds(outdir: Path) -> dict[str, list[int]]:
    path = outdir / "seeds.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _missing(modules: Sequence[str]) -> list[str]:
    return [m for m in modules if not has_module(m)]
