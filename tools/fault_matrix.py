#!/usr/bin/env python
"""The fault matrix: bad inputs, missing and truncated files, bad flag values, stops mid-run then a
rerun, two runs at once, unwritable outputs and full disks, against every program of the stack, on small
data built here (the shipped examples/data, a tiny model trained for 2 iterations, its export, a random
tiny VQGAN). Each outcome is classed by :func:`classify`; the table is printed and, with --markdown,
written as docs/faults.md.

- clear: refused with exit status 2, the message names what it should (the file, line or flag), no
  traceback; or, where the fault may be survived (a stop then a rerun, two runs at once), finished
  with status 0;
- unclear: failed without naming it (or with another status, or ran past its time);
- traceback: a Python traceback reached the user;
- silent: exit status 0 where it had to refuse;
- left-behind: temporary files or folders stayed after the run (and the rerun).

    python tools/fault_matrix.py --markdown docs/faults.md [--work-dir /tmp/faults] [--only plot_losses]

Not part of the test suite: about 10 minutes on 2 cores. A full disk is a real one for the program:
its files are capped (RLIMIT_FSIZE), so writes past the cap fail with EFBIG as on a full disk.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
CLASSES = ("clear", "unclear", "traceback", "silent", "left-behind")
TEMPORARY_MARKS = (".tmp", ".partial", ".progress.json", ".conditional-entropy-", ".entropy-progress")
"""What the names of uncommitted outputs hold, in this stack's programs."""


def leftovers(folder: Path, before: Iterable[Path] = ()) -> list[Path]:
    """The files and folders under ``folder`` (not in ``before``) named as temporaries are."""
    seen = set(before)
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            if path not in seen and any(mark in name for mark in TEMPORARY_MARKS):
                found.append(path)
    return sorted(found)


def classify(rc: int | None, stderr: str, names: Sequence[str], may_succeed: bool, left: Sequence[Path]) -> str:
    """The class of one outcome: exit status ``rc`` (None: timed out), what it printed to stderr, the
    strings a clear refusal names, whether finishing is a right answer, what it left behind."""
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    if left:
        return "left-behind"
    if rc == 0:
        return "clear" if may_succeed else "silent"
    if rc == 2 and names and all(name in stderr for name in names):
        return "clear"
    return "unclear"


@dataclass
class Case:
    tool: str
    fault: str
    argv: list[str]
    """The command after ``python``; ``{C}`` is the case's folder, other ``{NAME}``s the fixtures'."""
    names: tuple[str, ...] = ()
    """What a clear refusal names (formatted like ``argv``)."""
    may_succeed: bool = False
    prepare: Callable[[Path], None] | None = None
    stop: tuple[int, str | None, float] | None = None
    """(signal, glob under the case folder to wait for or None, seconds after it): stopped, then rerun."""
    concurrent: bool = False
    file_limit: int | None = None
    timeout: float = 240


@dataclass
class Outcome:
    case: Case
    status: str
    rc: int | None
    said: str
    seconds: float
    left: list[Path] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- fixtures


def build_fixtures(work: Path) -> dict[str, str]:
    """Small data for every program, built once under ``work/fixtures`` (reused when present)."""
    fx = work / "fixtures"
    paths = {
        "TOK": fx / "tokenizer",
        "TEXT": fx / "text",
        "PAIRS": fx / "pairs",
        "BIG": fx / "big",
        "BIGJSONL": fx / "big.jsonl",
        "CKPT": fx / "ckpt",
        "HF": fx / "hf",
        "VQ": fx / "vqgan",
        "IMAGES": fx / "images.jsonl",
        "METRICS": fx / "metrics.jsonl",
    }
    done = fx / "done"
    if done.exists():
        return {k: str(v) for k, v in paths.items()}
    shutil.rmtree(fx, ignore_errors=True)
    fx.mkdir(parents=True)
    from megatron_unix.data.tokenizer import MultimodalTokenizer, train_bpe_tokenizer

    text_jsonl = ROOT / "examples" / "data" / "text.jsonl"
    lines = [json.loads(line)["text"] for line in text_jsonl.read_text().splitlines()]
    train_bpe_tokenizer(lines, 600, paths["TOK"])
    paths["BIGJSONL"].write_text(
        "".join(json.dumps({"text": f"{i} {lines[i % len(lines)]}"}) + "\n" for i in range(40000))
    )
    for prefix, source in (("TEXT", text_jsonl), ("PAIRS", ROOT / "examples" / "data" / "image_text.jsonl.gz")):
        run_quiet(
            [
                PY,
                "tools/preprocess_data.py",
                "--input",
                str(source),
                "--output-prefix",
                str(paths[prefix]),
                "--tokenizer-model",
                str(paths["TOK"]),
            ]
        )
    _big_dataset(paths["BIG"], MultimodalTokenizer.from_pretrained(str(paths["TOK"])))
    run_quiet(
        [
            PY,
            "pretrain_unix.py",
            "--model-preset",
            "tiny",
            "--tokenizer-model",
            str(paths["TOK"]),
            "--data-path",
            "0.5",
            str(paths["TEXT"]),
            "0.5",
            str(paths["PAIRS"]),
            "--split",
            "90,10,0",
            "--seq-length",
            "1152",
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "2",
            "--train-iters",
            "2",
            "--lr",
            "1e-3",
            "--eval-interval",
            "2",
            "--eval-iters",
            "1",
            "--save",
            str(paths["CKPT"]),
        ]
    )
    run_quiet(
        [PY, "tools/convert_checkpoint.py", "export-hf", "--load", str(paths["CKPT"]), "--save", str(paths["HF"])]
    )
    _vqgan_and_images(paths["VQ"], paths["IMAGES"])
    records = [{"iteration": it, "text_loss": 9.0 / it, "vision_loss": 9.2 / it} for it in range(1, 30)]
    paths["METRICS"].write_text("".join(json.dumps(r) + "\n" for r in records))
    done.touch()
    return {k: str(v) for k, v in paths.items()}


def run_quiet(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=_env())
    if proc.returncode:
        raise SystemExit(f"building the fixtures failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")


def _big_dataset(prefix: Path, tok) -> None:
    """Enough random tokens (text and images) that counting its entropy takes some seconds."""
    import numpy as np

    from megatron_unix.data import vocabulary
    from megatron_unix.data.indexed import DatasetWriter

    rng = np.random.default_rng(0)
    fields = tok.model_config_fields()
    with DatasetWriter(prefix, fields) as writer:
        for _ in range(1500):
            ids = rng.integers(0, 400, 400).tolist() + [tok.boi_id]
            ids += (fields["vq_offset"] + rng.integers(0, 8192, 256)).tolist() + [tok.eoi_id]
            vision = vocabulary.vision_mask(np.array(ids), fields["vq_offset"], tok.boi_id, fields["separator_ids"])
            writer.add(ids, [True] * len(ids), int(vision.sum()))
        writer.commit()


def _vqgan_and_images(vq: Path, jsonl: Path) -> None:
    """A random tiny VQGAN (8192 codes, 64 px -> 32x32 codes, the shipped data's 1024 a picture): for
    trying the programs, not for pictures; and eight 256 px pictures listed in a jsonl."""
    import torch
    from PIL import Image

    from megatron_unix.image.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    config = VQGANConfig(
        n_embed=8192, embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 1), num_res_blocks=1, resolution=64
    )
    VQGAN(config).save_pretrained(vq)
    records = []
    for i in range(8):
        path = jsonl.parent / f"picture{i}.png"
        Image.new("RGB", (256, 256), (30 * i, 200 - 20 * i, 90)).save(path)
        records.append({"image": path.name, "caption": f"a picture of colour {i}"})
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------------------------------------- faults


def write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def prepare(case: Path) -> None:
        (case / name).parent.mkdir(parents=True, exist_ok=True)
        (case / name).write_bytes(text if isinstance(text, bytes) else text.encode())

    return prepare


def half_gzip() -> bytes:
    """The first half of a .jsonl.gz of distinct lines: a file cut short (a copy that stopped)."""
    data = gzip.compress(
        "".join(json.dumps({"text": f"line {i} of {i * 7919 % 1000}"}) + "\n" for i in range(3000)).encode()
    )
    return data[: len(data) // 2]


def truncated_copy(source_key: str, fixtures: dict[str, str], suffixes: tuple[str, ...], cut: str | None) -> Callable:
    """A copy of dataset ``source_key``'s ``suffixes`` files as ``{C}/data``, the ``cut`` one halved."""

    def prepare(case: Path) -> None:
        for suffix in suffixes:
            shutil.copy(fixtures[source_key] + suffix, str(case / "data") + suffix)
        if cut:
            target = Path(str(case / "data") + cut)
            with open(target, "r+b") as f:
                f.truncate(target.stat().st_size // 2)

    return prepare


def damaged_checkpoint(fixtures: dict[str, str]) -> Callable[[Path], None]:
    def prepare(case: Path) -> None:
        shutil.copytree(fixtures["CKPT"], case / "ckpt")
        biggest = max((case / "ckpt").rglob("*.distcp"), key=lambda p: p.stat().st_size)
        with open(biggest, "r+b") as f:
            f.seek(biggest.stat().st_size // 2)
            f.write(b"\0" * 64)

    return prepare


DATASET = (".bin", ".idx", "_lossmask.bin", "_lossmask.idx", "_vision.npy", "_vocab.json")


def cases(fx: dict[str, str]) -> list[Case]:
    """Every fault tried, one list read top to bottom, grouped by program."""
    P, T, C = "tools/preprocess_data.py", "tools/train_tokenizer.py", "tools/convert_checkpoint.py"
    E, G, V = "tools/encode_images.py", "tools/generate.py", "tools/evaluate.py"
    A, H, L = "tools/analyze_gradients.py", "tools/conditional_entropy.py", "tools/plot_losses.py"
    text_jsonl = str(ROOT / "examples" / "data" / "text.jsonl")
    pre = [P, "--tokenizer-model", "{TOK}", "--output-prefix", "{C}/out"]
    tok = [T, "--output", "{C}/tok"]
    hf = [G, "--hf", "{HF}"]
    enc = [E, "--vqgan", "{VQ}", "--output", "{C}/codes.jsonl"]
    ana = [A, "--load", "{CKPT}", "--batches", "1", "--output-dir", "{C}/out"]
    ent = [H, "--max-n", "3", "--output-dir", "{C}/out"]
    pretrain = [
        "pretrain_unix.py",
        "--model-preset",
        "tiny",
        "--tokenizer-model",
        "{TOK}",
        "--seq-length",
        "1152",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "2",
        "--train-iters",
        "2",
        "--lr",
        "1e-3",
    ]
    data = ["--data-path", "0.5", "{TEXT}", "0.5", "{PAIRS}"]
    bad_json = '{"text": "one"}\n{"text": \n'
    return [
        # preprocess_data
        Case("preprocess_data", "missing input", [*pre, "--input", "{C}/none.jsonl"], ("{C}/none.jsonl",)),
        Case(
            "preprocess_data",
            "bad JSON line, --strict",
            [*pre, "--input", "{C}/bad.jsonl", "--strict"],
            ("{C}/bad.jsonl:2",),
            prepare=write("bad.jsonl", bad_json),
        ),
        Case(
            "preprocess_data",
            "truncated .gz",
            [*pre, "--input", "{C}/cut.jsonl.gz"],
            ("{C}/cut.jsonl.gz",),
            prepare=write("cut.jsonl.gz", half_gzip()),
        ),
        Case(
            "preprocess_data",
            "empty input",
            [*pre, "--input", "{C}/empty.jsonl"],
            ("{C}/empty.jsonl",),
            prepare=write("empty.jsonl", ""),
        ),
        Case("preprocess_data", "--workers 0", [*pre, "--input", text_jsonl, "--workers", "0"], ("--workers",)),
        Case("preprocess_data", "--t2i-ratio 2", [*pre, "--input", text_jsonl, "--t2i-ratio", "2"], ("--t2i-ratio",)),
        Case(
            "preprocess_data",
            "missing tokenizer",
            [P, "--input", text_jsonl, "--tokenizer-model", "{C}/none", "--output-prefix", "{C}/out"],
            ("{C}/none",),
        ),
        Case(
            "preprocess_data",
            "--input without --tokenizer-model",
            [P, "--input", text_jsonl, "--output-prefix", "{C}/out"],
            ("--tokenizer-model",),
        ),
        Case(
            "preprocess_data",
            "merge a missing prefix",
            [P, "--merge-prefixes", "{TEXT}", "{C}/none", "--output-prefix", "{C}/out"],
            ("{C}/none",),
        ),
        Case(
            "preprocess_data",
            "output folder missing",
            [P, "--input", text_jsonl, "--tokenizer-model", "{TOK}", "--output-prefix", "{C}/no/out"],
            ("{C}/no",),
            may_succeed=True,
        ),
        Case("preprocess_data", "full disk", [*pre, "--input", "{BIGJSONL}"], ("{C}/out",), file_limit=200_000),
        Case(
            "preprocess_data",
            "SIGTERM mid-run, rerun",
            [*pre, "--input", "{BIGJSONL}"],
            may_succeed=True,
            stop=(signal.SIGTERM, None, 6),
        ),
        Case(
            "preprocess_data",
            "SIGINT (Ctrl-C) mid-run, rerun",
            [*pre, "--input", "{BIGJSONL}"],
            may_succeed=True,
            stop=(signal.SIGINT, None, 6),
        ),
        Case(
            "preprocess_data",
            "SIGKILL mid-run, rerun",
            [*pre, "--input", "{BIGJSONL}"],
            may_succeed=True,
            stop=(signal.SIGKILL, None, 6),
        ),
        Case(
            "preprocess_data",
            "two runs at once",
            [*pre, "--input", text_jsonl],
            ("{C}/out",),
            may_succeed=True,
            concurrent=True,
        ),
        # train_tokenizer
        Case("train_tokenizer", "missing input", [*tok, "--input", "{C}/none.jsonl"], ("{C}/none.jsonl",)),
        Case(
            "train_tokenizer",
            "bad JSON line",
            [*tok, "--input", "{C}/bad.jsonl"],
            ("{C}/bad.jsonl:2",),
            prepare=write("bad.jsonl", bad_json),
        ),
        Case(
            "train_tokenizer",
            "no text under the keys",
            [*tok, "--input", "{C}/ids.jsonl"],
            ("--json-keys",),
            prepare=write("ids.jsonl", '{"id": 1}\n'),
        ),
        Case(
            "train_tokenizer",
            "truncated .gz",
            [*tok, "--input", "{C}/cut.jsonl.gz"],
            ("{C}/cut.jsonl.gz",),
            prepare=write("cut.jsonl.gz", half_gzip()),
        ),
        Case(
            "train_tokenizer", "--vocab-size 10", [*tok, "--input", text_jsonl, "--vocab-size", "10"], ("--vocab-size",)
        ),
        Case(
            "train_tokenizer",
            "output is a file",
            [T, "--input", text_jsonl, "--output", "{C}/file"],
            ("{C}/file",),
            prepare=write("file", "x"),
        ),
        # convert_checkpoint
        Case(
            "convert_checkpoint",
            "export: missing --load",
            [C, "export-hf", "--load", "{C}/none", "--save", "{C}/hf"],
            ("{C}/none",),
        ),
        Case(
            "convert_checkpoint",
            "export: --load an empty folder",
            [C, "export-hf", "--load", "{C}/empty", "--save", "{C}/hf"],
            ("{C}/empty",),
            prepare=lambda c: (c / "empty").mkdir(),
        ),
        Case(
            "convert_checkpoint",
            "export: damaged shard",
            [C, "export-hf", "--load", "{C}/ckpt", "--save", "{C}/hf"],
            ("{C}/ckpt",),
            prepare=damaged_checkpoint(fx),
        ),
        Case(
            "convert_checkpoint",
            "import: missing --hf-dir",
            [C, "import-hf", "--hf-dir", "{C}/none", "--save", "{C}/ckpt"],
            ("{C}/none",),
        ),
        Case(
            "convert_checkpoint",
            "import: bad config.json",
            [C, "import-hf", "--hf-dir", "{C}/hf", "--save", "{C}/ckpt"],
            ("{C}/hf/config.json",),
            prepare=write("hf/config.json", "{not json"),
        ),
        Case(
            "convert_checkpoint",
            "export: --save is a file",
            [C, "export-hf", "--load", "{CKPT}", "--save", "{C}/file"],
            ("{C}/file",),
            prepare=write("file", "x"),
        ),
        Case(
            "convert_checkpoint",
            "export: full disk",
            [C, "export-hf", "--load", "{CKPT}", "--save", "{C}/hf"],
            ("{C}/hf",),
            file_limit=100_000,
        ),
        Case(
            "convert_checkpoint",
            "export: SIGKILL mid-run, rerun",
            [C, "export-hf", "--load", "{CKPT}", "--save", "{C}/hf"],
            ("{C}/hf",),
            may_succeed=True,
            stop=(signal.SIGKILL, ".hf.partial-*/*", 0.2),
        ),
        # pretrain
        Case("pretrain", "missing --data-path", [*pretrain, "--data-path", "{C}/none"], ("{C}/none",)),
        Case(
            "pretrain",
            "global batch not divisible",
            [*pretrain, *data, "--global-batch-size", "3", "--micro-batch-size", "2"],
            ("--global-batch-size",),
        ),
        Case("pretrain", "missing tokenizer", [*pretrain, *data, "--tokenizer-model", "{C}/none"], ("{C}/none",)),
        Case("pretrain", "--seq-length 0", [*pretrain, *data, "--seq-length", "0"], ("--seq-length",)),
        Case("pretrain", "--split a,b", [*pretrain, *data, "--split", "a,b"], ("--split",)),
        Case(
            "pretrain",
            "truncated dataset .bin",
            [*pretrain, "--data-path", "{C}/data"],
            ("{C}/data.bin",),
            prepare=truncated_copy("TEXT", fx, DATASET, ".bin"),
        ),
        Case(
            "pretrain",
            "damaged checkpoint shard",
            [*pretrain, *data, "--load", "{C}/ckpt", "--save", "{C}/ckpt", "--eval-interval", "2", "--eval-iters", "1"],
            ("{C}/ckpt",),
            prepare=damaged_checkpoint(fx),
        ),
        Case(
            "pretrain",
            "SIGTERM mid-run, rerun",
            [*pretrain, *data, "--train-iters", "12", "--save", "{C}/ckpt", "--log-interval", "1"],
            may_succeed=True,
            stop=(signal.SIGTERM, "ckpt/metrics.jsonl", 3),
            timeout=400,
        ),
        # encode_images
        Case("encode_images", "missing input", [*enc, "--input", "{C}/none.jsonl"], ("{C}/none.jsonl",)),
        Case(
            "encode_images",
            "missing --vqgan",
            [E, "--vqgan", "{C}/none", "--input", "{IMAGES}", "--output", "{C}/codes.jsonl"],
            ("{C}/none",),
        ),
        Case("encode_images", "--batch-size 0", [*enc, "--input", "{IMAGES}", "--batch-size", "0"], ("--batch-size",)),
        Case(
            "encode_images",
            "--vqgan-config alone",
            [E, "--vqgan-config", "{C}/x.yaml", "--input", "{IMAGES}", "--output", "{C}/codes.jsonl"],
            ("--vqgan-checkpoint",),
        ),
        Case(
            "encode_images",
            "missing image, --strict",
            [*enc, "--input", "{C}/in.jsonl", "--strict"],
            ("{C}/in.jsonl:1",),
            prepare=write("in.jsonl", '{"image": "gone.png", "caption": "x"}\n'),
        ),
        Case(
            "encode_images",
            "not an image, --strict",
            [*enc, "--input", "{C}/in.jsonl", "--strict"],
            ("{C}/in.jsonl:1",),
            prepare=lambda c: (
                write("in.jsonl", '{"image": "x.png", "caption": "x"}\n')(c),
                write("x.png", b"not a png")(c),
            ),
        ),
        Case(
            "encode_images",
            "output folder missing",
            [E, "--vqgan", "{VQ}", "--input", "{IMAGES}", "--output", "{C}/no/codes.jsonl"],
            ("{C}/no/codes.jsonl:",),  # the output, not its .partial
            may_succeed=True,
        ),
        Case(
            "encode_images",
            "two runs at once",
            [*enc, "--input", "{IMAGES}"],
            ("{C}/codes.jsonl",),
            may_succeed=True,
            concurrent=True,
        ),
        # generate
        Case("generate", "missing --hf", [G, "--hf", "{C}/none", "--prompt", "a"], ("{C}/none",)),
        Case(
            "generate",
            "--tokenizer of another vocabulary",
            [*hf, "--tokenizer", "{C}/tok", "--prompt", "a", "--max-new-tokens", "4"],
            ("--tokenizer",),
            prepare=lambda c: __import__("megatron_unix.data.tokenizer", fromlist=["x"]).train_bpe_tokenizer(
                ["some other text entirely"] * 20, 300, c / "tok"
            ),
        ),
        Case("generate", "--device cuda without CUDA", [*hf, "--device", "cuda", "--prompt", "a"], ("--device",)),
        Case("generate", "--device cuda:banana", [*hf, "--device", "cuda:banana", "--prompt", "a"], ("--device",)),
        Case(
            "generate",
            "--cfg-scale nan",
            [*hf, "--mode", "t2i", "--cfg-scale", "nan", "--prompt", "a", "--vqgan", "{VQ}", "--output-dir", "{C}/out"],
            ("--cfg-scale",),
        ),
        Case(
            "generate",
            "t2i: --codes-per-image the VQGAN does not decode",
            [
                *hf,
                "--mode",
                "t2i",
                "--prompt",
                "a",
                "--vqgan",
                "{VQ}",
                "--codes-per-image",
                "7",
                "--output-dir",
                "{C}/o",
            ],
            ("--codes-per-image",),
        ),
        Case(
            "generate",
            "i2t: missing --image",
            [*hf, "--mode", "i2t", "--image", "{C}/none.png", "--vqgan", "{VQ}"],
            ("{C}/none.png",),
        ),
        Case("generate", "missing --prompts-file", [*hf, "--prompts-file", "{C}/none.txt"], ("{C}/none.txt",)),
        Case("generate", "--top-p 2", [*hf, "--prompt", "a", "--top-p", "2"], ("--top-p",)),
        Case("generate", "--max-new-tokens 0", [*hf, "--prompt", "a", "--max-new-tokens", "0"], ("--max-new-tokens",)),
        Case("generate", "text mode without a prompt", [*hf], ("--prompt",)),
        # evaluate
        Case(
            "evaluate",
            "loss --eval-iters 0",
            [V, "loss", "--load", "{CKPT}", "--eval-iters", "0", "--output-dir", "{C}/out"],
            ("--eval-iters",),
        ),
        Case(
            "evaluate",
            "loss: missing --load",
            [V, "loss", "--load", "{C}/none", "--output-dir", "{C}/out"],
            ("{C}/none",),
        ),
        Case(
            "evaluate",
            "loss: missing --data-path",
            [V, "loss", "--load", "{CKPT}", "--data-path", "{C}/none", "--output-dir", "{C}/out"],
            ("{C}/none",),
        ),
        Case(
            "evaluate",
            "understanding: missing --benchmark-dir",
            [
                V,
                "understanding",
                "--hf",
                "{HF}",
                "--benchmark-dir",
                "{C}/none",
                "--vqgan",
                "{VQ}",
                "--output-dir",
                "{C}/out",
            ],
            ("{C}/none",),
        ),
        Case(
            "evaluate",
            "generation: missing --geneval-prompts",
            [
                V,
                "generation",
                "--hf",
                "{HF}",
                "--geneval-prompts",
                "{C}/none.jsonl",
                "--vqgan",
                "{VQ}",
                "--output-dir",
                "{C}/out",
            ],
            ("{C}/none.jsonl",),
        ),
        Case("evaluate", "report: missing folder", [V, "report", "{C}/none", "--output-dir", "{C}/out"], ("{C}/none",)),
        Case(
            "evaluate",
            "report: bad results.json",
            [V, "report", "{C}/run", "--output-dir", "{C}/out"],
            ("{C}/run/results.json",),
            prepare=write("run/results.json", "{not json"),
        ),
        Case(
            "evaluate", "text: missing --hf", [V, "text", "--hf", "{C}/none", "--output-dir", "{C}/out"], ("{C}/none",)
        ),
        # analyze_gradients
        Case(
            "analyze_gradients",
            "modality-loss given --text-data",
            [*ana, "--mode", "modality-loss", "--text-data", "{TEXT}", "--mm-data", "{PAIRS}"],
            ("--text-data", "--mode"),
        ),
        Case(
            "analyze_gradients",
            "image-text data as --text-data",
            [*ana, "--text-data", "{PAIRS}", "--mm-data", "{PAIRS}"],
            ("--text-data {PAIRS}", "{PAIRS}_vision.npy"),
        ),
        Case(
            "analyze_gradients",
            "text data as --mm-data",
            [*ana, "--text-data", "{TEXT}", "--mm-data", "{TEXT}"],
            ("--mm-data {TEXT}",),
        ),
        Case(
            "analyze_gradients",
            "--batches 0",
            [*ana, "--batches", "0", "--text-data", "{TEXT}", "--mm-data", "{PAIRS}"],
            ("--batches",),
        ),
        Case(
            "analyze_gradients", "missing --load", [A, "--load", "{C}/none", "--output-dir", "{C}/out"], ("{C}/none",)
        ),
        Case(
            "analyze_gradients",
            "missing --mm-data prefix",
            [*ana, "--text-data", "{TEXT}", "--mm-data", "{C}/none"],
            ("{C}/none",),
        ),
        Case(
            "analyze_gradients",
            "TP 2 in one process",
            [*ana, "--tensor-model-parallel-size", "2", "--text-data", "{TEXT}", "--mm-data", "{PAIRS}"],
            ("--tensor-model-parallel-size",),
        ),
        Case(
            "analyze_gradients",
            "full disk (the packing cache is written first)",
            [*ana, "--text-data", "{TEXT}", "--mm-data", "{PAIRS}", "--data-cache-path", "{C}/cache"],
            ("{C}/cache", "--data-cache-path"),
            file_limit=1000,
        ),
        # conditional_entropy
        Case("conditional_entropy", "missing --data-path", [*ent, "--data-path", "{C}/none"], ("{C}/none",)),
        Case("conditional_entropy", "--max-n 0", [*ent, "--data-path", "{TEXT}", "--max-n", "0"], ("--max-n",)),
        Case(
            "conditional_entropy",
            "truncated .bin",
            [*ent, "--data-path", "{C}/data"],
            ("{C}/data.bin",),
            prepare=truncated_copy("TEXT", fx, DATASET, ".bin"),
        ),
        Case(
            "conditional_entropy",
            "no vocabulary record",
            [*ent, "--data-path", "{C}/data"],
            ("{C}/data_vocab.json",),
            prepare=truncated_copy("TEXT", fx, DATASET[:-1], None),
        ),
        Case(
            "conditional_entropy",
            "missing --temp-dir",
            [*ent, "--data-path", "{TEXT}", "--temp-dir", "{C}/none"],
            ("--temp-dir",),
        ),
        Case(
            "conditional_entropy",
            "--output-dir is a file",
            [H, "--data-path", "{TEXT}", "--output-dir", "{C}/file"],
            ("{C}/file",),
            prepare=write("file", "x"),
        ),
        Case(
            "conditional_entropy",
            "unreadable progress record",
            [*ent, "--data-path", "{TEXT}"],
            ("{C}/out/.entropy-progress.json",),
            prepare=write("out/.entropy-progress.json", "{x"),
        ),
        Case(
            "conditional_entropy",
            "full disk while spilling",
            [*ent, "--data-path", "{BIG}", "--memory-budget-mb", "2"],
            ("--temp-dir",),
            file_limit=50_000,
        ),
        *[
            Case(
                "conditional_entropy",
                f"{sig.name} mid-run, rerun",
                [*ent, "--data-path", "{TEXT}", "{BIG}", "--memory-budget-mb", "2"],
                may_succeed=True,
                stop=(sig, "out/.conditional-entropy-*/*/*", 0.5),
            )
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL)
        ],
        Case(
            "conditional_entropy",
            "two runs at once",
            [*ent, "--data-path", "{TEXT}"],
            ("{C}/out",),
            may_succeed=True,
            concurrent=True,
        ),
        # plot_losses
        Case(
            "plot_losses",
            "bad JSON line",
            [L, "{C}/m.jsonl"],
            ("{C}/m.jsonl:2",),
            prepare=write("m.jsonl", '{"iteration": 1, "text_loss": 3.0}\n{"iteration": 2, "text_loss": }\n'),
        ),
        Case(
            "plot_losses",
            "record without iteration",
            [L, "{C}/m.jsonl"],
            ("{C}/m.jsonl:1",),
            prepare=write("m.jsonl", '{"text_loss": 3.0}\n'),
        ),
        Case("plot_losses", "missing file", [L, "{C}/none.jsonl"], ("{C}/none.jsonl",)),
        Case("plot_losses", "empty file", [L, "{C}/m.jsonl"], ("{C}/m.jsonl",), prepare=write("m.jsonl", "")),
        Case(
            "plot_losses",
            "--codebook-size 0",
            [L, "{METRICS}", "--codebook-size", "0", "--output", "{C}/l.png"],
            ("--codebook-size",),
        ),
        Case(
            "plot_losses",
            "--codebook-size -1",
            [L, "{METRICS}", "--codebook-size", "-1", "--output", "{C}/l.png"],
            ("--codebook-size",),
        ),
        Case(
            "plot_losses",
            "output folder missing",
            [L, "{METRICS}", "--output", "{C}/no/l.png"],
            ("{C}/no/l.png",),
            may_succeed=True,
        ),
        Case(
            "plot_losses",
            "--labels count",
            [L, "{METRICS}", "{METRICS}", "--labels", "a", "--output", "{C}/l.png"],
            ("--labels",),
        ),
        Case(
            "plot_losses",
            "full disk writing the PNG",
            [L, "{METRICS}", "--output", "{C}/l.png"],
            ("{C}/l.png",),
            file_limit=2000,
        ),
    ]


# --------------------------------------------------------------------------------------------- running


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def _start(cmd: list[str], limit: int | None) -> subprocess.Popen:
    def cap() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as from a terminal (a background shell ignores it)
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=cap,
        start_new_session=True,  # its own process group, which a Ctrl-C reaches whole
    )


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int | None, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        return None, err + "\n(timed out)"


def run_case(case: Case, index: int, work: Path, fixtures: dict[str, str]) -> Outcome:
    folder = work / "cases" / f"{index:03d}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    values = {**fixtures, "C": str(folder)}
    if case.prepare:
        case.prepare(folder)
    before = set(leftovers(folder))
    cmd = [PY, *(_fill(a, values) for a in case.argv)]
    start, said = time.perf_counter(), None
    if case.concurrent:
        procs = [_start(cmd, None) for _ in range(2)]
        results = [_finish(p, case.timeout) for p in procs]
        rc = 0 if all(r == 0 for r, _ in results) else next(r for r, _ in results if r != 0)
        err = "\n".join(e for _, e in results)
    elif case.stop:
        signum, pattern, delay = case.stop
        proc = _start(cmd, None)
        deadline = time.monotonic() + case.timeout
        while pattern and not list(folder.glob(pattern)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        stopped_early = proc.poll() is not None
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)  # Ctrl-C: the terminal signals the whole foreground group
        else:
            proc.send_signal(signum)
        first_rc, first_err = _finish(proc, case.timeout)
        rc, err = _finish(_start(cmd, None), case.timeout)
        said = f"stopped: exit {first_rc}, {_said(first_err, 'clear')[:80]!r}; rerun: exit {rc}, {_said(err, 'clear')[:80]!r}"
        err = first_err + "\n" + err  # a traceback from either counts
        if stopped_early:
            said = "ended before the stop; " + said
    else:
        rc, err = _finish(_start(cmd, case.file_limit), case.timeout)
    left = [p for p in leftovers(folder) if p not in before]
    names = tuple(_fill(n, values) for n in case.names)
    status = classify(rc, err, names, case.may_succeed, left)
    said = said or _said(err, status)
    return Outcome(case, status, rc, said, time.perf_counter() - start, left)


def _said(stderr: str, status: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if status == "traceback":
        return next((line for line in reversed(lines) if not line.startswith("File ")), "")
    errors = [line for line in lines if "error" in line.lower() or "stopped by" in line or "removed" in line]
    return (errors or lines or [""])[-1]


def table(outcomes: list[Outcome], work: Path) -> str:
    counts = Counter(o.status for o in outcomes)
    lines = [
        "| tool | fault | class | exit | what it said |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        said = o.said.replace(str(work), "W").replace("|", "\\|")[:160]
        left = f" LEFT: {', '.join(p.name for p in o.left)}" if o.left else ""
        lines.append(f"| {o.case.tool} | {o.case.fault} | {o.status} | {o.rc} | {said}{left} |")
    summary = " / ".join(f"{name} {counts[name]}" for name in CLASSES)
    return f"{len(outcomes)} faults tried: {summary}\n\n" + "\n".join(lines)


def write_markdown(path: Path, text: str, done: int, total: int) -> None:
    from megatron_unix.files import write_text_atomically

    command = "python tools/fault_matrix.py --markdown docs/faults.md"
    partial = "" if done == total else f"(incomplete: {done} of {total} cases run)\n\n"
    write_text_atomically(
        path,
        "# Fault matrix\n\nMeasured with `" + command + "` (W: its work folder; small data it builds itself: "
        "the shipped examples, a tiny model trained 2 iterations, its export, a random tiny VQGAN). Classes: "
        "clear (exit 2 naming the file or flag; or, for a stop then a rerun and for two runs at once, a right "
        "finish), unclear, traceback, silent (exit 0 where it had to refuse), left-behind (temporary files after "
        "the run and the rerun). A full disk is real for the program: its files are capped (RLIMIT_FSIZE).\n\n"
        + partial
        + text
        + "\n",
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/fault-matrix"), help="fixtures and case folders")
    p.add_argument("--markdown", type=Path, help="write the table here (docs/faults.md)")
    p.add_argument("--only", nargs="+", help="only these tools (e.g. plot_losses conditional_entropy)")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once")
    args = p.parse_args(argv)
    fixtures = build_fixtures(args.work_dir)
    chosen = [(i, c) for i, c in enumerate(cases(fixtures)) if not args.only or c.tool in args.only]
    outcomes = []
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_case, case, i, args.work_dir, fixtures) for i, case in chosen]
        for future in futures:
            outcomes.append(future.result())
            o = outcomes[-1]
            print(f"{o.status:<12} {o.case.tool:<20} {o.case.fault:<40} {o.seconds:5.1f} s  {o.said[:120]}", flush=True)
            if args.markdown:  # as it goes: a matrix stopped early still shows what it measured
                write_markdown(args.markdown, table(outcomes, args.work_dir), len(outcomes), len(chosen))
    print("\n" + table(outcomes, args.work_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
