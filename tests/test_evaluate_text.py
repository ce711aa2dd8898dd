"""``tools/evaluate.py text`` (lm-evaluation-harness) on a tiny Uni-X export, offline: lm-eval's accuracies
against an independent scoring of every choice, the export's remote code against plain Qwen3ForCausalLM,
a Megatron checkpoint against its export, resuming from the request cache, and the refusals.

The tasks are tests/data/lm_eval_tasks (6 multiple-choice questions, twice, and a group of both aggregated
like mmlu); datasets reads their jsonl relative to the working directory, so runs chdir there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read by datasets and huggingface_hub when imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval", reason="lm-eval is the optional extra megatron-unix[eval]")

ROOT = Path(__file__).resolve().parents[1]
TASKS = Path(__file__).parent / "data" / "lm_eval_tasks"
PROMPTS = {"tiny_choice": "{}", "tiny_choice_caption": "The caption of this image is: {}"}
"""Task -> its YAML's doc_to_text, for the independent scoring."""
DOCS = [json.loads(line) for line in (TASKS / "tiny_choice.jsonl").read_text().splitlines()]


def evaluate(*argv: str | Path) -> int:
    from megatron_unix.cli.evaluate import main

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(TASKS)
        return main(["text", *(str(a) for a in argv)])


def text_section(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())["sections"]["text"]


def logged(output_dir: Path, task: str) -> list[dict]:
    lines = (output_dir / "text_samples" / f"{task}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def loglikelihoods(output_dir: Path, task: str) -> torch.Tensor:
    """[document, choice] log-likelihoods from lm-eval's per-document log."""
    return torch.tensor([[answer[0] for answer in sample["filtered_resps"]] for sample in logged(output_dir, task)])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, hf_tokenizer_dir, megatron_single) -> dict[str, Path]:
    """A tiny Uni-X (N=M=1, a separator) as the reference writes it, imported (Megatron) and exported."""
    from test_generate import make_unix_dir

    from megatron_unix.conversion.convert import ImportOptions, export_hf, import_hf

    root = tmp_path_factory.mktemp("evaluate_text")
    make_unix_dir(root / "reference", hf_tokenizer_dir, separators=True, seed=1)
    import_hf(root / "reference", root / "megatron", ImportOptions())
    export_hf(root / "megatron", root / "hf")
    return {"hf": root / "hf", "megatron": root / "megatron", "root": root}


def run(checkpoints, name: str, *flags: str, tasks: str = "tiny_group") -> Path:
    out = checkpoints["root"] / f"out-{name}"
    assert evaluate(*flags, "--tasks", tasks, "--include-path", TASKS, "--log-samples", "--output-dir", out) == 0
    return out


@pytest.fixture(scope="module")
def remote(checkpoints) -> Path:
    return run(checkpoints, "remote", "--hf", checkpoints["hf"])


def test_accuracy_equals_scoring_every_choice_directly(checkpoints, remote):
    """Each choice scored with the export's model in plain torch (sum of the continuation's log-probabilities,
    lm-eval's split of context and continuation tokens), argmax per question: lm-eval's acc and acc_norm."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoints["hf"], trust_remote_code=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["hf"])
    section = text_section(remote)
    for task, prompt in PROMPTS.items():
        scores = []
        for doc in DOCS:
            context = tokenizer.encode(prompt.format(doc["question"]))
            row = []
            for choice in doc["choices"]:
                whole = tokenizer.encode(prompt.format(doc["question"]) + " " + choice)
                with torch.no_grad():
                    logprobs = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
                continuation = torch.tensor(whole[len(context) :])
                row.append(logprobs[len(context) - 1 :].gather(1, continuation[:, None]).sum().item())
            scores.append(row)
        scores = torch.tensor(scores)
        labels = torch.tensor([doc["label"] for doc in DOCS])
        lengths = torch.tensor([[len(choice) for choice in doc["choices"]] for doc in DOCS])
        torch.testing.assert_close(loglikelihoods(remote, task), scores, rtol=1e-5, atol=1e-5)
        assert section[task]["acc"] == (scores.argmax(1) == labels).double().mean().item()
        assert section[task]["acc_norm"] == ((scores / lengths).argmax(1) == labels).double().mean().item()
        assert (section[task]["samples"], section[task]["num_fewshot"]) == (len(DOCS), 0)
        assert section[task]["acc_stderr"] >= 0
    assert section["tiny_group"]["acc"] == pytest.approx(
        (section["tiny_choice"]["acc"] + section["tiny_choice_caption"]["acc"]) / 2
    )
    assert {section[task]["acc"] for task in PROMPTS} != {0.0} and set(section) == {*PROMPTS, "tiny_group"}
    assert section["tiny_group"]["subtasks"] == sorted(PROMPTS)  # so reports show the group alone


def test_plain_qwen3_scores_text_as_the_remote_code(checkpoints, remote, capfd):
    """Spec §5: on text the Uni-X export is a Qwen3 model; the vision copies are dropped with one log line."""
    out = run(checkpoints, "qwen3", "--hf", checkpoints["hf"], "--as-qwen3")
    err = capfd.readouterr().err
    assert "22 vision tensors dropped" in err and "UNEXPECTED" not in err  # 2 layers x 11 tensors
    for task in PROMPTS:
        assert torch.equal(loglikelihoods(out, task), loglikelihoods(remote, task))
    assert text_section(out) == text_section(remote)


def test_megatron_checkpoint_scores_as_its_export(checkpoints, remote):
    out = run(checkpoints, "megatron", "--load", checkpoints["megatron"])
    for task in PROMPTS:
        torch.testing.assert_close(loglikelihoods(out, task), loglikelihoods(remote, task), rtol=1e-5, atol=1e-5)
    assert text_section(out) == text_section(remote)
    results, export = (json.loads((folder / "results.json").read_text()) for folder in (out, remote))
    assert (results["sources"]["text"]["format"], results["checkpoint"]["iteration"]) == ("megatron", 0)
    # the export records the checkpoint it came from: both are one model, evaluated into one folder
    assert export["checkpoint"] == results["checkpoint"] and export["sources"]["text"]["format"] == "hf"


def test_rerun_reads_answers_from_the_cache(checkpoints, remote, capfd):
    """Answers of documents 0-2 doctored in the cache (the right choice certain), those of 3-5 deleted: the
    rerun reports the doctored answers (read, not recomputed) and recomputes exactly the deleted ones."""
    from lm_eval.api.model import hash_args
    from sqlitedict import SqliteDict

    out = checkpoints["root"] / "out-resume"
    shutil.copytree(remote, out)
    (database,) = (out / "lm_eval_cache").glob("*.db")
    samples = logged(remote, "tiny_choice")
    with SqliteDict(str(database), autocommit=True) as cache:
        assert len(cache) == 36  # tiny_group: 2 tasks x 6 documents x 3 choices
        for sample in samples:
            for index, arguments in enumerate(sample["arguments"]):
                key = hash_args("loglikelihood", arguments)
                if sample["doc_id"] < 3:
                    cache[key] = (0.0 if index == sample["target"] else -100.0, False)
                else:
                    del cache[key]
    capfd.readouterr()
    assert (
        evaluate("--hf", checkpoints["hf"], "--tasks", "tiny_choice", "--include-path", TASKS, "--output-dir", out) == 0
    )
    err = capfd.readouterr().err
    assert "27 answers stored" in err and "request cache: 36 answers stored" in err
    recomputed = sum(sample["acc"] for sample in samples if sample["doc_id"] >= 3)
    assert text_section(out)["tiny_choice"]["acc"] == pytest.approx((3 + recomputed) / 6)
    assert text_section(out)["tiny_group"] == text_section(remote)["tiny_group"]  # kept: not evaluated now


@pytest.fixture(scope="module")
def without_tokenizer(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """An export without tokenizer files; a Megatron checkpoint whose recorded tokenizer is gone."""
    from megatron_unix.conversion.convert import ImportOptions, import_hf

    root = tmp_path_factory.mktemp("no_tokenizer")
    shutil.copytree(checkpoints["hf"], root / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "hf" / name).unlink()
    shutil.copytree(checkpoints["root"] / "reference", root / "source")
    import_hf(root / "source", root / "megatron", ImportOptions())
    shutil.rmtree(root / "source")
    return {"hf": root / "hf", "megatron": root / "megatron"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hf", "{hf}", "--tasks", "tiny_choice,no_such_task"], "--tasks no_such_task: not among lm-eval"),
        (["--hf", "missing-dir"], "--hf missing-dir: no such file or directory"),
        (["--hf", "{hf_bare}"], "has no tokenizer files: give --tokenizer"),
        (["--load", "{megatron_bare}"], "records tokenizer_model="),
        (["--load", "{megatron}", "--as-qwen3"], "--as-qwen3 loads an HF directory: give --hf"),
        (["--hf", "{hf}", "--limit", "0"], "--limit 0 is out of range"),
    ],
)
def test_refusals_name_the_flag(checkpoints, without_tokenizer, tmp_path, capsys, argv, message):
    paths = {
        "hf": checkpoints["hf"],
        "megatron": checkpoints["megatron"],
        "hf_bare": without_tokenizer["hf"],
        "megatron_bare": without_tokenizer["megatron"],
    }
    argv = [a.format(**paths) for a in argv]
    assert evaluate(*argv, "--include-path", TASKS, "--output-dir", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert error.startswith("evaluate text: error:") or "\nevaluate text: error:" in error
    assert message in error and ("--include-path" in error) == ("not among" in message)
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.slow
def test_without_lm_eval_the_program_works_and_text_says_how_to_install(checkpoints, tmp_path):
    """lm-eval absent (its import blocked): tools/evaluate.py still builds every subcommand; text exits 2
    with the install command."""
    script = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "from megatron_unix.cli import evaluate\n"
        "evaluate.build_parser()\n"
        "sys.exit(evaluate.main(sys.argv[1:]))\n"
    )
    argv = ["text", "--hf", str(checkpoints["hf"]), "--output-dir", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "lm-eval is not usable" in done.stderr and "pip install 'megatron-unix[eval]'" in done.stderr
