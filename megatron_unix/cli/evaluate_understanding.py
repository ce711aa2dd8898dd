"""``tools/evaluate.py understanding``: VLMEvalKit's MME, POPE, MMBench and SEED from local TSVs, answered
greedily and read one of two ways (--scoring): as the reference's ``eval_vqa.py`` read them for the paper,
or as VLMEvalKit's exact matching reads them.

Answers go to ``OUTPUT_DIR/answers.jsonl`` as they come; a rerun answers only what is missing (a larger
--limit extends a run), and refuses a cache made with another checkpoint, tokenizer, VQGAN, prompt style
or --max-new-tokens. Scores go to results.json's ``understanding`` section by benchmark (VLMEvalKit's file
names: MMBench_DEV_EN, SEEDBench_IMG...), merged with benchmarks scored earlier.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from megatron_unix.cli import add_model_arguments, add_vqgan_arguments, out_of_range
from megatron_unix.cli.evaluate import (
    add_output_arguments,
    check_model_flags,
    checkpoint_record,
    load_models,
    model_settings,
)

HELP = "VLMEvalKit understanding benchmarks (MME, POPE, MMBench, SEED) from local TSVs, greedy answers"
ANSWERS = "answers.jsonl"
KEPT = "the answers so far are in {output_dir}/" + ANSWERS + ": the same command resumes after them"
ALIASES = {"MMBench": "MMBench_DEV_EN", "MMBench_CN": "MMBench_DEV_CN", "SEED": "SEEDBench_IMG"}
"""Short names the flag takes; results use VLMEvalKit's file names."""
DEFAULT_BENCHMARKS = "MME,POPE,MMBench_DEV_EN,SEEDBench_IMG"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--benchmark-dir", type=Path, required=True, help="folder of VLMEvalKit TSVs (MME.tsv, ...)")
    parser.add_argument(
        "--benchmarks",
        default=DEFAULT_BENCHMARKS,
        help=f"comma-separated VLMEvalKit names (short: {', '.join(ALIASES)}); default {DEFAULT_BENCHMARKS}",
    )
    parser.add_argument("--limit", type=int, help="only the first N questions of each benchmark (a rerun extends it)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per forward batch")
    parser.add_argument(
        "--scoring",
        choices=("reference", "vlmevalkit"),
        default="reference",
        help="how answers are prompted, capped and read. reference (default): as the reference's "
        "evaluation/eval_vqa.py did for the paper's numbers (its prompts, at most 3 new tokens, first A-D "
        "anywhere, unclear yes/no read as no, SEED as the mean of its categories), the only reading "
        "comparable with the paper's table; vlmevalkit: VLMEvalKit's prompt and exact-matching rules, "
        "comparable with the VLMEvalKit leaderboards, not with the paper",
    )
    parser.add_argument(
        "--prompt-style", choices=("reference", "vlmevalkit", "llava"), help="default: that of --scoring"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help="answer length cap (greedy); default 3 under --scoring reference, else 16"
    )
    parser.add_argument(
        "--skip-bad-rows", action="store_true", help="leave out (and count) rows or images that cannot be read"
    )
    add_vqgan_arguments(parser)
    add_output_arguments(parser)


def benchmark_names(flag: str) -> list[str]:
    from megatron_unix.evaluation.benchmarks import BENCHMARKS

    names = [ALIASES.get(name.strip(), name.strip()) for name in flag.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown or not names:
        raise ValueError(f"--benchmarks {flag}: unknown {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace) -> int:
    from megatron_unix.evaluation import understanding
    from megatron_unix.evaluation.benchmarks import load_benchmark
    from megatron_unix.evaluation.report import AnswerCache
    from megatron_unix.evaluation.results import update_results

    args.prompt_style = args.prompt_style or args.scoring
    if args.max_new_tokens is None:
        args.max_new_tokens = understanding.MAX_NEW_TOKENS[args.scoring]
    try:
        names = benchmark_names(args.benchmarks)
        checks = (
            ("--limit", args.limit is None or args.limit >= 1),
            ("--batch-size", args.batch_size >= 1),
            ("--max-new-tokens", args.max_new_tokens >= 1),
        )
        if message := out_of_range(args, checks):
            raise ValueError(message)
        check_model_flags(args)
        if not args.benchmark_dir.is_dir():
            raise ValueError(f"--benchmark-dir {args.benchmark_dir}: no such directory")
        benchmarks = [load_benchmark(args.benchmark_dir, name, args.skip_bad_rows) for name in names]
        record = checkpoint_record(args)
        loaded, vqgan = load_models(args)
        settings = model_settings(args, record, vqgan)
        settings |= {"prompts": understanding.PROMPTS, "prompt_style": args.prompt_style}
        settings |= {"max_new_tokens": args.max_new_tokens}
        options = understanding.Options(
            args.scoring, args.prompt_style, args.max_new_tokens, args.batch_size, args.limit, args.skip_bad_rows
        )
        with AnswerCache(args.output_dir / ANSWERS, settings) as cache:
            values = understanding.evaluate(loaded, vqgan, benchmarks, cache, options)
        update_results(args.output_dir, "understanding", values, record, merge=True)
    except (ValueError, OSError) as error:
        print(f"evaluate understanding: error: {error}", file=sys.stderr)
        return 2
    for bench in benchmarks:
        for reason in bench.skipped[:5]:
            print(f"[understanding] skipped {reason}", file=sys.stderr)
    for name, scores in values.items():
        print(f"{name}: {summary_line(scores)}")
    return 0


def summary_line(scores: dict[str, Any]) -> str:
    """The top-level numbers of a scorer's output (and those of its ``overall`` record)."""
    flat = {**scores, **(scores["overall"] if isinstance(scores.get("overall"), dict) else {})}
    return ", ".join(
        f"{key} {value:.2f}" if isinstance(value, float) else f"{key} {value}"
        for key, value in flat.items()
        if isinstance(value, (int, float))
    )
