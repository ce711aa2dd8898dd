"""Understanding benchmarks on a loaded model: each question's image through the VQGAN, the reference's
prompt after it as an I2T sample (spec §3: ``[BOI][codes][EOI]`` + prompt), a short greedy answer, kept
in the :class:`AnswerCache` as it comes (a rerun answers only what is missing), then scored by one of
two readings: the reference's own (``scoring_reference``, the paper's numbers) or VLMEvalKit's
exact matching (``scoring``).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import IO, Any

from megatron_unix.data.preprocess_report import ProgressLine
from megatron_unix.evaluation import scoring, scoring_reference
from megatron_unix.evaluation.benchmarks import Benchmark
from megatron_unix.evaluation.prompts import item_prompt
from megatron_unix.evaluation.report import AnswerCache
from megatron_unix.inference.generate import generate_text, i2t_prompt
from megatron_unix.inference.images import encode_images
from megatron_unix.inference.loading import LoadedModel
from megatron_unix.inference.sampling import SamplingParams

GREEDY = SamplingParams(greedy=True)
SCORINGS = {"reference": scoring_reference.SCORERS, "vlmevalkit": scoring.SCORERS}
"""Scoring name -> its scorers by ``BenchmarkSpec.scorer``."""
MAX_NEW_TOKENS = {"reference": 3, "vlmevalkit": 16}
"""Answer length cap by scoring: the reference's server answers at most 3 tokens (``eval_template.py``)."""
PROMPTS = "2"
"""Version of the prompt styles, recorded with the answers: before it, ``"reference"`` named VLMEvalKit's
prompt (now ``"vlmevalkit"``), so a cache of that time must not be taken for answers to today's prompts."""
PROGRESS_LINES = 20
"""About this many progress lines per benchmark."""


@dataclass(frozen=True)
class Options:
    scoring: str = "reference"
    prompt_style: str = "reference"
    max_new_tokens: int = MAX_NEW_TOKENS["reference"]
    batch_size: int = 8
    limit: int | None = None
    """Only the first ``limit`` questions of each benchmark."""
    skip_bad: bool = False
    """Leave out questions whose image does not decode (counted) instead of stopping."""


def evaluate(
    loaded: LoadedModel,
    vqgan: Any,
    benchmarks: Sequence[Benchmark],
    cache: AnswerCache,
    options: Options,
    log: IO[str] | None = None,
) -> dict[str, dict]:
    """``{benchmark name: scores}``: the scorer's output plus ``answered`` and ``skipped`` counts and the
    ``scoring`` that read the answers."""
    return {bench.spec.name: evaluate_benchmark(loaded, vqgan, bench, cache, options, log) for bench in benchmarks}


def cache_label(bench: Benchmark) -> str:
    """A benchmark's name in the answer cache, with its file's size and modification time: answers to a
    file that was replaced (another release of the TSV) are not taken for answers to the new one."""
    stat = bench.path.stat()
    return f"{bench.spec.name}@{stat.st_size:x}-{stat.st_mtime_ns:x}"


def evaluate_benchmark(
    loaded: LoadedModel,
    vqgan: Any,
    bench: Benchmark,
    cache: AnswerCache,
    options: Options,
    log: IO[str] | None = None,
) -> dict:
    name = cache_label(bench)
    items = bench.items[: options.limit]
    pending = [item for item in items if not cache.done((name, item.index))]
    if pending:
        _answer(loaded, vqgan, dataclasses.replace(bench, items=pending), name, cache, options, log or sys.stderr)
    answered = [item for item in items if cache.done((name, item.index))]
    scores = SCORINGS[options.scoring][bench.spec.scorer](answered, cache.for_benchmark(name))
    return {**scores, "answered": len(answered), "skipped": len(bench.skipped), "scoring": options.scoring}


def _answer(
    loaded: LoadedModel, vqgan: Any, todo: Benchmark, name: str, cache: AnswerCache, options: Options, log: IO[str]
) -> None:
    """Answer every item of ``todo`` under its cache label ``name`` (bad images skipped into
    ``todo.skipped``, shared with the caller's)."""
    total = len(todo.items)
    done_before = len([key for key in cache.answers if key[0] == name])
    every = max(options.batch_size, -(-total // PROGRESS_LINES))
    progress = ProgressLine(f"{todo.spec.name} answers", every, log)
    pictures, done = todo.with_images(options.skip_bad), 0
    while batch := list(islice(pictures, options.batch_size)):
        items = [item for item, _ in batch]
        codes = encode_images(vqgan, [image for _, image in batch], options.batch_size)
        prompts = [
            i2t_prompt(loaded.tokenizer, loaded.layout, item_codes, item_prompt(todo.spec, item, options.prompt_style))
            for item, item_codes in zip(items, codes)
        ]
        answers = generate_text(
            loaded.model, loaded.layout, prompts, GREEDY, [0] * len(prompts), options.max_new_tokens
        )
        for item, tokens in zip(items, answers):
            cache.add((name, item.index), loaded.tokenizer.decode(tokens))
        done += len(items)
        rate = progress.rate(done)
        progress.update(done, done_before + done, lambda rate=rate: f"{rate:.2f} items/s", done / total)
