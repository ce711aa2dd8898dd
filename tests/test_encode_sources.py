"""encode_images' inputs: parquet row groups and webdataset tars made here (pyarrow, tarfile, Pillow), their
records resumable by count, their codes those of the jsonl path, FineVision and LLaVA conversations laid out
by preprocess_data as SFT, bad data counted by reason with file and row or member."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import CORPUS
from PIL import Image
from test_encode_images import MIN, expected_codes, lines, model, picture, run, vqgan_dir, write_jsonl  # noqa: F401  (fixtures)

from megatron_unix.cli import preprocess_data
from megatron_unix.data.indexed import MultimodalDocuments
from megatron_unix.data.tokenizer import MultimodalTokenizer, train_bpe_tokenizer
from megatron_unix.image.sources import SourceOptions, TarShard, chained, shards


def encoded(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_parquet(path: Path, columns: dict[str, list], row_group_size: int = 2) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """Good images as files (jsonl gives their paths; parquet and tar their bytes)."""
    folder = tmp_path_factory.mktemp("pictures")
    made = {
        "a.png": picture(48, 40, 1),
        "b.jpg": picture(40, 70, 2),
        "c.png": picture(40, 40, 3, "RGBA"),
        "palette.png": picture(40, 40, 8).convert("P", palette=Image.Palette.ADAPTIVE),
        "cmyk.jpg": picture(40, 44, 9).convert("CMYK"),
    }
    for name, image in made.items():
        image.save(folder / name)
    return {name: folder / name for name in made}


def test_parquet_and_tar_give_the_codes_of_the_jsonl_path(tmp_path, pictures, vqgan_dir, capsys):  # noqa: F811
    names = ["a.png", "b.jpg", "c.png"]
    jsonl = write_jsonl(tmp_path / "in.jsonl", [{"image": str(pictures[n]), "caption": n} for n in names])
    structs = [{"bytes": pictures[n].read_bytes(), "path": n} for n in names[:2]]
    structs.append({"bytes": None, "path": str(pictures["c.png"])})  # a path only: read from disk
    parquet = write_parquet(tmp_path / "in.parquet", {"image": structs, "caption": names, "n": [0, 1, 2]})
    tar = write_tar(
        tmp_path / "in.tar",
        [
            member
            for i, n in enumerate(names)
            for member in [
                (f"s/{i:03d}.{n.split('.')[1]}", pictures[n].read_bytes()),
                (f"s/{i:03d}.txt", n.encode()),
                (f"s/{i:03d}.json", json.dumps({"key": f"{i:03d}", "caption": "replaced by .txt"}).encode()),
            ]
        ],
    )
    outputs = {}
    for name, inputs in {"jsonl": [jsonl], "parquet_tar": [parquet, tar]}.items():
        out = tmp_path / f"{name}.out.jsonl"
        status, _, stderr = run(
            capsys, "--input", *inputs, "--output", out, "--vqgan", vqgan_dir, *MIN, "--batch-size", 2
        )
        assert status == 0, stderr
        outputs[name] = lines(out)
    reference = outputs["jsonl"]
    assert [line["caption"] for line in reference] == names
    assert outputs["parquet_tar"] == [
        *({**line, "n": i} for i, line in enumerate(reference)),
        *({**line, "key": f"{i:03d}"} for i, line in enumerate(reference)),
    ]


def test_shards_count_and_resume_where_a_count_says(tmp_path, pictures):
    """A parquet file is a shard per row group; ``items(skip)`` and ``chained(skip)`` give what follows."""
    data = pictures["a.png"].read_bytes()
    parquet = write_parquet(
        tmp_path / "p.parquet", {"image": [{"bytes": data, "path": None}] * 5, "caption": list("abcde")}
    )
    members = [(f"{k}.{ext}", data if ext == "png" else k.encode()) for k in "fgh" for ext in ("png", "txt")]
    tar = write_tar(tmp_path / "t.tar", members)
    found = shards([str(tmp_path / "*.parquet"), tar], SourceOptions(batch_rows=2))
    assert [(s.name, s.count()) for s in found] == [
        (f"{parquet}:row group 0", 2),
        (f"{parquet}:row group 1", 2),
        (f"{parquet}:row group 2", 1),
        (str(tar), 3),
    ]
    every = list(chained(found))
    assert [(i.where, i.fields["caption"]) for i in every] == [
        *((f"{parquet}:row {r}", c) for r, c in enumerate("abcde")),
        (f"{tar}:f.png", "f"),
        (f"{tar}:g.png", "g"),
        (f"{tar}:h.png", "h"),
    ]
    assert all(i.data == data for i in every) and [round(i.progress, 6) for i in every] == sorted(
        round(i.progress, 6) for i in every
    )
    for skip in (1, 3, 5, 7):
        assert list(chained(found, skip)) == every[skip:], skip
    assert [i.where for i in found[3].items(2)] == [f"{tar}:h.png"]
    offsets = {m.name: (m.offset, m.offset_data) for m in tarfile.open(tar)}
    for cut_at, expected in [
        (offsets["g.png"][1] + 100, [("f.png", None), ("g.png", "unexpected end of data")]),  # in g.png's data
        (offsets["g.png"][0], [("f.png", None), ("after f.txt", "no end-of-archive blocks")]),  # tarfile: "the end"
    ]:
        cut = tmp_path / f"cut{cut_at}.tar"
        cut.write_bytes(tar.read_bytes()[:cut_at])
        shard = TarShard(cut, SourceOptions())
        records = list(shard.items())
        assert [(i.at, i.error and i.error[0]) for i in records] == [
            (at, why and "corrupt_member") for at, why in expected
        ]
        assert expected[-1][1] in records[-1].error[1]
        assert shard.count() == 2 and list(shard.items(1)) == records[1:]


def sft_tokens(tok: MultimodalTokenizer, codes: list[int], turns: list[tuple[str, bool]]) -> tuple[list, list]:
    """The SFT sample by hand (spec §3): BOI, codes, EOI, each turn after a newline, EOS; answers and EOS trained."""
    tokens = [tok.boi_id, *(c + tok.vq_offset for c in codes), tok.eoi_id]
    trained = [False] * len(tokens)
    for text, answer in turns:
        ids = tok.tokenize("\n" + text)
        tokens += ids
        trained += [answer] * len(ids)
    return tokens + [tok.eos_id], trained + [True]


def test_conversations_become_the_sft_samples_laid_out_by_hand(tmp_path, pictures, model, vqgan_dir, capsys):  # noqa: F811
    a, b = ({"bytes": pictures[n].read_bytes(), "path": None} for n in ("a.png", "b.jpg"))
    turns = [{"user": "What is shown?", "assistant": "A red bicycle."}, {"user": "Where?", "assistant": "By a wall."}]
    finevision = write_parquet(
        tmp_path / "fv.parquet",
        {"images": [[a], [a, b]], "texts": [turns, turns[:1]], "source": ["x", "y"]},
    )
    llava = [
        {"image": str(pictures["b.jpg"]), "conversations": [
            {"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "Noise, mostly."}
        ]},
        {"image": str(pictures["b.jpg"]), "conversations": [
            {"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."},
            {"from": "human", "value": "<image>\nAnd this?"}, {"from": "gpt", "value": "Noise."},
        ]},
        {"image": [str(pictures["a.png"])], "messages": [  # Hugging Face's content parts
            {"role": "user", "content": [{"type": "text", "text": "What now?"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Still noise."}]},
        ]},
    ]  # fmt: skip
    source = write_jsonl(tmp_path / "llava.jsonl", llava)
    out = tmp_path / "out.jsonl"
    status, stdout, stderr = run(capsys, "--input", finevision, source, "--output", out, "--vqgan", vqgan_dir, *MIN)
    assert status == 0, stderr
    assert "skipped         2, unsupported_layout 2" in stdout
    assert f"{finevision}:row 1: unsupported_layout: 2 images in a conversation: the SFT layout holds one" in stdout
    assert f"{source}:2: unsupported_layout: conversations[2] holds the <image>" in stdout
    got = lines(out)
    codes = [expected_codes(model, pictures[n]) for n in ("a.png", "b.jpg")]
    assert got == [
        {"source": "x", "conversations": [
            {"from": "human", "value": "What is shown?"}, {"from": "gpt", "value": "A red bicycle."},
            {"from": "human", "value": "Where?"}, {"from": "gpt", "value": "By a wall."},
        ], "vqcode": codes[0]},
        {"conversations": llava[0]["conversations"], "vqcode": codes[1]},
        {"messages": [
            {"role": "user", "content": "What now?\n<image>"}, {"role": "assistant", "content": "Still noise."}
        ], "vqcode": codes[0]},
    ]  # fmt: skip

    tokenizer = train_bpe_tokenizer(CORPUS, 400, tmp_path / "tok")
    prefix = tmp_path / "sft"
    args = ["--input", out, "--output-prefix", prefix, "--tokenizer-model", tokenizer, "--vq-codebook-size", 64]
    assert preprocess_data.main([str(a) for a in [*args, "--image-tokens", 256]]) == 0
    capsys.readouterr()
    docs = MultimodalDocuments(prefix)
    tok = MultimodalTokenizer.from_pretrained(tokenizer, codebook_size=64)
    hand = [
        sft_tokens(tok, codes[0], [("What is shown?", False), ("A red bicycle.", True), ("Where?", False), ("By a wall.", True)]),
        sft_tokens(tok, codes[1], [("Describe it.", False), ("Noise, mostly.", True)]),
        sft_tokens(tok, codes[0], [("What now?", False), ("Still noise.", True)]),
    ]  # fmt: skip
    assert len(docs) == 3
    for i, (tokens, trained) in enumerate(hand):
        got_tokens, got_trained = docs.sample(i)
        assert got_tokens.tolist() == tokens and got_trained.tolist() == trained, i


def sixteen_bit_png() -> bytes:
    return encoded(Image.fromarray(np.random.default_rng(3).integers(0, 65535, (40, 40), dtype=np.uint16)))


def test_bad_data_is_counted_by_reason_with_file_and_row_or_member(tmp_path, pictures, model, vqgan_dir, capsys):  # noqa: F811
    good = pictures["a.png"].read_bytes()
    truncated = encoded(picture(64, 64, 5), "JPEG")
    members = [("0.png", good), ("0.txt", b"good"), ("1.txt", b"no image"), ("2.png", good), ("2.txt", b"lost")]
    tar = write_tar(tmp_path / "t.tar", members)
    damaged = bytearray(tar.read_bytes())
    header = next(m.offset for m in tarfile.open(tar) if m.name == "2.png")
    damaged[header : header + 100] = b"x" * 100  # a garbage header: tarfile alone would take it for the end
    tar.write_bytes(bytes(damaged))
    cases = [  # (image bytes, caption): one bad of each kind, then palette and CMYK (converted, encoded)
        (b"not an image", "undecodable"),
        (truncated[: len(truncated) // 2], "truncated"),
        (encoded(picture(12, 12, 7)), "tiny"),
        (encoded(picture(120, 40, 6)), "wide"),
        (sixteen_bit_png(), "16-bit"),
        (None, "no image"),
        (good, ""),
        (pictures["palette.png"].read_bytes(), "palette"),
        (pictures["cmyk.jpg"].read_bytes(), "cmyk"),
        (good, "in a row group that is damaged"),
        (good, "so is this"),
    ]
    parquet = write_parquet(
        tmp_path / "p.parquet",
        {"image": [{"bytes": b, "path": None} for b, _ in cases], "caption": [c for _, c in cases]},
        row_group_size=9,
    )
    damaged = bytearray(parquet.read_bytes())
    page = pq.ParquetFile(parquet).metadata.row_group(1).column(0).data_page_offset
    damaged[page : page + 16] = b"\xff" * 16
    parquet.write_bytes(bytes(damaged))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")

    out = tmp_path / "out.jsonl"
    args = ["--input", tar, parquet, broken, "--output", out, "--vqgan", vqgan_dir, *MIN]
    status, _, stderr = run(capsys, *args[:3], "--output", out, "--vqgan", vqgan_dir, *MIN, "--strict")
    assert status == 2 and f"error: {tar}:1: no image: no member 1.{{" in stderr and not out.exists()

    status, stdout, stderr = run(capsys, *args, "--batch-size", 4)
    assert status == 0, stderr
    assert (
        "skipped         12, aspect_ratio 1, corrupt_file 1, corrupt_member 1, corrupt_row_group 2, high_bit_depth 1, "
        "missing_image 2, missing_text 1, too_small 1, truncated 1, unreadable 1" in stdout
    )
    reported = [
        f"{tar}:1: missing_image: no image: no member 1.",
        f"{tar}:after 1.txt: corrupt_member: tar unreadable from here on (an unreadable member header at byte",
        f"{parquet}:row 0: unreadable: not an image",
        f"{parquet}:row 1: truncated: ",
        f"{parquet}:row 2: too_small: 12x12",
        f"{parquet}:row 3: aspect_ratio: 120x40",
        f"{parquet}:row 4: high_bit_depth: I;16 pixels",
        f"{parquet}:row 5: missing_image: no image: column 'image' is empty",
        f"{parquet}:row 6: missing_text: no text",
        f"{parquet}:row 9: corrupt_row_group: row group 1 unreadable from row 9 on (Couldn't deserialize thrift",
    ]
    assert [line[2 : 2 + len(r)] for line, r in zip(stdout.splitlines()[2:], reported)] == reported
    assert [(line["caption"], line["vqcode"]) for line in lines(out)] == [
        ("good", expected_codes(model, pictures["a.png"])),
        ("palette", expected_codes(model, pictures["palette.png"])),
        ("cmyk", expected_codes(model, pictures["cmyk.jpg"])),
    ]
    assert TarShard(tar, SourceOptions()).count() == 3, "the damaged tar counts the record it ends with"


def test_a_parquet_file_without_the_columns_asked_is_refused_by_name(tmp_path, vqgan_dir, capsys):  # noqa: F811
    parquet = write_parquet(tmp_path / "p.parquet", {"picture": [b"x"], "caption": ["c"]})
    args = ["--input", parquet, "--output", tmp_path / "o.jsonl", "--vqgan", vqgan_dir]
    status, _, stderr = run(capsys, *args)
    assert (
        status == 2
        and f"{parquet}: no image column images/image (--image-column); it has ['picture', 'caption']" in stderr
    )
    status, _, stderr = run(capsys, *args, "--image-column", "picture", "--text-column", "alt")
    assert status == 2 and f"{parquet}: no column 'alt' (--text-column)" in stderr
