"""The model-independent evaluation pieces: VLMEvalKit TSVs, prompts, scorers on canned answers,
GenEval / DPG-Bench folders from a fake painter, results and the resumable answer cache."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from megatron_unix.evaluation.benchmarks import BENCHMARKS, BenchmarkError, Item, load_benchmark
from megatron_unix.evaluation.layouts import (
    read_dpg_prompts,
    read_geneval_prompts,
    record_path,
    write_dpg,
    write_geneval,
)
from megatron_unix.evaluation.prompts import ANSWER_CUE, item_prompt, multiple_choice_prompt, yes_no_prompt
from megatron_unix.evaluation.report import PAPER, AnswerCache, markdown_table, write_results
from megatron_unix.evaluation.scoring import (
    extract_option,
    extract_yes_no,
    score_mmbench,
    score_mme,
    score_pope,
    score_seed,
)


def png_b64(colour: str = "red") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows([[str(v) for v in row] for row in rows])


MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def mmb_rows(image: str) -> list[list]:
    """Question 1 (answer A) and its rotation 1000001 (options rolled by one: answer D); question 2
    (answer B) alone. Rotations refer to the main row's image by index, as VLMEvalKit's files do."""
    return [
        [1, "What animal?", "", "cat", "dog", "cow", "pig", "A", "cp", "perception", image],
        [1000001, "What animal?", "", "dog", "cow", "pig", "cat", "D", "cp", "perception", "1"],
        [2, "What colour?", "a hint", "red", "blue", "", "", "B", "lr", "reasoning", image],
    ]


# --- benchmarks -------------------------------------------------------------------------------


def test_mmbench_tsv_items_and_lazy_images(tmp_path):
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_HEADER, mmb_rows(png_b64("blue")))
    bench = load_benchmark(tmp_path, "MMBench_DEV_EN")
    first, rotation, second = bench.items
    assert rotation.index == 1000001 and rotation.answer == "D" and rotation.options["D"] == "cat"
    assert rotation.image_key == "1" and rotation.image_b64 == first.image_b64  # resolved reference
    assert second.options == {"A": "red", "B": "blue"} and second.hint == "a hint"
    assert second.l2_category == "reasoning"
    assert rotation.image().getpixel((0, 0)) == (0, 0, 255)
    assert [item.index for item, _ in bench.with_images()] == [1, 1000001, 2]


def test_missing_file_names_file_and_expected_name(tmp_path):
    with pytest.raises(BenchmarkError, match=r"MME\.tsv not found \(expected VLMEvalKit's MME\.tsv"):
        load_benchmark(tmp_path, "MME")


def test_benchmark_without_questions_is_refused(tmp_path):
    """Scoring nothing would put 0% beside the paper: a header alone, or only bad rows skipped, is an error."""
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_HEADER, [])
    with pytest.raises(BenchmarkError, match=r"MMBench_DEV_EN\.tsv: no questions$"):
        load_benchmark(tmp_path, "MMBench_DEV_EN")
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_HEADER, [[7, "", "", "cat", "dog", "", "", "A", "cp", "x", "i"]])
    with pytest.raises(BenchmarkError, match=r"no questions \(1 bad rows skipped\)"):
        load_benchmark(tmp_path, "MMBench_DEV_EN", skip_bad=True)
    (tmp_path / "m.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"m\.jsonl: no prompts"):
        read_geneval_prompts(tmp_path / "m.jsonl")


@pytest.mark.parametrize(
    "row, message",
    [
        ([7, "Q?", "", "cat", "dog", "", "", "A", "cp", "x"], r"row 2: 10 fields, the header has 11"),
        ([7, "", "", "cat", "dog", "", "", "A", "cp", "x", "IMG"], r"row 2: empty 'question'"),
        (
            [7, "Q?", "", "cat", "dog", "", "", "C", "cp", "x", "IMG"],
            r"row 2: answer 'C' is not one of the options A, B",
        ),
        (["x7", "Q?", "", "cat", "dog", "", "", "A", "cp", "x", "IMG"], r"row 2: index 'x7' is not an integer"),
        ([7, "Q?", "", "cat", "dog", "", "", "A", "cp", "x", "99"], r"row 2: image refers to index '99'"),
    ],
)
def test_broken_row_names_file_and_row(tmp_path, row, message):
    image = png_b64()
    good = [1, "Q?", "", "cat", "dog", "", "", "A", "cp", "x", image]
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_HEADER, [good, [image if v == "IMG" else v for v in row]])
    with pytest.raises(BenchmarkError, match="MMBench_DEV_EN.tsv: " + message):
        load_benchmark(tmp_path, "MMBench_DEV_EN")
    bench = load_benchmark(tmp_path, "MMBench_DEV_EN", skip_bad=True)
    assert [item.index for item in bench.items] == [1] and len(bench.skipped) == 1
    assert "row 2" in bench.skipped[0]


def test_bad_base64_found_on_access_names_row(tmp_path):
    rows = [[1, png_b64(), "Is it red? Please answer yes or no.", "Yes", "color"]]
    rows.append([2, "!" * 80 + "not base64", "Is it blue?", "No", "color"])
    rows.append([3, base64.b64encode(b"x" * 80).decode(), "Is it green?", "No", "color"])  # base64, not an image
    write_tsv(tmp_path / "MME.tsv", ["index", "image", "question", "answer", "category"], rows)
    bench = load_benchmark(tmp_path, "MME")  # structure is fine: images are decoded lazily
    with pytest.raises(BenchmarkError, match=r"MME\.tsv: row 2: image is not a readable base64 image"):
        list(bench.with_images())
    assert [item.index for item, _ in bench.with_images(skip_bad=True)] == [1]
    assert len(bench.skipped) == 2 and "row 3" in bench.skipped[1]


def test_missing_column_names_file(tmp_path):
    write_tsv(tmp_path / "SEEDBench_IMG.tsv", ["index", "image", "question", "A", "B"], [])
    with pytest.raises(BenchmarkError, match=r"SEEDBench_IMG\.tsv: header lacks column\(s\) answer, category"):
        load_benchmark(tmp_path, "SEEDBench_IMG")


# --- prompts ----------------------------------------------------------------------------------


def test_prompts():
    options = {"A": "cat", "B": "dog"}
    assert multiple_choice_prompt("What?", options, style="llava") == (
        "\nWhat?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices directly."
    )
    assert multiple_choice_prompt("What?", options, hint="h", style="vlmevalkit") == (
        "\nHint: h\nQuestion: What?\nOptions:\nA. cat\nB. dog\n"
        "Please select the correct answer from the options above. \n\n" + ANSWER_CUE
    )
    assert yes_no_prompt("Is it red?", style="llava") == "\nIs it red?\nPlease answer yes or no."
    assert (
        yes_no_prompt("Is it red? Please answer yes or no.", style="llava") == "\nIs it red? Please answer yes or no."
    )
    assert yes_no_prompt("Is it red?") == "\nIs it red?\n" + ANSWER_CUE
    item = Item(1, "Is it red?", "Yes")
    assert item_prompt(BENCHMARKS["POPE"], item, "llava") == "\nIs it red?\nPlease answer yes or no."
    with pytest.raises(ValueError, match="prompt style"):
        yes_no_prompt("q", style="chat")


# --- scoring ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [("B", "B"), ("(B)", "B"), ("B. dog", "B"), ("The answer is B.", "B"), ("dog", "B"), ("a Dog!", "B"),
     ("A or B", None), ("horse", None), ("", None)],
)  # fmt: skip
def test_extract_option(answer, expected):
    assert extract_option(answer, {"A": "cat", "B": "dog", "C": "cow"}) == expected


@pytest.mark.parametrize(
    "answer, expected", [("Yes", "Yes"), ("no.", "No"), ("Yes, it is.", "Yes"), ("yes and no", None), ("maybe", None)]
)
def test_extract_yes_no(answer, expected):
    assert extract_yes_no(answer) == expected


def test_mmbench_circular_one_rotation_wrong(tmp_path):
    write_tsv(tmp_path / "MMBench_DEV_EN.tsv", MMB_HEADER, mmb_rows(png_b64()))
    items = load_benchmark(tmp_path, "MMBench_DEV_EN").items
    all_right = score_mmbench(items, {1: "A", 1000001: "(D) cat", 2: "blue"})
    assert all_right["overall"] == 100.0 and all_right["questions"] == 2 and all_right["rows"] == 3
    # rotation 1000001 answered "A" (dog) while the main row is right: question 1 is wrong; 1 of 2 right
    one_wrong = score_mmbench(items, {1: "A", 1000001: "A", 2: "B"})
    assert one_wrong["overall"] == 50.0
    assert one_wrong["categories"] == {"cp": 0.0, "lr": 100.0}
    assert one_wrong["l2_categories"] == {"perception": 0.0, "reasoning": 100.0}
    with pytest.raises(KeyError, match="no answer for index 1000001"):
        score_mmbench(items, {1: "A", 2: "B"})


def test_mme_acc_plus_pairs_and_sums():
    def q(index, image, answer, category):
        return Item(index, "q", answer, category=category, image_key=image)

    items = [q(1, "a", "Yes", "color"), q(2, "a", "No", "color"), q(3, "b", "Yes", "color"), q(4, "b", "No", "color")]
    items += [q(5, "c", "Yes", "code_reasoning"), q(6, "c", "No", "code_reasoning")]
    answers = {1: "Yes", 2: "No", 3: "Yes", 4: "Yes", 5: "no", 6: "No"}
    result = score_mme(items, answers)
    # color: 3 of 4 questions right -> acc 75; image a both right, b not -> acc+ 50; score 125
    assert result["categories"]["color"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    # code_reasoning: 1 of 2 right -> 50; its one image not fully right -> 0; score 50
    assert result["categories"]["code_reasoning"]["score"] == 50.0
    assert result["perception"] == 125.0 and result["cognition"] == 50.0


def test_pope_f1_per_split():
    truth = ["Yes", "Yes", "No", "No", "Yes"]
    said = ["Yes", "No", "Yes", "No", "yes"]
    splits = ["random", "random", "random", "popular", "popular"]
    items = [Item(i, "q", t, category=s) for i, (t, s) in enumerate(zip(truth, splits))]
    result = score_pope(items, dict(enumerate(said)))
    # overall: TP = 2 (items 0, 4), FP = 1 (item 2), FN = 1 (item 1): precision 2/3, recall 2/3, F1 2/3;
    # right: items 0, 3, 4 -> 3/5; said yes 3 of 5
    overall = result["overall"]
    assert overall["precision"] == pytest.approx(200 / 3) and overall["recall"] == pytest.approx(200 / 3)
    assert overall["f1"] == pytest.approx(200 / 3) and overall["accuracy"] == 60.0 and overall["yes_ratio"] == 60.0
    # random: TP 1, FP 1, FN 1 -> P = R = F1 = 1/2, accuracy 1/3; popular: TP 1, FP 0, FN 0 -> 100
    assert result["splits"]["random"]["f1"] == pytest.approx(50.0)
    assert result["splits"]["random"]["accuracy"] == pytest.approx(100 / 3)
    assert result["splits"]["popular"]["f1"] == 100.0 and result["splits"]["popular"]["count"] == 2


def test_pope_multi_split_category_counts_in_each():
    items = [Item(0, "q", "Yes", category="adversarial,popular"), Item(1, "q", "No", category="random")]
    result = score_pope(items, {0: "No", 1: "No"})
    assert result["overall"]["count"] == 3 and result["overall"]["accuracy"] == pytest.approx(100 / 3)
    assert set(result["splits"]) == {"adversarial", "popular", "random"}


def test_seed_per_category():
    options = {"A": "x", "B": "y", "C": "z", "D": "w"}
    items = [Item(i, "q", a[0], category=a[1], options=options) for i, a in enumerate(["AS", "BS", "CI", "DI"])]
    result = score_seed(items, {0: "A", 1: "C", 2: "z", 3: "D"})
    # S: 1 of 2 right -> 50; I: 2 of 2 -> 100; overall 3 of 4 -> 75
    assert result == {"overall": 75.0, "categories": {"I": 100.0, "S": 50.0}}


# --- layouts ----------------------------------------------------------------------------------

COLOURS = ["red", "green", "blue", "white"]


def fake_painter(calls: list):
    """A stand-in model: solid colours, seeds 100 * prompt number + sample."""

    def paint(requests):
        calls.extend(prompt for prompt, _ in requests)
        return [([Image.new("RGB", (4, 4), c) for c in COLOURS], [100 * n + i for i in range(4)]) for _, n in requests]

    return paint


def test_geneval_layout_and_resume(tmp_path):
    metadata = tmp_path / "evaluation_metadata.jsonl"
    lines = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"}]
    lines.append({"tag": "colors", "prompt": "a photo of a red dog"})
    metadata.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out, calls = tmp_path / "geneval", []
    run = write_geneval(read_geneval_prompts(metadata), out, fake_painter(calls))
    assert run.painted == 2 and calls == ["a photo of a cat", "a photo of a red dog"]
    assert json.loads((out / "00001" / "metadata.jsonl").read_text()) == lines[1]
    assert Image.open(out / "00000" / "samples" / "0003.png").getpixel((0, 0)) == (255, 255, 255)
    record = json.loads(record_path(out).read_text())
    assert record["seeds"] == {"00000": [0, 1, 2, 3], "00001": [100, 101, 102, 103]}
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001"]  # only what GenEval reads
    assert f"evaluation/evaluate_images.py {out.resolve()} --outfile {run.scores.resolve()}" in run.commands[0]
    assert run.commands[1].endswith(f"/evaluation && python summary_scores.py {run.scores.resolve()}")
    (out / "00001" / "samples" / "0002.png").unlink()  # as if killed mid-prompt
    again = write_geneval(read_geneval_prompts(metadata), out, fake_painter(calls))
    assert (again.painted, again.resumed) == (1, 1) and calls[-1] == "a photo of a red dog"
    lines[0]["prompt"] = "a photo of a tabby cat"  # the prompt file changed: that folder is painted anew
    metadata.write_text("".join(json.dumps(x) + "\n" for x in lines))
    changed = write_geneval(read_geneval_prompts(metadata), out, fake_painter(calls))
    assert (changed.painted, changed.resumed) == (1, 1) and calls[-1] == "a photo of a tabby cat"
    assert json.loads((out / "00000" / "metadata.jsonl").read_text()) == lines[0]


def test_geneval_bad_metadata_line_names_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"prompt": "a"}\n{"tag": "x"}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not a GenEval metadata line"):
        read_geneval_prompts(tmp_path / "m.jsonl")


def test_dpg_grid_per_prompt_stem(tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "partiprompts10.txt").write_text("a tall tower\n")
    (prompts / "coco5.txt").write_text("two dogs")
    out, calls = tmp_path / "dpg", []
    run = write_dpg(read_dpg_prompts(prompts), out, fake_painter(calls))
    assert calls == ["two dogs", "a tall tower"] and run.painted == 2
    grid = Image.open(out / "partiprompts10.png")
    assert grid.size == (8, 8)  # 2x2 of 4x4 samples, row-major
    corners = [grid.getpixel(xy) for xy in [(0, 0), (4, 0), (0, 4), (4, 4)]]
    assert corners == [(255, 0, 0), (0, 128, 0), (0, 0, 255), (255, 255, 255)]
    assert json.loads(record_path(out).read_text())["seeds"]["partiprompts10"] == [100, 101, 102, 103]
    assert sorted(p.name for p in out.iterdir()) == ["coco5.png", "partiprompts10.png"]  # the scorer opens all
    assert "&& accelerate launch" in run.commands[0] and " dpg_bench/compute_dpg_bench.py " in run.commands[0]
    assert f"--resolution 4 --pic-num 4 --vqa-model mplug --res-path {run.scores.resolve()}" in run.commands[0]
    assert write_dpg(read_dpg_prompts(prompts), out, fake_painter(calls)).resumed == 2 and len(calls) == 2


# --- report -----------------------------------------------------------------------------------


def test_results_json_and_markdown(tmp_path):
    path = tmp_path / "eval" / "results.json"
    write_results(path, {"ckpt": {"MMB": 31.0}})
    write_results(path, {"ckpt": {"MMB": 32.0}})
    assert json.loads(path.read_text()) == {"ckpt": {"MMB": 32.0}}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temporary left
    checkpoints = {"iter_1000": {"MMLU": 49.0, "GenEval": 40.0, "MMB": 31.0}, "iter_500": {"MMB": 29.0}}
    table = markdown_table(checkpoints, readings={"iter_1000": "reference", "iter_500": "reference"})
    lines = table.splitlines()
    assert lines[0] == "| model | MMLU | GenEval | MMB [reference reading] | avg |"
    assert "| Uni-X 9:5 (paper) | 50.1 | 43.3 | 31.5 | 41.6 |" in lines
    assert lines[-2] == "| iter_1000 | 49.0 | 40.0 | 31.0 | 40.0 |"  # (49 + 40 + 31) / 3 = 40.0
    assert lines[-1] == "| iter_500 | - | - | 29.0 | - |"
    assert PAPER["Shared (paper)"]["GenEval"] == 33.6 and PAPER["MoT (paper)"]["MMLU"] == 48.0


SETTINGS = {"checkpoint": "/ckpt", "prompt_style": "reference", "max_new_tokens": 16}


def test_answer_cache_resumes_and_drops_torn_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    with AnswerCache(path, SETTINGS) as cache:
        cache.add(("MME", 1), "Yes")
        cache.add(("MME", 2), "No")
    with path.open("a") as f:
        f.write('{"benchmark": "MME", "index": 3, "ans')  # killed mid-write
    with AnswerCache(path, SETTINGS) as cache:
        assert cache.done(("MME", 1)) and cache.done(("MME", "2")) and not cache.done(("MME", 3))
        cache.add(("POPE", 3), "yes")
    with AnswerCache(path, SETTINGS) as cache:
        assert cache.for_benchmark("MME") == {1: "Yes", 2: "No"} and cache.get(("POPE", 3)) == "yes"
    assert len(path.read_text().splitlines()) == 4  # the settings line, then three answers


def test_answer_cache_refuses_other_settings_by_key(tmp_path):
    path = tmp_path / "answers.jsonl"
    with AnswerCache(path, SETTINGS) as cache:
        cache.add(("MME", 1), "Yes")
    other = {**SETTINGS, "prompt_style": "llava", "vqgan": "abc"}
    with pytest.raises(
        ValueError, match=r"answers\.jsonl was written with other settings \(prompt_style: 'reference' "
    ):
        AnswerCache(path, other)
    with pytest.raises(ValueError, match=r"vqgan: None there, 'abc' now"):
        AnswerCache(path, other)
    path.write_text('{"settings": {"checkpoint": "/ckpt", "prom')  # killed while writing the settings line
    with AnswerCache(path, other) as cache:
        assert not cache.answers
    assert json.loads(path.read_text().splitlines()[0]) == {"settings": other}


def test_answer_cache_bad_middle_line_names_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text(
        json.dumps({"settings": SETTINGS})
        + '\n{"benchmark": "MME", "index": 1, "answer": "Yes"}\ngarbage\n{"benchmark": "MME", "index": 2, "answer": "No"}\n'
    )
    with pytest.raises(ValueError, match=r"answers\.jsonl:3: not an answer record"):
        AnswerCache(path, SETTINGS)
    path.write_text('{"benchmark": "MME", "index": 1, "answer": "Yes"}\n')  # a cache without settings
    with pytest.raises(ValueError, match=r"answers\.jsonl:1: no settings record"):
        AnswerCache(path, SETTINGS)


def test_markdown_marks_an_mmb_not_read_as_the_paper():
    checkpoints = {"a": {"MMB": 31.0}, "b": {"MMB": 29.0}, "c": {"MMLU": 40.0}}
    lines = markdown_table(checkpoints, readings={"a": "reference", "b": "vlmevalkit"}).splitlines()
    assert lines[0] == "| model | MMLU | GenEval | MMB [paper: reference reading; †: vlmevalkit] | avg |"
    assert "| a | - | - | 31.0 | - |" in lines and "| b | - | - | 29.0 † | - |" in lines
    assert "| c | 40.0 | - | - | - |" in lines  # no MMB: nothing to mark
    assert (
        lines[-1].startswith("† MMB reading vlmevalkit, not the paper's")
        and "not comparable with the paper's rows" in lines[-1]
    )
    unrecorded = markdown_table({"old": {"MMB": 30.0}}).splitlines()
    assert "not recorded" in unrecorded[0] and "| old | - | - | 30.0 † | - |" in unrecorded
