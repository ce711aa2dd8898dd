"""The paper's text benchmarks through lm-evaluation-harness (an optional extra): task names, the
request cache that makes runs resumable, and lm-eval's results in ``results.json``'s ``text`` section.

Model-independent: :func:`run_tasks` takes any lm-eval ``LM``; which Uni-X model to wrap is the
program's business (``megatron_unix/cli/evaluate_text.py``). lm-eval is imported only inside the
functions, so everything else keeps working without it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from megatron_unix.files import stat_digest, write_text_atomically

PAPER_TASKS = ("arc_easy", "arc_challenge", "winogrande", "boolq", "mmlu")
"""The paper's text evaluation, 0-shot: MMLU is its Table 4 column, the others its text table."""
INSTALL = "pip install 'megatron-unix[eval]' (lm-eval with its Hugging Face backend)"
CACHE_DIR = "lm_eval_cache"
SAMPLES_DIR = "text_samples"


def require_lm_eval() -> str:
    """lm-eval's version, or a ``ValueError`` saying how to install it (its HF backend needs ``accelerate``)."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (imports accelerate)
    except ImportError as error:
        raise ValueError(f"lm-eval is not usable ({error}): {INSTALL}") from None
    return lm_eval.__version__


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def hub_offline(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub is out of reach (an offline variable set, or no connection to it within
    ``timeout`` seconds), else None."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f"{name}={os.environ[name]}"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout).close()
    except OSError as error:
        return f"{host} cannot be reached: {error.strerror or error}"
    return None


def go_offline() -> None:
    """Datasets from the local cache only: without the hub, a dataset that is not cached fails at once
    instead of after a minute and more of retries. Before the hub's libraries are imported (they read
    these variables once)."""
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"


def parse_tasks(value: str) -> list[str]:
    """``--tasks a,b,c`` -> names, in order; empty or repeated names are refused."""
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise ValueError(f"--tasks {value!r}: an empty task name")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--tasks names {', '.join(repeated)} more than once")
    return names


@functools.lru_cache(maxsize=4)
def task_manager(include_path: tuple[str, ...] = ()) -> Any:
    """lm-eval's task index (its own tasks plus ``include_path``); indexing its ~15k YAML files takes
    seconds, so one index per process and include path."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None)


def check_tasks(tasks: Sequence[str], include_path: Sequence[str | Path]) -> None:
    """Refuse task names lm-eval does not know before any model is loaded."""
    from lm_eval import __version__

    known = set(task_manager(tuple(map(str, include_path))).all_tasks)
    unknown = [name for name in tasks if name not in known]
    if unknown:
        searched = "".join(f" nor in --include-path {path}" for path in include_path)
        raise ValueError(
            f"--tasks {', '.join(unknown)}: not among lm-eval {__version__}'s tasks{searched}; "
            "a task of your own needs the folder of its YAML file given with --include-path"
        )


def cache_prefix(output_dir: Path, identity: Mapping[str, Any], files: Iterable[Path]) -> Path:
    """Where lm-eval's request cache goes (it appends ``_rank0.db``): one SQLite file per model, named by a
    digest of ``identity`` (loader, source, tokenizer, dtype) and of ``files``' names, sizes and mtimes.
    lm-eval keys cached answers by request text alone, so a checkpoint overwritten in place, another
    loader or precision must not find the answers of the previous one."""
    digest = hashlib.sha256(
        json.dumps([dict(identity), stat_digest(files)], sort_keys=True, default=str).encode()
    ).hexdigest()
    return output_dir / CACHE_DIR / f"requests-{digest[:16]}"


def cached_answers(prefix: Path) -> int:
    """How many answers the cache at ``prefix`` holds (0 when there is none yet)."""
    database = Path(f"{prefix}_rank0.db")
    if not database.is_file():
        return 0
    with contextlib.closing(sqlite3.connect(database)) as connection:  # sqlitedict's default table
        return connection.execute("SELECT COUNT(*) FROM unnamed").fetchone()[0]


def run_tasks(
    lm: Any,
    tasks: Sequence[str],
    include_path: Sequence[str | Path] = (),
    num_fewshot: int = 0,
    limit: int | None = None,
    cache: Path | None = None,
    log_samples: bool = False,
    seed: int = 1234,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on ``lm`` (an ``lm_eval.api.model.LM``), answers cached under ``cache``."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        use_cache=str(cache) if cache else None,
        log_samples=log_samples,
        task_manager=task_manager(tuple(map(str, include_path))),
        fewshot_random_seed=seed,
    )


def metrics(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{task: {metric: value}}`` for every task and group lm-eval reports: its ``"acc,none"`` keys
    without the default filter's suffix (other filters keep theirs), stderr included when numeric
    ("N/A" is dropped), plus ``samples`` (documents scored) and ``num_fewshot`` where lm-eval gives them,
    and a group's ``subtasks`` (so reports show mmlu, not its 57 subjects beside it)."""
    found: dict[str, dict[str, Any]] = {}
    for task, values in results["results"].items():
        entry = {
            key.removesuffix(",none"): value
            for key, value in values.items()
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        if task in results.get("n-samples", {}):
            entry["samples"] = results["n-samples"][task]["effective"]
        if task in results.get("n-shot", {}):
            entry["num_fewshot"] = results["n-shot"][task]
        if subtasks := results.get("group_subtasks", {}).get(task):
            entry["subtasks"] = sorted(subtasks)
        found[task] = entry
    return found


def write_samples(output_dir: Path, results: Mapping[str, Any]) -> list[Path]:
    """lm-eval's per-document log (``--log-samples``): ``OUTPUT/text_samples/TASK.jsonl``, one document a
    line with its requests, the model's answers (log-likelihood, is-greedy) and its scores."""
    from lm_eval.utils import handle_non_serializable

    written = []
    for task, samples in results.get("samples", {}).items():
        path = output_dir / SAMPLES_DIR / f"{task}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = (json.dumps(sample, default=handle_non_serializable, ensure_ascii=False) + "\n" for sample in samples)
        write_text_atomically(path, "".join(lines))
        written.append(path)
    return written


def table(results: Mapping[str, Any]) -> str:
    """lm-eval's own markdown table of ``results`` (tasks, then groups)."""
    from lm_eval.utils import make_table

    return make_table(results) + ("\n" + make_table(results, "groups") if results.get("groups") else "")
