#!/usr/bin/env python
"""Throughput of the exact n-gram conditional entropy (tools/conditional_entropy.py) on a synthetic
dataset in the Qwen2.5 layout: text documents of Zipf-distributed ids drawn from a pool of phrases, and
T2I samples [caption][BOI][1024 codes][EOI][EOS] whose codes repeat their left neighbour 20% of the time.

    python tools/bench_conditional_entropy.py                        # 10M tokens, --max-n 5
    python tools/bench_conditional_entropy.py --tokens 2e6 --memory-budget-mb 64

Prints tokens/s of the whole computation (counting, spilling, merging) and the entropies it found.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron_unix.analysis.entropy import dataset_entropy
from megatron_unix.data import vocabulary as v
from megatron_unix.data.indexed import DatasetWriter, SampleBatch


def synthetic_dataset(prefix: Path, tokens: int, seed: int = 0) -> int:
    """Write about ``tokens`` tokens of half text, half image-text documents; returns the count."""
    rng = np.random.default_rng(seed)
    phrases = [np.minimum(rng.zipf(1.3, rng.integers(5, 16)), 150_000).astype(np.int32) for _ in range(20_000)]

    def text(k: int) -> np.ndarray:
        return np.concatenate([phrases[i] for i in rng.integers(0, len(phrases), k)])

    docs, total = [], 0
    while total < tokens:
        if rng.random() < 0.5:
            doc = text(int(rng.integers(20, 200)))
        else:
            codes = rng.integers(0, v.CODEBOOK_SIZE, 1024)
            repeat = rng.random(1024) < 0.2
            codes[1:][repeat[1:]] = codes[:-1][repeat[1:]]
            image = [[v.QWEN25_BOI], v.QWEN25_VQ_OFFSET + codes, [v.QWEN25_EOI, v.QWEN25_EOS]]
            doc = np.concatenate([text(3), *image]).astype(np.int32)
        docs.append(doc)
        total += len(doc)
    layout = dict(
        vq_offset=v.QWEN25_VQ_OFFSET,
        vq_codebook_size=v.CODEBOOK_SIZE,
        boi_id=v.QWEN25_BOI,
        eoi_id=v.QWEN25_EOI,
        eos_id=v.QWEN25_EOS,
        separator_ids=[],
    )
    lengths = np.array([len(d) for d in docs])
    vision = np.array([int(((d >= v.QWEN25_VQ_OFFSET) | (d == v.QWEN25_BOI)).sum()) for d in docs], np.int32)
    runs = np.stack([np.zeros_like(lengths), lengths], 1).ravel().astype(np.int32)
    with DatasetWriter(prefix, vocabulary=layout) as writer:
        writer.add_batch(SampleBatch(np.concatenate(docs), lengths, runs, np.full(len(docs), 2), vision))
        writer.commit()
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=float, default=1e7)
    p.add_argument("--max-n", type=int, default=5)
    p.add_argument("--memory-budget-mb", type=int, default=1024)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        prefix = Path(folder) / "bench"
        tokens = synthetic_dataset(prefix, int(args.tokens))
        start = time.perf_counter()
        result = dataset_entropy(str(prefix), args.max_n, args.memory_budget_mb << 20, folder)
        seconds = time.perf_counter() - start
    print(
        f"{tokens:,} tokens, --max-n {args.max_n}, budget {args.memory_budget_mb} MB: {seconds:.1f} s, "
        f"{tokens / seconds:,.0f} tokens/s, {result.spilled_runs} spilled runs"
    )
    for modality, values in result.entropies.items():
        print(
            f"  {modality:<6} "
            + "  ".join(f"H{e.n}={e.bits:.2f}" if e.bits is not None else f"H{e.n}=-" for e in values)
        )


if __name__ == "__main__":
    main()
