"""Faults of generate, encode_images, evaluate and export-hf (issue 22), one test per class: silently wrong
results refused, no tracebacks, nothing left behind, messages naming the file or flag, one writer per output.
Each refusal asserts exit status 2 and the flag or file named; each write failure lists the folder after it.

A full disk is a real write failure in a child process: ``RLIMIT_FSIZE`` caps the size of any file it
writes, and with ``SIGXFSZ`` ignored the write that crosses the cap fails with ``EFBIG`` ("File too
large"), the way ``ENOSPC`` fails it on a full disk: the same ``OSError`` from the same ``write``."""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, SPECIALS
from PIL import Image
from test_evaluate_report import write_checkpoint
from test_evaluate_understanding import bench_dir, model_dir  # noqa: F401  (fixtures)
from test_evaluate_understanding import cli as understanding
from test_generate import CAPTIONS, make_unix_dir

from megatron_unix.cli import evaluate_generation
from megatron_unix.cli.encode_images import main as encode_main
from megatron_unix.cli.evaluate import main as evaluate_main
from megatron_unix.cli.generate import main as generate_main
from megatron_unix.evaluation import layouts
from megatron_unix.evaluation.benchmarks import Item
from megatron_unix.evaluation.progress import CheckpointResults, progress_curves
from megatron_unix.evaluation.report import AnswerCache
from megatron_unix.files import OutputBusy, default_mode, exclusive, write_text_atomically
from megatron_unix.image.random_vqgan import NOTE, save_random_vqgan
from megatron_unix.image.vqgan import VQGAN
from megatron_unix.inference.loading import device_of, load_hf

ROOT = Path(__file__).resolve().parents[1]
CODES = 48
"""The test models' codebook (test_generate.CODES)."""


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory) -> Path:
    """The shipped random VQGAN, sized for the test models: 48 codes, 4x4 per 8-pixel image."""
    root = tmp_path_factory.mktemp("vqgan")
    save_random_vqgan(root, CODES, grid=4)
    return root


@pytest.fixture(scope="module")
def sep_dir(tmp_path_factory, hf_tokenizer_dir) -> Path:
    return make_unix_dir(tmp_path_factory.mktemp("sep"), hf_tokenizer_dir, separators=True, seed=1)


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer with the same size and special tokens as conftest's, trained on other text: every
    layout check passes, and the model would read every prompt as other words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [line[::-1].upper() for line in CORPUS]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    root = tmp_path_factory.mktemp("other")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(root)
    return root


def refused(capsys, prefix: str, *named: str) -> str:
    """The error line (the last of stderr; progress lines may come before it), naming each of ``named``."""
    stderr = capsys.readouterr().err
    error = stderr.strip().splitlines()[-1]
    assert error.startswith(prefix) and "Traceback" not in stderr, stderr
    assert sum(prefix in line for line in stderr.splitlines()) == 1, stderr
    for text in named:
        assert text in error, error
    return error


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------ silent


def test_a_tokenizer_of_another_vocabulary_is_refused(sep_dir, other_tokenizer, hf_tokenizer_dir, tmp_path, capsys):
    argv = ["--hf", str(sep_dir), "--prompt", "a red bicycle", "--max-new-tokens", "2"]
    assert generate_main([*argv, "--tokenizer", str(other_tokenizer)]) == 2
    refused(capsys, "generate: error:", f"--tokenizer {other_tokenizer}", "vocabulary", str(sep_dir))
    copy = shutil.copytree(hf_tokenizer_dir, tmp_path / "copy")  # the same vocabulary elsewhere is fine
    assert generate_main([*argv, "--tokenizer", str(copy)]) == 0


def test_eval_iters_zero_is_refused_before_anything_runs(tmp_path, capsys):
    argv = ["loss", "--load", str(tmp_path / "nowhere"), "--eval-iters", "0", "--output-dir", str(tmp_path / "o")]
    assert evaluate_main(argv) == 2
    refused(capsys, "error:", "--eval-iters 0")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------- traceback


def test_device_is_resolved_in_one_place(tmp_path, capsys):
    assert device_of(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert device_of("cpu") == torch.device("cpu")
    for flag in ("cuda:banana", "banana", "meta"):
        with pytest.raises(ValueError, match=f"--device {flag}: "):
            device_of(flag)
    absent = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match=f"--device {absent}: "):
        device_of(absent)
    for flag in (absent, "cuda:banana"):
        assert generate_main(["--hf", str(tmp_path), "--prompt", "x", "--device", flag]) == 2
        refused(capsys, "generate: error:", f"--device {flag}")
        (tmp_path / "in.jsonl").write_text("")
        argv = ["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--vqgan", str(tmp_path)]
        assert encode_main([*argv, "--device", flag]) == 2
        refused(capsys, "encode_images.py: error:", f"--device {flag}")


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--cfg-scale", "nan"),
        ("--cfg-scale", "inf"),
        ("--cfg-scale", "-1"),
        ("--temperature", "nan"),
        ("--temperature", "inf"),
        ("--temperature", "0"),
        ("--top-p", "nan"),
        ("--top-k", "-1"),
    ],
)
def test_sampling_flags_are_refused_unless_finite_and_in_range(flag, value, vqgan_dir, tmp_path, capsys):
    assert generate_main(["--hf", str(tmp_path), "--prompt", "x", flag, value]) == 2
    refused(capsys, "generate: error:", f"{flag} {float(value) if flag != '--top-k' else value}")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "a cat"}) + "\n")
    argv = ["--hf", str(tmp_path), "--vqgan", str(vqgan_dir), "--geneval-prompts", str(tmp_path / "prompts.jsonl")]
    parser = evaluate_generation.argparse.ArgumentParser()
    evaluate_generation.add_arguments(parser)
    assert evaluate_generation.run(parser.parse_args([*argv, "--output-dir", str(tmp_path / "o"), flag, value])) == 2
    error = refused(capsys, "evaluate generation: error:", flag)
    assert "--greedy" not in error  # a flag evaluate generation does not have


def child_with_file_cap(limit: int, code: str) -> subprocess.CompletedProcess:
    """``code`` in a Python child whose files cannot grow past ``limit`` bytes (see the module docstring)."""

    def cap() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], preexec_fn=cap, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_a_full_disk_while_writing_the_report_names_the_file_and_leaves_nothing(tmp_path):
    for name, tokens in (("early", 1e9), ("late", 2e9)):
        write_checkpoint(tmp_path / name, name, tokens, 0.4, 6.0)
    out = tmp_path / "summary"
    argv = ["report", str(tmp_path / "early"), str(tmp_path / "late"), "--output-dir", str(out)]
    code = f"import sys; from megatron_unix.cli.evaluate import main; sys.exit(main({argv!r}))"
    proc = child_with_file_cap(4096, code)  # the tables fit, the plots do not
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"evaluate report: error: cannot write {out / 'loss.png'}: File too large" in proc.stderr
    assert listing(out) == []  # no temporary, no half PNG
    assert evaluate_main(argv) == 0  # room again: the same command finishes
    assert listing(out) == ["loss.png", "report.json", "report.md", "scores.png"]


@pytest.mark.slow
def test_a_full_disk_during_t2i_leaves_whole_images_listed_in_samples_jsonl(sep_dir, vqgan_dir, tmp_path):
    out = tmp_path / "t2i"
    argv = ["--hf", str(sep_dir), "--vqgan", str(vqgan_dir), "--mode", "t2i", "--batch-size", "1"]
    argv += ["--prompt", CAPTIONS[0], "--prompt", CAPTIONS[1], "--samples-per-prompt", "3"]
    argv += ["--codes-per-image", "16", "--output-dir", str(out)]
    code = f"import sys; from megatron_unix.cli.generate import main; sys.exit(main({argv!r}))"
    proc = child_with_file_cap(800, code)  # the 8-pixel PNGs fit (~270 B); samples.jsonl outgrows it (~210 B a line)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"generate: error: cannot write {out / 'samples.jsonl'}: File too large" in proc.stderr
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert 0 < len(records) < 6
    pngs = [name for name in listing(out) if name.endswith(".png")]
    # every PNG whole; those of the failed batch were written, the listed ones are all there
    assert {r["image"] for r in records} <= set(pngs) and len(pngs) == len(records) + 1
    assert all(not name.startswith(".") for name in listing(out))
    for name in pngs:
        with Image.open(out / name) as image:
            image.load()  # whole
    assert generate_main(argv) == 0  # room again: the same command writes everything
    assert listing(out) == sorted(
        [*(f"{p:04d}_{i:02d}.png" for p in range(2) for i in range(3)), "grid.png", "samples.jsonl"]
    )


# -------------------------------------------------------------------------------------- left behind


def test_strict_encode_leaves_no_partial(vqgan_dir, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    (tmp_path / "in.jsonl").write_text(json.dumps({"image": "bad.png", "caption": "x"}) + "\n")
    out = tmp_path / "out" / "codes.jsonl"
    argv = ["--input", str(tmp_path / "in.jsonl"), "--vqgan", str(vqgan_dir), "--min-size", "1", "--workers", "0"]
    assert encode_main([*argv, "--output", str(out), "--strict"]) == 2  # its folder is missing: named
    refused(capsys, "encode_images.py: error:", f"--output {out}", f"its folder {out.parent} does not exist")
    out.parent.mkdir()
    assert encode_main([*argv, "--output", str(out), "--strict"]) == 2
    error = refused(capsys, "encode_images.py: error:", f"{tmp_path / 'in.jsonl'}:1: not an image", "(--strict)")
    assert "BytesIO" not in error
    assert listing(out.parent) == []


# ------------------------------------------------------------------------------------------ unclear


def test_write_errors_name_the_file_not_its_temporary(tmp_path):
    target = tmp_path / "missing" / "results.json"
    with pytest.raises(OSError) as caught:
        write_text_atomically(target, "{}")
    assert str(caught.value) == f"cannot write {target}: its folder {target.parent} does not exist"


def test_an_output_folder_that_is_a_file_is_named(tmp_path, capsys):
    file = tmp_path / "taken"
    file.write_text("x")
    assert generate_main(["--hf", str(tmp_path), "--mode", "t2i", "--prompt", "x", "--output-dir", str(file)]) == 2
    refused(capsys, "generate: error:", f"--output-dir {file}: a file, not a folder")
    assert evaluate_main(["report", str(tmp_path), "--output-dir", str(file)]) == 2
    refused(capsys, "evaluate report: error:", f"--output-dir {file}: a file, not a folder")


def test_an_empty_prompts_file_is_named(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("\n\n")
    assert generate_main(["--hf", str(tmp_path), "--prompts-file", str(tmp_path / "prompts.txt")]) == 2
    refused(capsys, "generate: error:", f"--prompts-file {tmp_path / 'prompts.txt'}: no prompt in it")


def test_skip_reasons_name_the_row_not_pillow_internals():
    item = Item(0, "q", "a", image_b64="eHh4eHh4eHh4eHh4", origin="MME.tsv: row 3")  # base64 of "xxx..."
    with pytest.raises(ValueError) as caught:
        item.image()
    assert str(caught.value).startswith("MME.tsv: row 3: ") and "BytesIO" not in str(caught.value)


def test_offline_is_said_at_once_naming_include_path(monkeypatch, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    argv = ["text", "--hf", str(tmp_path), "--tasks", "not_a_task", "--output-dir", str(tmp_path / "o")]
    assert evaluate_main(argv) == 2
    error = capsys.readouterr().err
    assert "offline (HF_HUB_OFFLINE=1)" in error and "--include-path" in error
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"  # datasets fail at once instead of retrying the hub


def test_loading_prints_no_transformers_progress_bars(sep_dir, capfd):
    load_hf(sep_dir, device=torch.device("cpu"))
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out


# -------------------------------------------------------------------------------- concurrent writers


def test_one_writer_per_resumable_output(model_dir, vqgan_dir, bench_dir, tmp_path, capsys):  # noqa: F811
    answers = tmp_path / "eval" / "answers.jsonl"
    with AnswerCache(answers, {"a": 1}):
        with pytest.raises(OutputBusy, match=f"{answers}: another process is writing it"):
            AnswerCache(answers, {"a": 1})
        argv = ["--hf", str(model_dir), "--benchmark-dir", str(bench_dir), "--benchmarks", "POPE"]
        assert understanding(*argv, "--vqgan", str(vqgan_dir), "--output-dir", str(answers.parent)) == 2
        refused(capsys, "evaluate understanding: error:", f"{answers}: another process is writing it")
    assert answers.read_text().count("\n") == 1  # the settings line alone: nothing answered twice
    folder = tmp_path / "geneval"
    folder.mkdir()
    with exclusive(folder), pytest.raises(OutputBusy, match=str(folder)):
        layouts.write_geneval([{"prompt": "a cat"}], folder, lambda requests: [])


# ------------------------------------------------------------------------------------------- others


def test_report_plots_each_loss_once_and_results_md_has_losses(tmp_path):
    write_checkpoint(tmp_path / "a", "a", 1e9, 0.5, 6.0)
    table = (tmp_path / "a" / "results.md").read_text()
    assert "| checkpoint | tokens seen | validation text | validation vision |" in table
    assert "| a | 1e+09 | 2.500 | 6.000 |" in table
    checkpoint = CheckpointResults.read(tmp_path / "a")
    curves = progress_curves([1e9], [checkpoint.losses])
    assert [c.label for c in curves] == ["validation text", "validation vision"]


def test_megatron_load_shares_the_tokenizer_rule_and_its_export_the_usual_permissions(
    megatron_single, sep_dir, other_tokenizer, tmp_path, capsys
):
    from megatron_unix.conversion.convert import ImportOptions, export_hf, import_hf

    import_hf(sep_dir, tmp_path / "megatron", ImportOptions())
    argv = ["--load", str(tmp_path / "megatron"), "--prompt", "x", "--max-new-tokens", "2"]
    assert generate_main([*argv, "--tokenizer", str(other_tokenizer)]) == 2
    refused(capsys, "generate: error:", f"--tokenizer {other_tokenizer}: its vocabulary", str(tmp_path / "megatron"))
    export_hf(tmp_path / "megatron", tmp_path / "hf")  # safetensors alone would write its file 0600
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "hf").iterdir()}
    assert set(modes.values()) == {default_mode()}, modes


def test_make_tiny_vqgan_is_labelled_and_round_trips(tmp_path, capsys):
    from megatron_unix.cli.make_tiny_vqgan import main

    assert main(["--output", str(tmp_path / "v"), "--codebook-size", "64", "--grid", "4"]) == 0
    assert NOTE in capsys.readouterr().out
    assert json.loads((tmp_path / "v" / "config.json").read_text())["untrained"] == NOTE
    assert "UNTRAINED" in (tmp_path / "v" / "README.md").read_text()
    model = VQGAN.from_pretrained(tmp_path / "v")
    assert (model.config.n_embed, model.codes_per_image, model.image_size) == (64, 16, 8)
    codes = model.encode(torch.rand(4, 3, 8, 8) * 2 - 1)
    assert len(codes.unique()) > 8 and not math.isnan(float(model.decode(codes).mean()))  # varied codes
    assert main(["--output", str(tmp_path / "v")]) == 2
    refused(capsys, "make_tiny_vqgan.py: error:", "--output", "not empty")
