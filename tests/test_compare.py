"""tools/compare.py: the four variants of the paper's Table 4 trained, exported, evaluated and reported from
one command, at the tiny preset on the shipped data. One run, stopped by SIGTERM while the second variant
is under way and run again, serves every test: the report's numbers against the runs' own files and
models, the resume, and the refusal of other settings."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from megatron_unix.cli.compare import job_argv

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("shared", "hardmoe", "mot", "unix")
FLAGS = ["--train-iters", "3", "--global-batch-size", "2", "--eval-iters", "1", "--grad-batches", "1"]
FLAGS += ["--log-interval", "1"]


def compare(out: Path, *flags: str, **kwargs) -> subprocess.Popen:
    argv = [sys.executable, "-m", "megatron_unix.cli.compare", "--output-dir", str(out), *flags]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The comparison stopped by SIGTERM once the second variant logged a training iteration, then
    run again to its end: (output folder, the stop's (status, stderr), step records before the rerun)."""
    out = tmp_path_factory.mktemp("compare") / "out"
    first = compare(out, *FLAGS)
    metrics = out / "checkpoints" / "hardmoe" / "metrics.jsonl"
    deadline = time.monotonic() + 900
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the second variant never started training"
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    _, stopped_err = first.communicate(timeout=300)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "steps").glob("*.json")}
    second = compare(out, *FLAGS)
    stdout, stderr = second.communicate(timeout=1800)
    assert second.returncode == 0, stdout + stderr
    return out, (first.returncode, stopped_err), before, stdout


@pytest.mark.slow
def test_sigterm_ends_in_one_line_and_the_rerun_resumes(run):
    out, (status, stderr), before, stdout = run
    assert status == 128 + signal.SIGTERM
    assert len(stderr.strip().splitlines()) == 1 and "stopped by SIGTERM" in stderr, stderr
    # what had finished is kept, not redone: the shared variant trained once
    assert {"train-shared.json", "export-shared.json", "loss-shared.json"} <= before.keys()
    assert "train-hardmoe.json" not in before  # it was stopped mid-training
    after = {p.name: p.stat().st_mtime_ns for p in (out / "steps").glob("*.json")}
    assert all(after[name] == mtime for name, mtime in before.items())
    assert "train-shared: done before" in stdout
    assert (out / "logs" / "train-shared.log").read_text().count("\n== ") + 1 == 1
    # the stopped training saved on SIGTERM and the rerun resumed from that checkpoint
    hardmoe = (out / "logs" / "train-hardmoe.log").read_text()
    assert hardmoe.startswith("== ") and hardmoe.count("\n== ") == 1, hardmoe
    resumed = hardmoe.split("\n== ", 1)[1]
    assert "loaded checkpoint" in resumed and "at iteration 0" not in resumed
    iterations = [r["iteration"] for r in records(out / "checkpoints" / "hardmoe" / "metrics.jsonl") if "loss" in r]
    assert iterations == [1, 2, 3]  # each iteration trained once, across the two attempts


@pytest.mark.slow
def test_report_rows_are_the_runs_numbers(run, megatron_single):
    from transformers import AutoModelForCausalLM

    from megatron_unix.conversion.convert import load_megatron
    from megatron_unix.model.builder import parameter_counts

    out = run[0]
    report = json.loads((out / "report.json").read_text())
    rows = report["variants"]
    assert list(rows) == list(VARIANTS)
    assert report["tokens_per_variant"] == 3 * 2 * 1152
    shared_speed = rows["shared"]["tokens_per_sec"]
    for variant, row in rows.items():
        metrics = records(out / "checkpoints" / variant / "metrics.jsonl")
        validation = [r for r in metrics if "valid_loss" in r]
        assert [r["iteration"] for r in validation] == [3]
        # tools/evaluate.py loss on the final checkpoint equals the run's own validation at its end
        for key in ("loss", "text_loss", "vision_loss"):
            assert row["evaluated_loss"][key] == validation[0][f"valid_{key}"]
        windows = [r["tokens_per_sec"] for r in metrics if "tokens_per_sec" in r]
        assert row["tokens_per_sec"] == pytest.approx(statistics.fmean(windows[1:]))
        assert row["throughput_ratio"] == pytest.approx(row["tokens_per_sec"] / shared_speed)
        # parameters: the model's, less the rows Megatron pads the vocabulary with (its output is tied)
        model, config, _ = load_megatron(out / "checkpoints" / variant, verify=False)
        hf_config = json.loads((out / "hf" / variant / "config.json").read_text())
        padded = model.embedding.word_embeddings.weight.shape[0]
        padding = (padded - hf_config["vocab_size"]) * config.hidden_size
        assert row["parameters"] == parameter_counts(model)[0] - padding
        # and the HF model's, as transformers builds it from the export's own modeling code
        hf = AutoModelForCausalLM.from_pretrained(out / "hf" / variant, trust_remote_code=True)
        assert row["parameters"] == sum(p.numel() for p in hf.parameters())
        assert row["evaluations"]["loss"] == "done"
        assert row["evaluations"]["text"].startswith("skipped: not requested")
    names = [row["name"] for row in rows.values()]
    assert names == ["Shared (ours)", "HardMoE (ours)", "MoT (ours)", "Uni-X 1:1 (ours)"]
    table = (out / "report.md").read_text()
    for name in [*names, "Shared (paper)", "HardMoE (paper)", "MoT (paper)", "Uni-X 9:5 (paper)"]:
        assert f"| {name} |" in table
    assert f"| Uni-X 1:1 (ours) | {rows['unix']['parameters']:,} |" in table
    assert "docs/spec.md §8" in table


@pytest.mark.slow
def test_conflict_profile_and_plots(run):
    out = run[0]
    rows = json.loads((out / "report.json").read_text())["variants"]
    table = json.loads((out / "gradients" / "grad_conflict.json").read_text())["rows"]
    for variant in VARIANTS:
        mine = [r for r in table if r["checkpoint"] == str(out / "checkpoints" / variant)]
        layers = sorted({r["layer"] for r in mine})
        assert layers == [0, 1, 2, 3]
        expected = [
            statistics.fmean(
                r["conflict"]
                for r in mine
                if r["layer"] == layer and "." not in r["group"] and r["conflict"] is not None
            )
            for layer in layers
        ]
        assert [value for _, value in rows[variant]["grad_conflict"]] == pytest.approx(expected)
        assert all(math.isfinite(value) for value in expected)
    for name in ("losses.png", "grad_conflict.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size == (900, 540)


@pytest.mark.slow
def test_other_settings_are_refused_naming_them(run):
    out = run[0]
    report = (out / "report.json").stat().st_mtime_ns
    refused = compare(out, *FLAGS[:-2], "--log-interval", "2", "--seed", "7")
    stdout, stderr = refused.communicate(timeout=120)
    assert refused.returncode == 2
    assert "settings.json was written with other settings" in stderr
    assert "log_interval: 1 there, 2 now" in stderr and "seed: 1234 there, 7 now" in stderr
    assert (out / "report.json").stat().st_mtime_ns == report


def test_slurm_jobs_run_the_same_command_one_stage_each():
    argv = ["--train-iters", "3", "--slurm", "--sbatch-args", "--time=1:00:00", "--only=mot", "--seed", "5"]
    assert job_argv(argv) == ["--train-iters", "3", "--seed", "5"]


def plan_settings(**overrides):
    from megatron_unix.cli.compare import build_parser, settings_of

    parser = build_parser()
    return settings_of(parser, parser.parse_args([*FLAGS, *overrides.get("argv", [])]))


def test_plan_passes_each_family_its_flags_and_says_why_one_is_skipped(tmp_path):
    from megatron_unix.comparison.plan import Layout, build_plan

    layout = Layout(tmp_path)
    settings = plan_settings(argv=["--generation-args", "--geneval-prompts p.jsonl --vqgan 'my vqgan'"])
    steps = {step.name: step for step in build_plan(settings, layout, ["python"])}
    generation = steps["generation-mot"]
    assert generation.argv[-4:] == ("--geneval-prompts", "p.jsonl", "--vqgan", "my vqgan")
    assert generation.argv[generation.argv.index("--hf") + 1] == str(tmp_path / "hf" / "mot")
    (tmp_path / "hf" / "mot").mkdir(parents=True)
    (tmp_path / "hf" / "mot" / "config.json").write_text(json.dumps({"architectures": ["MoTQwen3ForCausalLM"]}))
    assert "carries no HF modeling code" in generation.skip()
    (tmp_path / "hf" / "mot" / "config.json").write_text(json.dumps({"auto_map": {}}))
    assert generation.skip() is None
    assert steps["text-mot"].skip().startswith("not requested: it needs the lm-eval tasks")
    # one budget: the four train on the same data, batches and schedule; only the architecture differs
    architecture = {
        "shared": "--vision-encode-layers 0 --vision-decode-layers 0",
        "hardmoe": "--layer-variant hardmoe --decoder-sparse-step 2 --vision-encode-layers 0 --vision-decode-layers 0",
        "mot": "--layer-variant mot --vision-encode-layers 0 --vision-decode-layers 0",
        "unix": "--vision-encode-layers 1 --vision-decode-layers 1",
    }
    train = {
        " ".join(steps[f"train-{v}"].argv).replace(architecture[v], "").replace(str(layout.checkpoint(v)), "SAVE")
        for v in VARIANTS
    }
    assert len(train) == 1 and "--train-iters 3 --lr" in train.pop()
