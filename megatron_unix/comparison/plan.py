"""What a comparison runs: its settings (recorded in ``OUT/settings.json``; a rerun must match them) and
the programs of each stage, as command lines of this stack's own tools.

Stages: ``data`` (the quickstart tokenizer and datasets, unless --data-path is given), one per variant
(import from the text LLM, train, export, evaluate), ``report`` (gradient conflict of the four final
checkpoints, then the report, written in-process). Every variant trains on the same data, batches,
sequence length, schedule and iterations: the same token budget (spec §9)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import megatron_unix

VARIANTS = ("shared", "hardmoe", "mot", "unix")
"""The rows of the paper's Table 4, in its order."""
STAGES = ("data", *VARIANTS, "report")
FAMILIES = ("text", "understanding", "generation")
"""The evaluations on the HF export that run only when their data (pass-through flags) is given."""
FAMILY_NEEDS = {
    "text": "the lm-eval tasks, e.g. --text-args='--tasks arc_easy,mmlu --limit 100'",
    "understanding": "VLMEvalKit TSVs and a VQGAN: --understanding-args='--benchmark-dir DIR --vqgan-config ... "
    "--vqgan-checkpoint ...'",
    "generation": "GenEval/DPG-Bench prompts and a VQGAN: --generation-args='--geneval-prompts FILE "
    "--vqgan-config ... --vqgan-checkpoint ...'",
}
SOURCE_TREE = Path(megatron_unix.__file__).resolve().parents[1]
QUICKSTART_DATA = SOURCE_TREE / "examples" / "data"
"""The shipped data (a source tree's; a wheel has none)."""


@dataclass(frozen=True)
class Settings:
    """Everything that decides the comparison's numbers (not how it is launched)."""

    model_preset: str | None
    hf_dir: str | None
    data_path: list[str] | None
    tokenizer_model: str | None
    split: str
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    lr: float
    min_lr: float
    lr_warmup_iters: int
    eval_iters: int
    log_interval: int
    save_interval: int | None
    seed: int
    vision_encode_layers: int
    vision_decode_layers: int
    decoder_sparse_step: int
    train_args: str
    grad_batches: int
    grad_text_data: list[str] | None
    grad_mm_data: list[str] | None
    text_args: str | None
    understanding_args: str | None
    generation_args: str | None

    def record(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # as read back from settings.json

    @property
    def tokens_per_variant(self) -> int:
        return self.train_iters * self.global_batch_size * self.seq_length


@dataclass(frozen=True)
class Step:
    """One program run. ``fresh``: an output the program refuses to overwrite, removed before an
    unfinished step is run again; ``skip``: why it does not run now (checked just before it would)."""

    name: str
    stage: str
    what: str
    argv: tuple[str, ...]
    fresh: Path | None = None
    skip: Callable[[], str | None] | None = None


@dataclass(frozen=True)
class Layout:
    """Where everything goes under the output folder."""

    root: Path

    def checkpoint(self, variant: str) -> Path:
        return self.root / "checkpoints" / variant

    def initial(self, variant: str) -> Path:
        return self.root / "initial" / variant

    def export(self, variant: str) -> Path:
        return self.root / "hf" / variant

    def evaluation(self, variant: str) -> Path:
        return self.root / "eval" / variant

    @property
    def gradients(self) -> Path:
        return self.root / "gradients"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def dataset(self, name: str) -> Path:
        return self.root / "data" / name


def label(variant: str, settings: Settings) -> str:
    """The row's name: the paper's, with Uni-X's N:M."""
    names = {"shared": "Shared", "hardmoe": "HardMoE", "mot": "MoT"}
    return names.get(variant) or f"Uni-X {settings.vision_encode_layers}:{settings.vision_decode_layers}"


def architecture(variant: str, settings: Settings) -> list[str]:
    """The architecture flags of a variant (pretrain_unix.py's and import-hf's names)."""
    flags = ["--layer-variant", variant] if variant in ("hardmoe", "mot") else []
    if variant == "hardmoe":
        flags += ["--decoder-sparse-step", str(settings.decoder_sparse_step)]
    n, m = (settings.vision_encode_layers, settings.vision_decode_layers) if variant == "unix" else (0, 0)
    return [*flags, "--vision-encode-layers", str(n), "--vision-decode-layers", str(m)]


def data_paths(settings: Settings, layout: Layout) -> tuple[list[str], str]:
    """(--data-path words, tokenizer): the given ones, or the quickstart's under the output folder."""
    if settings.data_path:
        return settings.data_path, settings.tokenizer_model or str(settings.hf_dir)
    quick = [str(layout.dataset("text")), str(layout.dataset("image_text"))]
    return ["0.5", quick[0], "0.5", quick[1]], str(layout.tokenizer)


def _module(launcher: list[str], module: str) -> list[str]:
    return [*launcher, "-m", f"megatron_unix.cli.{module}"]


def data_steps(layout: Layout) -> list[Step]:
    """The quickstart's tokenizer and datasets, as examples/quickstart_data.sh makes them."""
    script = 'REPO="$1" PYTHON="$2"; source "$1/examples/quickstart_data.sh"; prepare_quickstart_data "$3"'
    return [
        Step(
            "data",
            "data",
            "the shipped text and image-text pairs as Megatron datasets, with a tokenizer trained on the text",
            ("bash", "-c", script, "quickstart_data", str(SOURCE_TREE), sys.executable, str(layout.root)),
            fresh=layout.tokenizer,
        )
    ]


def training_argv(variant: str, settings: Settings, layout: Layout, launcher: list[str]) -> list[str]:
    """pretrain_unix.py for one variant: the same data, batches, schedule and budget as the others;
    --load = --save, so a rerun resumes from its last checkpoint."""
    data, tokenizer = data_paths(settings, layout)
    if settings.hf_dir:
        start = ["--pretrained-checkpoint", str(layout.initial(variant))]
    else:
        start = ["--model-preset", str(settings.model_preset), *architecture(variant, settings)]
    s = settings
    argv = [
        *_module(launcher, "pretrain"),
        *start,
        *("--tokenizer-model", tokenizer, "--data-path", *data, "--split", s.split),
        *("--seq-length", str(s.seq_length), "--micro-batch-size", str(s.micro_batch_size)),
        *("--global-batch-size", str(s.global_batch_size), "--seed", str(s.seed)),
        *("--train-iters", str(s.train_iters), "--lr", str(s.lr), "--min-lr", str(s.min_lr)),
        *("--lr-warmup-iters", str(s.lr_warmup_iters), "--lr-decay-style", "cosine"),
        *("--weight-decay", "0.01", "--clip-grad", "1.0", "--log-interval", str(s.log_interval)),
        *("--eval-interval", str(s.train_iters), "--eval-iters", str(s.eval_iters)),
        *("--save", str(layout.checkpoint(variant)), "--load", str(layout.checkpoint(variant))),
    ]
    if s.save_interval:
        argv += ["--save-interval", str(s.save_interval)]
    return argv + shlex.split(s.train_args)


def no_modeling_code(export: Path, variant: str) -> str | None:
    """Why an export cannot be evaluated through transformers: it carries no modeling code (``auto_map``)."""
    try:
        config = json.loads((export / "config.json").read_text())
    except (OSError, ValueError):
        return f"{export}/config.json is unreadable"
    if "auto_map" not in config:
        return f"the {variant} export carries no HF modeling code (no auto_map in its config.json)"
    return None


def family_skip(family: str, settings: Settings, export: Path, variant: str) -> Callable[[], str | None]:
    """Why a family does not run for a variant: its data not given, its extra not installed, or an export
    that transformers cannot build."""

    def reason() -> str | None:
        if getattr(settings, f"{family}_args") is None:
            return f"not requested: it needs {FAMILY_NEEDS[family]}"
        if family == "text" and importlib.util.find_spec("lm_eval") is None:
            return "lm-eval is not installed (pip install 'megatron-unix[eval]')"
        return no_modeling_code(export, variant)

    return reason


def variant_steps(variant: str, settings: Settings, layout: Layout, launcher: list[str]) -> list[Step]:
    """Import (from a text LLM), train, export, then the evaluations of one variant."""
    python = [sys.executable]
    name = f"{label(variant, settings)} (ours)"
    export, evaluation = layout.export(variant), layout.evaluation(variant)
    steps = []
    if settings.hf_dir:
        steps.append(
            Step(
                f"import-{variant}",
                variant,
                f"{settings.hf_dir} as a {variant} model at iteration 0",
                (*_module(python, "convert_checkpoint"), "import-hf", "--hf-dir", settings.hf_dir)
                + ("--save", str(layout.initial(variant)), *architecture(variant, settings)),
                fresh=layout.initial(variant),
            )
        )
    output = ("--output-dir", str(evaluation), "--name", name)
    steps += [
        Step(
            f"train-{variant}",
            variant,
            f"{settings.train_iters} iterations of {settings.tokens_per_variant:,} tokens in all",
            tuple(training_argv(variant, settings, layout, launcher)),
        ),
        Step(
            f"export-{variant}",
            variant,
            "the final checkpoint as an HF directory",
            (*_module(python, "convert_checkpoint"), "export-hf", "--load", str(layout.checkpoint(variant)))
            + ("--save", str(export)),
            fresh=export,
        ),
        Step(
            f"loss-{variant}",
            variant,
            "validation loss per modality of the final checkpoint",
            (*_module(launcher, "evaluate"), "loss", "--load", str(layout.checkpoint(variant)), *output),
        ),
    ]
    for family in FAMILIES:
        extra = shlex.split(getattr(settings, f"{family}_args") or "")
        steps.append(
            Step(
                f"{family}-{variant}",
                variant,
                f"{family} benchmarks on the export",
                (*_module(python, "evaluate"), family, "--hf", str(export), *output, *extra),
                skip=family_skip(family, settings, export, variant),
            )
        )
    return steps


def gradient_data(settings: Settings, layout: Layout) -> tuple[list[str], list[str]] | None:
    """(text-only, image-text) datasets of the gradient-conflict analysis: given, or the quickstart's."""
    if settings.grad_text_data and settings.grad_mm_data:
        return settings.grad_text_data, settings.grad_mm_data
    if settings.data_path:
        return None
    return [str(layout.dataset("text"))], [str(layout.dataset("image_text"))]


def report_steps(settings: Settings, layout: Layout, launcher: list[str]) -> list[Step]:
    """analyze_gradients.py on the four final checkpoints (the paper's Figure 2)."""
    data = gradient_data(settings, layout)
    text, mm = data or ([], [])
    return [
        Step(
            "gradients",
            "report",
            "gradient conflict between text and image-text data per layer, on the four final checkpoints",
            (*_module(launcher, "analyze_gradients"), "--load", *(str(layout.checkpoint(v)) for v in VARIANTS))
            + ("--text-data", *text, "--mm-data", *mm, "--batches", str(settings.grad_batches))
            + ("--output-dir", str(layout.gradients)),
            skip=(lambda: "give --grad-text-data and --grad-mm-data (which of --data-path is text-only)")
            if data is None
            else None,
        )
    ]


def build_plan(settings: Settings, layout: Layout, launcher: list[str]) -> list[Step]:
    """Every step, in order: data, each variant, the gradient analysis."""
    steps = [] if settings.data_path else data_steps(layout)
    for variant in VARIANTS:
        steps += variant_steps(variant, settings, layout, launcher)
    return steps + report_steps(settings, layout, launcher)
