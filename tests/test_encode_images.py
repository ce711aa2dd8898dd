"""tools/encode_images.py: images -> vqcode jsonl with a tiny random VQGAN (32x32 -> 256 codes) on CPU."""

from __future__ import annotations

import base64
import errno
import io
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
import torch
from conftest import CORPUS
from PIL import Image
from test_vqgan import tiny_vqgan

from megatron_unix.cli.encode_images import main
from megatron_unix.data.indexed import MultimodalDocuments
from megatron_unix.data.tokenizer import MultimodalTokenizer, train_bpe_tokenizer
from megatron_unix.image import VQGAN, to_pixels

ROOT = Path(__file__).resolve().parents[1]
MIN = ["--min-size", "16", "--workers", "0"]  # tests of --workers give theirs after it (the last wins)


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("vqgan")
    tiny_vqgan(seed=5).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model(vqgan_dir) -> VQGAN:
    return VQGAN.from_pretrained(vqgan_dir)


def picture(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    channels = len(mode)
    array = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def save(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


@pytest.fixture
def images(tmp_path) -> dict[str, Path]:
    """Good images of several kinds and sizes, and one of each bad kind."""
    folder = tmp_path / "img"
    folder.mkdir()
    good = {
        "png": save(picture(48, 40, 1), folder / "a.png"),
        "jpeg": save(picture(40, 70, 2), folder / "b.jpg"),
        "rgba": save(picture(40, 40, 3, "RGBA"), folder / "c.png"),
        "gray": save(picture(36, 50, 4, "L"), folder / "d.png"),
    }
    truncated = io.BytesIO()
    picture(64, 64, 5).save(truncated, "JPEG")
    (folder / "truncated.jpg").write_bytes(truncated.getvalue()[: len(truncated.getvalue()) // 2])
    (folder / "unreadable.png").write_bytes(b"this is not an image")
    return {
        **good,
        "truncated": folder / "truncated.jpg",
        "unreadable": folder / "unreadable.png",
        "wide": save(picture(120, 40, 6), folder / "wide.png"),
        "small": save(picture(12, 12, 7), folder / "small.png"),
    }


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_codes(model: VQGAN, path: Path) -> list[int]:
    with Image.open(path) as image:
        return model.encode(to_pixels(image, model.image_size)[None])[0].tolist()


def run(capsys, *args: str) -> tuple[int, str, str]:
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_codes_equal_direct_encoding_and_bad_images_are_counted_by_reason(tmp_path, images, model, vqgan_dir, capsys):
    records = [
        {"image": "img/a.png", "caption": "first", "id": 1},
        {"image": "img/truncated.jpg", "caption": "cut"},
        {"image": str(images["jpeg"]), "caption": "absolute path", "id": 2},
        "{not json",
        {"image": "img/wide.png", "caption": "wide"},
        {"image": "img/unreadable.png", "caption": "text"},
        {"image": "img/c.png", "caption": "rgba"},
        {"image": "img/small.png", "caption": "small"},
        {"image": "img/nothere.png", "caption": "missing"},
        {"caption": "no image key"},
        {"image": "img/d.png", "text": "gray"},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    status, stdout, stderr = run(
        capsys, "--input", source, "--output", out, "--vqgan", vqgan_dir, *MIN, "--log-interval", 2, "--batch-size", 1
    )
    assert status == 0, stderr
    progress = re.findall(r"^(\d) images \([\d.,]+ images/s\), (\d+)% of the input, ETA (?:\d+ s|\?)$", stderr, re.M)
    assert [int(n) for n, _ in progress] == [2, 4] and 0 < int(progress[0][1]) < int(progress[1][1]) <= 100
    got = lines(out)
    assert [{k: v for k, v in line.items() if k != "vqcode"} for line in got] == [
        {"caption": "first", "id": 1},
        {"caption": "absolute path", "id": 2},
        {"caption": "rgba"},
        {"text": "gray"},
    ]
    for line, name in zip(got, ["png", "jpeg", "rgba", "gray"]):
        assert line["vqcode"] == expected_codes(model, images[name]), name
    assert len(got[0]["vqcode"]) == model.codes_per_image == 256
    assert (
        "skipped         7, aspect_ratio 1, missing_file 1, missing_image 1, too_small 1, truncated 1, "
        "unparsable_json 1, unreadable 1" in stdout
    )
    for number, reason in [(2, "truncated"), (4, "unparsable_json"), (5, "aspect_ratio"), (6, "unreadable")]:
        assert f"  {source}:{number}: {reason}: " in stdout
    assert f"{source}:8: too_small: 12x12: the short side is below --min-size 16" in stdout
    used = len({c for line in got for c in line["vqcode"]})
    assert f"codebook usage: {used} / 64 codes ({100 * used / 64:.1f}%)" in stdout
    assert re.search(r"images encoded  4 \(4 in [\d.]+ s, [\d.,]+ images/s\)", stdout)
    assert not (tmp_path / "out.jsonl.partial").exists() and not (tmp_path / "out.jsonl.progress.json").exists()


def test_strict_stops_at_the_first_bad_image_naming_file_and_line(tmp_path, images, vqgan_dir, capsys):
    source = write_jsonl(
        tmp_path / "in.jsonl", [{"image": f"img/{n}", "caption": n} for n in ("a.png", "wide.png", "b.jpg")]
    )
    out = tmp_path / "out.jsonl"
    status, _, stderr = run(capsys, "--input", source, "--output", out, "--vqgan", vqgan_dir, *MIN, "--strict")
    assert status == 2
    assert f"error: {source}:2: 120x40: the aspect ratio is above --max-aspect 2.5 (--strict)" in stderr
    assert not out.exists()


def test_missing_input_default_min_size_and_no_image_at_all(tmp_path, images, vqgan_dir, capsys):
    status, _, stderr = run(
        capsys, "--input", tmp_path / "nothere.jsonl", "--output", tmp_path / "o", "--vqgan", vqgan_dir
    )
    assert status == 2 and f"--input {tmp_path / 'nothere.jsonl'}: no such file" in stderr
    source = write_jsonl(
        tmp_path / "in.jsonl", [{"image": "img/a.png", "caption": "a"}, {"image": "img/b.jpg", "caption": "b"}]
    )
    status, _, stderr = run(capsys, "--input", source, "--output", tmp_path / "o", "--vqgan", vqgan_dir, "--workers", 0)
    assert status == 2, "default --min-size 256 skips 48x40 and 40x70 images, and no image is an error"
    assert f"{tmp_path / 'o'}: no image to write (inputs skipped: 2, too_small 2); nothing written" in stderr
    assert list(tmp_path.glob("o*")) == []


def test_base64_and_data_uri_give_the_codes_of_the_file(tmp_path, images, model, vqgan_dir, capsys):
    raw = base64.b64encode(images["jpeg"].read_bytes()).decode()
    records = [
        {"image_base64": raw, "caption": "b64"},
        {"image": f"data:image/jpeg;base64,{raw}", "caption": "uri"},
        {"image_base64": "not base64!", "caption": "bad"},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    status, stdout, stderr = run(capsys, "--input", source, "--output", out, "--vqgan", vqgan_dir, *MIN)
    assert status == 0, stderr
    assert lines(out) == [
        {"caption": "b64", "vqcode": expected_codes(model, images["jpeg"])},
        {"caption": "uri", "vqcode": expected_codes(model, images["jpeg"])},
    ]
    assert f"{source}:3: unreadable: " in stdout


def test_image_dir_with_caption_files(tmp_path, images, model, vqgan_dir, capsys):
    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    for name, target in [("2.png", "png"), ("1.jpg", "jpeg"), ("sub/0.png", "rgba")]:
        (folder / name).write_bytes(images[target].read_bytes())
    (folder / "1.txt").write_text("a caption\n")
    (folder / "sub" / "0.txt").write_text("nested")
    (folder / "notes.md").write_text("not an image")
    out = tmp_path / "out.jsonl"
    status, stdout, stderr = run(capsys, "--image-dir", folder, "--output", out, "--vqgan", vqgan_dir, *MIN)
    assert status == 0, stderr
    assert lines(out) == [
        {"caption": "a caption", "vqcode": expected_codes(model, images["jpeg"])},
        {"caption": "nested", "vqcode": expected_codes(model, images["rgba"])},
    ]
    assert f"{folder / '2.png'}: missing_text: no text: no caption under caption/text" in stdout


def test_output_prefix_builds_a_dataset_through_preprocessing(tmp_path, images, model, vqgan_dir, capsys):
    tokenizer = train_bpe_tokenizer(CORPUS, 400, tmp_path / "tok")
    records = [{"image": f"img/{name}", "caption": CORPUS[i]} for i, name in enumerate(["a.png", "b.jpg", "c.png"])]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    prefix = tmp_path / "data" / "pairs"
    prefix.parent.mkdir()
    args = ["--input", source, "--output", tmp_path / "out.jsonl", "--vqgan", vqgan_dir, *MIN]
    status, stdout, stderr = run(capsys, *args, "--output-prefix", prefix, "--tokenizer-model", tokenizer)
    assert status == 0, stderr
    docs = MultimodalDocuments(prefix)
    tok = MultimodalTokenizer.from_pretrained(tokenizer, codebook_size=64)
    assert len(docs) == 3 and list(docs.vision_tokens) == [257] * 3, "BOI and 256 codes per image"
    for i, line in enumerate(lines(tmp_path / "out.jsonl")):
        tokens, _ = docs.sample(i)
        assert (tokens[tokens >= tok.vq_offset] - tok.vq_offset).tolist() == line["vqcode"]
    assert "documents       3" in stdout


def test_workers_give_the_output_of_the_main_process(tmp_path, images, vqgan_dir, capsys):
    names = ["a.png", "b.jpg", "wide.png", "c.png", "truncated.jpg", "d.png", "a.png"]
    source = write_jsonl(tmp_path / "in.jsonl", [{"image": f"img/{n}", "caption": str(i)} for i, n in enumerate(names)])
    outputs = []
    for workers in (0, 2):
        out = tmp_path / f"out{workers}.jsonl"
        args = ["--input", source, "--output", out, "--vqgan", vqgan_dir, *MIN, "--batch-size", 2]
        status, stdout, stderr = run(capsys, *args, "--workers", workers)
        assert status == 0, stderr
        assert "skipped         2, aspect_ratio 1, truncated 1" in stdout
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] and outputs[0].count(b"\n") == 5


def open_fifo_for_writing(path: Path, proc: subprocess.Popen, timeout: float = 60) -> int:
    """Once the reader has opened the FIFO (open() without a reader would block, or fail non-blocking)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO or proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the encoder never opened its input: {proc.communicate()}") from e
            time.sleep(0.05)


def consumed(progress: Path) -> int:
    try:
        return json.loads(progress.read_text())["consumed"]
    except (FileNotFoundError, ValueError):
        return 0


def test_killed_run_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path, images, vqgan_dir, capsys):
    """The input is a FIFO fed by the test, so the kill lands at a known point: after 5 inputs (one bad)
    are encoded and committed, while the encoder waits for more. Then the partial gets a half-written line
    (a kill during a write of many lines), and the FIFO is replaced by the whole file."""
    names = ["a.png", "b.jpg", "wide.png", "c.png", "d.png", "a.png", "truncated.jpg", "b.jpg", "c.png"]
    records = "".join(json.dumps({"image": f"img/{n}", "caption": f"image {i}"}) + "\n" for i, n in enumerate(names))
    fifo, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    os.mkfifo(fifo)
    args = ["--input", fifo, "--output", out, "--vqgan", vqgan_dir, *MIN, "--batch-size", 1, "--workers", 0]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "encode_images.py"), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    progress, partial = tmp_path / "out.jsonl.progress.json", tmp_path / "out.jsonl.partial"
    try:
        writer = open_fifo_for_writing(fifo, proc)
        os.write(writer, "".join(records.splitlines(keepends=True)[:5]).encode())
        deadline = time.monotonic() + 60
        while consumed(progress) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert consumed(progress) == 5 and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.close(writer)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists() and partial.read_bytes().count(b"\n") == 4
    with partial.open("ab") as f:  # lines of a batch that was being written (longer than the rest of the output)
        f.write(b'{"caption":"image 5","vqcode":[' + b"1," * 5000)
    fifo.unlink()
    fifo.write_text(records)

    status, _, stderr = run(capsys, *args[:-4], "--batch-size", 1, "--min-size", 17)
    assert status == 2 and "was written with other settings (min_size: 16 there, 17 now)" in stderr

    status, stdout, stderr = run(capsys, *args)
    assert status == 0, stderr
    assert "resuming" in stderr and "resumed after 5 inputs" in stdout
    assert "images encoded  7 (3 in" in stdout and "skipped         2, aspect_ratio 1, truncated 1" in stdout
    assert not partial.exists() and not progress.exists()
    status, _, stderr = run(capsys, "--input", fifo, "--output", tmp_path / "whole.jsonl", *args[4:])
    assert status == 0, stderr
    assert out.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    status, _, stderr = run(capsys, *args)
    assert status == 2 and f"{out} exists already" in stderr


def test_codes_of_a_batch_equal_codes_one_by_one(model, images):
    """Batching (and its padding-free stacking) changes nothing: the resumable output depends on it."""
    from megatron_unix.image.encode import encode_crops
    from megatron_unix.image.transforms import crop_bytes

    crops = np.stack([crop_bytes(Image.open(images[n]), 32) for n in ("png", "jpeg", "rgba", "gray")])
    together = encode_crops(model, crops)
    assert together.shape == (4, 256)
    assert all(np.array_equal(together[i], encode_crops(model, crops[i : i + 1])[0]) for i in range(4))
    assert torch.equal(torch.from_numpy(together[1]), torch.tensor(expected_codes(model, images["jpeg"])))


def test_resumed_inputs_are_skipped_unparsed_and_globs_expand(tmp_path, images, model, vqgan_dir, capsys):
    from megatron_unix.image.sources import FolderShard, JsonlShard, SourceOptions

    source = write_jsonl(tmp_path / "in.jsonl", ["{not json", "", "[1]", {"image": "img/a.png", "caption": "x"}])
    items = list(JsonlShard(source, SourceOptions()).items(skip=2))
    assert [(item.where, item.fields, item.error) for item in items] == [(f"{source}:4", {"caption": "x"}, None)], (
        "the first two non-blank lines are skipped, bad or not, and numbering goes on"
    )
    assert [item.where for item in FolderShard(tmp_path / "img", SourceOptions()).items(skip=7)] == [
        str(images["wide"])
    ]

    write_jsonl(tmp_path / "in2.jsonl", [{"image": "img/b.jpg", "caption": "y"}])
    out = tmp_path / "out.jsonl"
    stale = tmp_path / f".out.jsonl.progress.json.{dead_pid()}.tmp"
    stale.write_text("{")
    status, _, stderr = run(capsys, "--input", tmp_path / "in*.jsonl", "--output", out, "--vqgan", vqgan_dir, *MIN)
    assert status == 0, stderr
    assert [line["caption"] for line in lines(out)] == ["x", "y"] and not stale.exists()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_output_prefix_takes_the_tokenizer_flags_of_preprocess_data(tmp_path, images, vqgan_dir, capsys):
    tokenizer = train_bpe_tokenizer(CORPUS, 400, tmp_path / "tok")
    source = write_jsonl(tmp_path / "in.jsonl", [{"image": "img/a.png", "alt": CORPUS[0]}])
    args = ["--input", source, "--output", tmp_path / "out.jsonl", "--vqgan", vqgan_dir, *MIN]
    args += ["--output-prefix", tmp_path / "p", "--tokenizer-model", tokenizer]
    status, _, stderr = run(capsys, *args, "--image-tokens", 1024)
    assert status == 2 and "--image-tokens 1024: the VQGAN gives 256 per image" in stderr
    status, stdout, stderr = run(capsys, *args, "--caption-key", "alt", "--boi", "<|endoftext|>", "--t2i-ratio", 1)
    assert status == 0, stderr
    docs = MultimodalDocuments(tmp_path / "p")
    tok = MultimodalTokenizer.from_pretrained(tokenizer, codebook_size=64, boi="<|endoftext|>")
    tokens, _ = docs.sample(0)
    assert len(docs) == 1 and tok.boi_id in tokens.tolist() and "documents       1" in stdout
