"""Preprocessing (tools/preprocess_data.py): jsonl -> stored samples, exact per layout (spec §3).

Expected sequences are built here from the tokenizer's own encoding of the expected strings, not by
the layout functions. Images are 4 codes from a 16-entry codebook to keep lines small.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS

from megatron_unix.data.indexed import MultimodalDocuments, output_files
from megatron_unix.data.jsonl_schema import BadLine, LineFormat, parse_line
from megatron_unix.data.layouts import I2T_PROMPTS, T2I_PROMPTS, UNCONDITIONAL
from megatron_unix.data.preprocess import PreprocessError, merge, preprocess
from megatron_unix.data.preprocess_report import Summary
from megatron_unix.data.tokenizer import MultimodalTokenizer, train_bpe_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CODEBOOK, IMAGE = 16, 4
WORDS = " ".join(CORPUS[:4]).replace(".", "").replace(":", "").split()


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """Byte-complete, unlike conftest's HF tokenizer: it encodes newlines (SFT turns start with them)."""
    return train_bpe_tokenizer(CORPUS, 400, tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def tok(bpe_dir):
    return MultimodalTokenizer.from_pretrained(bpe_dir, codebook_size=CODEBOOK)


def write(path: Path, lines: list) -> Path:
    """dicts as JSON, strings as they are; ``.gz`` compressed."""
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


def run(
    tok, inputs, prefix, workers=1, strict=False, block_bytes=1 << 20, log_interval=10**6, **fmt
) -> tuple[Summary, str]:
    log = io.StringIO()
    summary = preprocess(
        inputs, prefix, tok, LineFormat(image_tokens=IMAGE, **fmt), workers, strict, log_interval, log, block_bytes
    )
    return summary, log.getvalue()


def stored(prefix) -> list[tuple[list[int], list[bool]]]:
    """Samples as MultimodalDocuments reads them; the tokens also through Megatron's IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs, megatron = MultimodalDocuments(prefix), IndexedDataset(str(prefix))
    assert list(megatron.document_indices) == list(range(len(docs) + 1))
    samples = [tuple(map(np.ndarray.tolist, docs.sample(i))) for i in range(len(docs))]
    assert [megatron[i].tolist() for i in range(len(docs))] == [tokens for tokens, _ in samples]
    return samples


def file_bytes(prefix) -> list[bytes]:
    return [path.read_bytes() for path in output_files(prefix)]


def codes(i: int) -> list[int]:
    return [(i * 7 + k * 3) % CODEBOOK for k in range(IMAGE)]


def caption(i: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3 + i % 5))


def image(tok, c: list[int]) -> list[int]:
    return [tok.boi_id] + [tok.vq_offset + x for x in c] + [tok.eoi_id]


def t2i_candidates(tok, text: str, c: list[int]) -> list[tuple[list[int], list[bool]]]:
    """``[text + " " + prompt][BOI] | [codes][EOI][EOS]`` for each prompt, and the unconditional one."""
    out = []
    for condition in [f"{text} {prompt}" for prompt in T2I_PROMPTS] + [UNCONDITIONAL]:
        head, tail = tok.tokenize(condition) + [tok.boi_id], image(tok, c)[1:] + [tok.eos_id]
        out.append((head + tail, [False] * len(head) + [True] * len(tail)))
    return out


def i2t_candidates(tok, text: str, c: list[int]) -> list[tuple[list[int], list[bool]]]:
    """``[BOI][codes][EOI][prompt] | [" " + caption][EOS]`` for each prompt."""
    out = []
    for prompt in I2T_PROMPTS:
        head, tail = image(tok, c) + tok.tokenize(prompt), tok.tokenize(" " + text) + [tok.eos_id]
        out.append((head + tail, [False] * len(head) + [True] * len(tail)))
    return out


@pytest.mark.parametrize("append_eod", [False, True])
def test_text_from_jsonl_and_gz_in_input_order(tok, tmp_path, append_eod):
    texts = [caption(i) + "." for i in range(6)]
    inputs = [
        write(tmp_path / "b.jsonl", [{"text": t} for t in texts[:4]]),
        write(tmp_path / "a.jsonl.gz", [{"text": t, "id": 3} for t in texts[4:]]),
    ]
    summary, _ = run(tok, inputs, tmp_path / "out", append_eod=append_eod)
    eos = [tok.eos_id] if append_eod else []
    assert stored(tmp_path / "out") == [(tok.tokenize(t) + eos, [True] * len(tok.tokenize(t) + eos)) for t in texts]
    assert list(MultimodalDocuments(tmp_path / "out").vision_tokens) == [0] * 6
    assert summary.documents == 6 and summary.vision_tokens == 0 and summary.trained_tokens == summary.tokens


def test_t2i_every_prompt_and_unconditional(tok, tmp_path):
    lines = (
        [{"caption": caption(i), "vqcode": codes(i)} for i in range(0, 60, 3)]
        + [{"text": caption(i), "vqcode": json.dumps(codes(i))} for i in range(1, 60, 3)]
        + [{"text": caption(i), "vqcode_512": codes(i)} for i in range(2, 60, 3)]
    )
    run(tok, [write(tmp_path / "pairs.jsonl", lines)], tmp_path / "out", t2i_ratio=1.0)
    samples = stored(tmp_path / "out")
    chosen = []
    for line, sample in zip(lines, samples):
        c = line.get("vqcode", line.get("vqcode_512"))
        c = json.loads(c) if isinstance(c, str) else c
        candidates = t2i_candidates(tok, line.get("caption", line.get("text")), c)
        assert sample in candidates
        chosen.append(candidates.index(sample))
    assert set(chosen) == {0, 1, 2, 3}  # every prompt, and <unconditional>
    assert list(MultimodalDocuments(tmp_path / "out").vision_tokens) == [1 + IMAGE] * len(lines)


def test_i2t_and_no_ignore_instruction(tok, tmp_path):
    lines = [{"caption": caption(i), "vqcode": codes(i)} for i in range(30)]
    path = write(tmp_path / "pairs.jsonl", lines)
    run(tok, [path], tmp_path / "i2t", t2i_ratio=0.0)
    chosen = []
    for line, sample in zip(lines, stored(tmp_path / "i2t")):
        candidates = i2t_candidates(tok, line["caption"], line["vqcode"])
        assert sample in candidates
        chosen.append(candidates.index(sample))
    assert set(chosen) == {0, 1, 2}
    summary, _ = run(tok, [path], tmp_path / "all", t2i_ratio=0.0, ignore_instruction=False)
    assert all(all(trained) for _, trained in stored(tmp_path / "all"))
    assert [t for t, _ in stored(tmp_path / "all")] == [t for t, _ in stored(tmp_path / "i2t")]
    assert summary.trained_tokens == summary.tokens


@pytest.mark.parametrize("newlines", [1, 2])
def test_sft_llava_and_chat_forms(tok, tmp_path, newlines):
    llava = {
        "vqcode": codes(1),
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A red bicycle."},
            {"from": "human", "value": "Where is it?"},
            {"from": "gpt", "value": "Near the river bank."},
        ],
    }
    chat = {
        "vqcode_512": json.dumps(codes(2)),
        "messages": [
            {"role": "user", "content": "Describe this image."},
            {"role": "assistant", "content": "A quick brown fox."},
        ],
    }
    text_only = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    }
    run(tok, [write(tmp_path / "sft.jsonl", [llava, chat, text_only])], tmp_path / "out", sft_newlines=newlines)

    def expected(c, turns):
        tokens, trained = (image(tok, c), [False] * (IMAGE + 2)) if c else ([], [])
        for text, assistant in turns:
            ids = tok.tokenize("\n" * newlines + text)
            tokens, trained = tokens + ids, trained + [assistant] * len(ids)
        return tokens + [tok.eos_id], trained + [True]

    assert stored(tmp_path / "out") == [
        expected(
            codes(1),
            [
                ("What is in the picture?", False),
                ("A red bicycle.", True),
                ("Where is it?", False),
                ("Near the river bank.", True),
            ],
        ),
        expected(codes(2), [("Describe this image.", False), ("A quick brown fox.", True)]),
        expected(None, [("Be brief.", False), ("Hi", False), ("Hello.", True)]),
    ]


def mixed_lines(n: int) -> list[dict]:
    kinds = [
        lambda i: {"text": caption(i) + "."},
        lambda i: {"caption": caption(i), "vqcode": codes(i)},
        lambda i: {
            "vqcode": codes(i),
            "conversations": [
                {"from": "human", "value": "<image>\n" + caption(i)},
                {"from": "gpt", "value": caption(i + 1)},
            ],
        },
    ]
    return [kinds[i % 3](i) for i in range(n)]


@pytest.mark.parametrize("tokenizer", ["bpe", "sentencepiece"])
def test_batched_tokenization_equals_parsing_each_line(request, tmp_path, tokenizer):
    """The block path (deferred, batch-encoded placeholders) stores what parse_line builds directly."""
    path = request.getfixturevalue("bpe_dir" if tokenizer == "bpe" else "sentencepiece_model")
    tok = MultimodalTokenizer.from_pretrained(path, codebook_size=CODEBOOK)
    lines = [json.dumps(line).encode() for line in mixed_lines(30)]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(lines))  # no final newline
    run(tok, [tmp_path / "in.jsonl"], tmp_path / "out")
    direct = [parse_line(line, tok, LineFormat(image_tokens=IMAGE)) for line in lines]
    assert stored(tmp_path / "out") == [(s.tokens, s.trained) for s in direct]


def test_identical_bytes_across_runs_worker_counts_and_block_sizes(tok, tmp_path):
    path = write(tmp_path / "in.jsonl", mixed_lines(150))
    run(tok, [path], tmp_path / "a")
    run(tok, [path], tmp_path / "b")
    _, log = run(tok, [path], tmp_path / "c", workers=2, block_bytes=700, log_interval=50)
    assert file_bytes(tmp_path / "a") == file_bytes(tmp_path / "b") == file_bytes(tmp_path / "c")
    progress = log.splitlines()
    assert len(progress) >= 2 and all(
        " docs/s, " in line and " MB/s), " in line and " ETA " in line for line in progress
    )


def test_t2i_ratio_and_unconditional_share(tok, tmp_path):
    lines = [{"caption": f"{caption(i)} {i}", "vqcode": codes(i)} for i in range(500)]
    run(tok, [write(tmp_path / "pairs.jsonl", lines)], tmp_path / "out")
    first = np.array([tokens[0] for tokens, _ in stored(tmp_path / "out")])
    i2t = np.mean(first == tok.boi_id)
    unconditional = np.mean(first == tok.tokenize(UNCONDITIONAL)[0]) / (1 - i2t)
    assert 0.15 < i2t < 0.25 and 0.06 < unconditional < 0.14


BAD = [
    ("{not json", "unparsable_json"),
    (json.dumps({"caption": "a red bicycle", "vqcode": [1, 2, 3]}), "wrong_code_count"),
    (json.dumps({"caption": "a red bicycle", "vqcode": [1, 2, 3, CODEBOOK]}), "code_out_of_range"),
    (json.dumps({"text": "  "}), "empty_text"),
    (json.dumps({"caption": "", "vqcode": [1, 2, 3, 4]}), "empty_text"),
    (json.dumps({"caption": "a red bicycle"}), "missing_key"),
    (json.dumps({"text": 3}), "wrong_type"),
    (json.dumps({"caption": "x", "vqcode": "[1, 2, 3, 4"}), "wrong_type"),
    (json.dumps([1, 2]), "not_an_object"),
    ("", "blank_line"),
    (json.dumps({"vqcode": [1, 2, 3, 4], "conversations": [{"from": "human", "value": "hi"}]}), "bad_conversation"),
    (
        json.dumps({"messages": [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "x"}]}),
        "missing_key",
    ),
    (json.dumps({"text": "a red bicycle", "image_codes": [1, 2, 3, 4]}), "unknown_codes_key"),
    (json.dumps({"text": "a red bicycle", "image_codes": "[1, 2, 3, 4]"}), "unknown_codes_key"),
]


@pytest.mark.parametrize("line,reason", BAD)
def test_parse_line_reasons(tok, line, reason):
    with pytest.raises(BadLine) as e:
        parse_line(line.encode(), tok, LineFormat(image_tokens=IMAGE))
    assert e.value.reason == reason


def test_bad_lines_reported_with_file_and_line_skipped_and_counted(tok, tmp_path):
    good = [{"text": caption(i)} for i in range(len(BAD) + 1)]
    lines = [x for pair in zip(good, [line for line, _ in BAD]) for x in pair] + good[-1:]
    summary, log = run(tok, [write(tmp_path / "bad.jsonl", lines)], tmp_path / "out")
    assert summary.skipped == Counter(reason for _, reason in BAD)
    assert [tokens for tokens, _ in stored(tmp_path / "out")] == [tok.tokenize(g["text"]) for g in good]
    for number, (_, reason) in enumerate(BAD[:10]):
        assert f"bad.jsonl:{2 * number + 2}: {reason}: " in log  # the first ten, in full
    report = summary.report()
    assert "bad.jsonl:2: unparsable_json" in report and "wrong_code_count 1" in report and "first 10 shown" in report


def cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), *map(str, args)]


def test_strict_cli_fails_on_the_first_bad_line_and_leaves_nothing(bpe_dir, tmp_path):
    bad = {"caption": "x", "vqcode": [1, 2]}
    write(tmp_path / "in.jsonl", [{"text": "a red bicycle"}] * 3 + [bad] + mixed_lines(9))
    done = subprocess.run(
        cli(
            "--input",
            tmp_path / "*.jsonl",
            "--output-prefix",
            tmp_path / "out",
            "--tokenizer-model",
            bpe_dir,
            "--vq-codebook-size",
            CODEBOOK,
            "--image-tokens",
            IMAGE,
            "--workers",
            2,
            "--strict",
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "in.jsonl:4: wrong_code_count" in done.stderr and "--strict" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no final or partial files


def test_unreadable_input_leaves_nothing(tok, tmp_path):
    good = write(tmp_path / "good.jsonl", mixed_lines(6))
    (tmp_path / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:-12])
    with pytest.raises(PreprocessError, match="broken.jsonl.gz"):
        run(tok, [good, tmp_path / "broken.jsonl.gz"], tmp_path / "out")
    assert not list(tmp_path.glob("out*"))


def test_codes_under_an_unknown_key_make_a_bad_line_not_a_text_sample(tok, tmp_path):
    """Image codes under a key the line format does not know would make a text-only sample silently; other
    unknown keys (metadata such as id, url, an image path, a short list) are ignored."""
    path = write(
        tmp_path / "in.jsonl",
        [
            {"text": "a red bicycle", "url": "http://x", "bbox": [1, 2]},
            {"text": "a quick fox", "image_codes": codes(1)},
            {"text": "the river bank", "id": 7, "image": "coco/1.jpg"},
        ],
    )
    summary, log = run(tok, [path], tmp_path / "out")
    assert summary.skipped == Counter(unknown_codes_key=1)
    assert log == (
        f"skipped {path}:2: unknown_codes_key: key 'image_codes' holds what looks like image codes (at "
        f"least {IMAGE} integers) but is no --vqcode-key: name it with --vqcode-key, or with "
        "--metadata-key to ignore it\n"
    )
    assert [tokens for tokens, _ in stored(tmp_path / "out")] == [
        tok.tokenize("a red bicycle"),
        tok.tokenize("the river bank"),
    ]
    with pytest.raises(PreprocessError, match=r"in\.jsonl:2: unknown_codes_key: key 'image_codes'"):
        run(tok, [path], tmp_path / "strict", strict=True)
    summary, _ = run(tok, [path], tmp_path / "declared", metadata_keys=("image_codes",))
    assert summary.documents == 3


@pytest.mark.parametrize(
    "lines,why",
    [
        ([], "the input is empty"),
        (
            ["{not json", {"text": " "}, {"text": "x", "image_codes": [1] * 1024}],
            "all 3 lines are bad (empty_text 1, unknown_codes_key 1, unparsable_json 1)",
        ),
    ],
)
def test_input_without_any_sample_fails_with_status_2_and_writes_nothing(bpe_dir, tmp_path, capsys, lines, why):
    path = write(tmp_path / "in.jsonl", lines)
    status = load_cli().main(
        ["--input", str(path), "--output-prefix", str(tmp_path / "out"), "--tokenizer-model", str(bpe_dir)]
    )
    assert status == 2
    assert (
        f"preprocess_data.py: error: --input {path}: no document to write, {why}; nothing written\n"
        in capsys.readouterr().err
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_partials_of_killed_runs_are_removed_and_a_live_process_s_kept(bpe_dir, tmp_path):
    """A run killed by SIGKILL leaves PREFIX.partial-PID* files; the next run for the prefix removes
    those of dead processes, says so in one line, and keeps those of a live one (this test process)."""
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = sorted(
        tmp_path / f"out.partial-{dead.pid}{suffix}"
        for suffix in (".bin", ".idx", "_lossmask.bin", "_vision.npy", "_vocab.json")
    )
    kept = [
        tmp_path / f"out.partial-{os.getpid()}.bin",
        tmp_path / f"out.partial-{os.getpid()}_lossmask.idx",
        tmp_path / f"other.partial-{dead.pid}.bin",
    ]  # another prefix's
    for path in stale + kept:
        path.write_bytes(b"partial")
    write(tmp_path / "in.jsonl", mixed_lines(6))
    done = subprocess.run(
        cli(
            "--input",
            tmp_path / "in.jsonl",
            "--output-prefix",
            tmp_path / "out",
            "--tokenizer-model",
            bpe_dir,
            "--vq-codebook-size",
            CODEBOOK,
            "--image-tokens",
            IMAGE,
        ),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("removed")] == [
        f"removed the partial files of earlier runs that did not finish: {', '.join(map(str, stale))}"
    ]
    assert not any(path.exists() for path in stale)
    assert all(path.read_bytes() == b"partial" for path in kept)
    assert len(MultimodalDocuments(tmp_path / "out")) == 6


def load_cli():
    spec = importlib.util.spec_from_file_location("preprocess_data", ROOT / "tools" / "preprocess_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merge_of_shards_equals_their_concatenation_and_cli_flags(tok, bpe_dir, tmp_path, capsys):
    lines = mixed_lines(40)
    write(tmp_path / "shard-0.jsonl", lines[:17])
    write(tmp_path / "shard-1.jsonl.gz", lines[17:])
    main = load_cli().main
    flags = [
        "--tokenizer-model",
        str(bpe_dir),
        "--vq-codebook-size",
        str(CODEBOOK),
        "--image-tokens",
        str(IMAGE),
        "--t2i-ratio",
        "0.5",
        "--seed",
        "7",
        "--append-eod",
    ]
    for shard in ("shard-0", "shard-1"):
        [path] = tmp_path.glob(shard + ".*")
        assert main(["--input", str(path), "--output-prefix", str(tmp_path / shard)] + flags) == 0
    assert "documents       23" in capsys.readouterr().out
    assert (
        main(
            [
                "--merge-prefixes",
                str(tmp_path / "shard-0"),
                str(tmp_path / "shard-1"),
                "--output-prefix",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    assert "40 documents" in capsys.readouterr().out
    (tmp_path / "whole").mkdir()
    whole = write(tmp_path / "whole" / "all.jsonl", lines)
    run(tok, [whole], tmp_path / "whole" / "out", t2i_ratio=0.5, seed=7, append_eod=True)
    assert file_bytes(tmp_path / "merged") == file_bytes(tmp_path / "whole" / "out")
    assert len(merge([tmp_path / "merged", tmp_path / "shard-0"], tmp_path / "again")) == 57


def test_vocabulary_record_guards_merge_and_training(tok, bpe_dir, tmp_path):
    """The dataset records the vocabulary layout it was tokenized with; merging datasets of two
    layouts, or training with a tokenizer of another layout, is refused naming the prefix."""
    from megatron_unix.data.indexed import check_vocabulary, read_vocabulary

    lines = write(tmp_path / "in.jsonl", [{"caption": caption(i), "vqcode": codes(i)} for i in range(4)])
    run(tok, [lines], tmp_path / "a")
    assert read_vocabulary(tmp_path / "a")["vq_offset"] == tok.vq_offset
    other = MultimodalTokenizer.from_pretrained(bpe_dir, codebook_size=CODEBOOK, vq_offset=tok.vq_offset + 8)
    run(other, [lines], tmp_path / "b")
    with pytest.raises(ValueError, match=r"b was tokenized with .*merge only datasets made with one tokenizer"):
        merge([tmp_path / "a", tmp_path / "b"], tmp_path / "ab")
    assert not list(tmp_path.glob("ab*"))
    check_vocabulary(tmp_path / "a", tok.model_config_fields(), "tok")
    with pytest.raises(ValueError, match=r"--data-path .*a was preprocessed with another vocabulary .*vq_offset"):
        check_vocabulary(tmp_path / "a", other.model_config_fields(), "other")
    with_separator = MultimodalTokenizer.from_pretrained(bpe_dir, codebook_size=CODEBOOK, separator="<|vision_pad|>")
    with pytest.raises(ValueError, match=r"\(separator_ids \[\] vs \[\d+\]\): pass --separator with the token"):
        check_vocabulary(tmp_path / "a", with_separator.model_config_fields(), "tok")
