"""Text-to-image benchmarks on a loaded model: a :data:`layouts.Painter` from spec §6 generation (CFG,
then VQ ids only, per-sample seeds) and the VQGAN decoder, the GenEval / DPG-Bench folders painted
through it, and their scores when the scorers run here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from megatron_unix.evaluation import layouts
from megatron_unix.inference.generate import generate_images, t2i_prompt, unconditional_prompt
from megatron_unix.inference.images import decode_codes
from megatron_unix.inference.loading import LoadedModel
from megatron_unix.inference.sampling import SamplingParams, derived_seed

GENEVAL_FOLDER = "geneval"
DPG_FOLDER = "dpg"


@dataclass(frozen=True)
class Options:
    params: SamplingParams
    cfg_scale: float = 4.0
    """Spec §6: the reference's evaluation scale."""
    seed: int = 1234
    samples: int = layouts.SAMPLES_PER_PROMPT
    prompts_per_batch: int = 4
    limit: int | None = None


@dataclass(frozen=True)
class Scorers:
    """Where the scorers are (placeholders in the printed commands when unknown)."""

    geneval_checkout: str = "<geneval-checkout>"
    geneval_detector: str = "<object-detector-folder>"
    dpg_checkout: str = "<ELLA-checkout>"


def painter(loaded: LoadedModel, vqgan: Any, options: Options) -> layouts.Painter:
    """Sample i of prompt number p draws from ``derived_seed(seed, p, i)``: the same images whatever the
    batching, and again on a rerun."""
    tok, layout = loaded.tokenizer, loaded.layout
    unconditional = unconditional_prompt(tok, layout)
    n = options.samples

    def paint(requests: Sequence[tuple[str, int]]) -> list[layouts.Painting]:
        seeds = [[derived_seed(options.seed, number, i) for i in range(n)] for _, number in requests]
        tokens = generate_images(
            loaded.model,
            layout,
            [t2i_prompt(tok, layout, prompt) for prompt, _ in requests for _ in range(n)],
            unconditional,
            options.params,
            [seed for prompt_seeds in seeds for seed in prompt_seeds],
            cfg_scale=options.cfg_scale,
            codes_per_image=vqgan.codes_per_image,
        )
        images = decode_codes(vqgan, [layout.codes(t) for t in tokens])
        return [(images[k * n : (k + 1) * n], seeds[k]) for k in range(len(requests))]

    return paint


def paint_benchmarks(
    loaded: LoadedModel,
    vqgan: Any,
    options: Options,
    output_dir: Path,
    settings: dict[str, Any],
    scorers: Scorers,
    geneval: list[dict] | None = None,
    dpg: dict[str, str] | None = None,
    log: IO[str] | None = None,
) -> dict[str, layouts.GenerationRun]:
    """The folders of the benchmarks given (``OUTPUT_DIR/geneval``, ``OUTPUT_DIR/dpg``), resumed where
    they stopped; ``settings`` (checkpoint, sampling, VQGAN...) must match those of an earlier run."""
    paint = painter(loaded, vqgan, options)
    settings = {**settings, "cfg_scale": options.cfg_scale, "seed": options.seed, "samples": options.samples}
    settings |= {k: getattr(options.params, k) for k in ("temperature", "top_k", "top_p", "greedy")}
    common = dict(samples=options.samples, batch=options.prompts_per_batch, settings=settings, log=log)
    runs = {}
    if geneval is not None:
        folder = output_dir / GENEVAL_FOLDER
        where = dict(checkout=scorers.geneval_checkout, detector=scorers.geneval_detector)
        runs["geneval"] = layouts.write_geneval(geneval[: options.limit], folder, paint, **common, **where)
    if dpg is not None:
        prompts = dict(list(dpg.items())[: options.limit])
        runs["dpg"] = layouts.write_dpg(
            prompts, output_dir / DPG_FOLDER, paint, **common, checkout=scorers.dpg_checkout
        )
    return runs


def score(runs: dict[str, layouts.GenerationRun], run_scorers: bool, log: IO[str] | None = None) -> dict[str, dict]:
    """The results.json section: per benchmark its folder and scorer commands, and the scores: read back
    when the scorer's output is newer than every image (nothing painted since), else computed when
    ``run_scorers`` and the scorer's packages are importable here (else ``"scored": false``)."""
    section = {}
    for name, run in runs.items():
        entry: dict[str, Any] = {"folder": str(run.outdir.resolve()), "commands": run.commands, "scored": False}
        if run.missing:
            entry["missing_packages"] = run.missing
        read = layouts.read_geneval_scores if name == "geneval" else layouts.read_dpg_scores
        record = layouts.record_path(run.outdir)
        if run.painted == 0 and run.scores.is_file() and run.scores.stat().st_mtime >= record.stat().st_mtime:
            entry |= read(run.scores) | {"scored": True}
        elif run_scorers and not run.missing:
            layouts.run_commands(run.commands, log)
            entry |= read(run.scores) | {"scored": True}
        section[name] = entry
    return section
