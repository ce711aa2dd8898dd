#!/usr/bin/env python
"""Throughput of tools/preprocess_data.py on a generated corpus, next to Megatron-LM's own loop.

    python tools/bench_preprocess.py --docs 20000 --pairs 5000 --workers 1 2

Generates web-text-like documents (2-4 KB of Zipf-distributed English-like words in sentences and
paragraphs) and image-text pairs (a caption and 1024 VQ codes), trains a 32k byte-level BPE with
Qwen's special tokens on the text, then times :func:`preprocess` per corpus and worker count and
checks that every worker count writes the same bytes. For comparison it runs Megatron-LM's
``tools/preprocess_data.py`` loop on the text, rebuilt here with megatron-core's own
``HuggingFaceTokenizer`` (Megatron-LM's script needs ``megatron.training``): ``Pool.imap`` over
lines in chunks of 32, one tokenizer call per document, one ``add_document`` per document.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from megatron_unix.data.indexed import output_files
from megatron_unix.data.jsonl_schema import LineFormat
from megatron_unix.data.preprocess import preprocess
from megatron_unix.data.tokenizer import MultimodalTokenizer, train_bpe_tokenizer

SYLLABLES = (
    "the an in on er re st ing ion al ent ous ly ment pro con de com ex un per ter ver for ble tion ic "
    "ate ist or ar ur ow ay ea ch sh th qu ph br cl gr tr pl sp wh ab ad ac im a e i o u y s t"
).split()


def vocabulary(rng: np.random.Generator, size: int = 300_000) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo-English words, shorter ones more frequent, and their Zipf CDF. Tuned so that a 32k BPE
    gives English-like statistics: about 5.3 characters per word and 4.3 bytes per token."""
    words = {"".join(rng.choice(SYLLABLES, n)) for n in rng.choice([1, 2, 2, 3, 3, 4], size)}
    words = np.array(sorted(words, key=len))
    rng.shuffle(words[:2000])
    p = 1.0 / np.arange(1, len(words) + 1)
    return words, np.cumsum(p / p.sum())


def document(rng: np.random.Generator, words: np.ndarray, cdf: np.ndarray, size: int) -> str:
    """Sentences of 6-30 words, with commas, numbers and paragraph breaks, until ``size`` characters."""
    out, length = [], 0
    while length < size:
        sentence = list(words[np.searchsorted(cdf, rng.random(rng.integers(6, 30)))])
        sentence[0] = sentence[0].capitalize()
        if rng.random() < 0.3:
            sentence[rng.integers(1, len(sentence))] = str(rng.integers(1, 3000))
        if rng.random() < 0.4:
            sentence[rng.integers(0, len(sentence) - 1)] += ","
        text = " ".join(sentence) + rng.choice([".", ".", ".", "?", "!"])
        text += "\n\n" if rng.random() < 0.15 else " "
        out.append(text)
        length += len(text)
    return "".join(out).strip()


def write_corpus(root: Path, docs: int, pairs: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    words, cdf = vocabulary(rng)
    text_path, pair_path = root / "web.jsonl", root / "pairs.jsonl"
    with open(text_path, "w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": document(rng, words, cdf, int(rng.integers(2000, 4000)))}) + "\n")
    with open(pair_path, "w") as f:
        for _ in range(pairs):
            caption = document(rng, words, cdf, int(rng.integers(40, 200)))
            f.write(json.dumps({"text": caption, "vqcode": rng.integers(0, 8192, 1024).tolist()}) + "\n")
    return text_path, pair_path


def train_tokenizer(text_path: Path, root: Path, vocab_size: int = 32000) -> Path:
    with open(text_path) as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(5000), f)]
    return train_bpe_tokenizer(texts, vocab_size, root / "tokenizer")


class MegatronEncoder:
    """Megatron-LM's ``Encoder.encode`` for one json key, without sentence splitting."""

    tokenizer = None

    def __init__(self, tokenizer_dir: Path) -> None:
        self.tokenizer_dir = str(tokenizer_dir)

    def initializer(self) -> None:
        from megatron.core.tokenizers.text.libraries import HuggingFaceTokenizer

        MegatronEncoder.tokenizer = HuggingFaceTokenizer(self.tokenizer_dir)

    def encode(self, json_line: str) -> tuple[list[int], list[int], int]:
        ids = MegatronEncoder.tokenizer.text_to_ids(json.loads(json_line)["text"])
        return ids, [len(ids)], len(json_line)


def megatron_loop(path: Path, prefix: Path, tokenizer_dir: Path, workers: int) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    encoder = MegatronEncoder(tokenizer_dir)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.int32)
    with open(path, encoding="utf-8") as fin, multiprocessing.Pool(workers, initializer=encoder.initializer) as pool:
        count = 0
        for ids, lengths, _ in pool.imap(encoder.encode, fin, 32):
            builder.add_document(ids, lengths)
            count += 1
    builder.finalize(f"{prefix}.idx")
    return count


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool workers): robust to a busy machine."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def timed(repeat: int, run, *args) -> tuple[object, float, float]:
    """The result, and the best wall and CPU seconds of ``repeat`` runs (the machine may be shared)."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), cpu_seconds()
        result = run(*args)
        walls.append(time.perf_counter() - wall)
        cpus.append(cpu_seconds() - cpu)
    return result, min(walls), min(cpus)


def row(name: str, workers: int, docs: int, seconds: float, cpu: float, nbytes: int) -> str:
    rate = docs / seconds
    return (
        f"| {name} | {workers} | {docs:,} | {seconds:.1f} | {rate:,.0f} | {rate / workers:,.0f} "
        f"| {nbytes / seconds / 1e6:.1f} | {docs / cpu:,.0f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=20000)
    p.add_argument("--pairs", type=int, default=5000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=1, help="report the best of this many runs")
    p.add_argument("--no-megatron", action="store_true", help="skip the Megatron-LM loop")
    p.add_argument("--dir", type=Path, help="keep the corpus and outputs here (default: a temporary directory)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        corpora = write_corpus(root, args.docs, args.pairs)
        tokenizer_dir = train_tokenizer(corpora[0], root)
        tok = MultimodalTokenizer.from_pretrained(tokenizer_dir)
        print(
            f"corpus and tokenizer: {time.perf_counter() - start:.0f} s; "
            + ", ".join(f"{c.name} {c.stat().st_size / 1e6:.0f} MB" for c in corpora),
            file=sys.stderr,
        )
        print(
            "| run | workers | docs | s | docs/s | docs/s per worker | MB/s | docs per CPU-s |\n"
            "|---|---|---|---|---|---|---|---|"
        )
        for corpus in corpora:
            outputs = []
            for workers in args.workers:
                prefix = root / f"{corpus.stem}-{workers}"
                summary, seconds, cpu = timed(
                    args.repeat, preprocess, [corpus], prefix, tok, LineFormat(), workers, False, 10**9
                )
                outputs.append([path.read_bytes() for path in output_files(prefix)])
                print(
                    row(
                        f"preprocess_data.py, {corpus.stem}",
                        workers,
                        summary.documents,
                        seconds,
                        cpu,
                        summary.input_bytes,
                    ),
                    flush=True,
                )
            print(
                f"  {corpus.stem}: {summary.tokens / summary.documents:.0f} tokens/doc, "
                f"{summary.input_bytes / summary.tokens:.2f} bytes/token; identical output for workers "
                f"{args.workers}: {all(o == outputs[0] for o in outputs)}",
                file=sys.stderr,
            )
        for workers in [] if args.no_megatron else args.workers:
            docs, seconds, cpu = timed(
                args.repeat, megatron_loop, corpora[0], root / f"megatron-{workers}", tokenizer_dir, workers
            )
            print(row("Megatron-LM loop, web", workers, docs, seconds, cpu, corpora[0].stat().st_size), flush=True)


if __name__ == "__main__":
    main()
