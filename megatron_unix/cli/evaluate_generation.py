"""``tools/evaluate.py generation``: GenEval and DPG-Bench images painted with spec §6 generation (CFG
scale 4.0, temperature 0.99, top-k 4096, top-p 0.96 by default; each sample's seed derived from --seed,
the prompt's number and the sample's), laid out as the scorers read them under ``OUTPUT_DIR/geneval`` and
``OUTPUT_DIR/dpg``. A rerun paints only the prompts missing and refuses other settings.

The scorers need their own checkouts and packages (GenEval: mmdet, open_clip, clip_benchmark and a GPU;
DPG-Bench: ELLA's repository, modelscope, accelerate). With --run-scorers and those importable here, the
commands run and the scores go to results.json's ``generation`` section (GenEval ``overall`` in [0, 1],
DPG-Bench ``score`` in percent); otherwise the commands are printed and recorded there, ``"scored": false``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_unix.cli import add_model_arguments, add_vqgan_arguments, out_of_range, sampling_checks
from megatron_unix.cli.evaluate import (
    add_output_arguments,
    check_model_flags,
    check_paths,
    checkpoint_record,
    load_models,
    model_settings,
)
from megatron_unix.cli.generate import T2I_SAMPLING

HELP = "GenEval / DPG-Bench images with CFG (spec §6), laid out for their scorers; scored where they run"
KEPT = "the images painted so far are kept under {output_dir}: the same command resumes after them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--geneval-prompts", type=Path, help="GenEval's prompts/evaluation_metadata.jsonl")
    parser.add_argument("--dpg-prompts", type=Path, help="DPG-Bench's prompt folder (ELLA's dpg_bench/prompts)")
    parser.add_argument("--limit", type=int, help="only the first N prompts of each benchmark (a rerun extends it)")
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="GenEval: 4; DPG-Bench: 1 to 4 (a 2x2 grid)")
    parser.add_argument("--prompts-per-batch", type=int, default=4, help="x samples x 2 (CFG) rows per forward")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale s (spec §6: 4.0 in evaluation)")
    parser.add_argument("--temperature", type=float, default=T2I_SAMPLING["temperature"])
    parser.add_argument("--top-k", type=int, default=T2I_SAMPLING["top_k"], help="0: off")
    parser.add_argument("--top-p", type=float, default=T2I_SAMPLING["top_p"], help="1: off")
    add_vqgan_arguments(parser)
    scorers = parser.add_argument_group("scorers")
    scorers.add_argument("--run-scorers", action="store_true", help="run the scorers here when their packages are")
    scorers.add_argument("--geneval-repo", type=Path, help="checkout of djghosh13/geneval")
    scorers.add_argument("--geneval-detector", type=Path, help="its Mask2Former folder (evaluation/download_models.sh)")
    scorers.add_argument("--dpg-repo", type=Path, help="checkout of TencentQQGYLab/ELLA (dpg_bench/)")
    add_output_arguments(parser)


def check(args: argparse.Namespace) -> None:
    """Everything that can be refused before a model is loaded, naming the flag."""
    if args.geneval_prompts is None and args.dpg_prompts is None:
        raise ValueError("give --geneval-prompts and/or --dpg-prompts")
    checks = (
        ("--limit", args.limit is None or args.limit >= 1),
        ("--samples-per-prompt", args.samples_per_prompt >= 1),
        ("--prompts-per-batch", args.prompts_per_batch >= 1),
        *sampling_checks(args),
    )
    if message := out_of_range(args, checks):
        raise ValueError(message)
    check_model_flags(args)
    check_paths(args, ("--geneval-prompts", "--dpg-prompts", "--geneval-repo", "--geneval-detector", "--dpg-repo"))
    if args.run_scorers:
        needed = [("--geneval-repo", args.geneval_prompts), ("--geneval-detector", args.geneval_prompts)]
        needed.append(("--dpg-repo", args.dpg_prompts))
        for flag, benchmark in needed:
            if benchmark is not None and getattr(args, flag[2:].replace("-", "_")) is None:
                raise ValueError(f"--run-scorers needs {flag}")


def run(args: argparse.Namespace) -> int:
    from megatron_unix.evaluation import generation, layouts
    from megatron_unix.evaluation.results import update_results
    from megatron_unix.inference.sampling import SamplingParams

    try:
        check(args)
        geneval = layouts.read_geneval_prompts(args.geneval_prompts) if args.geneval_prompts else None
        dpg = layouts.read_dpg_prompts(args.dpg_prompts) if args.dpg_prompts else None
        if dpg is not None:
            layouts.check_dpg_samples(args.samples_per_prompt)
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        record = checkpoint_record(args)
        loaded, vqgan = load_models(args)
        options = generation.Options(
            params, args.cfg_scale, args.seed, args.samples_per_prompt, args.prompts_per_batch, args.limit
        )
        given = dict(geneval_checkout=args.geneval_repo, geneval_detector=args.geneval_detector)
        given["dpg_checkout"] = args.dpg_repo
        scorers = generation.Scorers(**{k: str(v.resolve()) for k, v in given.items() if v is not None})
        settings = model_settings(args, record, vqgan)
        runs = generation.paint_benchmarks(loaded, vqgan, options, args.output_dir, settings, scorers, geneval, dpg)
        section = generation.score(runs, args.run_scorers)
        update_results(args.output_dir, "generation", section, record, merge=True)
    except (ValueError, OSError) as error:
        print(f"evaluate generation: error: {error}", file=sys.stderr)
        return 2
    except layouts.ScorerError as error:  # the images are complete
        print(f"evaluate generation: error: {error}", file=sys.stderr)
        return 1
    for name, entry in section.items():
        painted = runs[name]
        print(
            f"[generation] {name}: {painted.painted} prompts painted, {painted.resumed} resumed: {painted.outdir}",
            file=sys.stderr,
        )
        if entry["scored"]:
            print(f"{name}: {entry['overall'] if name == 'geneval' else entry['score']:.4g}")
            continue
        why = f"packages missing here: {', '.join(painted.missing)}" if painted.missing else "not run (--run-scorers)"
        print(f"{name}: not scored ({why}); score with:")
        for command in entry["commands"]:
            print(f"  {command}")
    return 0
