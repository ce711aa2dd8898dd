"""tools/conditional_entropy.py: n-gram conditional entropy of text tokens and image codes (spec §7).

Expected values are hand arithmetic on tiny streams, or a plain Counter over n-grams (the definition,
written out) for random ones. Ids: the tiny layout (VQ codes from 100, BOI 90, EOI 91, separator 93)
or Qwen2.5's, whose 18-bit text ids put n > 3 on two-word keys and n > 6 on three (13-bit image codes:
n > 4 on two).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS
from PIL import Image
from tiny import BOI, EOI, EOS, SEP, TEXT_VOCAB, VQ_CODES

from megatron_unix.analysis.entropy import Entropy, dataset_entropy
from megatron_unix.cli.conditional_entropy import main
from megatron_unix.data import vocabulary
from megatron_unix.data.indexed import DatasetWriter
from megatron_unix.data.jsonl_schema import LineFormat
from megatron_unix.data.preprocess import preprocess
from megatron_unix.data.tokenizer import MultimodalTokenizer, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vq_offset=TEXT_VOCAB, vq_codebook_size=VQ_CODES, boi_id=BOI, eoi_id=EOI, eos_id=EOS, separator_ids=[SEP])
QWEN = dict(
    vq_offset=vocabulary.QWEN25_VQ_OFFSET,
    vq_codebook_size=vocabulary.CODEBOOK_SIZE,
    boi_id=vocabulary.QWEN25_BOI,
    eoi_id=vocabulary.QWEN25_EOI,
    eos_id=vocabulary.QWEN25_EOS,
    separator_ids=[151654],
)


def write_dataset(prefix: Path, documents: list[list[int]], layout: dict | None = TINY) -> str:
    mask = layout or TINY
    with DatasetWriter(prefix, vocabulary=layout) as writer:
        for tokens in documents:
            ids = np.array(tokens, np.int64)
            vision = vocabulary.vision_mask(ids, mask["vq_offset"], mask["boi_id"], mask["separator_ids"])
            writer.add(tokens, [True] * len(tokens), int(vision.sum()))
        writer.commit()
    return str(prefix)


def values(entropies: list[Entropy]) -> list[tuple[float | None, int, int]]:
    return [(e.bits, e.ngrams, e.distinct) for e in entropies]


def test_hand_computed_text_stream(tmp_path):
    result = dataset_entropy(write_dataset(tmp_path / "d", [[1, 2, 1, 3]]), max_n=5)
    # unigrams 1:2, 2:1, 3:1 -> 1.5 bits; bigrams 12 21 13: after 1, 2 or 3 equally -> 1 bit with
    # p(prefix 1) = 2/3; trigrams 121 213 and the 4-gram have one continuation each; no 5-gram
    assert values(result.entropies["text"]) == [
        (1.5, 4, 3),
        (pytest.approx(2 / 3, abs=1e-15), 3, 3),
        (0.0, 2, 2),
        (0.0, 1, 1),
        (None, 0, 0),
    ]
    assert values(result.entropies["image"]) == [(None, 0, 0)] * 5
    assert result.modality_tokens == {"text": 4, "image": 0} and result.spilled_runs == 0


def test_documents_images_boi_and_separators_bound_the_ngrams(tmp_path):
    a = [5, 6, BOI, 101, 102, SEP, 101, 103, EOI, 5, 7]
    b = [BOI, 103, 101, BOI, 102, EOI, 6]
    result = dataset_entropy(write_dataset(tmp_path / "d", [a, b]), max_n=5)
    # text runs [5 6] [EOI 5 7] | [EOI 6] (EOI is text, the image cuts the text of a):
    # unigrams 5:2 6:2 EOI:2 7:1; bigrams 56 E5 57 E6: after 5 and after EOI two choices -> 1 bit
    # (0.8 if 6-EOI across the image or 7-EOI across the documents were counted)
    assert values(result.entropies["text"]) == [
        (pytest.approx(3 * 2 / 7 * math.log2(7 / 2) + 1 / 7 * math.log2(7), abs=1e-14), 7, 4),
        (1.0, 4, 4),
        (0.0, 1, 1),
        (None, 0, 0),
        (None, 0, 0),
    ]
    # image runs: codes [1 2 1 3] (the separator inside does not cut it) | [3 1] | [2] (a BOI starts
    # an image); bigrams 12 21 13 31: only after 1 two choices, p(prefix 1) = 1/2 -> 0.5 bits
    # (2/3 if the separator cut, 0.8 with 3-3 across documents, more with 1-2 across the BOI)
    assert values(result.entropies["image"]) == [
        (pytest.approx(3 / 7 * math.log2(7 / 3) + 2 * 2 / 7 * math.log2(7 / 2), abs=1e-14), 7, 3),
        (0.5, 4, 4),
        (0.0, 2, 2),
        (0.0, 1, 1),
        (None, 0, 0),
    ]
    assert result.modality_tokens == {"text": 7, "image": 7}


def plain_entropy(documents: list[list[int]], layout: dict, max_n: int) -> dict[str, list[float | None]]:
    """The rules and the definition written out: segments token by token, Counters of n-grams."""
    offset, codebook = layout["vq_offset"], layout["vq_codebook_size"]
    streams: dict[str, list[list[int]]] = {"text": [], "image": []}
    for document in documents:
        previous = None
        for token in document:
            vision = token >= offset or token == layout["boi_id"] or token in layout["separator_ids"]
            if previous is None or vision != previous or token == layout["boi_id"]:
                streams["text"].append([]), streams["image"].append([])
            previous = vision
            if not vision:
                streams["text"][-1].append(token)
            elif offset <= token < offset + codebook:
                streams["image"][-1].append(token - offset)
    result = {}
    for modality, runs in streams.items():
        result[modality] = []
        for n in range(1, max_n + 1):
            grams = Counter(tuple(run[i : i + n]) for run in runs for i in range(len(run) - n + 1))
            prefixes = Counter()
            for gram, count in grams.items():
                prefixes[gram[:-1]] += count
            total = sum(grams.values())
            bits = -sum(c / total * math.log2(c / prefixes[g[:-1]]) for g, c in grams.items()) if total else None
            result[modality].append(bits)
    return result


def random_documents(seed: int, count: int) -> list[list[int]]:
    """Qwen2.5 ids: text from a few high and low ids, images of 4..40 codes with separators, a long
    document spanning many chunks; few distinct ids so that n-grams repeat."""
    rng = np.random.default_rng(seed)
    text_ids = [0, 7, 151642, 151643, 131071, 99999, vocabulary.QWEN25_EOI]
    documents = []
    for index in range(count):
        document: list[int] = []
        for _ in range(rng.integers(1, 4)):
            if rng.random() < 0.5:
                document += rng.choice(text_ids, rng.integers(1, 30)).tolist()
            else:
                codes = (QWEN["vq_offset"] + rng.choice([0, 1, 4095, 8191], rng.integers(4, 40))).tolist()
                codes[rng.integers(1, len(codes))] = QWEN["separator_ids"][0]
                document += [QWEN["boi_id"], *codes]
        documents.append(document * (40 if index == 3 else 1))
    return documents


def test_streaming_in_a_tiny_budget_equals_in_memory_and_the_definition(tmp_path):
    documents = random_documents(seed=0, count=80)
    prefix = write_dataset(tmp_path / "d", documents, QWEN)
    held = dataset_entropy(prefix, max_n=7)  # text 7-grams take three words (sorted by lexsort)
    spill = tmp_path / "spill"
    spill.mkdir()
    spilled = dataset_entropy(prefix, max_n=7, memory_budget=4096, spill_dir=spill)
    assert held.spilled_runs == 0 and spilled.spilled_runs > 20
    assert spilled.entropies == held.entropies  # the same floats: counts of counts are exact
    assert not any(spill.iterdir())  # the runs are removed
    expected = plain_entropy(documents, QWEN, max_n=7)
    for modality in ("text", "image"):
        assert [e.bits for e in held.entropies[modality]] == pytest.approx(expected[modality], abs=1e-12)
        assert all(e.bits is not None and e.bits > 0 for e in held.entropies[modality][:3])


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory) -> tuple[str, str]:
    """A text dataset and an image-text dataset (4 codes of 16 an image) made by preprocessing."""
    root = tmp_path_factory.mktemp("data")
    tok = MultimodalTokenizer.from_pretrained(train_bpe_tokenizer(CORPUS, 400, root / "bpe"), codebook_size=16)
    (root / "text.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in CORPUS))
    pairs = [{"caption": CORPUS[i % 4], "vqcode": [(i * 7 + k * 3) % 16 for k in range(4)]} for i in range(40)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    for name in ("text", "pairs"):
        preprocess([root / f"{name}.jsonl"], root / name, tok, LineFormat(image_tokens=4), log=sys.stderr)
    return str(root / "text"), str(root / "pairs")


def test_tool_writes_csv_json_and_png(preprocessed, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("conditional_entropy", ROOT / "tools" / "conditional_entropy.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)  # the thin entry point, run in this process (no second import of megatron)
    text, pairs = preprocessed
    argv = ["--data-path", text, pairs, "--max-n", "3", "--output-dir", str(tmp_path / "out"), "--log-interval", "100"]
    assert tool.main(argv) == 0
    printed = capsys.readouterr()
    assert "tokens/s" in printed.err and "ETA" in printed.err
    assert "note: text has no image tokens: no image entropy" in printed.out
    with open(tmp_path / "out" / "entropy.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["dataset"], r["modality"], r["n"]) for r in table] == [
        (dataset, modality, str(n))
        for dataset in ("text", "pairs")
        for modality in ("text", "image")
        for n in (1, 2, 3)
    ]
    expected = dataset_entropy(pairs, max_n=3)
    pair_rows = [r for r in table if r["dataset"] == "pairs"]
    assert [float(r["entropy_bits"]) for r in pair_rows] == [
        e.bits for modality in ("text", "image") for e in expected.entropies[modality]
    ]
    assert [r["entropy_bits"] for r in table if r["dataset"] == "text" and r["modality"] == "image"] == [""] * 3
    record = json.loads((tmp_path / "out" / "entropy.json").read_text())
    assert record["datasets"][1]["image_tokens"] == 40 * 4 and len(record["rows"]) == 12
    with Image.open(tmp_path / "out" / "entropy.png") as image:
        assert image.format == "PNG" and image.size == (720, 540)
        assert len(image.getcolors(1 << 20)) > 10


def refused(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_refusals_name_the_flag_or_the_file(tmp_path, capsys):
    good = write_dataset(tmp_path / "good", [[1, 2, 3]])
    out = ["--output-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_:
        main(["--data-path", good, "--max-n", "0", *out])
    assert exit_.value.code == 2 and "--max-n 0 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--data-path", good, good, *out])
    assert "--data-path names a dataset twice" in capsys.readouterr().err
    assert "has no tokens" in refused(["--data-path", write_dataset(tmp_path / "empty", []), *out], capsys)
    no_vocabulary = write_dataset(tmp_path / "plain", [[1, 2]], layout=None)
    assert f"{no_vocabulary}_vocab.json is missing" in refused(["--data-path", no_vocabulary, *out], capsys)
    Path(good + ".idx").rename(tmp_path / "moved.idx")
    assert f"missing {good}.idx" in refused(["--data-path", good, *out], capsys)
    truncated = write_dataset(tmp_path / "truncated", [[1, 2, 3, 4]])
    with open(truncated + ".bin", "r+b") as f:
        f.truncate(8)
    assert f"{truncated}.bin: 8 bytes" in refused(["--data-path", truncated, *out], capsys)
    assert not (tmp_path / "out").exists()  # refused before anything was written
