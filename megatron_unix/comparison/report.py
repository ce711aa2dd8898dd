"""The comparison's report, from what its programs wrote: ``report.md`` (the paper's Table 4 with the four
variants beside the paper's rows, their parameters, throughput and losses, which evaluations ran and
why others did not), ``report.json`` (the same numbers), ``losses.png`` (the four runs' training losses
per modality) and ``grad_conflict.png`` (their gradient-conflict profiles, the paper's Figure 2)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_unix.comparison.plan import FAMILIES, VARIANTS, Layout, Settings, Step, label
from megatron_unix.comparison.runner import finished
from megatron_unix.evaluation.progress import CheckpointResults
from megatron_unix.evaluation.report import PAPER, markdown_table
from megatron_unix.evaluation.results import read_results
from megatron_unix.files import write_text_atomically
from megatron_unix.plotting import PALETTE, Curve, render_lines
from megatron_unix.training.gradient_conflict import VISION
from megatron_unix.training.loss_plot import read_series, render_comparison

PAPER_THROUGHPUT = {"shared": 1.0, "hardmoe": 0.895, "mot": 0.773, "unix": 0.952}
"""Spec §8: the paper's Table 4 throughput relative to the shared model (1.5B)."""
PAPER_SOURCE = (
    "docs/spec.md §8 (throughput) and §9 (MMLU, GenEval, MMB, avg), as recorded from the paper's Table 4 "
    "(Uni-X, arXiv 2509.24365: 1.5B models trained on identical data)"
)


def parameter_count(export: Path) -> int:
    """Parameters of an HF export: the sum of its safetensors' tensor sizes (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(export.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    if not total:
        raise ValueError(f"{export}: no safetensors weights")
    return total


def metrics_records(path: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl (its loss plot reader has checked them)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def throughput(records: Sequence[Mapping[str, Any]]) -> tuple[float, float | None]:
    """(tokens/s, TFLOP/s) averaged over the logged training windows, the first left out when there are
    others (it holds the warm-up)."""
    windows = [r for r in records if r.get("tokens_per_sec") is not None]
    if not windows:
        raise ValueError("no logged training window with tokens_per_sec")
    windows = windows[1:] or windows
    flops = [r["tflops"] for r in windows if r.get("tflops") is not None]
    return statistics.fmean(r["tokens_per_sec"] for r in windows), statistics.fmean(flops) if flops else None


def conflict_profile(gradients: Mapping[str, Any], checkpoint: str) -> list[tuple[int, float]]:
    """(layer, conflict averaged over the layer's shared weight groups) of one checkpoint of
    analyze_gradients' grad_conflict.json; the vision copies have no text gradient, so no conflict."""
    by_layer: dict[int, list[float]] = {}
    for row in gradients["rows"]:
        if row["checkpoint"] == checkpoint and not row["group"].startswith(VISION) and row["conflict"] is not None:
            by_layer.setdefault(row["layer"], []).append(row["conflict"])
    return [(layer, statistics.fmean(values)) for layer, values in sorted(by_layer.items())]


def evaluations(steps: Sequence[Step], layout: Layout, variant: str) -> dict[str, str]:
    """Family -> "done", or why it did not run, for one variant."""
    found = {}
    for step in steps:
        family = step.name.removesuffix(f"-{variant}")
        if step.stage == variant and family in ("loss", *FAMILIES):
            reason = None if finished(layout, step) else (step.skip and step.skip()) or "not run yet"
            found[family] = "done" if reason is None else f"skipped: {reason}"
    return found


def variant_record(variant: str, settings: Settings, layout: Layout, steps: Sequence[Step]) -> dict[str, Any]:
    """Every number of one variant, each from the file its program wrote."""
    metrics = layout.checkpoint(variant) / "metrics.jsonl"
    records = metrics_records(metrics)
    tokens_per_sec, tflops = throughput(records)
    results = read_results(layout.evaluation(variant))
    loss = results["sections"].get("loss") or {}
    logged = [r for r in records if "valid_loss" in r]
    train = read_series(metrics)
    return {
        "label": label(variant, settings),
        "name": (results.get("checkpoint") or {}).get("name"),
        "checkpoint": (results.get("checkpoint") or {}).get("checkpoint"),
        "iteration": (results.get("checkpoint") or {}).get("iteration"),
        "parameters": parameter_count(layout.export(variant)),
        "tokens_per_sec": tokens_per_sec,
        "tflops": tflops,
        "paper_throughput_ratio": PAPER_THROUGHPUT[variant],
        "evaluated_loss": {k: loss.get(k) for k in ("loss", "text_loss", "vision_loss")},
        "logged_validation": {k.removeprefix("valid_"): v for k, v in logged[-1].items() if k != "iteration"}
        if logged
        else None,
        "last_training": {k: train[k][-1][1] if train[k] else None for k in ("text_loss", "vision_loss")},
        "summary": results.get("summary") or {},
        "evaluations": evaluations(steps, layout, variant),
    }


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def cost_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: per variant its parameters, throughput (and the paper's ratio), and losses."""
    lines = [
        "| model | parameters | tokens/s | TFLOP/s | throughput vs shared | paper | validation text loss "
        "| validation vision loss | last training text loss | last training vision loss |",
        "|---" * 10 + "|",
    ]
    for row in rows.values():
        loss, train = row["evaluated_loss"], row["last_training"]
        cells = [
            f"{row['parameters']:,}",
            _cell(row["tokens_per_sec"], 0),
            _cell(row["tflops"], 3),
            _cell(row["throughput_ratio"], 3),
            _cell(row["paper_throughput_ratio"], 3),
            *(_cell(v, 4) for v in (loss["text_loss"], loss["vision_loss"], train["text_loss"], train["vision_loss"])),
        ]
        lines.append(f"| {row['name']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def evaluation_lines(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown bullets: per family, the variants it ran on and why it did not run on the others."""
    lines = []
    for family in ("loss", *FAMILIES):
        states = {row["label"]: row["evaluations"].get(family, "not planned") for row in rows.values()}
        reasons = sorted(set(states.values()))
        if reasons == ["done"]:
            lines.append(f"- **{family}**: done for all four")
        else:
            parts = [f"{', '.join(n for n, s in states.items() if s == r)}: {r}" for r in reasons]
            lines.append(f"- **{family}**: {'; '.join(parts)}")
    return "\n".join(lines) + "\n"


def render_plots(settings: Settings, layout: Layout, rows: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """losses.png (training losses per modality of the four) and, when the analysis ran, grad_conflict.png."""
    plots = {}
    runs = {rows[v]["label"]: read_series(layout.checkpoint(v) / "metrics.jsonl") for v in rows}
    losses = layout.root / "losses.png"
    title = f"training loss per modality, {settings.tokens_per_variant:,} tokens each"
    render_comparison(runs, losses, title, _codebook_size(layout))
    plots["losses"] = str(losses)
    curves = [
        Curve(row["label"], row["grad_conflict"], PALETTE[i])
        for i, row in enumerate(rows.values())
        if row.get("grad_conflict")
    ]
    if curves:
        output = layout.root / "grad_conflict.png"
        render_lines(
            curves,
            output,
            "gradient conflict between text and image-text data (mean over q, k, v, o, gate, up, down)",
            "layer",
            "conflict = -(cos(text, image-text) - cos(A, B))",
            whole_x=True,
            y_from_zero=False,
        )
        plots["grad_conflict"] = str(output)
    return plots


def _codebook_size(layout: Layout) -> int | None:
    """The VQ codebook of the runs (for the uniform vision loss line), from the Uni-X export's config."""
    config = json.loads((layout.export("unix") / "config.json").read_text())
    return config.get("vision_vocab_size")


def write_report(settings: Settings, layout: Layout, steps: Sequence[Step]) -> Path:
    """report.md, report.json and the plots in the output folder; returns report.md's path."""
    rows = {v: variant_record(v, settings, layout, steps) for v in VARIANTS}
    gradients = layout.gradients / "grad_conflict.json"
    conflicts = json.loads(gradients.read_text()) if gradients.is_file() else None
    for variant, row in rows.items():
        row["throughput_ratio"] = row["tokens_per_sec"] / rows["shared"]["tokens_per_sec"]
        if conflicts:
            row["grad_conflict"] = conflict_profile(conflicts, str(layout.checkpoint(variant)))
    plots = render_plots(settings, layout, rows)
    checkpoints = [CheckpointResults.read(layout.evaluation(v)) for v in VARIANTS]
    table = markdown_table(
        {c.name: c.summary for c in checkpoints}, readings={c.name: c.mmb_reading for c in checkpoints}
    )
    start = f"from {settings.hf_dir}" if settings.hf_dir else f"from scratch at the {settings.model_preset} preset"
    text = "\n".join(
        [
            "# Table 4: the shared transformer, HardMoE, MoT and Uni-X at one token budget",
            "",
            f"Each variant trained {start} for {settings.train_iters} iterations of {settings.global_batch_size} x "
            f"{settings.seq_length} tokens ({settings.tokens_per_variant:,} tokens), on the same data and "
            f"schedule. Paper rows: {PAPER_SOURCE}.",
            "",
            table,
            "## Cost and loss (measured here)",
            "",
            "Parameters: the HF export's. Throughput: the mean of the logged training windows after the first. "
            "Validation loss: `tools/evaluate.py loss` on the final checkpoint (nats per token).",
            "",
            cost_table(rows),
            "## Evaluations",
            "",
            evaluation_lines(rows),
            "## Figures",
            "",
            *(f"- {name}: `{Path(path).name}`" for name, path in plots.items()),
            "",
        ]
    )
    record = {
        "settings": settings.record(),
        "tokens_per_variant": settings.tokens_per_variant,
        "variants": rows,
        "paper": {"source": PAPER_SOURCE, "table4": PAPER, "throughput_ratio": PAPER_THROUGHPUT},
        "plots": plots,
    }
    write_text_atomically(layout.root / "report.json", json.dumps(record, indent=1) + "\n")  # rows in Table 4's order
    write_text_atomically(layout.root / "report.md", text)
    return layout.root / "report.md"
