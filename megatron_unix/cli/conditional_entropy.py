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
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from megatron_unix.analysis.entropy import MODALITIES, DatasetEntropy, dataset_entropy, open_dataset, render_png
from megatron_unix.cli import refuse_out_of_range
from megatron_unix.data.preprocess_report import ProgressLine
from megatron_unix.files import write_text_atomically

COLUMNS = ("dataset", "modality", "n", "entropy_bits", "ngrams", "distinct")


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
    return args


def labels(prefixes: list[str]) -> list[str]:
    """Each dataset's name in the outputs: its prefix's last part, or the whole prefix if those repeat."""
    names = [Path(prefix).name for prefix in prefixes]
    return names if len(set(names)) == len(names) else list(prefixes)


def rows(results: dict[str, DatasetEntropy]) -> list[dict]:
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
                **{f"{modality}_tokens": result.modality_tokens[modality] for modality in MODALITIES},
                "spilled_runs": result.spilled_runs,
            }
            for label, result in results.items()
        ],
        "rows": rows(results),
    }
    write_text_atomically(output_dir / "entropy.json", json.dumps(record, indent=1) + "\n")
    render_png(results, output_dir / "entropy.png")


def report(results: dict[str, DatasetEntropy]) -> str:
    """The table, and what has no value and why."""
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = labels(args.data_path)
    try:
        opened = [open_dataset(prefix) for prefix in args.data_path]  # every dataset refused or accepted first
        total = sum(tokens for _, tokens in opened)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        progress, done = ProgressLine("tokens", args.log_interval, sys.stderr), 0

        def counted(tokens: int) -> None:
            nonlocal done
            done += tokens
            progress.update(done, done, lambda: f"{done / max(progress.elapsed(), 1e-9):,.0f} tokens/s", done / total)

        results = {
            name: dataset_entropy(
                prefix,
                args.max_n,
                args.memory_budget_mb << 20,
                args.temp_dir or args.output_dir,
                counted,
                dataset,
                args.reference_definition,
            )
            for name, prefix, dataset in zip(names, args.data_path, opened)
        }
        definition = "reference" if args.reference_definition else "segments"
        write_outputs(results, args.max_n, args.output_dir, definition)
    except (OSError, ValueError) as error:
        print(f"conditional_entropy.py: error: {error}", file=sys.stderr)
        return 2
    seconds = progress.elapsed()
    print(report(results))
    print(f"{done:,} tokens in {seconds:.1f} s ({done / max(seconds, 1e-9):,.0f} tokens/s)")
    print(f"wrote {', '.join(str(args.output_dir / f'entropy.{ext}') for ext in ('csv', 'json', 'png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
