"""``evaluate generation`` on a tiny Uni-X model and a tiny VQGAN: GenEval folders and DPG-Bench grids from
prompt files, seeds recorded and reproducible, resume without repainting, settings checked, the scorer
commands printed and recorded when the scorers are missing, and run (against stand-in scorer scripts
with the real ones' command lines) when asked."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from test_evaluate_understanding import model_dir, vqgan_dir  # noqa: F401  (fixtures)

from megatron_unix.cli import evaluate_generation
from megatron_unix.evaluation import generation, layouts
from megatron_unix.inference.sampling import derived_seed

GENEVAL = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a photo of a red dog"},
    {"tag": "single_object", "include": [{"class": "bus", "count": 1}], "prompt": "a photo of a bus"},
]
DPG = {"coco5": "two dogs near the river", "partiprompts10": "a tall tower at dawn"}


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("prompts")
    (root / "evaluation_metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GENEVAL))
    (root / "dpg").mkdir()
    for stem, prompt in DPG.items():
        (root / "dpg" / f"{stem}.txt").write_text(prompt + "\n")
    return root / "evaluation_metadata.jsonl", root / "dpg"


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    evaluate_generation.add_arguments(parser)
    return evaluate_generation.run(parser.parse_args(list(argv)))


def flags(model_dir, vqgan_dir, prompt_files, out, *more) -> list[str]:  # noqa: F811
    geneval, dpg = prompt_files
    return [
        *("--hf", str(model_dir), "--vqgan", str(vqgan_dir), "--device", "cpu", "--seed", "7"),
        *("--geneval-prompts", str(geneval), "--dpg-prompts", str(dpg), "--samples-per-prompt", "2"),
        *("--output-dir", str(out), *more),
    ]


def pngs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


@pytest.fixture
def painted_prompts(monkeypatch) -> list[int]:
    """How many prompts the model paints (generate_images rows / samples)."""
    calls: list[int] = []
    generate = generation.generate_images

    def counting(model, layout, prompts, *args, **kwargs):
        calls.append(len(prompts) // 2)
        return generate(model, layout, prompts, *args, **kwargs)

    monkeypatch.setattr(generation, "generate_images", counting)
    return calls


def test_layouts_seeds_resume_and_printed_commands(
    model_dir,  # noqa: F811
    vqgan_dir,  # noqa: F811
    prompt_files,
    tmp_path,
    painted_prompts,
    capsys,
    monkeypatch,
):
    from PIL import Image

    monkeypatch.setattr(layouts, "has_module", lambda name: False)  # the scorers' packages: missing
    out = tmp_path / "eval"
    assert cli(*flags(model_dir, vqgan_dir, prompt_files, out, "--prompts-per-batch", "2")) == 0
    assert painted_prompts == [2, 1, 2]  # GenEval's 3 prompts two at a time, then DPG's 2
    geneval, dpg = out / "geneval", out / "dpg"
    for number, record in enumerate(GENEVAL):
        folder = geneval / f"{number:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == record
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert Image.open(folder / "samples" / "0001.png").size == (16, 16)
    assert sorted(p.name for p in dpg.iterdir()) == ["coco5.png", "partiprompts10.png"]
    assert Image.open(dpg / "coco5.png").size == (32, 16)  # 2 samples side by side in a 2-column grid
    seeds = json.loads(layouts.record_path(geneval).read_text())["seeds"]
    assert seeds == {f"{p:05d}": [derived_seed(7, p, i) for i in range(2)] for p in range(3)}
    assert json.loads(layouts.record_path(dpg).read_text())["seeds"]["partiprompts10"] == [
        derived_seed(7, 1, i) for i in range(2)
    ]

    printed = capsys.readouterr().out
    section = json.loads((out / "results.json").read_text())["sections"]["generation"]
    assert section["geneval"]["scored"] is False and section["dpg"]["scored"] is False
    assert section["geneval"]["missing_packages"] == list(layouts.GENEVAL_PACKAGES)
    for entry in section.values():
        for command in entry["commands"]:
            assert f"  {command}\n" in printed
    assert f"evaluate_images.py {geneval.resolve()} --outfile" in section["geneval"]["commands"][0]
    assert f"--image-root-path {dpg.resolve()} --resolution 16 --pic-num 2" in section["dpg"]["commands"][0]

    again = tmp_path / "again"  # same seed, other batching: the same PNGs
    assert cli(*flags(model_dir, vqgan_dir, prompt_files, again, "--prompts-per-batch", "3")) == 0
    assert pngs(again) == pngs(out) and len(pngs(out)) == 3 * 2 + 2

    painted_prompts.clear()  # resume: only what is missing is painted
    (geneval / "00001" / "samples" / "0001.png").unlink()
    before = pngs(out)
    assert cli(*flags(model_dir, vqgan_dir, prompt_files, out)) == 0
    assert painted_prompts == [1] and pngs(out) == pngs(again)
    assert {k: v for k, v in pngs(out).items() if k in before} == before

    capsys.readouterr()
    assert cli(*flags(model_dir, vqgan_dir, prompt_files, out, "--cfg-scale", "2")) == 2
    assert "written with other settings (cfg_scale: 4.0 there, 2.0 now)" in capsys.readouterr().err


def test_refusals_name_the_flag(model_dir, vqgan_dir, prompt_files, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "eval"
    base = ["--hf", str(model_dir), "--vqgan", str(vqgan_dir), "--output-dir", str(out)]
    cases = [
        (base, "give --geneval-prompts and/or --dpg-prompts"),
        ([*flags(model_dir, vqgan_dir, prompt_files, out), "--samples-per-prompt", "5"], "DPG-Bench takes at most 4"),
        ([*flags(model_dir, vqgan_dir, prompt_files, out), "--run-scorers"], "--run-scorers needs --geneval-repo"),
        ([*base, "--dpg-prompts", str(tmp_path / "none")], "--dpg-prompts"),
        (["--hf", str(model_dir), "--dpg-prompts", str(prompt_files[1]), "--output-dir", str(out)], "give --vqgan"),
    ]
    for argv, message in cases:
        assert cli(*argv) == 2
        error = capsys.readouterr().err
        assert error.startswith("evaluate generation: error:") and message in error, error


FAKE_GENEVAL = """import argparse, json, os, re
parser = argparse.ArgumentParser()  # evaluate_images.py's flags
parser.add_argument("imagedir")
parser.add_argument("--outfile", default="results.jsonl")
parser.add_argument("--model-config", default=None)
parser.add_argument("--model-path", default="./")
args = parser.parse_args()
assert os.path.isdir(os.path.join(args.model_path))
with open(args.outfile, "w") as out:
    for sub in sorted(os.listdir(args.imagedir)):
        folder = os.path.join(args.imagedir, sub)
        if not (os.path.isdir(folder) and sub.isdigit()):
            continue
        metadata = json.load(open(os.path.join(folder, "metadata.jsonl")))
        for name in sorted(os.listdir(os.path.join(folder, "samples"))):
            if re.match(r"\\d+\\.png", name):
                correct = metadata["tag"] == "single_object" or name == "0000.png"
                out.write(json.dumps({"tag": metadata["tag"], "correct": correct}) + "\\n")
"""
FAKE_DPG = """import argparse, os
from PIL import Image
parser = argparse.ArgumentParser()  # compute_dpg_bench.py's flags
parser.add_argument("--image-root-path")
parser.add_argument("--resolution", type=int)
parser.add_argument("--csv", default="./dpg_bench/dpg_bench.csv")
parser.add_argument("--res-path")
parser.add_argument("--pic-num", type=int, default=1)
parser.add_argument("--vqa-model", default="mplug")
args = parser.parse_args()
assert os.path.isfile(args.csv), args.csv
for name in os.listdir(args.image_root_path):
    grid = Image.open(os.path.join(args.image_root_path, name))
    assert grid.size == (2 * args.resolution, args.resolution * (1 + (args.pic_num > 2)))
with open(args.res_path, "a") as f:
    f.write("Model: dpg\\nL1 category scores:\\n\\tentity: 50.0\\nL2 category scores:\\n\\tentity - whole: 50.0\\n")
    f.write("Image path: x\\nSave results to: y\\nDPG-Bench score: 62.5\\n")
"""
FAKE_ACCELERATE = """#!/bin/sh
shift
while [ "${1%.py}" = "$1" ]; do shift; done
exec python "$@"
"""


@pytest.mark.slow
def test_run_scorers_runs_the_commands_and_reads_the_scores(
    model_dir,  # noqa: F811
    vqgan_dir,  # noqa: F811
    prompt_files,
    tmp_path,
    monkeypatch,
    capsys,
):
    """The printed command lines run against stand-ins that parse them with the real scripts' flags."""
    geneval_repo, ella, detector, bin_dir = (tmp_path / name for name in ("geneval", "ella", "detector", "bin"))
    for folder in (geneval_repo / "evaluation", ella / "dpg_bench", detector, bin_dir):
        folder.mkdir(parents=True)
    (geneval_repo / "evaluation" / "evaluate_images.py").write_text(FAKE_GENEVAL)
    (geneval_repo / "evaluation" / "summary_scores.py").write_text("import sys; open(sys.argv[1]).read()\n")
    (ella / "dpg_bench" / "compute_dpg_bench.py").write_text(FAKE_DPG)
    (ella / "dpg_bench" / "dpg_bench.csv").write_text("item_id\n")
    accelerate = bin_dir / "accelerate"
    accelerate.write_text(FAKE_ACCELERATE)
    accelerate.chmod(accelerate.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(layouts, "has_module", lambda name: True)
    located = ["--geneval-repo", str(geneval_repo), "--geneval-detector", str(detector), "--dpg-repo", str(ella)]
    out = tmp_path / "eval"
    assert cli(*flags(model_dir, vqgan_dir, prompt_files, out, "--run-scorers", *located)) == 0
    results = json.loads((out / "results.json").read_text())
    geneval, dpg = results["sections"]["generation"]["geneval"], results["sections"]["generation"]["dpg"]
    # single_object: 4 of 4 images right; colors: 1 of 2 -> overall (1 + 0.5) / 2
    assert geneval["scored"] and geneval["tasks"] == {"single_object": 1.0, "colors": 0.5}
    assert geneval["overall"] == 0.75 and results["summary"]["GenEval"] == 75.0
    assert dpg["scored"] and dpg["score"] == 62.5 and dpg["l1"] == {"entity": 50.0}
    assert f"cd {geneval_repo.resolve()} && python evaluation/evaluate_images.py" in geneval["commands"][0]
    assert "geneval: 0.75" in capsys.readouterr().out
