"""pretrain_unix.py end to end on CPU: parallel parity, exact resume, crash-safe and SIGTERM saves,
non-finite loss, early errors for bad settings, logging sinks, silenced warnings, and the quickstart."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CODEBOOK, IMAGE_CODES = 64, 16


@pytest.fixture(scope="module")
def data(tmp_path_factory, hf_tokenizer_dir) -> dict[str, str]:
    """A text dataset and an image-text dataset (16-code images) written with the production writer."""
    from conftest import CORPUS

    from megatron_unix.data.indexed import DatasetWriter
    from megatron_unix.data.layouts import pair_sample, text_sample
    from megatron_unix.data.tokenizer import MultimodalTokenizer

    root = tmp_path_factory.mktemp("data")
    tok = MultimodalTokenizer.from_pretrained(hf_tokenizer_dir, codebook_size=CODEBOOK)
    rng = random.Random(0)
    with DatasetWriter(root / "text", tok.model_config_fields()) as writer:
        for line in CORPUS:
            sample = text_sample(tok, line)
            writer.add(sample.tokens, sample.trained, 0)
        writer.commit()
    with DatasetWriter(root / "pairs", tok.model_config_fields()) as writer:
        for i in range(60):
            codes = [rng.randrange(CODEBOOK) for _ in range(IMAGE_CODES)]
            sample = pair_sample(tok, CORPUS[i % 4][:30], codes, rng)
            writer.add(sample.tokens, sample.trained, IMAGE_CODES + 1)
        writer.commit()
    return {"tokenizer": str(hf_tokenizer_dir), "text": str(root / "text"), "pairs": str(root / "pairs")}


def common_args(data: dict[str, str], iters: int = 4) -> list[str]:
    return [
        "--model-preset",
        "tiny",
        "--tokenizer-model",
        data["tokenizer"],
        "--vq-codebook-size",
        str(CODEBOOK),
        "--data-path",
        "0.5",
        data["text"],
        "0.5",
        data["pairs"],
        "--split",
        "90,10,0",
        "--seq-length",
        "64",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "4",
        "--train-iters",
        str(iters),
        "--log-interval",
        "1",
        "--lr",
        "3e-3",
        "--lr-warmup-iters",
        "1",
        "--clip-grad",
        "1.0",
    ]


def run(
    args: list[str], nproc: int = 1, env: dict[str, str] | None = None, check: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            str(20000 + os.getpid() % 9000),
        ]
    )
    proc = subprocess.run(
        launcher + [str(ROOT / "pretrain_unix.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        start_new_session=True,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(metrics_file: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in map(json.loads, metrics_file.read_text().splitlines()) if "loss" in r}


UNDERSTOOD_WARNINGS = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "The pad token id in the tokenizer collides",
    "full scope is deprecated",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
    "`load_state_dict` is deprecated",
    "we are deprecating ShardedTensor",
)
"""Warnings that say nothing actionable here (megatron_unix/known_warnings.py): silenced, or avoided."""


def assert_no_understood_warnings(stderr: str) -> None:
    for message in UNDERSTOOD_WARNINGS:
        assert message not in stderr, stderr[-3000:]


@pytest.fixture(scope="module")
def initial(data, tmp_path_factory) -> str:
    """Initial weights shared by every run: a pipeline stage initialises only its own layers, so
    runs at different PP sizes start from the same checkpoint (as in Megatron-LM)."""
    save = tmp_path_factory.mktemp("initial")
    run(common_args(data, iters=0) + ["--save", str(save)])
    assert (save / "iter_0000000" / "metadata.json").is_file()
    return str(save)


@pytest.fixture(scope="module")
def straight_run(data, initial, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The reference run: 4 iterations in one process, every sink on; its save folder and its output."""
    save = tmp_path_factory.mktemp("straight")
    proc = run(
        common_args(data)
        + [
            "--pretrained-checkpoint",
            initial,
            "--save",
            str(save),
            "--eval-interval",
            "2",
            "--eval-iters",
            "1",
            "--tensorboard-dir",
            str(save / "tb"),
            "--wandb-project",
            "unix-test",
            "--wandb-save-dir",
            str(save),
        ],
        env={"WANDB_MODE": "offline"},
    )
    return save, proc


@pytest.fixture(scope="module")
def straight(straight_run) -> Path:
    return straight_run[0]


def test_metrics_file_and_sinks(straight):
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in train] == [1, 2, 3, 4]
    for key in (
        "iteration",
        "consumed_samples",
        "loss",
        "text_loss",
        "vision_loss",
        "lr",
        "grad_norm",
        "tokens_per_sec",
        "tflops",
        "mfu",
        "mem_gib",
    ):
        assert key in train[0], key
    assert train[-1]["consumed_samples"] == 16
    assert all(r["tokens_per_sec"] > 0 and r["tflops"] > 0 for r in train)
    both = [r for r in train if r["text_loss"] is not None and r["vision_loss"] is not None]
    assert both and all(0 < r["text_loss"] < 10 and 0 < r["vision_loss"] < 10 for r in both)
    valid = [r for r in records if "valid_loss" in r]
    assert [r["iteration"] for r in valid] == [2, 4] and all(r["valid_vision_loss"] > 0 for r in valid)
    assert list((straight / "tb").glob("events.out.tfevents.*"))
    assert list((straight / "wandb").glob("offline-run-*"))
    assert (straight / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


def test_resume_is_exact(data, initial, straight, tmp_path):
    start = ["--pretrained-checkpoint", initial, "--save", str(tmp_path)]
    run(common_args(data) + start + ["--exit-interval", "2"])
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    run(common_args(data) + start + ["--load", str(tmp_path)])
    expected, resumed = losses(straight / "metrics.jsonl"), losses(tmp_path / "metrics.jsonl")
    assert sorted(resumed) == [1, 2, 3, 4]
    for it in range(1, 5):
        assert resumed[it]["loss"] == expected[it]["loss"], it
        assert resumed[it]["grad_norm"] == expected[it]["grad_norm"], it
        assert resumed[it]["lr"] == expected[it]["lr"], it


def test_longer_resume_names_the_schedule_flags(data, straight, tmp_path):
    """Resuming with more --train-iters changes the LR schedule: refused before any work, naming the flags
    (not Megatron's assertion in samples); --override-opt-param-scheduler accepts it."""
    resume = common_args(data, iters=6) + ["--load", str(straight), "--save", str(tmp_path)]
    proc = run(resume, check=False)
    assert proc.returncode == 2
    assert (
        "--lr-decay-iters (default --train-iters): checkpoint 4 iterations (16 samples), this run 6 iterations "
        "(24 samples)"
    ) in proc.stderr and "--override-opt-param-scheduler" in proc.stderr
    doubled = common_args(data, iters=6) + [
        "--global-batch-size",
        "8",
        "--load",
        str(straight),
        "--save",
        str(tmp_path),
    ]
    proc = run(doubled, check=False)
    assert proc.returncode == 2 and "(--global-batch-size: checkpoint 4, this run 8; " in proc.stderr
    run(resume + ["--override-opt-param-scheduler"])
    assert sorted(losses(tmp_path / "metrics.jsonl")) == [5, 6]


def test_checkpoint_and_tokenizer_conflict_names_that_pair(data, initial, sentencepiece_model, tmp_path):
    args = common_args(data) + ["--pretrained-checkpoint", initial, "--save", str(tmp_path)]
    args[args.index("--tokenizer-model") + 1] = str(sentencepiece_model)
    proc = run(args, check=False)
    assert proc.returncode == 2
    assert re.search(
        rf"--tokenizer-model {re.escape(str(sentencepiece_model))} gives (\w+)=\d+ but the checkpoint "
        rf"{re.escape(initial)}/iter_0000000 was trained with \1=\d+",
        proc.stderr,
    )
    assert "preprocessed with another vocabulary" not in proc.stderr


def test_separator_that_the_checkpoint_does_not_route_is_refused(data, initial, tmp_path):
    proc = run(
        common_args(data)
        + ["--pretrained-checkpoint", initial, "--save", str(tmp_path), "--separator", "<|vision_pad|>"],
        check=False,
    )
    assert proc.returncode == 2
    assert re.search(
        rf"--separator <\|vision_pad\|> is id \[\d+\] but the checkpoint {re.escape(initial)}/iter_0000000 "
        r"routes separators \[\] as vision",
        proc.stderr,
    )


@pytest.mark.dist
@pytest.mark.parametrize("layout", ["tp2", "pp2", "dp2"])
def test_parallel_runs_match_single_process(data, initial, straight, tmp_path, layout):
    flags = {
        "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        "pp2": ["--pipeline-model-parallel-size", "2"],
        "dp2": [],
    }[layout]
    proc = run(common_args(data) + flags + ["--pretrained-checkpoint", initial, "--save", str(tmp_path)], nproc=2)
    assert_no_understood_warnings(proc.stderr)  # TP+SP: megatron-core's deprecated collectives
    expected, got = losses(straight / "metrics.jsonl"), losses(tmp_path / "metrics.jsonl")
    for it in range(1, 5):
        assert got[it]["loss"] == pytest.approx(expected[it]["loss"], rel=1e-5), it
        assert got[it]["text_loss"] == pytest.approx(expected[it]["text_loss"], rel=1e-5), it
        assert got[it]["grad_norm"] == pytest.approx(expected[it]["grad_norm"], rel=1e-4), it


def test_kill_during_save_keeps_previous_checkpoint(data, initial, straight, tmp_path):
    proc = run(
        common_args(data) + ["--pretrained-checkpoint", initial, "--save", str(tmp_path), "--save-interval", "2"],
        env={"MEGATRON_UNIX_KILL_DURING_SAVE": "4"},
        check=False,
    )
    assert proc.returncode != 0
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (tmp_path / "iter_0000004.partial").is_dir() and not (tmp_path / "iter_0000004").exists()
    run(common_args(data) + ["--save", str(tmp_path), "--load", str(tmp_path)])
    assert losses(tmp_path / "metrics.jsonl")[4]["loss"] == losses(straight / "metrics.jsonl")[4]["loss"]
    assert not list(tmp_path.glob("*.partial"))


def test_damaged_checkpoint_stops_the_run_naming_the_file(data, initial, tmp_path):
    from helpers import garble

    shutil.copytree(initial, tmp_path / "damaged")
    name = garble(tmp_path / "damaged" / "iter_0000000")
    start = common_args(data, iters=0) + ["--pretrained-checkpoint", str(tmp_path / "damaged")]
    proc = run(start, check=False)
    assert proc.returncode == 2
    assert f"error: {tmp_path}/damaged/iter_0000000/{name} is damaged" in proc.stderr, proc.stderr[-2000:]
    assert "loaded weights from" in run(start + ["--no-verify-checkpoint"]).stdout


@pytest.mark.dist
@pytest.mark.parametrize("damage", ["checkpoint", "dataset"])
def test_damage_stops_every_rank_of_a_two_process_run(data, initial, tmp_path, damage):
    """The checks run on one rank (data) or on a share of the files each (checkpoint): a damaged file must
    stop both ranks with its name, never leave one waiting in a collective (the timeout would fail here)."""
    import numpy as np
    from helpers import garble

    args = common_args(data, iters=2) + ["--save", str(tmp_path / "out")]
    if damage == "checkpoint":
        shutil.copytree(initial, tmp_path / "damaged")
        name = f"{tmp_path}/damaged/iter_0000000/{garble(tmp_path / 'damaged' / 'iter_0000000')} is damaged"
        args += ["--pretrained-checkpoint", str(tmp_path / "damaged")]
    else:
        for suffix in (".bin", ".idx", "_lossmask.bin", "_lossmask.idx", "_vision.npy", "_vocab.json"):
            shutil.copy(data["pairs"] + suffix, str(tmp_path / "pairs") + suffix)
        lengths = np.memmap(str(tmp_path / "pairs.idx"), np.int32, "r+", offset=34, shape=(2,))
        lengths[1] = -3  # the second sample's length (the header is 34 bytes)
        lengths.flush()
        args[args.index(data["pairs"])] = str(tmp_path / "pairs")
        name = f"{tmp_path}/pairs.idx: sample 1 has length -3"
    proc = run(args, nproc=2, check=False, timeout=240)
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: {name}") == 2, proc.stderr[-3000:]  # both ranks say it


def test_sigterm_saves_and_exits_cleanly(data, tmp_path):
    cmd = [sys.executable, str(ROOT / "pretrain_unix.py"), *common_args(data, iters=10_000), "--save", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "received SIGTERM" in out
    last = max(losses(metrics))
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == str(last)
    assert (tmp_path / f"iter_{last:07d}" / "metadata.json").is_file()


def test_nonfinite_loss_stops_or_skips(data, tmp_path):
    # Also the explicit-dimensions path: a shared baseline (N = M = 0) with every unset flag defaulted.
    args = common_args(data, iters=4)[2:] + [
        "--num-layers",
        "2",
        "--hidden-size",
        "64",
        "--ffn-hidden-size",
        "128",
        "--num-attention-heads",
        "4",
        "--num-query-groups",
        "2",
        "--kv-channels",
        "16",
        "--lr",
        "1e30",
        "--clip-grad",
        "0",
        "--lr-warmup-iters",
        "0",
    ]
    proc = run(args, check=False)
    assert proc.returncode == 1
    assert re.search(r"error: iteration \d+: (lm loss|grad norm) is (nan|inf)", proc.stderr), proc.stderr[-2000:]
    proc = run(args + ["--skip-nonfinite-steps", "--metrics-file", str(tmp_path / "m.jsonl")])
    assert "skipping the step" in proc.stdout
    assert losses(tmp_path / "m.jsonl")[4]["skipped_iterations"] >= 1
    assert "> Uni-X (0:0 separated), 2 layers," in proc.stdout


BAD_SETTINGS = {
    "heads": (["--tensor-model-parallel-size", "3"], 3, "--num-attention-heads"),
    "query-groups": (["--tensor-model-parallel-size", "4", "--num-attention-heads", "8"], 4, "--num-query-groups"),
    "ffn": (
        ["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "383"],
        2,
        "must divide --ffn-hidden-size (383)",
    ),
    "global-batch": (["--global-batch-size", "3"], 2, "--global-batch-size"),
    "empty-stage": (["--pipeline-model-parallel-size", "8"], 8, "--pipeline-model-parallel-size"),
    "missing-data": (["--data-path", "/nonexistent/prefix"], 1, "--data-path /nonexistent/prefix"),
    "seq-length": (["--seq-length", "0"], 1, "--seq-length must be positive, got 0"),
    "micro-batch": (["--micro-batch-size", "0"], 1, "--micro-batch-size must be positive, got 0"),
    "split": (["--split", "0,0,0"], 1, "--split '0,0,0' must be up to three non-negative weights"),
    "split-count": (["--split", "1,2,3,4"], 1, "--split '1,2,3,4' must be up to three non-negative weights"),
    "log-interval": (["--log-interval", "0"], 1, "--log-interval must be positive, got 0"),
    "min-lr": (["--min-lr", "0.1"], 1, "--min-lr (0.1) must not exceed --lr (0.003)"),
    "negative-lr": (["--lr", "-1"], 1, "--lr must not be negative, got -1.0"),
}


@pytest.mark.parametrize("name", list(BAD_SETTINGS))
def test_bad_settings_fail_early_naming_the_flag(data, name):
    from megatron_unix.training.arguments import parse_args, validate

    extra, world, flag = BAD_SETTINGS[name]
    args = parse_args(common_args(data) + extra)
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(flag)):
        validate(args, world)


@pytest.mark.parametrize("split", ["99,1", "100", "969,30,1"])
def test_split_is_read_as_megatron_reads_it(data, split):
    from megatron_unix.training.arguments import parse_args, validate

    validate(parse_args(common_args(data) + ["--split", split]), 1)  # missing weights are 0


def test_help_is_instant_and_every_flag_says_what_it_does():
    """--help imports neither torch nor megatron-core (that is what made it take 13 s), every flag has help,
    and no help shows a meaningless default (a switch's stored True/False) or states its default twice."""
    from megatron_unix.training.arguments import build_parser

    probe = (
        "import runpy, sys\nsys.argv = ['pretrain_unix.py', '--help']\ntry:\n"
        "    runpy.run_path('pretrain_unix.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'megatron.core') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and "--train-iters" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    parser = build_parser()
    actions = [a for a in parser._actions if a.dest != "help"]
    assert [a.option_strings[0] for a in actions if not a.help] == []
    text = parser.format_help()
    assert "(default: True)" not in text and "(default: False)" not in text
    entries = re.split(r"\n  (?=-)", text)
    assert [e.split()[0] for e in entries if e.count("default") > 1] == []


def test_bad_setting_cli_exits_before_any_work(data):
    start = time.time()
    proc = run(common_args(data) + ["--global-batch-size", "3", "--micro-batch-size", "2"], check=False)
    assert proc.returncode == 2 and "--global-batch-size" in proc.stderr
    assert time.time() - start < 60


def test_understood_warnings_are_silenced_and_absent_accelerators_named_once(straight_run):
    """On the reference run (training, validation, saves and every sink: what a run can warn about)."""
    from megatron_unix import platform

    proc = straight_run[1]
    assert_no_understood_warnings(proc.stderr)
    absent = ", ".join(platform.detect_accelerators().absent()) or "none"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("> accelerators absent: ")]
    assert lines and lines[0].startswith(f"> accelerators absent: {absent}") and len(lines) == 1, proc.stdout[-3000:]


def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "quickstart"
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "quickstart.sh"), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "QUICKSTART_ITERS": "3", "PYTHON": sys.executable},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    records = losses(out / "checkpoints" / "metrics.jsonl")
    assert sorted(records) == [1, 3] and records[3]["vision_loss"] is not None  # iteration 1 is always logged
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert f"checkpoints    {out}/checkpoints (latest: iteration 3)" in proc.stdout
    assert re.search(r"train vision +\d+\.\d+ \(iteration 1\) -> \d+\.\d+ \(iteration 3\)", proc.stdout)
    assert f"plot               {out}/loss.png" in proc.stdout
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert_no_understood_warnings(proc.stderr)


@pytest.mark.parametrize("script", ["pretrain_3b.sh", "pretrain_1.5b.sh"])
def test_slurm_examples_use_existing_flags(script):
    """The sbatch scripts' pretrain_unix.py command line parses (no misspelt or removed flag)."""
    from megatron_unix.training.arguments import parse_args

    text = (ROOT / "examples" / script).read_text()
    settings = text.split("# ---------------------------------------------------------------- edit me")[1]
    settings = settings.split("# ----------------------------------------------------------------")[0]
    launch = (ROOT / "examples" / "pretrain_common.sh").read_text()
    assert text.rstrip().endswith('source "$REPO/examples/pretrain_common.sh"')
    command = launch[launch.index("srun --kill-on-bad-exit") :].replace(
        'srun --kill-on-bad-exit=1 python "$REPO/pretrain_unix.py"', "printf '%s\\n'"
    )
    exit_line = re.search(r"^EXIT_MINUTES=.*$", launch, re.M)[0]
    assert re.search(r"^#SBATCH --time=48:00:00 ", text, re.M)
    job = (  # a job that started now with the script's own limit, as slurm >= 23.02 tells it
        f'SLURM_JOB_ID=1\nREPO={ROOT}\nsource "$REPO/examples/slurm_time.sh"\n'
        "SLURM_JOB_END_TIME=$(( $(date +%s) + 48 * 3600 ))\n"
    )
    proc = subprocess.run(
        ["bash", "-c", settings + job + exit_line + "\n" + command], capture_output=True, text=True, check=True
    )
    args = parse_args(proc.stdout.splitlines())
    assert args.bf16 and args.use_distributed_optimizer and args.save and args.pretrained_checkpoint
    assert args.lr == 1e-4 and args.wandb_exp_name.endswith("-1")
    assert 48 * 60 - 30 - 0.05 < args.exit_duration_in_mins <= 48 * 60 - 30  # a second may pass
    assert re.search(r"^##SBATCH --partition=\S+ +# edit me", text, re.M) and re.search(
        r"^##SBATCH --account=", text, re.M
    )
    assert "export OMP_NUM_THREADS=$SRUN_CPUS_PER_TASK" in launch
    n_m = {"pretrain_3b.sh": "12 --vision-decode-layers 6", "pretrain_1.5b.sh": "9 --vision-decode-layers 5"}[script]
    assert f"--vision-encode-layers {n_m}" in text


@pytest.mark.parametrize("minutes, margin, out, status", [(60, "30", 30, 0), (2, "1.5", 0.5, 0), (20, "30", None, 1)])
def test_exit_minutes_leave_the_margin_or_refuse(minutes, margin, out, status):
    job = f"SLURM_JOB_END_TIME=$(( $(date +%s) + {60 * minutes} )); exit_minutes {margin}"
    proc = subprocess.run(
        ["bash", "-c", f'source "{ROOT}/examples/slurm_time.sh"; {job}'], capture_output=True, text=True
    )
    assert proc.returncode == status
    if status:
        assert proc.stdout == "" and f"no time after EXIT_MARGIN_MINUTES={margin}" in proc.stderr
    else:
        assert out - 0.05 < float(proc.stdout) <= out  # the minutes left less the margin (a second may pass)
