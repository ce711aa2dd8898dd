#!/usr/bin/env python
"""What the damage checks cost: CRC-32 of checkpoint files (GB/s) and check_dataset (samples/s).

    python tools/bench_damage_checks.py [--file-mb 200] [--samples 1000000]

Both run on page-cached files (the second of two passes), so they measure the computation, not the disk.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron_unix.data.indexed import DatasetWriter, SampleBatch, check_dataset
from megatron_unix.training.checksums import crc32


def seconds(fn, repeats: int = 5) -> float:
    """Best of ``repeats`` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file-mb", type=int, default=200, help="size of the file hashed")
    p.add_argument("--samples", type=int, default=1_000_000, help="samples of the dataset checked (8 tokens each)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "shard.bin"
        shard.write_bytes(os.urandom(args.file_mb << 20))
        rate = shard.stat().st_size / seconds(lambda: crc32(shard)) / 1e9
        print(f"crc32: {rate:.2f} GB/s on a {args.file_mb} MiB file")
        n = args.samples
        with DatasetWriter(Path(tmp) / "data") as writer:
            runs = np.tile(np.array([3, 5], np.int32), n)
            writer.add_batch(
                SampleBatch(np.zeros(8 * n, np.int32), np.full(n, 8), runs, np.full(n, 2), np.full(n, 3, np.int32))
            )
            writer.commit()
        took = seconds(lambda: check_dataset(Path(tmp) / "data"))
        print(f"check_dataset: {n / took / 1e6:.1f} M samples/s ({n:,} samples in {took:.3f} s)")


if __name__ == "__main__":
    main()
