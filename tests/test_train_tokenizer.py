"""tools/train_tokenizer.py: inputs as the other tools read them (globs, .gz, errors naming the file and
line), the real vocabulary size printed, nothing written from bad input."""

from __future__ import annotations

import gzip
import json

import pytest
from conftest import CORPUS
from tokenizers import Tokenizer

from megatron_unix.cli.train_tokenizer import main


def test_globs_and_gzip_are_read_and_the_real_size_is_printed(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in CORPUS[:2]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"caption": line}) + "\n" for line in CORPUS[2:])
    assert main(["--input", str(tmp_path / "*.jsonl*"), "--vocab-size", "5000", "--output", str(tmp_path / "tok")]) == 0
    size = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).get_vocab_size()
    assert 260 < size < 5000  # the corpus has fewer merges than asked for
    assert capsys.readouterr().out == (
        f"> tokenizer with vocab {size} (--vocab-size 5000: the text has no more pairs to merge) "
        f"written to {tmp_path / 'tok'}\n"
    )
    tokenizer = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    words = CORPUS[3].split()[:3]  # the gzip file's text was learnt: its words are single tokens or few
    assert len(tokenizer.encode(" ".join(words)).ids) < len(" ".join(words))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "--input {input}: no such file"),
        ('{"text": "fine"}\n{"text": \n', "{input}:2: not a JSON record (Expecting value"),
        ('{"text": "fine"}\n[1, 2]\n', "{input}:2: not a JSON object"),
        ('{"id": 3}\n', "--input {input}: no text (under --json-keys text caption)"),
        (b"\xff\xfe\n", "{input}: 'utf-8' codec can't decode byte 0xff"),
    ],
    ids=["missing", "not-json", "not-an-object", "no-text", "not-utf8"],
)
def test_bad_input_is_named_and_nothing_is_written(tmp_path, capsys, content, message):
    path = tmp_path / "in.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert main(["--input", str(path), "--output", str(tmp_path / "tok")]) == 2
    assert f"train_tokenizer.py: error: {message.format(input=path)}" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_a_vocabulary_smaller_than_the_bytes_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--input", "x.jsonl", "--vocab-size", "100", "--output", str(tmp_path / "tok")])
    assert exit_.value.code == 2 and "--vocab-size 100 is out of range" in capsys.readouterr().err


def test_output_is_replaced_whole_and_a_failed_write_leaves_nothing(tmp_path, capsys):
    """A rerun replaces the folder; a file as --output is refused; a full disk (files capped by RLIMIT_FSIZE:
    EFBIG, in a child process) names --output and leaves neither a staging folder nor a half tokenizer."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "in.txt").write_text("\n".join(CORPUS) + "\n")
    argv = ["--input", str(tmp_path / "in.txt"), "--vocab-size", "300", "--output", str(tmp_path / "tok")]
    assert main(argv) == 0 and main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "tok"]
    (tmp_path / "file").write_text("x")
    assert main([*argv[:-1], str(tmp_path / "file")]) == 2
    assert f"--output {tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err
    probe = (
        "import resource, sys\nresource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.RLIM_INFINITY))\n"
        "from megatron_unix.cli.train_tokenizer import main\nsys.exit(main(sys.argv[1:]))"
    )
    full = [*argv[:-1], str(tmp_path / "full")]
    proc = subprocess.run([sys.executable, "-c", probe, *full], capture_output=True, text=True, cwd=root, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"train_tokenizer.py: error: writing --output {tmp_path / 'full'}: " in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in.txt", "tok"]
