"""One checkpoint's ``results.json``: a section per subcommand, merged as they finish, and the
paper-comparable summary (``MMLU``, ``GenEval``, ``MMB`` in percent) derived from the sections."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_unix.evaluation.report import write_results
from megatron_unix.files import exclusive, write_text_atomically

RESULTS = "results.json"
TABLE = "results.md"

SUMMARY: dict[str, tuple[tuple[str, ...], float]] = {
    "MMLU": (("text", "mmlu", "acc"), 100.0),
    "GenEval": (("generation", "geneval", "overall"), 100.0),
    "MMB": (("understanding", "MMBench_DEV_EN", "overall"), 1.0),
}
"""Paper metric -> (path in results.json's ``sections``, factor to percent). Sections store what their
tool reports: lm-eval accuracies in [0, 1], GenEval's overall score in [0, 1], VLMEvalKit scores in %."""


def read_results(output_dir: str | Path) -> dict[str, Any]:
    """``OUTPUT_DIR/results.json``, or an empty record when there is none yet."""
    path = Path(output_dir) / RESULTS
    if not path.exists():
        return {"checkpoint": {}, "sections": {}, "summary": {}}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(results.get("sections"), dict):
            raise ValueError("no 'sections' object")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"{path}: not a results file of tools/evaluate.py ({error})") from None
    return results


def mmb_reading(sections: Mapping[str, Any]) -> str | None:
    """The ``--scoring`` that read the summary's MMB (None: not recorded, or no MMB)."""
    record = (sections.get("understanding") or {}).get(SUMMARY["MMB"][0][1]) or {}
    return record.get("scoring") if isinstance(record, Mapping) else None


def lookup(tree: Any, path: tuple[str, ...]) -> float | None:
    """The number at ``path`` in nested mappings, else None."""
    for key in path:
        tree = tree.get(key) if isinstance(tree, Mapping) else None
    return float(tree) if isinstance(tree, (int, float)) and not isinstance(tree, bool) else None


def summary(sections: Mapping[str, Any]) -> dict[str, float]:
    """The paper's Table 4 metrics found in ``sections``, in percent."""
    found = {metric: lookup(sections, path) for metric, (path, _) in SUMMARY.items()}
    return {metric: value * SUMMARY[metric][1] for metric, value in found.items() if value is not None}


IDENTITY = ("checkpoint", "iteration", "tokens_seen", "name")
"""What ``results.json``'s ``checkpoint`` record holds; each section's ``source`` and ``format`` go to
``sources`` (one checkpoint, evaluated through its export and itself)."""


def check_owner(output_dir: str | Path, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The folder's results, refused when they belong to another checkpoint (checked before a long run)."""
    results = read_results(output_dir)
    known = results.get("checkpoint") or {}
    for key in ("checkpoint", "iteration"):
        if key in known and key in checkpoint and known[key] != checkpoint[key]:
            raise ValueError(
                f"{Path(output_dir) / RESULTS} holds results of {key}={known[key]!r}, not {checkpoint[key]!r}: "
                "use another --output-dir per checkpoint"
            )
    return results


def update_results(
    output_dir: str | Path,
    section: str,
    values: Mapping[str, Any],
    checkpoint: Mapping[str, Any],
    merge: bool = False,
) -> dict:
    """Put ``values`` under ``sections[section]`` (replacing that section, or with ``merge`` only its keys
    in ``values``: benchmarks scored by an earlier run stay), record what was evaluated, recompute the
    summary, and rewrite results.json and results.md atomically."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(output_dir, wait=True):  # subcommands running side by side into one folder take turns
        return _update(output_dir, section, values, checkpoint, merge)


def _update(
    output_dir: Path, section: str, values: Mapping[str, Any], checkpoint: Mapping[str, Any], merge: bool
) -> dict:
    results = check_owner(output_dir, checkpoint)
    identity = {k: v for k, v in checkpoint.items() if k in IDENTITY}
    results["checkpoint"] = {**(results.get("checkpoint") or {}), **identity}
    results.setdefault("sources", {})[section] = {k: checkpoint[k] for k in ("source", "format") if k in checkpoint}
    results["sections"][section] = {**(results["sections"].get(section, {}) if merge else {}), **values}
    results["summary"] = summary(results["sections"])
    write_results(output_dir / RESULTS, results)
    from megatron_unix.evaluation.progress import CheckpointResults, tables  # (it reads results files)

    write_text_atomically(output_dir / TABLE, tables([CheckpointResults.read(output_dir)]))
    return results
