"""Gradient conflict (spec §7): the reduction against plain autograd on a tiny model, the tool's outputs
and refusals, TP/PP/DP runs against one process, and --grad-conflict-interval in training (the loss
curve unchanged, the value equal to the tool's on the same batch)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import MIXED_ROWS, make_batch, make_batches

ROOT = Path(__file__).resolve().parents[1]
TEXT_ROWS = [["text"] * 4, ["text"] * 4]
WEIGHT = re.compile(
    r"decoder\.layers\.(\d+)\.(vision\.)?(self_attention\.linear_qkv|self_attention\.linear_proj|mlp\.linear_fc1|mlp\.linear_fc2)\.weight"
)


# --------------------------------------------------------------- the math against plain autograd


def plain_groups(model, config, grads: dict[str, torch.Tensor]) -> dict[tuple[int, str], torch.Tensor]:
    """Each group's gradient, cut out of the fused tensors by head arithmetic (not the conversion table)."""
    groups, heads, dim = config.num_query_groups, config.num_attention_heads, config.kv_channels
    out = {}
    for name, grad in grads.items():
        match = WEIGHT.fullmatch(name)
        if not match:
            continue
        layer, copy, kind = int(match[1]), match[2] or "", match[3]
        if kind.endswith("linear_qkv"):
            per = grad.reshape(groups, heads // groups + 2, dim, -1)
            pieces = {"q": per[:, :-2], "k": per[:, -2], "v": per[:, -1]}
        elif kind.endswith("linear_fc1"):
            pieces = dict(zip(("gate", "up"), grad.chunk(2)))
        else:
            pieces = {"o" if kind.endswith("linear_proj") else "down": grad}
        out.update({(layer, copy + group): piece.reshape(-1) for group, piece in pieces.items()})
    return out


def plain_gradient(model, config, global_batches, part: str | None = None) -> dict[tuple[int, str], torch.Tensor]:
    """Sum over global batches of the mean over micro-batches of d(masked mean CE)/dW, by torch.autograd
    on the unwrapped model; ``part`` keeps one modality's targets (denominator: all unmasked targets)."""
    from megatron_unix.model.forward import stream_forward

    names = [n for n, _ in model.named_parameters()]
    total = None
    for micro_batches in global_batches:
        for batch in micro_batches:
            losses = stream_forward(model, batch, batch["labels"]).reshape(-1)
            mask = batch["loss_mask"].reshape(-1).float()
            vision = (batch["labels"].reshape(-1) >= config.vq_offset).float() * mask
            keep = {"text": mask - vision, "vision": vision, None: mask}[part]
            loss = (losses * keep).sum() / mask.sum() / len(micro_batches)
            grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
            grads = {n: torch.zeros_like(p) if g is None else g for n, g, p in zip(names, grads, model.parameters())}
            grouped = plain_groups(model, config, grads)
            total = grouped if total is None else {k: total[k] + v for k, v in grouped.items()}
    return total


def plain_cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if not a.norm() or not b.norm():
        return None
    return F.cosine_similarity(a.double(), b.double(), dim=0).item()


@pytest.fixture(scope="module")
def tiny(megatron_single):
    """A DDP-wrapped tiny Uni-X (TP=PP=1) and an unwrapped copy of its weights."""
    from helpers import build_tiny

    from megatron_unix.training.gradient_conflict import GradientProbe
    from megatron_unix.training.setup import wrap_model

    model, config = build_tiny(seed=3)
    plain, _ = build_tiny(seed=4)
    with torch.no_grad():
        for p, q in zip(model.parameters(), plain.parameters()):
            q.copy_(p)
    ddp = wrap_model(config, model)
    return ddp, GradientProbe(ddp, config), plain, config


def assert_cosines(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if value is None:
            assert got[key] is None, key
        else:
            assert got[key] == pytest.approx(value, abs=2e-5), key


def test_data_conflict_matches_plain_autograd(tiny):
    from megatron_unix.training.gradient_conflict import GROUPS, data_conflict

    ddp, probe, plain, config = tiny
    text = [[make_batch(TEXT_ROWS, 32, seed=10 + 2 * i + j) for j in range(2)] for i in range(2)]
    mm = [[make_batch(MIXED_ROWS, 32, seed=30 + 2 * i + j) for j in range(2)] for i in range(2)]
    halves = [[text[0][0], mm[1][1]], [mm[0][0], text[1][1]]], [[mm[0][1], text[0][1]], [text[1][0], mm[1][0]]]
    rows = data_conflict(probe, ddp, {"text": text, "mm": mm, "A": halves[0], "B": halves[1]})

    g = {name: plain_gradient(plain, config, batches) for name, batches in zip("tmAB", (text, mm, *halves))}
    want_sim = {k: plain_cosine(g["t"][k], g["m"][k]) for k in g["t"]}
    want_base = {k: plain_cosine(g["A"][k], g["B"][k]) for k in g["t"]}
    assert_cosines({(r["layer"], r["group"]): r["similarity"] for r in rows}, want_sim)
    assert_cosines({(r["layer"], r["group"]): r["baseline"] for r in rows}, want_base)
    for r in rows:
        assert r["conflict"] == (None if r["similarity"] is None else pytest.approx(r["baseline"] - r["similarity"]))
    # every group of every layer, and the vision copies of the separated layers (0 and 3)
    assert {r["group"] for r in rows if r["layer"] == 1} == set(GROUPS)
    assert {r["group"] for r in rows if r["layer"] == 0} == set(GROUPS) | {f"vision.{g}" for g in GROUPS}
    assert all(r["similarity"] is None for r in rows if r["group"].startswith("vision."))  # no text gradient
    assert all(r["baseline"] is not None for r in rows)


def test_modality_cosine_matches_plain_autograd(tiny):
    from megatron_unix.training.gradient_conflict import modality_products

    ddp, probe, plain, config = tiny
    batches = make_batches("mixed", 2)
    got = {key: value.cosine for key, value in modality_products(probe, ddp, batches).items()}
    text = plain_gradient(plain, config, [batches], "text")
    vision = plain_gradient(plain, config, [batches], "vision")
    assert_cosines(got, {k: plain_cosine(text[k], vision[k]) for k in text})
    # shared layers mix the modalities; only the last layer's text copy gets no gradient from vision
    # targets (those are predicted from vision inputs: codes and BOI; EOI is predicted from a code)
    last = config.num_layers - 1
    assert {key for key, value in got.items() if value is None} == {k for k in got if k[0] == last and "." not in k[1]}


# ---------------------------------------------------------------------- the tool and training


@pytest.fixture(scope="module")
def data(tmp_path_factory, hf_tokenizer_dir):
    """test_pretrain's datasets: text-only and image-text prefixes."""
    from test_pretrain import data as make_data

    return make_data.__wrapped__(tmp_path_factory, hf_tokenizer_dir)


@pytest.fixture(scope="module")
def initial(data, tmp_path_factory) -> str:
    """A training checkpoint (iteration 0) whose recorded run the tool's defaults come from."""
    from test_pretrain import common_args, run

    save = tmp_path_factory.mktemp("initial")
    run(common_args(data, iters=0) + ["--save", str(save)])
    return str(save)


def analyze(*argv: str, capsys=None) -> int:
    from megatron_unix.cli.analyze_gradients import main

    return main(list(argv))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def conflict_args(data, initial) -> list[str]:
    return ["--load", initial, "--text-data", data["text"], "--mm-data", data["pairs"], "--batches", "2"]


@pytest.fixture(scope="module")
def single_conflict(data, initial, tmp_path_factory, megatron_single) -> tuple[Path, str]:
    """The conflict tool in this process (TP=PP=DP=1): its output folder and what it printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("conflict")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert analyze(*conflict_args(data, initial), "--output-dir", str(out)) == 0
    return out, printed.getvalue()


def test_tool_writes_conflict_table_json_and_plots(single_conflict, initial):
    out, printed = single_conflict
    assert re.search(r"8/8 global batches \| [\d.]+ batches/s \| ETA 0:00:00", printed), printed
    rows = read_csv(out / "grad_conflict.csv")
    assert list(rows[0]) == ["checkpoint", "group", "layer", "similarity", "baseline", "conflict"]
    assert {r["checkpoint"] for r in rows} == {initial}
    for r in rows:
        if r["similarity"]:
            assert float(r["conflict"]) == pytest.approx(float(r["baseline"]) - float(r["similarity"]))
        else:  # a vision copy: text-only data gives it no gradient
            assert r["group"].startswith("vision.") and r["conflict"] == "" and r["baseline"]
    record = json.loads((out / "grad_conflict.json").read_text())
    assert record["checkpoints"][0]["iteration"] == 0 and record["settings"]["global_batch_size"] == 4
    assert len(record["rows"]) == len(rows) == 4 * 7 + 2 * 7  # tiny preset: 4 layers, 1:1 separated
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted(f"grad_conflict_{g}.png" for g in ("q", "k", "v", "o", "gate", "up", "down"))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--text-data", "nowhere/text"], "--text-data nowhere/text: dataset nowhere/text is incomplete"),
        (["--text-data", "TEXT"], "--mm-data must name dataset prefixes in --mode conflict"),
        (["--mode", "modality-loss", "--data-path", "0.5", "TEXT", "0.5", "no/pairs"], "--data-path no/pairs: dataset"),
        (["--batches", "0", "--text-data", "TEXT", "--mm-data", "TEXT"], "--batches 0 is out of range"),
        (["--global-batch-size", "3", "--micro-batch-size", "2"], "--global-batch-size (3) must be divisible"),
        (
            ["--mode", "modality-loss", "--text-data", "TEXT", "--mm-data", "PAIRS"],
            "--text-data and --mm-data are read in --mode conflict only, not in --mode modality-loss",
        ),
        (["--text-data", "TEXT", "--mm-data", "PAIRS", "--split", "1,0,0"], "--split is read in --mode modality-loss"),
        (["--text-data", "PAIRS", "--mm-data", "PAIRS"], "--text-data PAIRS is not text-only: 60 of its documents"),
        (["--text-data", "TEXT", "--mm-data", "TEXT"], "--mm-data TEXT holds no image tokens (TEXT_vision.npy)"),
    ],
    ids=[
        "missing-prefix",
        "missing-mm",
        "missing-blended-prefix",
        "batches",
        "batch-sizes",
        "conflict-flags-in-modality-loss",
        "modality-loss-flag-in-conflict",
        "image-text-as-text",
        "text-as-image-text",
    ],
)
def test_tool_refuses_naming_the_flag(data, initial, tmp_path, capsys, flags, message):
    def named(text: str) -> str:
        return text.replace("TEXT", data["text"]).replace("PAIRS", data["pairs"])

    flags = [named(f) for f in flags]
    assert analyze("--load", initial, *flags, "--output-dir", str(tmp_path)) == 2
    assert named(message) in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_full_disk_while_writing_the_table_is_named(data, initial, single_conflict, tmp_path):
    """Files capped at 1000 bytes (RLIMIT_FSIZE: writes past it fail with EFBIG, as on a full disk): the
    table is refused naming it and nothing is left in the folder (the packing cache exists already)."""
    import resource

    out = tmp_path / "out"
    cmd = [sys.executable, "tools/analyze_gradients.py", *conflict_args(data, initial), "--output-dir", str(out)]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY)),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"error: --output-dir {out}: cannot write {out / 'grad_conflict.csv'}: File too large" in proc.stderr
    assert list(out.iterdir()) == []


def test_tool_refuses_a_missing_checkpoint(tmp_path, capsys):
    assert analyze("--load", str(tmp_path / "none"), "--output-dir", str(tmp_path)) == 2
    assert f"--load {tmp_path / 'none'}: no checkpoint there" in capsys.readouterr().err


def by_key(rows: list[dict], *columns: str) -> dict[tuple, float | None]:
    return {
        tuple(r[c] for c in ("checkpoint", "group", "layer", "iteration") if c in r): tuple(r[c] for c in columns)
        for r in rows
    }


def assert_same_values(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, values in want.items():
        for a, b in zip(got[key], values):
            assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-5, abs=1e-6)), key


@pytest.mark.slow
def test_training_flag_keeps_the_loss_curve_and_equals_the_tool(data, initial, tmp_path, capsys, megatron_single):
    """--grad-conflict-interval 1 changes no loss, grad norm or LR, and records per iteration the
    cosines that the tool's modality-loss mode computes from the checkpoint before that iteration."""
    from test_pretrain import common_args, losses, run

    start = ["--pretrained-checkpoint", initial]
    run(common_args(data, iters=2) + start + ["--save", str(tmp_path / "off")])
    on = tmp_path / "on"
    proc = run(
        common_args(data, iters=2)
        + start
        + ["--save", str(on), "--save-interval", "1", "--grad-conflict-interval", "1"]
    )
    assert proc.stdout.count("--grad-conflict-interval 1: those iterations run 2 extra forward-backward") == 1
    assert proc.stdout.count("gradient cosine text vs vision loss, mean over layers: ") == 2
    expected, got = losses(tmp_path / "off" / "metrics.jsonl"), losses(on / "metrics.jsonl")
    assert sorted(got) == [1, 2]
    for it in (1, 2):
        for key in ("loss", "text_loss", "vision_loss", "grad_norm", "lr"):
            assert got[it][key] == expected[it][key], (it, key)
    records = [json.loads(line) for line in (on / "metrics.jsonl").read_text().splitlines()]
    measured = {r["iteration"]: r for r in records if "grad_cos/layer00/q" in r}
    assert sorted(measured) == [1, 2]
    assert "grad_cos/layer03/vision.down" in measured[1] and "grad_cos/layer01/vision.q" not in measured[1]

    out = tmp_path / "tool"
    loads = ["--load", initial, str(on / "iter_0000001")]
    assert analyze("--mode", "modality-loss", *loads, "--batches", "1", "--output-dir", str(out)) == 0
    rows = read_csv(out / "modality_cosine.csv")
    assert {(r["checkpoint"], r["iteration"]) for r in rows} == {(initial, "1"), (str(on / "iter_0000001"), "2")}
    for r in rows:
        value = measured[int(r["iteration"])][f"grad_cos/layer{int(r['layer']):02d}/{r['group']}"]
        assert (value is None) == (r["similarity"] == ""), r
        assert value is None or float(r["similarity"]) == pytest.approx(value, rel=1e-6, abs=1e-7), r


def torchrun(nproc: int, *argv: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={25000 + (os.getpid() + nproc) % 4000}",
        str(ROOT / "tools" / "analyze_gradients.py"),
        *argv,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.dist
@pytest.mark.slow
def test_tensor_parallel_conflict_equals_one_process(data, initial, single_conflict, tmp_path):
    """TP=2: q/k/v and gate/up split per shard, dot products and norms summed over the TP group."""
    torchrun(2, *conflict_args(data, initial), "--tensor-model-parallel-size", "2", "--output-dir", str(tmp_path))
    columns = ("similarity", "baseline", "conflict")
    want = by_key(json.loads((single_conflict[0] / "grad_conflict.json").read_text())["rows"], *columns)
    assert_same_values(by_key(json.loads((tmp_path / "grad_conflict.json").read_text())["rows"], *columns), want)


@pytest.mark.dist
@pytest.mark.slow
def test_pipeline_and_data_parallel_modality_cosine_equals_one_process(initial, tmp_path, megatron_single):
    """PP=2 x DP=2: each stage's layers gathered, gradients already averaged over data-parallel ranks."""
    argv = ["--mode", "modality-loss", "--load", initial, "--batches", "1"]
    assert analyze(*argv, "--output-dir", str(tmp_path / "one")) == 0
    torchrun(4, *argv, "--pipeline-model-parallel-size", "2", "--output-dir", str(tmp_path / "pp2dp2"))

    def read(name: str) -> dict:
        return by_key(json.loads((tmp_path / name / "modality_cosine.json").read_text())["rows"], "similarity")

    assert_same_values(read("pp2dp2"), read("one"))


def test_an_unwritable_packing_cache_is_named(data, initial, tmp_path, capsys, megatron_single):
    """--data-cache-path under a file: the cache cannot be written; the error names it and the flag
    (megatron-core's bare Exception around it is unwrapped: training reads the same error)."""
    (tmp_path / "file").write_text("x")
    cache = tmp_path / "file" / "cache"
    args = conflict_args(data, initial) + ["--data-cache-path", str(cache), "--output-dir", str(tmp_path / "out")]
    assert analyze(*args) == 2
    err = capsys.readouterr().err
    assert f"error: {cache}" in err and "cannot write the packing cache" in err and "--data-cache-path" in err
    assert not (tmp_path / "out").exists()
