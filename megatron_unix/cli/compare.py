"""The paper's Table 4 from one command: the shared transformer, HardMoE, MoT and Uni-X trained on the
same data at one token budget, exported, evaluated and reported side by side.

    python tools/compare.py                                   # tiny preset, shipped data, CPU: minutes
    python tools/compare.py --hf-dir Qwen2.5-1.5B --data-path 0.6 data/text 0.4 data/pairs \\
        --seq-length 8192 --global-batch-size 256 --train-iters 20000 --lr 1e-4 --min-lr 1e-5 \\
        --train-args='--bf16 --use-distributed-optimizer' --launcher 'torchrun --nproc-per-node 8' \\
        --grad-text-data data/text --grad-mm-data data/pairs \\
        --text-args='--tasks mmlu' --output-dir compare-1.5b [--slurm --sbatch-args='--gres=gpu:8 --time=48:00:00']

Each variant starts from the text LLM (--hf-dir, through import-hf) or from scratch (--model-preset), and
trains with the same data, batches, schedule and iterations. Then each is exported (export-hf) and
evaluated: tools/evaluate.py loss always; text, understanding and generation when --text-args,
--understanding-args, --generation-args give their data (passed on to that subcommand), otherwise
skipped with the reason in the report. analyze_gradients.py then measures the gradient conflict of
the four final checkpoints (the paper's Figure 2), and OUTPUT_DIR gets report.md and report.json (the
paper's Table 4 with the four beside the paper's rows; parameters, throughput and losses per variant),
losses.png and grad_conflict.png. Every program's output is in OUTPUT_DIR/logs.

Stopped (SIGTERM, Ctrl-C), the same command resumes: finished steps (OUTPUT_DIR/steps) are kept, training
resumes from its last checkpoint. A rerun with other settings is refused, naming them. --slurm submits
a job per stage (data, each variant, then the report after the four). Exit status: 0 ok, 1 a program
failed (its log is named), 2 refused (a flag or file, named), 128+N stopped by signal N.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_unix.cli import Interrupted, missing_path, not_a_folder, refuse_out_of_range, stop_on_signals

if TYPE_CHECKING:  # the plan imports the package: imported after the flags are parsed
    from megatron_unix.comparison.plan import Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("--output-dir", type=Path, default=Path("compare-output"), help="default: ./compare-output")
    model = p.add_argument_group("the models")
    start = model.add_mutually_exclusive_group()
    start.add_argument("--model-preset", help="train from scratch at this preset (default: tiny)")
    start.add_argument("--hf-dir", help="the text LLM every variant starts from (Qwen2/2.5, Qwen3)")
    model.add_argument("--vision-encode-layers", type=int, default=1, help="Uni-X's N (default: 1)")
    model.add_argument("--vision-decode-layers", type=int, default=1, help="Uni-X's M (default: 1)")
    model.add_argument("--decoder-sparse-step", type=int, default=2, help="HardMoE's K (default: 2)")
    data = p.add_argument_group("data (default: the shipped quickstart data, prepared under OUTPUT_DIR)")
    data.add_argument("--data-path", nargs="+", help="dataset prefixes, optionally weighted: 0.6 a 0.4 b")
    data.add_argument("--tokenizer-model", help="the data's tokenizer (default: --hf-dir's)")
    data.add_argument("--split", default="90,10,0", help="train,valid,test weights (default: 90,10,0)")
    train = p.add_argument_group("training, the same for the four")
    train.add_argument("--seq-length", type=int, default=1152)
    train.add_argument("--micro-batch-size", type=int, default=1)
    train.add_argument("--global-batch-size", type=int, default=4)
    train.add_argument("--train-iters", type=int, default=80)
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--min-lr", type=float, default=2e-4)
    train.add_argument("--lr-warmup-iters", type=int, help="default: a tenth of --train-iters")
    train.add_argument("--eval-iters", type=int, default=2, help="validation batches, at the end of training")
    train.add_argument("--log-interval", type=int, default=5)
    train.add_argument("--save-interval", type=int, help="default: a checkpoint at the end (and on SIGTERM)")
    train.add_argument("--seed", type=int, default=1234)
    train.add_argument(
        "--train-args",
        default="",
        help="more pretrain_unix.py flags, e.g. --train-args='--bf16' (with '=': the value starts with --)",
    )
    train.add_argument(
        "--launcher",
        help="what runs pretrain, evaluate loss and analyze_gradients before '-m MODULE', e.g. "
        "'torchrun --nproc-per-node 8' or 'srun python' (default: this python)",
    )
    evaluation = p.add_argument_group("evaluation and analysis")
    for family in ("text", "understanding", "generation"):
        evaluation.add_argument(
            f"--{family}-args", help=f"flags of tools/evaluate.py {family}, e.g. --{family}-args='...' (runs it)"
        )
    evaluation.add_argument("--grad-batches", type=int, default=4, help="analyze_gradients --batches (default: 4)")
    evaluation.add_argument("--grad-text-data", nargs="+", help="text-only prefixes (default: the quickstart's)")
    evaluation.add_argument("--grad-mm-data", nargs="+", help="image-text prefixes (default: the quickstart's)")
    run = p.add_argument_group("where it runs")
    run.add_argument("--only", help="one stage: data, shared, hardmoe, mot, unix or report (what a slurm job runs)")
    run.add_argument("--slurm", action="store_true", help="submit a job per stage instead of running here")
    run.add_argument("--sbatch-args", default="", help="#SBATCH lines of every job, e.g. '--gres=gpu:8 --time=1-0'")
    return p


def _absolute(paths: Sequence[str] | None) -> list[str] | None:
    """Prefixes as absolute paths (weights, which are numbers, as given): the jobs may start elsewhere."""
    if paths is None:
        return None
    return [word if _is_number(word) else str(Path(word).resolve()) for word in paths]


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def settings_of(p: argparse.ArgumentParser, args: argparse.Namespace) -> Settings:
    """The recorded settings, refusing what cannot work (through ``p.error``)."""
    from megatron_unix.comparison.plan import QUICKSTART_DATA, STAGES, Settings

    positive = ("seq_length", "micro_batch_size", "global_batch_size", "train_iters", "eval_iters", "log_interval")
    refuse_out_of_range(
        p,
        args,
        [(f"--{name.replace('_', '-')}", getattr(args, name) >= 1) for name in (*positive, "grad_batches")]
        + [("--save-interval", args.save_interval is None or args.save_interval >= 1)]
        + [
            (f"--{n}", getattr(args, n.replace("-", "_")) >= 0)
            for n in ("vision-encode-layers", "vision-decode-layers")
        ]
        + [("--decoder-sparse-step", args.decoder_sparse_step >= 1), ("--lr", args.lr > 0)],
    )
    if args.hf_dir and not args.data_path:
        p.error("--hf-dir needs --data-path: datasets made with its tokenizer (the quickstart data has its own)")
    if args.data_path and not (args.tokenizer_model or args.hf_dir):
        p.error("--data-path needs --tokenizer-model (the tokenizer the datasets were made with)")
    if args.only and args.only not in STAGES:
        p.error(f"--only {args.only}: one of {', '.join(STAGES)}")
    if bool(args.grad_text_data) != bool(args.grad_mm_data):
        p.error("--grad-text-data and --grad-mm-data go together")
    if message := missing_path([("--hf-dir", args.hf_dir), ("--tokenizer-model", args.tokenizer_model)]):
        p.error(message)
    if message := not_a_folder("--output-dir", args.output_dir):
        p.error(message)
    if not args.data_path and not QUICKSTART_DATA.is_dir():
        p.error(f"the quickstart data ({QUICKSTART_DATA}) ships with the source tree only: give --data-path")
    for flag in ("--train-args", "--text-args", "--understanding-args", "--generation-args", "--sbatch-args"):
        try:
            shlex.split(getattr(args, flag[2:].replace("-", "_")) or "")
        except ValueError as error:
            p.error(f"{flag}: {error}")
    resolved = {
        "model_preset": None if args.hf_dir else args.model_preset or "tiny",
        "hf_dir": str(Path(args.hf_dir).resolve()) if args.hf_dir else None,
        "data_path": _absolute(args.data_path),
        "tokenizer_model": str(Path(args.tokenizer_model).resolve()) if args.tokenizer_model else None,
        "lr_warmup_iters": args.train_iters // 10 if args.lr_warmup_iters is None else args.lr_warmup_iters,
        "grad_text_data": _absolute(args.grad_text_data),
        "grad_mm_data": _absolute(args.grad_mm_data),
    }
    return Settings(
        **{
            f.name: resolved[f.name] if f.name in resolved else getattr(args, f.name)
            for f in dataclasses.fields(Settings)
        }
    )


def job_argv(argv: Sequence[str]) -> list[str]:
    """The command line of a slurm job: this one without --slurm, --sbatch-args and --only."""
    kept, skip = [], False
    for word in argv:
        name = word.split("=", 1)[0]
        if skip or name == "--slurm":
            skip = False
        elif name in ("--sbatch-args", "--only"):
            skip = "=" not in word
        else:
            kept.append(word)
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = build_parser()
    args = p.parse_args(argv)
    settings = settings_of(p, args)
    from megatron_unix.comparison.plan import STAGES, VARIANTS, Layout, build_plan
    from megatron_unix.comparison.report import write_report
    from megatron_unix.comparison.runner import Runner, StepFailed, check_settings, finished, stopped_line, submit_slurm

    layout = Layout(args.output_dir.resolve())
    launcher = shlex.split(args.launcher) if args.launcher else [sys.executable]
    runner = Runner(layout)
    try:
        with stop_on_signals():
            check_settings(layout, settings)
            steps = build_plan(settings, layout, launcher)
            stages = [args.only] if args.only else [s for s in STAGES if s != "data" or not settings.data_path]
            if args.slurm:
                submit_slurm(layout, job_argv(argv), args.sbatch_args, stages)
                return 0
            for stage in stages:
                if stage == "report":
                    unfinished = [
                        s.name for s in steps if s.stage in VARIANTS and not s.skip and not finished(layout, s)
                    ]
                    if unfinished:
                        raise ValueError(f"the report needs the four variants; not finished: {', '.join(unfinished)}")
                runner.run_stage(stage, steps)
            if "report" in stages:
                report = write_report(settings, layout, steps)
                print(report.read_text(), end="")
                print(f"wrote {report}, {report.with_suffix('.json')} and the plots beside them")
    except Interrupted as stop:
        print(stopped_line(stop, runner, layout), file=sys.stderr)
        return stop.exit_status
    except StepFailed as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:
        print(f"compare: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
