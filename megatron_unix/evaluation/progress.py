"""The checkpoints of a run side by side: one table, and plots of validation loss and benchmark scores
against training tokens seen, so that a run's progress shows at a glance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_unix.evaluation.report import markdown_table
from megatron_unix.evaluation.results import RESULTS, lookup, mmb_reading, read_results
from megatron_unix.plotting import PALETTE, Curve, render_lines

LOSSES = {"validation text": "text_loss", "validation vision": "vision_loss"}
"""Plot label -> key of the ``loss`` section."""


def headlines(sections: Mapping[str, Any]) -> dict[str, float]:
    """Each benchmark's headline score in percent: lm-eval tasks' ``acc`` (groups, not their subtasks:
    mmlu, not its 57 subjects), the understanding benchmarks' overall accuracy (MME's perception sum is in
    points: left to the table), GenEval's overall score and DPG-Bench's score."""
    scores = {}
    text = sections.get("text") or {}
    subtasks = {name for metrics in text.values() for name in metrics.get("subtasks", ())}
    for task, metrics in sorted(text.items()):
        if task not in subtasks and (value := lookup(metrics, ("acc",))) is not None:
            scores[task] = 100 * value
    for name, result in sorted((sections.get("understanding") or {}).items()):
        value = lookup(result, ("overall",))
        value = lookup(result, ("overall", "accuracy")) if value is None else value
        if value is not None:
            scores[name] = value
    generation = sections.get("generation") or {}
    if (value := lookup(generation, ("geneval", "overall"))) is not None:
        scores["GenEval"] = 100 * value
    if (value := lookup(generation, ("dpg", "score"))) is not None:
        scores["DPG-Bench"] = value
    return scores


@dataclass(frozen=True)
class CheckpointResults:
    folder: Path
    name: str
    tokens_seen: float | None
    iteration: int | None
    summary: dict[str, float]
    scores: dict[str, float]
    losses: dict[str, float]
    mmb_reading: str | None = None
    """The ``--scoring`` that read MMB (None: not recorded)."""

    @classmethod
    def read(cls, folder: str | Path) -> CheckpointResults:
        folder = Path(folder)
        if not (folder / RESULTS).is_file():
            raise ValueError(f"{folder}: no {RESULTS} (run a tools/evaluate.py subcommand with --output-dir {folder})")
        results = read_results(folder)
        checkpoint, sections = results.get("checkpoint") or {}, results["sections"]
        losses = {label: lookup(sections, ("loss", key)) for label, key in LOSSES.items()}
        return cls(
            folder,
            checkpoint.get("name") or folder.name,
            checkpoint.get("tokens_seen"),
            checkpoint.get("iteration"),
            dict(results.get("summary") or {}),
            headlines(sections),
            {label: value for label, value in losses.items() if value is not None},
            mmb_reading(sections),
        )


def x_axis(checkpoints: Sequence[CheckpointResults]) -> tuple[str, list[float]]:
    """Tokens seen when every checkpoint records them, else the iteration; refuses checkpoints with neither."""
    if all(c.tokens_seen is not None for c in checkpoints):
        return "tokens seen", [float(c.tokens_seen) for c in checkpoints]
    if all(c.iteration is not None for c in checkpoints):
        return "iteration", [float(c.iteration) for c in checkpoints]
    unknown = [str(c.folder) for c in checkpoints if c.tokens_seen is None and c.iteration is None]
    raise ValueError(
        f"{', '.join(unknown)}: no tokens seen or iteration recorded (an HF export): "
        "evaluate it again with --tokens-seen, or leave it out"
    )


def progress_table(checkpoints: Sequence[CheckpointResults]) -> str:
    """Markdown: a row per checkpoint with its losses and every headline score any checkpoint has."""
    columns = [*LOSSES, *sorted({name for c in checkpoints for name in c.scores})]
    rows = [f"| checkpoint | tokens seen | {' | '.join(columns)} |", "|---" * (len(columns) + 2) + "|"]
    for c in checkpoints:
        values = {**c.losses, **c.scores}
        cells = ["-" if values.get(col) is None else f"{values[col]:.{3 if col in LOSSES else 1}f}" for col in columns]
        seen = "-" if c.tokens_seen is None else f"{c.tokens_seen:.4g}"
        rows.append(f"| {c.name} | {seen} | {' | '.join(cells)} |")
    return "\n".join(rows) + "\n"


def tables(checkpoints: Sequence[CheckpointResults]) -> str:
    """Markdown: the checkpoints beside the paper's Table 4, then every loss and score of each
    (:func:`progress_table`); results.md of one checkpoint and report.md of several."""
    readings = {c.name: c.mmb_reading for c in checkpoints}
    return (
        markdown_table({c.name: c.summary for c in checkpoints}, readings=readings) + "\n" + progress_table(checkpoints)
    )


def progress_curves(xs: Sequence[float], values: Sequence[Mapping[str, float]]) -> list[Curve]:
    """One curve per name any checkpoint has (``values[i]``: checkpoint i's numbers at ``xs[i]``): the
    losses first, in their order, then the scores by name; each name once."""
    names = [
        n for n in dict.fromkeys([*LOSSES, *sorted({n for v in values for n in v})]) if any(n in v for v in values)
    ]
    return [
        Curve(name, sorted((x, v[name]) for x, v in zip(xs, values) if name in v), PALETTE[i % len(PALETTE)], "dashed")
        for i, name in enumerate(names)
    ]


def render_progress(checkpoints: Sequence[CheckpointResults], output_dir: Path, title: str) -> list[Path]:
    """``loss.png`` and ``scores.png`` (each when some checkpoint has such numbers) in ``output_dir``."""
    label, xs = x_axis(checkpoints)
    written = []
    for filename, y_label, values in (
        ("loss.png", "validation loss (nats per token)", [c.losses for c in checkpoints]),
        ("scores.png", "score (%)", [c.scores for c in checkpoints]),
    ):
        if curves := progress_curves(xs, values):
            render_lines(curves, output_dir / filename, f"{title}: {y_label.split(' (')[0]}", label, y_label)
            written.append(output_dir / filename)
    return written
