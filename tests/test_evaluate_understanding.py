"""``evaluate understanding`` on a tiny Uni-X model, a tiny VQGAN and tiny VLMEvalKit TSVs built here: the
answers equal an independent greedy decode of the same I2T prompt, the scores the scorer's on them;
resume answers only what is missing and refuses other settings; bad inputs are refused by name."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_evaluation_scoring import write_tsv
from test_generate import CODES, make_unix_dir

from megatron_unix.cli import evaluate_understanding
from megatron_unix.evaluation import understanding
from megatron_unix.evaluation.benchmarks import BENCHMARKS, load_benchmark
from megatron_unix.evaluation.prompts import item_prompt
from megatron_unix.evaluation.scoring import SCORERS
from megatron_unix.evaluation.scoring_reference import SCORERS as REFERENCE_SCORERS

MAX_NEW = 4
ALL = "MME,POPE,MMBench,SEED"


def png_b64(seed: int) -> str:
    pixels = torch.randint(0, 256, (8, 8, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy(), "RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_benchmarks(folder: Path) -> Path:
    """A few rows per benchmark; MME's second question and MMBench's rotation refer to a row's image."""
    folder.mkdir(parents=True, exist_ok=True)
    yes_no = ["index", "image", "question", "answer", "category"]
    write_tsv(
        folder / "MME.tsv",
        yes_no,
        [
            [0, png_b64(0), "Is there a cat? Please answer yes or no.", "Yes", "existence"],
            [1, "0", "Is there a dog? Please answer yes or no.", "No", "existence"],
            [2, png_b64(1), "Is it red? Please answer yes or no.", "No", "color"],
        ],
    )
    write_tsv(
        folder / "POPE.tsv",
        yes_no,
        [
            [i, png_b64(10 + i), f"Is there a {w} in the image?", a, "random"]
            for i, (w, a) in enumerate([("cat", "Yes"), ("bus", "No"), ("cup", "Yes")])
        ],
    )
    choice = ["index", "question", "hint", "A", "B", "C", "answer", "category", "l2-category", "image"]
    write_tsv(
        folder / "MMBench_DEV_EN.tsv",
        choice,
        [
            [1, "What animal?", "", "cat", "dog", "cow", "A", "cp", "perception", png_b64(20)],
            [1000001, "What animal?", "", "dog", "cow", "cat", "C", "cp", "perception", "1"],
            [2, "What colour?", "a hint", "red", "blue", "", "B", "lr", "reasoning", png_b64(21)],
        ],
    )
    write_tsv(
        folder / "SEEDBench_IMG.tsv",
        ["index", "question", "A", "B", "C", "D", "answer", "category", "image"],
        [[i, f"Question {i}?", "one", "two", "three", "four", "ABCD"[i], "Scene", png_b64(30 + i)] for i in range(3)],
    )
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, hf_tokenizer_dir) -> Path:
    return make_unix_dir(tmp_path_factory.mktemp("model"), hf_tokenizer_dir, separators=False)


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory) -> Path:
    from megatron_unix.image.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    config = VQGANConfig(
        n_embed=CODES, embed_dim=8, z_channels=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, resolution=16
    )
    vqgan = VQGAN(config)
    with torch.no_grad():  # codebook entries drawn from latents of noise: images get varied codes
        latents = vqgan.latents(torch.rand(8, 3, 16, 16) * 2 - 1).permute(0, 2, 3, 1).reshape(-1, 8)
        vqgan.quantize.embedding.weight.copy_(latents[torch.randperm(len(latents))[:CODES]])
    root = tmp_path_factory.mktemp("vqgan")
    vqgan.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    return write_benchmarks(tmp_path_factory.mktemp("vlmeval"))


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    evaluate_understanding.add_arguments(parser)
    return evaluate_understanding.run(parser.parse_args(list(argv)))


def flags(model_dir, vqgan_dir, bench_dir, out, *more) -> list[str]:
    common = ["--hf", str(model_dir), "--vqgan", str(vqgan_dir), "--benchmark-dir", str(bench_dir)]
    return [*common, "--max-new-tokens", str(MAX_NEW), "--device", "cpu", "--output-dir", str(out), *more]


def cached_answers(out: Path) -> dict[tuple[str, int], str]:
    lines = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()[1:]]
    return {(r["benchmark"].split("@")[0], r["index"]): r["answer"] for r in lines}  # name@size-mtime


def independent_answer(model, tokenizer, vqgan, spec, item) -> str:
    """Spec §3 I2T by hand: [BOI][codes + offset][EOI][prompt], then argmax over text ids, no cache."""
    from megatron_unix.image.transforms import to_pixels

    config = model.config
    codes = vqgan.encode(to_pixels(item.image(), vqgan.image_size)[None])[0].tolist()
    boi, offset = config.vision_start_id, config.real_text_vocab_size
    tokens = [boi, *(offset + c for c in codes), tokenizer.token_id("<|vision_end|>")]
    tokens += tokenizer.encode(item_prompt(spec, item, "reference"))
    eos, answer = tokenizer.token_id("<|endoftext|>"), []
    with torch.no_grad():
        for _ in range(MAX_NEW):
            logits = model(torch.tensor([tokens]), use_cache=False).logits[0, -1]
            logits[offset:] = float("-inf")
            logits[boi] = float("-inf")
            token = int(logits.argmax())
            if token == eos:
                break
            answer.append(token)
            tokens.append(token)
    return tokenizer.decode(answer)


def test_answers_are_the_greedy_decode_and_scores_the_scorers(model_dir, vqgan_dir, bench_dir, tmp_path, capsys):
    from megatron_unix.image.transforms import to_pixels
    from megatron_unix.image.vqgan import VQGAN
    from megatron_unix.inference.loading import load_hf

    out = tmp_path / "eval"
    assert cli(*flags(model_dir, vqgan_dir, bench_dir, out, "--benchmarks", ALL, "--batch-size", "2")) == 0
    answers = cached_answers(out)
    loaded, vqgan = load_hf(model_dir, device=torch.device("cpu")), VQGAN.from_pretrained(vqgan_dir)
    sections = json.loads((out / "results.json").read_text())["sections"]["understanding"]
    assert sorted(sections) == ["MMBench_DEV_EN", "MME", "POPE", "SEEDBench_IMG"]
    for name, scores in sections.items():
        bench = load_benchmark(bench_dir, name)
        for item in bench.items:
            expected = independent_answer(loaded.model, loaded.tokenizer, vqgan, bench.spec, item)
            assert answers[(name, item.index)] == expected, (name, item.index)
        by_index = {index: answers[(name, index)] for (b, index) in answers if b == name}
        expected_scores = REFERENCE_SCORERS[BENCHMARKS[name].scorer](bench.items, by_index)
        assert scores == {**expected_scores, "answered": len(bench.items), "skipped": 0, "scoring": "reference"}
    codes = [vqgan.encode(to_pixels(item.image(), 16)[None])[0] for item in load_benchmark(bench_dir, "POPE").items]
    assert all(len(set(c.tolist())) > 4 for c in codes) and not torch.equal(codes[0], codes[1])
    assert len(set(answers.values())) > 1
    assert "MMBench_DEV_EN: overall" in capsys.readouterr().out


def test_resume_answers_only_the_missing_and_refuses_other_settings(
    model_dir, vqgan_dir, bench_dir, tmp_path, monkeypatch, capsys
):
    prompts: list[int] = []
    generate = understanding.generate_text

    def counting(model, layout, contexts, *args, **kwargs):
        prompts.append(len(contexts))
        return generate(model, layout, contexts, *args, **kwargs)

    monkeypatch.setattr(understanding, "generate_text", counting)
    out, once = tmp_path / "resumed", tmp_path / "once"
    assert cli(*flags(model_dir, vqgan_dir, bench_dir, out, "--benchmarks", "MME,SEED", "--limit", "2")) == 0
    assert sum(prompts) == 4 and len(cached_answers(out)) == 4
    first = cached_answers(out)
    prompts.clear()
    assert cli(*flags(model_dir, vqgan_dir, bench_dir, out, "--benchmarks", "MME,SEED")) == 0
    assert sum(prompts) == 2  # the third question of each, only
    assert cached_answers(out).items() >= first.items()
    assert cli(*flags(model_dir, vqgan_dir, bench_dir, once, "--benchmarks", "MME,SEED")) == 0
    results = [json.loads((d / "results.json").read_text())["sections"] for d in (out, once)]
    assert results[0] == results[1] and cached_answers(out) == cached_answers(once)

    copy = tmp_path / "vlmeval"  # another release of a TSV in the same place: its answers are not reused
    shutil.copytree(bench_dir, copy)  # (a copy keeps the file times: its answers would be reused)
    stamp = (copy / "MME.tsv").stat().st_mtime_ns + 10**9
    os.utime(copy / "MME.tsv", ns=(stamp, stamp))
    prompts.clear()
    assert cli(*flags(model_dir, vqgan_dir, copy, out, "--benchmarks", "MME")) == 0
    assert sum(prompts) == 3
    prompts.clear()
    assert cli(*flags(model_dir, vqgan_dir, copy, out, "--benchmarks", "MME")) == 0
    assert sum(prompts) == 0

    capsys.readouterr()
    assert cli(*flags(model_dir, vqgan_dir, bench_dir, out, "--benchmarks", "MME", "--prompt-style", "llava")) == 2
    error = capsys.readouterr().err
    assert "written with other settings (prompt_style: 'reference' there, 'llava' now)" in error


def test_scorings_do_not_share_answers_to_other_prompts(model_dir, vqgan_dir, bench_dir, tmp_path, monkeypatch, capsys):
    prompts: list[str] = []
    item_prompt_of = understanding.item_prompt

    def recording(spec, item, style):
        prompts.append(style)
        return item_prompt_of(spec, item, style)

    monkeypatch.setattr(understanding, "item_prompt", recording)
    out = tmp_path / "eval"
    assert cli(*flags(model_dir, vqgan_dir, bench_dir, out, "--benchmarks", "SEED")) == 0
    assert prompts == ["reference"] * 3
    # VLMEvalKit's scoring prompts VLMEvalKit's way: the reference's answers are not reused for it
    base = ["--hf", str(model_dir), "--vqgan", str(vqgan_dir), "--benchmark-dir", str(bench_dir), "--device", "cpu"]
    assert cli(*base, "--output-dir", str(out), "--benchmarks", "SEED", "--scoring", "vlmevalkit") == 2
    assert "prompt_style: 'reference' there, 'vlmevalkit' now" in capsys.readouterr().err
    # the same prompts and cap asked for explicitly: the same answers, read VLMEvalKit's way
    prompts.clear()
    same = ["--prompt-style", "reference", "--scoring", "vlmevalkit"]
    assert cli(*flags(model_dir, vqgan_dir, bench_dir, out, "--benchmarks", "SEED", *same)) == 0
    assert prompts == []
    seed = json.loads((out / "results.json").read_text())["sections"]["understanding"]["SEEDBench_IMG"]
    answers = {index: text for (name, index), text in cached_answers(out).items()}
    expected = SCORERS["seed"](load_benchmark(bench_dir, "SEEDBench_IMG").items, answers)
    assert seed == {**expected, "answered": 3, "skipped": 0, "scoring": "vlmevalkit"}
    # the reference's cap: 3 new tokens when --max-new-tokens is not given
    fresh = tmp_path / "capped"
    assert cli(*base, "--output-dir", str(fresh), "--benchmarks", "SEED") == 0
    settings = json.loads((fresh / "answers.jsonl").read_text().splitlines()[0])["settings"]
    assert (settings["max_new_tokens"], settings["prompt_style"]) == (3, "reference")


@pytest.mark.parametrize("broken", ["row", "image"])
def test_broken_row_named_or_skipped_and_counted(model_dir, vqgan_dir, tmp_path, capsys, broken):
    folder = write_benchmarks(tmp_path / "vlmeval")
    rows = list(csv.reader((folder / "POPE.tsv").open(), delimiter="\t"))
    if broken == "row":
        rows[2][3] = "Maybe"  # file row 2: answer neither Yes nor No
    else:
        rows[2][1] = "A" * 100  # not base64 of an image
    write_tsv(folder / "POPE.tsv", rows[0], rows[1:])
    out = tmp_path / "eval"
    assert cli(*flags(model_dir, vqgan_dir, folder, out, "--benchmarks", "POPE")) == 2
    error = capsys.readouterr().err
    assert f"{folder / 'POPE.tsv'}: row 2:" in error
    assert cli(*flags(model_dir, vqgan_dir, folder, out, "--benchmarks", "POPE", "--skip-bad-rows")) == 0
    pope = json.loads((out / "results.json").read_text())["sections"]["understanding"]["POPE"]
    assert (pope["answered"], pope["skipped"], pope["overall"]["count"]) == (2, 1, 2)
    assert "skipped" in capsys.readouterr().err


def test_refusals_name_the_file_or_flag(model_dir, vqgan_dir, bench_dir, tmp_path, capsys):
    out = str(tmp_path / "eval")
    empty = tmp_path / "empty"
    empty.mkdir()
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    cases = [
        (flags(model_dir, vqgan_dir, empty, out, "--benchmarks", "POPE"), "POPE.tsv not found (expected VLMEvalKit's"),
        (flags(bare, vqgan_dir, bench_dir, out, "--benchmarks", "POPE"), f"--hf {bare} has no tokenizer files"),
        (["--hf", str(model_dir), "--benchmark-dir", str(bench_dir), "--output-dir", out], "give --vqgan"),
        (flags(model_dir, vqgan_dir, bench_dir, out, "--benchmarks", "MMB"), "--benchmarks MMB: unknown MMB"),
        (flags(model_dir, vqgan_dir, bench_dir, out, "--limit", "0"), "--limit 0 is out of range"),
        (flags(model_dir, tmp_path / "nowhere", bench_dir, out), "--vqgan"),
    ]
    for argv, message in cases:
        assert cli(*argv) == 2
        error = capsys.readouterr().err
        assert error.startswith("evaluate understanding: error:") and message in error, error
    assert not (tmp_path / "eval" / "results.json").exists()
