#!/usr/bin/env python
"""Images/s of encode_images per process on CPU for each input format, and where the time goes.

    python tools/bench_encode.py --images 64 --repeat 3

Writes the same generated photos (smooth colour fields with noise, JPEG, 640x480 to 1024x768) as every
input format encode_images reads: jsonl of paths (the reference path), jsonl of base64, an image folder,
parquet with the bytes inline (Hugging Face's ``{"bytes", "path"}`` structs) and a webdataset tar. Each is
encoded whole by the library (:func:`~megatron_unix.image.encode.encode_images` over
:func:`~megatron_unix.image.ranks.batches`, one process, ``--workers 0``) with a small random VQGAN
(random_vqgan: 32 px, 1024 codes, so that reading and decoding weigh as they do beside a GPU), and
every format's codes must equal the jsonl path's. Then the stages on the same images, per image: reading the record
(the format's own cost), decoding (Pillow), resizing and cropping to 512 px (Lanczos, as the reference),
and the encoder itself, the small VQGAN's and Chameleon's shape (random weights, 512 px) on this CPU.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from megatron_unix.image.encode import Filters, encode_images, load
from megatron_unix.image.random_vqgan import random_vqgan
from megatron_unix.image.ranks import batches
from megatron_unix.image.sources import SourceOptions, chained, shards
from megatron_unix.image.transforms import crop_bytes, normalize, open_image
from megatron_unix.image.vqgan import VQGAN, VQGANConfig


def photo(rng: np.random.Generator) -> bytes:
    """A JPEG of a smooth colour field with noise (compresses as photos do, unlike pure noise)."""
    width, height = rng.choice([(640, 480), (800, 600), (1024, 768), (480, 640)])
    small = rng.integers(0, 256, (height // 32, width // 32, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.int16)
    pixels = np.clip(field + rng.normal(0, 4, field.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_inputs(folder: Path, images: list[bytes]) -> dict[str, Path]:
    """Every format of the same images and captions."""
    photos = folder / "photos"
    photos.mkdir()
    captions = [f"photo number {i}" for i in range(len(images))]
    for i, data in enumerate(images):
        (photos / f"{i:06d}.jpg").write_bytes(data)
        (photos / f"{i:06d}.txt").write_text(captions[i])
    paths = folder / "paths.jsonl"
    paths.write_text(
        "".join(json.dumps({"image": f"photos/{i:06d}.jpg", "caption": c}) + "\n" for i, c in enumerate(captions))
    )
    b64 = folder / "base64.jsonl"
    b64.write_text(
        "".join(
            json.dumps({"image_base64": base64.b64encode(d).decode(), "caption": c}) + "\n"
            for d, c in zip(images, captions)
        )
    )
    parquet = folder / "inline.parquet"
    structs = [{"bytes": d, "path": f"{i:06d}.jpg"} for i, d in enumerate(images)]
    pq.write_table(pa.table({"image": structs, "caption": captions}), parquet, row_group_size=16)
    tar = folder / "shard.tar"
    with tarfile.open(tar, "w") as t:
        for i, (data, caption) in enumerate(zip(images, captions)):
            for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                t.addfile(info, io.BytesIO(payload))
    return {"jsonl (paths)": paths, "jsonl (base64)": b64, "folder": photos, "parquet (inline)": parquet, "tar": tar}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def encode_format(source: Path, model: VQGAN, out: Path, batch_size: int) -> tuple[float, float, bytes]:
    """Wall and CPU seconds of one whole encode of ``source``; its output."""
    found = shards([source], SourceOptions())
    wall, cpu = time.perf_counter(), cpu_seconds()
    encode_images(
        lambda skip: batches(found, skip, batch_size),
        out,
        model,
        Filters(model.image_size, 1, 10.0),
        {},
        log=io.StringIO(),
    )
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    data = out.read_bytes()
    out.unlink()
    return wall, cpu, data


def stage_seconds(source: Path) -> dict[str, float]:
    """Per image: reading the records (with their image bytes), decoding, resizing to 512 px."""
    start = time.perf_counter()
    raw = []
    for item in chained(shards([source], SourceOptions())):
        raw.append(item.data or (base64.b64decode(item.base64) if item.base64 else Path(item.path).read_bytes()))
    read = time.perf_counter() - start
    start = time.perf_counter()
    decoded = []
    for data in raw:
        with open_image(data) as image:
            image.load()
            decoded.append(image.copy())
    decode = time.perf_counter() - start
    start = time.perf_counter()
    for image in decoded:
        crop_bytes(image, 512)
    resize = time.perf_counter() - start
    n = len(raw)
    return {"read": read / n, "decode": decode / n, "resize 512": resize / n}


def encoder_seconds(model: VQGAN, crops: np.ndarray) -> float:
    """Per image, of one batch (after one warm-up call)."""
    model.encode(normalize(crops[:1]))
    start = time.perf_counter()
    model.encode(normalize(crops))
    return (time.perf_counter() - start) / len(crops)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="whole encodes per format (the best is reported)")
    p.add_argument("--chameleon-images", type=int, default=1, help="images through Chameleon's encoder shape")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = [photo(rng) for _ in range(args.images)]
    model = random_vqgan(1024, 16).eval()
    print(
        f"{args.images} JPEG photos ({sum(map(len, images)) / len(images) / 1e3:.0f} KB each), torch threads "
        f"{torch.get_num_threads()}, batch {args.batch_size}, one process (--workers 0)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inputs = write_inputs(folder, images)
        encode_format(inputs["jsonl (paths)"], model, folder / "out.jsonl", args.batch_size)  # warm-up, untimed
        reference = None
        print(f"\n{'input':18} {'images/s':>9} {'images/CPU-s':>13} {'read ms':>8} {'decode ms':>10} {'resize ms':>10}")
        for name, source in inputs.items():
            runs = [encode_format(source, model, folder / "out.jsonl", args.batch_size) for _ in range(args.repeat)]
            wall, cpu, data = min(runs)
            codes = [json.loads(line)["vqcode"] for line in data.splitlines()]
            if reference is None:
                reference = codes
            elif codes != reference:
                raise SystemExit(f"{name}: codes differ from the jsonl path's")
            stages = stage_seconds(source)
            print(
                f"{name:18} {args.images / wall:9.1f} {args.images / cpu:13.1f} {stages['read'] * 1e3:8.2f} "
                f"{stages['decode'] * 1e3:10.2f} {stages['resize 512'] * 1e3:10.2f}"
            )
        item = next(chained(shards([inputs["jsonl (paths)"]], SourceOptions())))
        crops = np.stack([load(item, Filters(model.image_size, 1, 10.0))] * args.batch_size)
        small = encoder_seconds(model, crops)
        chameleon = VQGAN(VQGANConfig()).eval()
        crop512 = np.stack([load(item, Filters(512, 1, 10.0))] * args.chameleon_images)
        with torch.no_grad():
            big = encoder_seconds(chameleon, crop512)
        print(
            f"\nencoder per image: random_vqgan {model.image_size} px {small * 1e3:.2f} ms; "
            f"Chameleon's shape 512 px {big * 1e3:.0f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
