"""``--reference-definition``: n-gram conditional entropy as the reference's ``tools/cal_entropy.py``
(``calculate_ngram_conditional_entropy``) computes it — each modality's sequences concatenated into one
stream, a prefix counted as every (n-1)-gram of it — against that definition written out in plain Python."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from test_conditional_entropy import QWEN, random_documents, write_dataset

from megatron_unix.analysis.entropy import dataset_entropy
from megatron_unix.cli.conditional_entropy import main


def reference_entropy(stream: list[int], n: int) -> float | None:
    """The reference's function on one concatenated stream: n-grams and (n-1)-grams by sliding windows."""
    grams = Counter(tuple(stream[i : i + n]) for i in range(len(stream) - n + 1))
    total = sum(grams.values())
    if not total:
        return None
    if n == 1:
        return -sum(c / total * math.log2(c / total) for c in grams.values())
    prefixes = Counter(tuple(stream[i : i + n - 1]) for i in range(len(stream) - n + 2))
    return -sum(c / total * math.log2(c / prefixes[g[:-1]]) for g, c in grams.items())


def streams(documents: list[list[int]], layout: dict) -> dict[str, list[int]]:
    """Every text token (not routed as vision) and every code, in order, with nothing cut."""
    offset, codebook = layout["vq_offset"], layout["vq_codebook_size"]
    text, image = [], []
    for token in (t for document in documents for t in document):
        if offset <= token < offset + codebook:
            image.append(token - offset)
        elif token < offset and token != layout["boi_id"] and token not in layout["separator_ids"]:
            text.append(token)
    return {"text": text, "image": image}


def test_hand_stream_counts_the_last_prefix(tmp_path):
    # two documents [1 2 1] [2 1 2] -> one stream 1 2 1 2 1 2: bigrams 12 x3, 21 x2 (T = 5); unigram
    # prefixes: 1 x3, 2 x3 (the last 2 starts no bigram). 12: p = 3/3; 21: p = 2/3 -> -(2/5) log2(2/3)
    result = dataset_entropy(write_dataset(tmp_path / "d", [[1, 2, 1], [2, 1, 2]]), 2, reference_definition=True)
    assert result.entropies["text"][1].bits == pytest.approx(-0.4 * math.log2(2 / 3), abs=1e-15)
    # the segmented definition: 12 21 | 21 12 -> after 1 only 2, after 2 only 1 -> 0 bits
    assert dataset_entropy(write_dataset(tmp_path / "e", [[1, 2, 1], [2, 1, 2]]), 2).entropies["text"][1].bits == 0


def test_random_interleaved_documents_equal_the_reference_function(tmp_path):
    documents = random_documents(seed=1, count=60)
    prefix = write_dataset(tmp_path / "d", documents, QWEN)
    spill = tmp_path / "spill"
    spill.mkdir()
    result = dataset_entropy(prefix, max_n=5, memory_budget=4096, spill_dir=spill, reference_definition=True)
    assert result.spilled_runs > 5  # merged from runs on disk, block by block
    for modality, stream in streams(documents, QWEN).items():
        expected = [reference_entropy(stream, n) for n in range(1, 6)]
        assert [e.bits for e in result.entropies[modality]] == pytest.approx(expected, abs=1e-12)
    segmented = dataset_entropy(prefix, max_n=5)
    assert segmented.entropies["image"][1].bits != pytest.approx(result.entropies["image"][1].bits, abs=1e-6)


def test_cli_flag_is_recorded(tmp_path):
    prefix = write_dataset(tmp_path / "d", [[1, 2, 1], [2, 1, 2]])
    assert (
        main(["--data-path", prefix, "--max-n", "2", "--output-dir", str(tmp_path / "out"), "--reference-definition"])
        == 0
    )
    record = json.loads((tmp_path / "out" / "entropy.json").read_text())
    assert record["definition"] == "reference"
    assert main(["--data-path", prefix, "--max-n", "2", "--output-dir", str(tmp_path / "seg")]) == 0
    assert json.loads((tmp_path / "seg" / "entropy.json").read_text())["definition"] == "segments"
