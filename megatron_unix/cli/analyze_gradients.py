"""Gradient conflict between text and image-text data, per layer and weight group (spec §7).

    python tools/analyze_gradients.py --load ckpt/shared/iter_0010000 ckpt/unix/iter_0010000 \\
        --text-data data/text --mm-data data/pairs --batches 64 --output-dir analysis/grad
    torchrun --nproc-per-node 8 tools/analyze_gradients.py --load ckpt/unix --tensor-model-parallel-size 2 ...
    python tools/analyze_gradients.py --mode modality-loss --load ckpt/unix/iter_0000100 \\
        --data-path 0.5 data/text 0.5 data/pairs --batches 4 --output-dir analysis/cos

conflict (default): per checkpoint, the training-loss gradient summed over --batches text-only global
batches (g_text), over as many image-text ones (g_mm), and over the two halves A and B of their rows
shuffled together with --seed; similarity = cos(g_text, g_mm), baseline = cos(g_A, g_B), conflict =
-(similarity - baseline). Groups q, k, v, o, gate, up, down per layer and vision.q ... for the vision
copies of separated layers (their similarity is empty: text-only data gives them no gradient).
Writes grad_conflict.csv (checkpoint, group, layer, similarity, baseline, conflict), grad_conflict.json
and grad_conflict_GROUP.png (conflict against layer, a line per checkpoint).

modality-loss: on each of --batches global batches of --data-path, from --consumed-samples on (default:
the checkpoint's data position, so ``--load SAVE/iter_N`` measures the batch of iteration N+1 exactly
as pretrain_unix.py --grad-conflict-interval does), the cosine between the gradients of the text-target
and vision-target parts of the loss. Writes modality_cosine.csv (checkpoint, iteration, group, layer,
similarity) and modality_cosine.json.

Data, batch and sequence settings default to the (first) checkpoint's run, opened as training opens it
(training.from_checkpoint: the same flag checks, the tokenizer checked against every checkpoint, damaged
data refused). Runs at any TP/PP under torchrun (data parallel over the remaining ranks). Exit status:
0 ok, 2 refused (a flag or file, named).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_unix.cli import RUN_FLAGS, add_run_arguments, add_verify_argument, given_run_flags, out_of_range
from megatron_unix.files import write_text_atomically

if TYPE_CHECKING:
    from megatron_unix.training.from_checkpoint import CheckpointRun, StartingPoint
    from megatron_unix.training.run_config import RunSettings

MODES = ("conflict", "modality-loss")
CONFLICT_COLUMNS = ("checkpoint", "group", "layer", "similarity", "baseline", "conflict")
MODALITY_COLUMNS = ("checkpoint", "iteration", "group", "layer", "similarity")
MODE_FLAGS = {
    "conflict": ("--text-data", "--mm-data"),
    "modality-loss": ("--data-path", "--consumed-samples", "--split"),
}
"""The flags only one mode reads: given to the other, they are refused rather than ignored."""
GIVEN = (
    "seq_length",
    "micro_batch_size",
    "global_batch_size",
    "seed",
    "split",
    "tokenizer_model",
    "data_cache_path",
    "allow_unrecorded_vocabulary",
)
"""This tool's flags that replace the (first) checkpoint's recorded run's settings when given."""
RECORDED = ("seq_length", "micro_batch_size", "global_batch_size", "seed", "split", "tokenizer_model", "long_text")
"""The run settings the measurement reads, recorded with its results."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument(
        "--load", nargs="+", required=True, help="Megatron checkpoints: save directories or iter_* directories"
    )
    p.add_argument("--mode", choices=MODES, default="conflict", help="what to measure (default: conflict)")
    p.add_argument(
        "--text-data", nargs="+", help="conflict: text-only dataset prefixes, optionally weighted (w1 p1 w2 p2)"
    )
    p.add_argument("--mm-data", nargs="+", help="conflict: image-text dataset prefixes, optionally weighted")
    p.add_argument(
        "--data-path",
        nargs="+",
        help="modality-loss: dataset prefixes as pretrain_unix.py --data-path (default: the run's)",
    )
    p.add_argument("--batches", type=int, default=8, help="global batches per set (default: 8)")
    p.add_argument(
        "--consumed-samples", type=int, default=None, help="modality-loss: first sample (default: the checkpoint's)"
    )
    p.add_argument("--split", default=None, help="modality-loss: train,valid,test weights (default: the run's)")
    p.add_argument("--seq-length", type=int, default=None, help="tokens per row (default: the run's)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="rows per forward pass (default: the run's)")
    p.add_argument("--global-batch-size", type=int, default=None, help="rows per batch (default: the run's)")
    p.add_argument("--seed", type=int, default=None, help="data order and the A/B shuffle (default: the run's)")
    p.add_argument("--tokenizer-model", default=None, help="the data's tokenizer (default: the one the run records)")
    p.add_argument("--data-cache-path", default=None, help="packing index cache (default: beside the data)")
    p.add_argument(
        "--allow-unrecorded-vocabulary",
        action="store_true",
        default=None,
        help="accept prefixes without PREFIX_vocab.json",
    )
    add_run_arguments(p)
    add_verify_argument(p)
    p.add_argument("--output-dir", type=Path, required=True, help="CSV, JSON and PNGs go here")
    return p


def _flag_refusal(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags alone."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    checks = [
        ("--batches", args.batches >= 1),
        ("--consumed-samples", args.consumed_samples is None or args.consumed_samples >= 0),
        ("--tensor-model-parallel-size", tp is None or tp >= 1),
        ("--pipeline-model-parallel-size", pp is None or pp >= 1),
    ]
    if problem := out_of_range(args, checks):
        return problem
    for mode, flags in MODE_FLAGS.items():
        given = [flag for flag in flags if getattr(args, flag[2:].replace("-", "_")) is not None]
        if mode != args.mode and given:
            return f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} read in --mode {mode} only, not in --mode {args.mode}"
    if args.mode == "conflict":
        from megatron_unix.data.indexed import require_files
        from megatron_unix.training.arguments import data_prefixes

        for flag in MODE_FLAGS["conflict"]:
            given = getattr(args, flag[2:].replace("-", "_"))
            for prefix in data_prefixes(given) if given else []:
                try:
                    require_files(prefix)
                except OSError as error:
                    return f"{flag} {prefix}: {error}"
                if problem := _modality_refusal(flag, prefix):
                    return problem
    return None


def _modality_refusal(flag: str, prefix: str) -> str | None:
    """Why ``prefix`` cannot be ``flag``'s data: image tokens in text-only data, or none in image-text
    data (from the dataset's vision counts); the conflict of a set with itself would read as none."""
    import numpy as np

    from megatron_unix.data.indexed import VISION_SUFFIX

    path = prefix + VISION_SUFFIX
    with_images = int(np.count_nonzero(np.load(path, mmap_mode="r")))
    if flag == "--text-data" and with_images:
        return f"--text-data {prefix} is not text-only: {with_images} of its documents hold image tokens ({path})"
    if flag == "--mm-data" and not with_images:
        return f"--mm-data {prefix} holds no image tokens ({path}): it is text-only data (--text-data)"
    return None


def open_checkpoints(args: argparse.Namespace) -> tuple[CheckpointRun, list[Checkpoint]]:
    """The first checkpoint's run with this tool's flags (the settings of every measurement; the model's
    precision fp32: a bf16 run's in-training values agree approximately, an fp32 run's exactly), and every
    ``--load``'s checkpoint; refuses as training refuses, then what this mode needs."""
    from megatron_unix.training.from_checkpoint import StartingPoint, open_run

    checkpoints = [Checkpoint(given, StartingPoint.required(given, args.verify_checkpoint)) for given in args.load]
    given = given_run_flags(args, GIVEN + RUN_FLAGS) | {"bf16": False}
    given["data_path"] = args.data_path if args.mode == "modality-loss" else (args.text_data or args.mm_data)
    opened = open_run(checkpoints[0].start, given, args.verify_checkpoint)
    for flag in MODE_FLAGS["conflict"] if args.mode == "conflict" else ():
        if not getattr(args, flag[2:].replace("-", "_")):
            raise ValueError(f"{flag} must name dataset prefixes in --mode {args.mode}")
    return opened, checkpoints


@dataclass(frozen=True)
class Checkpoint:
    name: str
    """As given on the command line: the label in tables and plots."""
    start: StartingPoint

    @property
    def path(self) -> Path:
        return self.start.checkpoint

    @property
    def iteration(self) -> int:
        return self.start.common["iteration"]


class Progress:
    """Global batches done of all the run will do, their rate and the ETA, one line each (rank 0)."""

    def __init__(self, total: int) -> None:
        from megatron_unix.progress import Clock

        self.total, self.done, self.clock = total, 0, Clock()

    def __call__(self, what: str) -> None:
        import torch.distributed as dist

        self.done += 1
        if dist.get_rank() == 0:
            done, total, clock = self.done, self.total, self.clock
            rate, eta = clock.rate(done), clock.eta(done, total)
            print(f" {what}: {done}/{total} global batches | {rate:.3f} batches/s | ETA {eta}", flush=True)


class Data:
    """Rows of the datasets and this rank's micro-batches of their global batches."""

    def __init__(self, run: RunSettings, tokenizer) -> None:
        from megatron.core import parallel_state as ps

        self.run, self.tokenizer = run, tokenizer
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.num_micro = run.global_batch_size // (run.micro_batch_size * self.dp)

    def rows(self, data_path: list[str], split: str, count: int):
        from megatron_unix.data.dataset import build_datasets

        run = self.run
        train, _, _ = build_datasets(
            data_path, split, run.seq_length, run.seed, self.tokenizer, (count, 0, 0), run.data_cache_dir, run.long_text
        )
        return train

    def global_batches(self, rows, first_sample: int, count: int) -> Iterator[list[dict]]:
        from megatron_unix.training.data import micro_batches

        data = micro_batches(rows, first_sample, self.run.micro_batch_size, self.dp_rank, self.dp)
        for _ in range(count):
            yield [next(data) for _ in range(self.num_micro)]


def _model(opened: CheckpointRun, checkpoint: Checkpoint):
    """The checkpoint's model at this run's TP/PP, wrapped in Megatron DDP, built and loaded as training
    builds and loads it (its tokenizer checked against it as training checks it)."""
    from megatron_unix.training import checkpointing, setup
    from megatron_unix.training.gradient_conflict import GradientProbe

    _, model_args = opened.tokenizer(checkpoint.start)
    config = setup.model_config(opened.run, model_args)
    ddp = setup.build(opened.run, config, model_args.vocab_size)
    run, start = opened.run, checkpoint.start
    checkpointing.load(start.checkpoint, ddp, load_rng=False, verify=run.verify_checkpoint, common=start.common)
    ddp.train()
    return ddp, GradientProbe(ddp, config)


def _conflict(args, opened: CheckpointRun, checkpoints: list[Checkpoint], data: Data) -> list[dict[str, Any]]:
    import torch
    from torch.utils.data import ConcatDataset, Subset

    from megatron_unix.training.gradient_conflict import data_conflict

    count = args.batches * opened.run.global_batch_size
    text = Subset(data.rows(args.text_data, "100,0,0", count), range(count))
    mm = Subset(data.rows(args.mm_data, "100,0,0", count), range(count))
    order = torch.randperm(2 * count, generator=torch.Generator().manual_seed(opened.run.seed)).tolist()
    union = ConcatDataset([text, mm])
    rows = {"text": text, "mm": mm, "A": Subset(union, order[:count]), "B": Subset(union, order[count:])}
    progress = Progress(4 * args.batches * len(checkpoints))
    results = []
    for checkpoint in checkpoints:
        ddp, probe = _model(opened, checkpoint)
        sets = {name: data.global_batches(dataset, 0, args.batches) for name, dataset in rows.items()}
        for row in data_conflict(probe, ddp, sets, lambda name, label=checkpoint.name: progress(f"{label} {name}")):
            results.append({"checkpoint": checkpoint.name, **row})
    return results


def _modality_loss(args, opened: CheckpointRun, checkpoints: list[Checkpoint], data: Data) -> list[dict[str, Any]]:
    from megatron_unix.training.gradient_conflict import modality_products

    run = opened.run
    gbs = run.global_batch_size
    starts = [
        args.consumed_samples if args.consumed_samples is not None else c.start.common.get("consumed_train_samples", 0)
        for c in checkpoints
    ]
    rows = data.rows(run.data_path, run.split, max(starts) + args.batches * gbs)
    progress = Progress(args.batches * len(checkpoints))
    results = []
    for checkpoint, start in zip(checkpoints, starts):
        ddp, probe = _model(opened, checkpoint)
        for j, micro_batches in enumerate(data.global_batches(rows, start, args.batches)):
            iteration = start // gbs + j + 1
            for (layer, group), value in modality_products(probe, ddp, micro_batches).items():
                results.append(
                    dict(
                        checkpoint=checkpoint.name,
                        iteration=iteration,
                        group=group,
                        layer=layer,
                        similarity=value.cosine,
                    )
                )
            progress(f"{checkpoint.name} iteration {iteration}")
    return results


def _csv(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if row[k] is None else row[k]) for k in columns} for row in rows)
    return out.getvalue()


def _plot_conflict(rows: list[dict[str, Any]], checkpoints: list[Checkpoint], group: str, path: Path) -> bool:
    """Conflict against layer, a line per checkpoint (as the paper's figures); False when the group has
    no conflict value (a vision copy: text-only data gives it no gradient)."""
    from megatron_unix.plotting import PALETTE, Curve, render_lines

    curves = []
    for i, checkpoint in enumerate(checkpoints):
        points = [
            (r["layer"], r["conflict"])
            for r in rows
            if r["checkpoint"] == checkpoint.name and r["group"] == group and r["conflict"] is not None
        ]
        if points:
            colour, style = PALETTE[i % len(PALETTE)], ("solid", "dashed")[i % 2]
            curves.append(Curve(checkpoint.name, points, colour, style))
    if curves:
        title = f"gradient conflict, {group}: -(cos(text, multimodal) - cos(A, B))"
        render_lines(curves, path, title, "layer", "gradient conflict", whole_x=True, y_from_zero=False)
    return bool(curves)


def settings_record(args: argparse.Namespace, run: RunSettings) -> dict[str, Any]:
    """What the measurement was made with: its flags and the run settings it read."""
    data = dict(text_data=args.text_data, mm_data=args.mm_data, data_path=None)
    if args.mode == "modality-loss":
        data = dict(text_data=None, mm_data=None, data_path=run.data_path)
    return dict(mode=args.mode, batches=args.batches, **{k: getattr(run, k) for k in RECORDED}, **data)


def write_outputs(
    output_dir: Path, settings: dict[str, Any], checkpoints: list[Checkpoint], rows: list[dict[str, Any]]
) -> list[Path]:
    """CSV, JSON and (conflict) one PNG per group, each written atomically; returns their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stem, columns = (
        ("grad_conflict", CONFLICT_COLUMNS) if settings["mode"] == "conflict" else ("modality_cosine", MODALITY_COLUMNS)
    )
    record = {
        "settings": settings,
        "checkpoints": [{"name": c.name, "path": str(c.path), "iteration": c.iteration} for c in checkpoints],
        "rows": rows,
    }
    written = [output_dir / f"{stem}.csv", output_dir / f"{stem}.json"]
    write_text_atomically(written[0], _csv(rows, columns))
    write_text_atomically(written[1], json.dumps(record, indent=1) + "\n")
    if settings["mode"] == "conflict":
        for group in dict.fromkeys(row["group"] for row in rows):
            path = output_dir / f"{stem}_{group}.png"
            if _plot_conflict(rows, checkpoints, group, path):
                written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if problem := _flag_refusal(args):
            raise ValueError(problem)
        opened, checkpoints = open_checkpoints(args)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return _run(args, opened, checkpoints)


def _run(args: argparse.Namespace, opened: CheckpointRun, checkpoints: list[Checkpoint]) -> int:
    import torch.distributed as dist

    from megatron_unix.training import distributed
    from megatron_unix.training.arguments import data_prefixes
    from megatron_unix.training.from_checkpoint import check_data

    run = opened.run
    distributed.initialize(run.tensor_model_parallel_size, run.pipeline_model_parallel_size, run.seed)
    try:
        tokenizer, _ = opened.tokenizer()
        sets = (args.text_data, args.mm_data) if args.mode == "conflict" else (run.data_path,)
        prefixes = [prefix for data_path in sets for prefix in data_prefixes(data_path)]
        check_data(prefixes, tokenizer, run.tokenizer_model, run.allow_unrecorded_vocabulary)
    except (OSError, ValueError) as error:  # the same on every rank
        if dist.get_rank() == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    measure = _conflict if args.mode == "conflict" else _modality_loss
    try:
        rows = measure(args, opened, checkpoints, Data(run, tokenizer))
    except OSError as error:  # the packing cache unwritable (the error names it): the rank that met it says so
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    outcome: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            for path in write_outputs(args.output_dir, settings_record(args, run), checkpoints, rows):
                print(f" wrote {path}", flush=True)
        except OSError as error:  # a full disk, an unwritable --output-dir: the error names the file
            outcome[0] = f"--output-dir {args.output_dir}: {error}"
            print(f"error: {outcome[0]}", file=sys.stderr, flush=True)
    dist.broadcast_object_list(outcome, src=0)  # every rank ends with rank 0's outcome
    return 0 if outcome[0] is None else 2


if __name__ == "__main__":
    sys.exit(main())
