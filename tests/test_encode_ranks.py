"""tools/encode_images.py on several ranks (torchrun, gloo, CPU): the joined output and dataset equal one
process's byte for byte; a rank killed mid-run resumes to the same bytes; --merge joins what ranks left."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CORPUS
from test_encode_images import consumed, open_fifo_for_writing, picture, run, save
from test_vqgan import tiny_vqgan

from megatron_unix.data.indexed import VOCABULARY_SUFFIX, output_files
from megatron_unix.data.tokenizer import train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARDS = {  # three jsonl shards; 2 ranks take [in1] and [in2, in3]: rank 1 has the bad images
    "in1.jsonl": [("a.png", 0), ("b.png", 1), ("c.png", 2)],
    "in2.jsonl": [("c.png", 3), ("wide.png", 4), ("a.png", 5)],
    "in3.jsonl": [("c.png", 6), ("broken.png", 7)],
}


def shard_text(name: str) -> str:
    return "".join(json.dumps({"image": f"img/{i}", "caption": CORPUS[n]}) + "\n" for i, n in SHARDS[name])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ranks")
    tiny_vqgan(seed=5).save_pretrained(root / "vqgan")
    train_bpe_tokenizer(CORPUS, 400, root / "tok")
    folder = root / "img"
    folder.mkdir()
    for i, (name, size) in enumerate({"a.png": (48, 40), "b.png": (40, 70), "c.png": (36, 36)}.items()):
        save(picture(*size, i), folder / name)
    save(picture(120, 40, 9), folder / "wide.png")
    (folder / "broken.png").write_bytes(b"not an image")
    for name in SHARDS:
        (root / name).write_text(shard_text(name))
    return root


def flags(data: Path, folder: Path, *extra) -> list[str]:
    inputs = [str(folder / name) for name in SHARDS]
    out, prefix = folder / "out.jsonl", folder / "pairs"
    model = ["--vqgan", data / "vqgan", "--output-prefix", prefix, "--tokenizer-model", data / "tok"]
    return [str(a) for a in ["--input", *inputs, "--output", out, *model, "--min-size", 16, *extra]]


def dataset_bytes(prefix: Path) -> list[bytes]:
    return [p.read_bytes() for p in [*output_files(prefix), Path(f"{prefix}{VOCABULARY_SUFFIX}")]]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[bytes, list[bytes]]:
    """One process (no launcher), in this process: the codes file and the dataset."""
    from megatron_unix.cli.encode_images import main

    folder = tmp_path_factory.mktemp("one") / "one"
    copy_shards(data, folder)
    assert main(flags(data, folder, "--workers", 0, "--batch-size", 2)) == 0
    return (folder / "out.jsonl").read_bytes(), dataset_bytes(folder / "pairs")


def torchrun(args: list[str], **kwargs) -> subprocess.Popen:
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    command = [sys.executable, *launcher, str(ROOT / "tools" / "encode_images.py"), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def copy_shards(data: Path, folder: Path, fifo: str | None = None) -> None:
    folder.mkdir()
    (folder / "img").symlink_to(data / "img")
    for name in SHARDS:
        if name == fifo:
            os.mkfifo(folder / name)
        else:
            (folder / name).write_text(shard_text(name))


def test_two_ranks_equal_one_process_byte_for_byte(data, reference, tmp_path):
    """With --strict, rank 1 stops at its first bad image, and rank 0 still finishes its output; the job
    run again without leaves rank 0's output as it is and joins."""
    folder = tmp_path / "two"
    copy_shards(data, folder)
    args = flags(data, folder, "--workers", 1, "--batch-size", 2, "--log-interval", 1, "--total-log-interval", 0.5)
    proc = torchrun([*args, "--strict"])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 and f"[rank 1/2] error: {folder}/in2.jsonl:2: 120x40: the aspect ratio" in stderr
    assert "rank 1 of 2 failed (above); the others' outputs are kept" in stderr
    assert (folder / "out.jsonl.rank-0-of-2").is_file() and not (folder / "out.jsonl").exists()

    proc = torchrun(args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert f"[rank 0/2] {folder}/out.jsonl.rank-0-of-2: finished by an earlier run" in stderr
    assert (folder / "out.jsonl").read_bytes() == reference[0]
    assert dataset_bytes(folder / "pairs") == reference[1], "the merged dataset, vocabulary record included"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [
            *SHARDS,
            "img",
            "out.jsonl",
            *(p.name for p in [*output_files(folder / "pairs"), Path(f"{folder}/pairs{VOCABULARY_SUFFIX}")]),
        ]
    ), "the ranks' files are removed once joined"
    assert "images encoded  6" in stdout and "skipped         2, aspect_ratio 1, unreadable 1" in stdout
    assert "(joined from 2 ranks)" in stdout and "merged from 2 ranks" in stdout
    lines = re.findall(r"^\[rank 1/2\] (\d) images \([\d.,]+ images/s\), (\d+)% of the input, ETA", stderr, re.M)
    assert [int(n) for n, _ in lines] == [1, 2, 3], "a line a batch: batches of 2 end at the end of in2's 3 lines"
    shares = [int(share) for _, share in lines]
    assert shares == sorted(shares) and shares[-1] == 100, stderr
    assert re.search(r"^\[rank 1/2\] 2 shards, images encoded  3 \(", stderr, re.M), stderr
    totals = re.findall(
        r"^total: (\d) images over 2 ranks \([\d.,]+ images/s\), (\d+)% of the input, ETA", stderr, re.M
    )
    assert totals and totals[-1] == ("6", "100"), stderr


def rank_pid(parent: int, rank: int, timeout: float = 60) -> int:
    """The pid of torchrun's worker of ``rank``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                environ = (stat.parent / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError):
                continue
            if ppid == parent and f"RANK={rank}".encode() in environ:
                return int(stat.parent.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank {rank} under {parent}")


def test_killed_rank_resumes_to_the_bytes_of_an_uninterrupted_run(data, reference, tmp_path, capsys):
    """Rank 1's first shard is a FIFO: it is SIGKILLed once it has committed 2 of its 3 lines (rank 0 has
    finished and waits); torchrun stops rank 0. --merge refuses, naming where rank 1 stands; the job run
    again leaves rank 0 as it is, resumes rank 1 and joins."""
    folder = tmp_path / "kill"
    copy_shards(data, folder, fifo="in2.jsonl")
    args = flags(data, folder, "--workers", 0, "--batch-size", 1)
    proc = torchrun(args)
    progress, finished_0 = folder / "out.jsonl.rank-1-of-2.progress.json", folder / "out.jsonl.rank-0-of-2"
    try:
        writer = open_fifo_for_writing(folder / "in2.jsonl", proc)
        os.write(writer, "".join(shard_text("in2.jsonl").splitlines(keepends=True)[:2]).encode())
        deadline = time.monotonic() + 120
        while (consumed(progress) < 2 or not finished_0.exists()) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=120)
        os.close(writer)
    finally:
        proc.kill()
    assert proc.returncode != 0 and not (folder / "out.jsonl").exists()
    assert consumed(progress) == 2 and finished_0.exists()

    status, _, stderr = run(capsys, "--merge", "--output", folder / "out.jsonl")
    assert status == 2 and "1 of 2 ranks have not finished: rank 1 (2 inputs done)" in stderr

    (folder / "in2.jsonl").unlink()
    (folder / "in2.jsonl").write_text(shard_text("in2.jsonl"))
    proc = torchrun(args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "[rank 0/2] " + str(finished_0) + ": finished by an earlier run" in stderr
    assert "[rank 1/2] resuming" in stderr
    assert (folder / "out.jsonl").read_bytes() == reference[0]
    assert dataset_bytes(folder / "pairs") == reference[1]


def test_merge_joins_what_the_ranks_of_a_job_left(data, reference, tmp_path, capsys):
    """Four ranks over three shards (rank 0 has none), encoded one after the other by the library; then
    --merge tokenizes each rank's output, merges the datasets and joins the codes, as the job would."""
    from megatron_unix.image import ranks, sources
    from megatron_unix.image.encode import Filters, encode_images
    from megatron_unix.image.vqgan import VQGAN

    assert [list(ranks.rank_block(range(5), rank, 3)) for rank in range(3)] == [[0], [1, 2], [3, 4]]
    folder = tmp_path / "merge"
    copy_shards(data, folder)
    args = flags(data, folder, "--workers", 0)
    model, out = VQGAN.from_pretrained(data / "vqgan"), folder / "out.jsonl"
    shards = sources.shards([folder / name for name in SHARDS], sources.SourceOptions())
    for rank in range(4):
        mine = ranks.rank_block(shards, rank, 4)
        batches = lambda skip, mine=mine: ranks.batches(mine, skip, 2)  # noqa: E731
        part = ranks.rank_output(out, rank, 4)
        encode_images(batches, part, model, Filters(32, 16, 2.5), {}, log=sys.stderr, rank_output=True)
        if rank < 3:
            status, _, stderr = run(capsys, "--merge", "--output", out)
            assert status == 2 and f"{3 - rank} of 4 ranks have not finished: rank {rank + 1} (not started)" in stderr

    status, stdout, stderr = run(capsys, "--merge", *args[args.index("--output") :])
    assert status == 0, stderr
    assert out.read_bytes() == reference[0] and dataset_bytes(folder / "pairs") == reference[1]
    assert "merged from 3 ranks" in stdout and "images encoded  6" in stdout
    assert not list(folder.glob("*.rank-*")), "the ranks' files are removed once joined"


def test_ctrl_c_ends_in_one_line_and_keeps_what_was_encoded(data, tmp_path):
    """The whole process group gets SIGINT (as from a terminal), decoding workers included."""
    folder = tmp_path / "stop"
    copy_shards(data, folder, fifo="in1.jsonl")
    args = flags(data, folder, "--workers", 1, "--batch-size", 1)
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "encode_images.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        writer = open_fifo_for_writing(folder / "in1.jsonl", proc)
        os.write(writer, shard_text("in1.jsonl").encode()[:-1])  # a line short of the end: more to come
        deadline = time.monotonic() + 60
        while consumed(folder / "out.jsonl.progress.json") < 1 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        os.close(writer)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert stderr.strip().splitlines()[-1] == (
        "encode_images.py: stopped by SIGINT; what was encoded is kept: the same command resumes"
    )
    assert "Traceback" not in stderr and (folder / "out.jsonl.partial").read_bytes().count(b"\n") >= 1
