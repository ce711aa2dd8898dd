"""tools/conditional_entropy.py stopped mid-run (SIGTERM as slurm sends it, Ctrl-C, SIGKILL) and started
again: nothing is left behind, the datasets counted before are reused, and the outputs are those of a
run never stopped.

The child is stopped at a known point without any sleep: its progress goes to a pipe of one page that
the test does not read until the signal is sent, so the child (printing a line per chunk, far more than
a page) cannot finish first; the signal is sent once the first dataset is recorded and the second has
spilled runs on disk.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_conditional_entropy import write_dataset
from tiny import BOI, EOI, TEXT_VOCAB, VQ_CODES

from megatron_unix.cli.conditional_entropy import PROGRESS, SPILL_PREFIX, main

ROOT = Path(__file__).resolve().parents[1]
F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ from Python 3.10 on Linux
OUTPUTS = ["entropy.csv", "entropy.json", "entropy.png"]


def documents(seed: int, tokens: int) -> list[list[int]]:
    """Random text ids with an image (BOI, codes, EOI) every few hundred tokens."""
    rng = np.random.default_rng(seed)
    docs = []
    while sum(map(len, docs)) < tokens:
        text = rng.integers(0, 60, 400).tolist()
        codes = (TEXT_VOCAB + rng.integers(0, VQ_CODES, 64)).tolist()
        docs.append(text[:200] + [BOI, *codes, EOI] + text[200:])
    return docs


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("entropy-data")
    return write_dataset(root / "small", documents(0, 3_000)), write_dataset(root / "large", documents(1, 200_000))


def argv(datasets: tuple[str, str], out: Path) -> list[str]:
    return ["--data-path", *datasets, "--max-n", "4", "--memory-budget-mb", "1", "--log-interval", "1"] + [
        "--output-dir",
        str(out),
    ]


@pytest.fixture(scope="module")
def uninterrupted(datasets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(argv(datasets, out)) == 0
    return out


def stopped_run(datasets: tuple[str, str], out: Path, signum: int) -> tuple[int, str, Path]:
    """Start the tool, send ``signum`` once the small dataset is recorded and the large one has spilled
    runs; its exit status, stderr and spill folder."""
    read, write = os.pipe()
    fcntl.fcntl(write, F_SETPIPE_SZ, 4096)
    cmd = [sys.executable, str(ROOT / "tools" / "conditional_entropy.py"), *argv(datasets, out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=write, cwd=ROOT, env=env)
    os.close(write)
    spill = out / f"{SPILL_PREFIX}{proc.pid}"
    deadline = time.monotonic() + 240
    while not ((out / PROGRESS).exists() and any(spill.rglob("*.npy"))):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.02)
    proc.send_signal(signum)
    with os.fdopen(read, encoding="utf-8") as stderr:
        printed = stderr.read()
    return proc.wait(timeout=60), printed, spill


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_run_leaves_nothing_and_the_rerun_resumes(datasets, uninterrupted, tmp_path, capsys, signum):
    out = tmp_path / "out"
    status, printed, spill = stopped_run(datasets, out, signum)
    recorded = json.loads((out / PROGRESS).read_text())["datasets"]
    assert list(recorded) == [str(Path(datasets[0]).resolve())]  # the small one, counted before the stop
    if signum == signal.SIGTERM:
        assert status == 143 and "Traceback" not in printed
        assert printed.splitlines()[-1] == (
            f"conditional_entropy.py: stopped by SIGTERM; the datasets counted so far are kept in "
            f"{out / PROGRESS}: the same command resumes after them"
        )
        assert sorted(p.name for p in out.iterdir()) == [PROGRESS]  # the spilled runs are removed
    else:
        assert status == -signal.SIGKILL and spill.is_dir()  # what a kill leaves: the next run removes it

    assert main(argv(datasets, out)) == 0
    err = capsys.readouterr().err
    assert f"small: counted by an earlier run, reused ({out / PROGRESS})" in err
    assert (f"removed {spill}: the spilled runs of a killed earlier run" in err) == (signum == signal.SIGKILL)
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS  # no record, no spill folder
    for name in ("entropy.csv", "entropy.json"):
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes()


@pytest.mark.slow
def test_ctrl_c_is_a_one_line_stop(datasets, tmp_path):
    status, printed, spill = stopped_run(datasets, tmp_path, signal.SIGINT)
    assert status == 130 and "Traceback" not in printed and not spill.exists()
    assert printed.splitlines()[-1].startswith("conditional_entropy.py: stopped by SIGINT; the datasets counted")


def test_a_result_counted_with_other_settings_is_counted_again(datasets, tmp_path, capsys):
    small = datasets[0]
    out = tmp_path / "out"
    out.mkdir()
    key = str(Path(small).resolve())
    wrong = {"prefix": small, "tokens": 1, "modality_tokens": {"text": 1, "image": 0}, "entropies": {}}
    (out / PROGRESS).write_text(json.dumps({"datasets": {key: {"settings": {"max_n": 9}, "result": wrong}}}))
    assert main(["--data-path", small, "--max-n", "2", "--output-dir", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"note: small: {out / PROGRESS} was written with other settings (" in err
    assert "files: None there" in err and "max_n: 9 there, 2 now" in err and "counting it again" in err
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    (out / PROGRESS).write_text("{not json")
    assert main(["--data-path", small, "--max-n", "2", "--output-dir", str(out)]) == 2
    assert f"{out / PROGRESS}: unreadable progress record" in capsys.readouterr().err


@pytest.mark.slow
def test_a_full_disk_while_spilling_names_the_folder(datasets, tmp_path):
    """Files capped at 50 kB (RLIMIT_FSIZE: EFBIG, as a full disk) stop the first spilled run: the
    error names where the runs go and the flag that moves them, and nothing is left."""
    import resource

    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "conditional_entropy.py"), *argv(datasets[1:], out)]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, resource.RLIM_INFINITY)),
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(  # numpy's short write, without errno
        rf"conditional_entropy\.py: error: a write fell short \(\d+ requested and \d+ written: a full disk\?\) "
        rf"while writing the spilled runs under {re.escape(str(out))} \(--temp-dir: one with room\)",
        proc.stderr.splitlines()[-1],
    ), proc.stderr
    assert list(out.iterdir()) == []
