"""Packed Megatron datasets over preprocessed samples: exact rows, packing invariants, blends, caching."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from megatron_unix.data.indexed import DatasetWriter, MultimodalDocuments
from megatron_unix.data.tokenizer import MultimodalTokenizer

# MegatronDataset warns that pad == EOS; packing masks padding by position, never by id.
pytestmark = pytest.mark.filterwarnings("ignore:The pad token id in the tokenizer collides")

# Tiny layout: text ids below 100, VQ codes from 100, BOI 90, EOI 91, EOS 92 (also the padding).
BOI, EOI, EOS = 90, 91, 92


class TinyText:
    path = "tiny-text"
    specials: ClassVar[dict[str, int]] = {
        "<|vision_start|>": BOI,
        "<|vision_end|>": EOI,
        "<|endoftext|>": EOS,
        "<|vision_pad|>": 93,
    }

    def __len__(self) -> int:
        return 100

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_id(self, name: str) -> int | None:
        return self.specials.get(name)


TOKENIZER = MultimodalTokenizer(TinyText(), codebook_size=64)

T, F = True, False
TEXT = ([1, 2, 3, 4, 5, EOS], [T] * 6, 0)
T2I = ([10, 11, BOI, 100, 101, 102, 103, EOI, EOS], [F] * 3 + [T] * 6, 5)  # caption and BOI ignored
I2T = ([BOI, 104, 105, EOI, 20, 21, 30, 31, EOS], [F] * 6 + [T] * 3, 3)  # image and prompt ignored
LONG = (list(range(40, 60)), [T] * 20, 0)
P = EOS


def write(prefix, samples) -> str:
    with DatasetWriter(prefix) as writer:
        for tokens, trained, vision in samples:
            writer.add(tokens, trained, vision)
        writer.commit()
    return str(prefix)


def build(prefix, seq_length=8, seed=6, sizes=(None, None, None), split="1,0,0", **kwargs):
    from megatron_unix.data.dataset import build_datasets

    data_path = prefix if isinstance(prefix, list) else [prefix]
    return build_datasets(data_path, split, seq_length, seed, TOKENIZER, sizes, **kwargs)


def rows(dataset) -> list[dict[str, list]]:
    return [{k: v.tolist() for k, v in dataset[i].items()} for i in range(len(dataset))]


def row(full: list[int], loss: list[int], docs: list[int]) -> dict[str, list]:
    """Expected row from its seq_length + 1 tokens."""
    return {"tokens": full[:-1], "labels": full[1:], "loss_mask": [float(x) for x in loss], "document_ids": docs}


# The T2I and I2T samples fill a row each.
S1 = row([10, 11, BOI, 100, 101, 102, 103, EOI, EOS], [0, 0, 1, 1, 1, 1, 1, 1], [0] * 8)
S2 = row([BOI, 104, 105, EOI, 20, 21, 30, 31, EOS], [0, 0, 0, 0, 0, 1, 1, 1], [0] * 8)
TEXT_THEN_LONG = row([1, 2, 3, 4, 5, EOS, 40, 41, 42], [1, 1, 1, 1, 1, 0, 1, 1], [0] * 6 + [1] * 2)


def test_exact_rows_split_long_text(tmp_path):
    prefix = write(tmp_path / "d", [TEXT, T2I, I2T, LONG])
    # The documented shuffle, written independently: seed 6, epoch 0 visits samples 0, 3, 1, 2.
    assert np.random.default_rng((6, 0)).permutation(np.arange(4, dtype=np.int32)).tolist() == [0, 3, 1, 2]
    train, valid, test = build(prefix, long_text="split")
    assert valid is None and test is None
    expected = [
        TEXT_THEN_LONG,  # the text, then the long text fills the row
        row(list(range(42, 51)), [1] * 8, [0] * 8),  # ... and continues from its last token, 42
        row(list(range(50, 59)), [1] * 8, [0] * 8),
        row([58, 59] + [P] * 7, [1] + [0] * 7, [0, 0] + [1] * 6),  # the T2I sample does not fit: padding
        S1,
        S2,
    ]
    assert rows(train) == expected
    stats = train.stats
    assert (stats.rows, stats.epochs, stats.truncated_texts, stats.dropped_images) == (6, 1, 0, 0)
    assert train.stats.padding_fraction == pytest.approx(7 / 54)
    with pytest.raises(IndexError):
        train[6]

    # Asking for more rows concatenates epochs; epoch 1 visits 2, 1, 0, 3.
    assert np.random.default_rng((6, 1)).permutation(4).tolist() == [2, 1, 0, 3]
    longer = build(prefix, sizes=(7, None, None), long_text="split", cache_dir=str(tmp_path / "c"))[0]
    assert rows(longer) == expected + [S2, S1] + expected[:4]
    assert longer.stats.epochs == 2


def test_exact_rows_truncated_long_text(tmp_path):
    prefix = write(tmp_path / "d", [TEXT, T2I, I2T, LONG])
    train = build(prefix)[0]
    assert rows(train) == [
        TEXT_THEN_LONG,
        row(list(range(42, 49)) + [P, P], [1] * 6 + [0, 0], [0] * 7 + [1]),  # the long text is cut to 9 tokens
        S1,
        S2,
    ]
    assert (train.stats.truncated_texts, train.stats.dropped_images) == (1, 0)


def test_over_long_image_is_dropped_and_counted(tmp_path):
    long_image = ([BOI] + list(range(100, 109)) + [EOI], [F] + [T] * 10, 10)  # 11 tokens > a row of 9
    train = build(write(tmp_path / "d", [TEXT, long_image, T2I]), seed=0)[0]
    assert train.stats.dropped_images == 1
    assert sorted(sum(t >= 100 for t in r["tokens"] + r["labels"][-1:]) for r in rows(train)) == [0, 4]
    assert sorted(r["tokens"][0] for r in rows(train)) == [1, 10]


def random_samples(count: int, capacity: int, seed: int) -> list[tuple[list[int], list[bool], int]]:
    """Token (s + 1) * 1000 + k is token k of sample s, so rows can be decoded back."""
    g = np.random.default_rng(seed)
    samples = []
    for s in range(count):
        image = g.random() < 0.4
        length = int(g.integers(8, capacity + 4)) if image else int(g.integers(1, 3 * capacity))
        untrained = int(g.integers(0, length)) if g.random() < 0.5 else 0
        samples.append(
            (
                [(s + 1) * 1000 + k for k in range(length)],
                [k >= untrained for k in range(length)],
                length // 2 if image else 0,
            )
        )
    return samples


@pytest.mark.parametrize("long_text", ["truncate", "split"])
def test_packing_invariants(tmp_path, long_text):
    seq_length, count = 32, 300
    capacity = seq_length + 1
    samples = random_samples(count, capacity, seed=1)
    train = build(write(tmp_path / "d", samples), seq_length=seq_length, seed=3, long_text=long_text)[0]

    images = [s for s, (_, _, vision) in enumerate(samples) if vision]
    too_long = [s for s, (tokens, _, _) in enumerate(samples) if len(tokens) > capacity]
    dropped = set(images) & set(too_long)
    truncated = set(too_long) - dropped if long_text == "truncate" else set()
    assert (train.stats.dropped_images, train.stats.truncated_texts) == (len(dropped), len(truncated))

    inputs = np.zeros((count, 3 * capacity), int)
    targets = np.zeros((count, 3 * capacity), int)
    segments: dict[int, list[list[int]]] = {s: [] for s in range(count)}
    for r in rows(train):
        tokens, labels, loss, docs = (np.array(r[k]) for k in ("tokens", "labels", "loss_mask", "document_ids"))
        full = np.append(tokens, labels[-1])
        sample, k = full // 1000 - 1, full % 1000
        real = full >= 1000
        # A row is runs of consecutive tokens of one sample, then padding (a suffix) of no loss.
        n_real = int(real.sum())
        assert real[:n_real].all() and not loss[~real[1:]].any()
        starts = np.flatnonzero(real & ~np.r_[False, (sample[1:] == sample[:-1]) & (k[1:] == k[:-1] + 1)])
        for begin, end in zip(starts, np.r_[starts[1:], n_real]):
            segments[int(sample[begin])].append(k[begin:end].tolist())
        # Document ids number the runs; padding is one more document.
        same_run = np.searchsorted(starts, np.arange(capacity), side="right")
        assert np.array_equal(docs[:n_real], same_run[:seq_length][:n_real] - 1)
        assert (docs[n_real:] == len(starts)).all()
        for j in np.flatnonzero(loss):
            assert same_run[j] == same_run[j + 1] and samples[sample[j + 1]][1][k[j + 1]]
            targets[sample[j + 1], k[j + 1]] += 1
        np.add.at(inputs, (sample[:-1][real[:-1]], k[:-1][real[:-1]]), 1)

    for s, (tokens, trained, vision) in enumerate(samples):
        n = 0 if s in dropped else capacity if s in truncated else len(tokens)
        if vision and n:
            assert segments[s] == [list(range(n))], f"image sample {s} is not whole in one row"
        # Every token is an input once (the last one may sit only as a label at a row's end) and every
        # trained token a target with loss once.
        assert (inputs[s, : max(n - 1, 0)] == 1).all() and inputs[s, n - 1 : n].max(initial=0) <= 1
        assert not inputs[s, n:].any()
        assert np.array_equal(targets[s, 1:n], np.array(trained[1:n], int)) and not targets[s, n:].any()


def test_blend_ratios_and_disjoint_splits(tmp_path, megatron_single):
    from megatron.core.datasets.blended_dataset import BlendedDataset

    a = write(tmp_path / "a", random_samples(200, 33, seed=2))
    b = write(tmp_path / "b", random_samples(200, 33, seed=3))
    datasets = build(
        ["0.7", a, "0.3", b], seq_length=32, split="98,1,1", sizes=(1000, 20, 10), cache_dir=str(tmp_path / "cache")
    )
    train = datasets[0]
    assert all(isinstance(d, BlendedDataset) for d in datasets)
    assert np.bincount(train.dataset_index).tolist() == [700, 300]
    assert set(train[5]) == {"dataset_id", "tokens", "labels", "loss_mask", "document_ids"}
    assert [len(d) for d in datasets] == [1000, 20, 10]
    for split, (begin, end) in zip(datasets, [(0, 196), (196, 198), (198, 200)]):  # disjoint sample ranges
        for source in split.datasets:
            used = source.pieces[:, 0]
            assert begin <= used.min() and used.max() < end


def test_deterministic_cached_and_resumable(tmp_path, monkeypatch):
    from megatron_unix.data import dataset as module

    prefix = write(tmp_path / "d", random_samples(100, 17, seed=4))
    first = build(prefix, seq_length=16, sizes=(200, None, None), cache_dir=str(tmp_path / "c1"))[0]
    again = build(prefix, seq_length=16, sizes=(200, None, None), cache_dir=str(tmp_path / "c2"))[0]
    expected = rows(first)
    assert first.stats.epochs > 1 and rows(again) == expected

    def no_packing(*args):
        raise AssertionError("packed again instead of loading the cache")

    monkeypatch.setattr(module, "pack_epoch", no_packing)
    cached = build(prefix, seq_length=16, sizes=(200, None, None), cache_dir=str(tmp_path / "c1"))[0]
    assert isinstance(cached.pieces, np.memmap) and cached.stats == first.stats
    k = 37  # resuming after k consumed rows = continuing to index
    assert [{n: v.tolist() for n, v in cached[i].items()} for i in range(k, len(cached))] == expected[k:]
    monkeypatch.undo()

    other = build(prefix, seq_length=16, seed=7, sizes=(200, None, None), cache_dir=str(tmp_path / "c1"))[0]
    assert rows(other) != expected


def test_missing_prefix_is_named(tmp_path):
    present = write(tmp_path / "present", [TEXT])
    with pytest.raises(FileNotFoundError, match="absent"):
        build(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="absent"):
        build(["1", present, "1", str(tmp_path / "absent")], sizes=(4, 1, 1))
    with pytest.raises(ValueError, match="long_text"):
        build(present, long_text="wrap")


def test_rows_are_tensors_of_the_training_dtypes(tmp_path):
    item = build(write(tmp_path / "d", [TEXT, T2I]))[0][0]
    assert {k: v.dtype for k, v in item.items()} == {
        "tokens": torch.int64,
        "labels": torch.int64,
        "loss_mask": torch.float32,
        "document_ids": torch.int64,
    }
    assert all(v.shape == (8,) for v in item.values())


def test_end_to_end_from_preprocessed_jsonl(tmp_path, sentencepiece_model):
    """tools/preprocess_data.py output packs with every image whole in one row (spec §1 routing)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    g = np.random.default_rng(0)
    captions = ["a red bicycle leaning on a wall", "a quick brown fox", "the river bank"]
    lines = [
        {"text": " ".join(captions[: 1 + i % 3] * (1 + i % 4))}
        if i % 2
        else {"caption": captions[i % 3], "vqcode": g.integers(0, 64, 16).tolist()}
        for i in range(40)
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    tool = Path(__file__).resolve().parents[1] / "tools" / "preprocess_data.py"
    subprocess.run(
        [
            sys.executable,
            str(tool),
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output-prefix",
            str(tmp_path / "mix"),
            "--tokenizer-model",
            str(sentencepiece_model),
            "--vq-codebook-size",
            "64",
            "--image-tokens",
            "16",
            "--append-eod",
        ],
        check=True,
        capture_output=True,
    )

    from megatron_unix.data.dataset import build_datasets

    tok = MultimodalTokenizer.from_pretrained(sentencepiece_model, codebook_size=64)
    train = build_datasets([str(tmp_path / "mix")], "1,0,0", 64, 1, tok, (None, None, None))[0]
    assert train.stats.dropped_images == 0
    images = 0
    for r in rows(train):
        full = np.array(r["tokens"] + r["labels"][-1:])
        for b in np.flatnonzero(full == tok.boi_id):
            assert (full[b + 1 : b + 17] >= tok.vq_offset).all() and full[b + 17] == tok.eoi_id
            images += 1
    assert images == 20


def _one_row(tmp_path: Path, tok: MultimodalTokenizer, name: str, line: dict, **fmt) -> dict:
    """Preprocess one jsonl line, then pack it into a row exactly its length: the row the model sees."""
    import io
    import json

    from megatron_unix.data.dataset import build_datasets
    from megatron_unix.data.jsonl_schema import LineFormat
    from megatron_unix.data.preprocess import preprocess

    (tmp_path / f"{name}.jsonl").write_text(json.dumps(line) + "\n")
    preprocess(
        [str(tmp_path / f"{name}.jsonl")],
        str(tmp_path / name),
        tok,
        LineFormat(image_tokens=4, **fmt),
        1,
        True,
        10**6,
        io.StringIO(),
    )
    documents = MultimodalDocuments(tmp_path / name)  # keep it alive: lengths is a view of its mmap
    length = int(documents.lengths[0])
    train = build_datasets([str(tmp_path / name)], "1,0,0", length - 1, 1, tok, (None, None, None))[0]
    assert len(train) == 1
    return {k: v.tolist() for k, v in train[0].items()}


def _matches_one_of(row: dict, candidates: list[tuple[list[int], list[bool]]]) -> bool:
    """The row is sample ``tokens`` shifted into inputs/labels, with loss where the target is trained."""
    return any(
        row["tokens"] == tokens[:-1]
        and row["labels"] == tokens[1:]
        and row["loss_mask"] == [float(t) for t in trained[1:]]
        and set(row["document_ids"]) == {0}
        for tokens, trained in candidates
    )


def test_jsonl_to_training_rows_for_every_layout(tmp_path):
    """Each layout of spec §3, from a jsonl line to the row the model sees, against sequences built
    here from the tokenizer's own encoding of the expected strings (ignore-instruction on)."""
    from conftest import CORPUS

    from megatron_unix.data.layouts import I2T_PROMPTS, T2I_PROMPTS, UNCONDITIONAL
    from megatron_unix.data.tokenizer import train_bpe_tokenizer

    tok = MultimodalTokenizer.from_pretrained(train_bpe_tokenizer(CORPUS, 400, tmp_path / "tok"), codebook_size=16)
    enc, codes = tok.tokenize, [3, 1, 4, 15]
    image = [tok.boi_id] + [tok.vq_offset + c for c in codes] + [tok.eoi_id]
    text = "A quick brown fox jumps over the lazy dog."
    row = _one_row(tmp_path, tok, "text", {"text": text}, append_eod=True)
    assert _matches_one_of(row, [(enc(text) + [tok.eos_id], [True] * (len(enc(text)) + 1))])

    caption = "a red bicycle"
    t2i = [
        (
            enc(condition) + [tok.boi_id] + image[1:] + [tok.eos_id],
            [False] * (len(enc(condition)) + 1) + [True] * (len(codes) + 2),
        )
        for condition in [f"{caption} {p}" for p in T2I_PROMPTS] + [UNCONDITIONAL]
    ]
    assert _matches_one_of(_one_row(tmp_path, tok, "t2i", {"caption": caption, "vqcode": codes}, t2i_ratio=1.0), t2i)

    i2t = [
        (
            image + enc(p) + enc(" " + caption) + [tok.eos_id],
            [False] * (len(image) + len(enc(p))) + [True] * (len(enc(" " + caption)) + 1),
        )
        for p in I2T_PROMPTS
    ]
    assert _matches_one_of(_one_row(tmp_path, tok, "i2t", {"caption": caption, "vqcode": codes}, t2i_ratio=0.0), i2t)

    question, answer = "What is in the picture?", "A red bicycle near the river bank."
    sft = (
        image + enc("\n" + question) + enc("\n" + answer) + [tok.eos_id],
        [False] * (len(image) + len(enc("\n" + question))) + [True] * (len(enc("\n" + answer)) + 1),
    )
    line = {"vqcode": codes, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
    assert _matches_one_of(_one_row(tmp_path, tok, "sft", line), [sft])


def overwrite(path: str, offset: int, data: bytes) -> None:
    """Damage a file in place: ``data`` at byte ``offset``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def shorten(path: str, by: int) -> None:
    os.truncate(path, os.path.getsize(path) - by)


def swap_loss_masks(prefix: str, samples) -> None:
    """Give ``prefix`` the loss masks of a dataset of other samples."""
    other = write(prefix + "-other", samples)
    for suffix in ("_lossmask.bin", "_lossmask.idx"):
        shutil.copy(other + suffix, prefix + suffix)


LENGTHS_AT = 34  # the int32 sequence lengths follow Megatron's 34-byte .idx header
# The dataset is [TEXT, T2I, I2T]: lengths 6, 9, 9 (24 int32 tokens, 96 bytes); loss-mask runs [0, 6], [3, 6],
# [6, 3]; vision counts 0, 5, 3. Each damage, then the exact refusal ({p} is the prefix).
DAMAGES = {
    "negative length": (
        lambda p: overwrite(p + ".idx", LENGTHS_AT + 4, np.int32(-3).tobytes()),
        "{p}.idx: sample 1 has length -3",
    ),
    "truncated bin": (
        lambda p: shorten(p + ".bin", 8),
        "{p}.bin: 88 bytes, but the lengths in {p}.idx add up to 24 tokens (96 bytes)",
    ),
    "empty idx": (
        lambda p: Path(p + ".idx").write_bytes(b""),
        "{p}.idx: 0 bytes, shorter than the 34-byte header of a Megatron index",
    ),
    "truncated idx": (
        lambda p: shorten(p + ".idx", 8),
        "{p}.idx: 94 bytes, but its header's 3 sequences and 4 document boundaries need 102",
    ),
    "not an idx": (
        lambda p: overwrite(p + ".idx", 0, b"MMIDIDY"),
        "{p}.idx: magic b'MMIDIDY\\x00\\x00', expected b'MMIDIDX\\x00\\x00'",
    ),
    "loss mask count": (lambda p: swap_loss_masks(p, [TEXT, T2I]), "{p}_lossmask.idx: 2 loss masks for 3 samples"),
    "loss mask length": (
        lambda p: overwrite(p + "_lossmask.bin", 4, np.int32(7).tobytes()),
        "{p}_lossmask.bin: the loss mask of sample 0 covers 7 tokens, the sample has 6",
    ),
    "negative run": (
        lambda p: overwrite(p + "_lossmask.bin", 8, np.int32([-1, 10]).tobytes()),
        "{p}_lossmask.bin: sample 1 has a run of length -1",
    ),
    "vision count": (
        lambda p: np.save(p + "_vision.npy", np.zeros(2, np.int32)),
        "{p}_vision.npy: 2 vision counts for 3 samples",
    ),
    "vision over length": (
        lambda p: np.save(p + "_vision.npy", np.int32([0, 10, 3])),
        "{p}_vision.npy: sample 1 has 10 vision tokens but length 9",
    ),
}


@pytest.mark.parametrize("name", DAMAGES)
def test_damaged_dataset_is_refused_when_opened_naming_the_file(tmp_path, name):
    """A damaged file is refused before training (or merging) starts, naming the file and the damage,
    not when training reaches the bad sample."""
    from megatron_unix.data.indexed import check_dataset
    from megatron_unix.data.preprocess import merge

    prefix = write(tmp_path / "d", [TEXT, T2I, I2T])
    check_dataset(prefix)
    damage, message = DAMAGES[name]
    damage(prefix)
    with pytest.raises(ValueError) as refused:
        check_dataset(prefix)
    assert str(refused.value) == message.format(p=prefix)
    with pytest.raises(ValueError) as refused:
        merge([prefix], tmp_path / "merged")
    assert str(refused.value) == message.format(p=prefix)
    assert not list(tmp_path.glob("merged*"))


@pytest.mark.slow
def test_training_refuses_unrecorded_vocabulary_and_damage_before_building(tmp_path, hf_tokenizer_dir):
    """pretrain_unix.py: a prefix without _vocab.json is refused unless --allow-unrecorded-vocabulary; then
    the damage check runs on it, both before the model is built (exit 2, the file named)."""
    prefix = write(tmp_path / "d", [TEXT, T2I, I2T])  # this writer records no vocabulary
    DAMAGES["negative length"][0](prefix)
    command = [
        sys.executable,
        str(Path(__file__).resolve().parents[1] / "pretrain_unix.py"),
        "--model-preset",
        "tiny",
        "--tokenizer-model",
        str(hf_tokenizer_dir),
        "--vq-codebook-size",
        "64",
        "--data-path",
        prefix,
        "--split",
        "1,0,0",
        "--seq-length",
        "8",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "1",
        "--train-iters",
        "1",
    ]
    refused = subprocess.run(command, capture_output=True, text=True, check=False)
    assert refused.returncode == 2
    message = (
        f"error: --data-path {prefix}: {prefix}_vocab.json is missing, so nothing records which vocabulary "
        f"its samples were tokenized with: preprocess it again with tools/preprocess_data.py, or pass "
        f"--allow-unrecorded-vocabulary if it was made with --tokenizer-model {hf_tokenizer_dir}\n"
    )
    assert message in refused.stderr
    allowed = subprocess.run(command + ["--allow-unrecorded-vocabulary"], capture_output=True, text=True, check=False)
    assert allowed.returncode == 2 and "_vocab.json" not in allowed.stderr
    assert f"error: {prefix}.idx: sample 1 has length -3\n" in allowed.stderr
