"""N-gram conditional entropy (bits) of text tokens and of image codes of preprocessed datasets (spec §7).

    python tools/conditional_entropy.py --data-path data/wiki data/t2i --max-n 5 --output-dir entropy/

For each dataset (a PREFIX written by tools/preprocess_data.py) and n = 1..--max-n: H_1 is the unigram
entropy, H_n = -sum p(w1..wn) log2 p(wn | w1..wn-1), over text tokens and over image codes separately.
N-grams never cross a document boundary or an image; the text before and after an image are separate
runs; BOI and separators are in no stream, EOI and EOS are text (megatron_unix/analysis/entropy.py
states the rules). Writes DIR/entropy.csv (dataset, modality, n, entropy_bits, ngrams, distinct),
entropy.json and entropy.png (entropy against n, as the paper's Figure 3); progress goes to stderr, the
table to stdout. Bad input (a missing or damaged file, a dataset without tokens) exits 2 before any
counting.

Exact counts in bounded memory: about --memory-budget-mb. Past half of it, the distinct n-grams counted
so far go to sorted runs in a temporary directory under --temp-dir, merged at the end: 16 bytes per
distinct n-gram of a run (24 for text n > 3 with Qwen2.5's vocabulary, image n > 4), so at most about
24 * tokens * max-n bytes when nearly every n-gram is distinct (as image codes' are). Time grows as
tokens * max-n * log(tokens); the progress ETA covers the counting pass, not the final merge.

Stopping and resuming: each dataset's result is recorded in DIR/.entropy-progress.json as soon as it is
counted (with --max-n and the sizes and times of the dataset's files); the same command started again
reuses what was counted with the same settings and counts the rest. SIGTERM (slurm) or Ctrl-C removes
the spilled runs and exits (143 or 130) saying what was kept; what a killed (SIGKILL) run spilled, in
TEMP/.conditional-entropy-PID/, is removed by the next run. The record is removed once the outputs
are written.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_unix.cli import os_error_message, refuse_out_of_range, stops_in_one_line
from megatron_unix.files import settings_mismatch, stat_digest, write_text_atomically

if TYPE_CHECKING:  # the analysis imports megatron-core: imported after the flags are parsed
    from megatron_unix.analysis.entropy import DatasetEntropy

COLUMNS = ("dataset", "modality", "n", "entropy_bits", "ngrams", "distinct")
PROGRESS = ".entropy-progress.json"
"""In --output-dir: the datasets counted so far, each with the settings it was counted with."""
SPILL_PREFIX = ".conditional-entropy-"
"""TEMP/.conditional-entropy-PID/ holds this run's spilled runs: a killed run's are found by its PID."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-path", nargs="+", required=True, metavar="PREFIX", help="datasets (PREFIX.bin/.idx ...)")
    p.add_argument("--max-n", type=int, default=5, help="largest n-gram length (default 5)")
    p.add_argument("--output-dir", type=Path, required=True, help="where entropy.csv/.json/.png go")
    p.add_argument("--memory-budget-mb", type=int, default=1024, help="memory to count in (default 1024)")
    p.add_argument("--temp-dir", type=Path, help="where spilled runs go (default: --output-dir)")
    p.add_argument("--log-interval", type=int, default=20_000_000, help="tokens between progress lines")
    p.add_argument(
        "--reference-definition",
        action="store_true",
        help="count as the reference's tools/cal_entropy.py (the paper's Figure 3): each modality's sequences "
        "concatenated (n-grams across documents and images), a prefix counted as every (n-1)-gram",
    )
    args = p.parse_args(argv)
    refuse_out_of_range(
        p,
        args,
        (
            ("--max-n", args.max_n >= 1),
            ("--memory-budget-mb", args.memory_budget_mb >= 1),
            ("--log-interval", args.log_interval >= 1),
        ),
    )
    if len(set(args.data_path)) < len(args.data_path):
        p.error("--data-path names a dataset twice")
    if args.temp_dir is not None and not args.temp_dir.is_dir():
        p.error(f"--temp-dir {args.temp_dir}: no such directory")
    return args


def labels(prefixes: list[str]) -> list[str]:
    """Each dataset's name in the outputs: its prefix's last part, or the whole prefix if those repeat."""
    names = [Path(prefix).name for prefix in prefixes]
    return names if len(set(names)) == len(names) else list(prefixes)


def rows(results: dict[str, DatasetEntropy]) -> list[dict]:
    from megatron_unix.analysis.entropy import MODALITIES

    return [
        dict(dataset=label, modality=modality, n=e.n, entropy_bits=e.bits, ngrams=e.ngrams, distinct=e.distinct)
        for label, result in results.items()
        for modality in MODALITIES
        for e in result.entropies[modality]
    ]


def write_outputs(
    results: dict[str, DatasetEntropy], max_n: int, output_dir: Path, definition: str = "segments"
) -> None:
    table = io.StringIO()
    writer = csv.DictWriter(table, COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows(results))
    write_text_atomically(output_dir / "entropy.csv", table.getvalue())
    record = {
        "max_n": max_n,
        "definition": definition,
        "datasets": [
            {
                "dataset": label,
                "prefix": result.prefix,
                "tokens": result.tokens,
                **{f"{modality}_tokens": tokens for modality, tokens in result.modality_tokens.items()},
                "spilled_runs": result.spilled_runs,
            }
            for label, result in results.items()
        ],
        "rows": rows(results),
    }
    write_text_atomically(output_dir / "entropy.json", json.dumps(record, indent=1) + "\n")
    from megatron_unix.analysis.entropy import render_png

    render_png(results, output_dir / "entropy.png")


def report(results: dict[str, DatasetEntropy]) -> str:
    """The table, and what has no value and why."""
    from megatron_unix.analysis.entropy import MODALITIES

    width = max(len("dataset"), *map(len, results))
    lines = [f"{'dataset':<{width}}  modality  n  entropy_bits  {'ngrams':>14}  {'distinct':>14}"]
    for row in rows(results):
        bits = "n/a" if row["entropy_bits"] is None else f"{row['entropy_bits']:.4f}"
        lines.append(
            f"{row['dataset']:<{width}}  {row['modality']:<8}  {row['n']}  {bits:>12}  "
            f"{row['ngrams']:>14,}  {row['distinct']:>14,}"
        )
    for label, result in results.items():
        for modality in MODALITIES:
            missing = [e.n for e in result.entropies[modality] if e.bits is None]
            if result.modality_tokens[modality] == 0:
                lines.append(f"note: {label} has no {modality} tokens: no {modality} entropy")
            elif missing:
                lines.append(f"note: {label}: no {modality} run reaches n = {missing[0]}: no entropy from there on")
            sparse = [e.n for e in result.entropies[modality] if e.bits is not None and e.distinct > e.ngrams / 2]
            if sparse:
                lines.append(
                    f"note: {label} {modality} n >= {sparse[0]}: most n-grams are seen once (distinct > ngrams / 2), "
                    "so the entropy reflects the sample's size more than the data"
                )
    return "\n".join(lines)


def counting_settings(prefix: str, max_n: int, definition: str) -> dict[str, Any]:
    """What a recorded result of ``prefix`` must have been counted with to be reused: the same n, the
    same definition and the same files (a dataset written again in place has other sizes or times)."""
    from megatron_unix.data.indexed import VOCABULARY_SUFFIX, output_files

    files = stat_digest([*output_files(prefix), Path(prefix + VOCABULARY_SUFFIX)])
    return {"max_n": max_n, "definition": definition, "files": files}


def definition_of(args: argparse.Namespace) -> str:
    return "reference" if args.reference_definition else "segments"


def read_progress(path: Path) -> dict[str, Any]:
    """The datasets recorded in ``path`` (by resolved prefix: settings and result); none if it is absent."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: unreadable progress record ({error}): remove it to count every dataset") from None
    if not isinstance(record, dict) or not isinstance(record.get("datasets"), dict):
        raise ValueError(f"{path}: not a progress record of this tool: remove it to count every dataset")
    return record["datasets"]


def recorded_result(entry: dict[str, Any], prefix: str) -> DatasetEntropy:
    from megatron_unix.analysis.entropy import MODALITIES, DatasetEntropy, Entropy

    result = DatasetEntropy(**entry)
    result.entropies = {m: [Entropy(**e) for e in result.entropies[m]] for m in MODALITIES}
    result.prefix = prefix  # as given this time (the record keys the resolved path)
    return result


def remove_leftovers(temp_root: Path) -> None:
    """Remove the spill folders of killed earlier runs (their PIDs run no more), saying so."""
    from megatron_unix.platform import leftovers_of_dead_processes

    for stale in leftovers_of_dead_processes(temp_root, SPILL_PREFIX):
        shutil.rmtree(stale, ignore_errors=True)
        print(f"removed {stale}: the spilled runs of a killed earlier run", file=sys.stderr, flush=True)


def count(args: argparse.Namespace, names: list[str], progress_path: Path, spill_root: Path) -> dict:
    """Every dataset's entropies: recorded ones reused, the others counted (and recorded one by one)."""
    from megatron_unix.analysis.entropy import dataset_entropy, open_dataset
    from megatron_unix.data.preprocess_report import ProgressLine

    opened = [open_dataset(prefix) for prefix in args.data_path]  # every dataset refused or accepted first
    args.output_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(spill_root.parent)
    recorded = read_progress(progress_path)
    results, todo = {}, []
    for name, prefix, dataset in zip(names, args.data_path, opened):
        key, settings = str(Path(prefix).resolve()), counting_settings(prefix, args.max_n, definition_of(args))
        entry = recorded.get(key)
        why = entry and settings_mismatch(progress_path, entry["settings"], settings, "counting it again")
        if entry and not why:
            results[name] = recorded_result(entry["result"], prefix)
            print(f"{name}: counted by an earlier run, reused ({progress_path})", file=sys.stderr, flush=True)
        else:
            if why:
                print(f"note: {name}: {why}", file=sys.stderr, flush=True)
            todo.append((name, prefix, dataset, key, settings))

    total = sum(tokens for _, _, (_, tokens), _, _ in todo)
    progress, done = ProgressLine("tokens", args.log_interval, sys.stderr), 0

    def counted(tokens: int) -> None:
        nonlocal done
        done += tokens
        progress.update(done, done, lambda: f"{progress.rate(done):,.0f} tokens/s", done / total)

    spill_root.mkdir()
    try:
        for name, prefix, dataset, key, settings in todo:
            results[name] = dataset_entropy(
                prefix,
                args.max_n,
                args.memory_budget_mb << 20,
                spill_root,
                counted,
                dataset,
                args.reference_definition,
            )
            recorded[key] = {"settings": settings, "result": dataclasses.asdict(results[name])}
            write_text_atomically(progress_path, json.dumps({"datasets": recorded}) + "\n", durable=True)
    finally:
        shutil.rmtree(spill_root, ignore_errors=True)
    results = {name: results[name] for name in names}  # in the order given
    seconds = progress.elapsed()
    print(f"{done:,} tokens counted in {seconds:.1f} s ({done / max(seconds, 1e-9):,.0f} tokens/s)")
    return results


def kept(args: argparse.Namespace) -> str:
    """What a stop leaves: the progress record of the datasets counted to the end, if any."""
    progress_path = args.output_dir / PROGRESS
    if progress_path.exists():
        return f"the datasets counted so far are kept in {progress_path}: the same command resumes after them"
    return "no dataset was counted to the end"


@stops_in_one_line("conditional_entropy.py", parse_args, kept)
def main(args: argparse.Namespace) -> int:
    names = labels(args.data_path)
    progress_path = args.output_dir / PROGRESS
    spill_root = (args.temp_dir or args.output_dir) / f"{SPILL_PREFIX}{os.getpid()}"
    try:
        results = count(args, names, progress_path, spill_root)
        write_outputs(results, args.max_n, args.output_dir, definition_of(args))
        progress_path.unlink(missing_ok=True)
    except (OSError, ValueError) as error:
        if isinstance(error, OSError):
            error = os_error_message(error, f"the spilled runs under {spill_root.parent} (--temp-dir: one with room)")
        print(f"conditional_entropy.py: error: {error}", file=sys.stderr)
        return 2
    print(report(results))
    print(f"wrote {', '.join(str(args.output_dir / f'entropy.{ext}') for ext in ('csv', 'json', 'png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
