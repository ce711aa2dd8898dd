"""Train a small byte-level BPE tokenizer (with Qwen's special tokens) from jsonl or text files.

For quickstarts and experiments where no pretrained tokenizer is at hand; real runs use the base
model's tokenizer (e.g. Qwen2.5's directory).

    python tools/train_tokenizer.py --input examples/data/text.jsonl --vocab-size 2000 --output tok/

Inputs are files or globs, plain or gzip-compressed, as preprocess_data.py reads them: .jsonl lines give
the strings under --json-keys, other files their lines. The tokenizer has --vocab-size entries at most:
fewer when the text has no more pairs to merge (the size is printed). A bad input exits 2 naming it.
The folder is written beside --output as .NAME.partial-PID and renamed over it when complete (what a
killed run left is removed by the next one).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from megatron_unix.cli import refuse_out_of_range
from megatron_unix.data.tokenizer import QWEN_SPECIALS, train_bpe_tokenizer
from megatron_unix.files import expand_inputs, open_input

BYTE_ALPHABET = 256
"""A byte-level BPE starts from every byte: the vocabulary holds them and the special tokens at least."""


def texts(paths: Sequence[Path], keys: Sequence[str]) -> Iterator[str]:
    """The texts of ``paths``. A line of a .jsonl file that is not a JSON object, undecodable text or a
    damaged .gz is a ValueError naming the file (and the line)."""
    for path in paths:
        try:
            with open_input(path) as (_, stream):
                for number, line in enumerate(io.TextIOWrapper(stream, encoding="utf-8"), 1):
                    if ".jsonl" not in path.name:
                        yield line
                        continue
                    try:
                        record = json.loads(line.rstrip("\n"))  # its error counts columns of this line
                    except ValueError as error:
                        raise ValueError(f"{path}:{number}: not a JSON record ({error})") from None
                    if not isinstance(record, dict):
                        raise ValueError(f"{path}:{number}: not a JSON object")
                    yield from (record[k] for k in keys if isinstance(record.get(k), str))
        except (OSError, EOFError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: {error}") from None


STAGING = ".{name}.partial-", ".{name}.old-"
"""The new folder while it is written, and the folder it replaces while it is renamed: ``PREFIX`` + PID."""


def publish(output: Path, write: Callable[[Path], None]) -> None:
    """``write(folder)`` into a hidden sibling of ``output``, then rename it to ``output`` (an existing
    one replaced whole); nothing is left when ``write`` fails, and killed runs' folders are removed."""
    from megatron_unix.platform import leftovers_of_dead_processes

    output.parent.mkdir(parents=True, exist_ok=True)
    for prefix in STAGING:
        for stale in leftovers_of_dead_processes(output.parent, prefix.format(name=output.name)):
            shutil.rmtree(stale, ignore_errors=True)
    staging, old = (output.with_name(prefix.format(name=output.name) + str(os.getpid())) for prefix in STAGING)
    try:
        write(staging)
        if output.exists():
            output.rename(old)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, metavar="FILE_OR_GLOB", help=".jsonl(.gz) or text files")
    p.add_argument("--json-keys", nargs="+", default=["text", "caption"], help="keys of the texts in .jsonl lines")
    p.add_argument("--vocab-size", type=int, default=2000, help="the most entries the tokenizer may have")
    p.add_argument("--output", type=Path, required=True, help="folder of the HF tokenizer to write")
    args = p.parse_args(argv)
    refuse_out_of_range(p, args, [("--vocab-size", args.vocab_size >= BYTE_ALPHABET + len(QWEN_SPECIALS))])
    try:
        stream = texts(expand_inputs(args.input), args.json_keys)
        first = next(stream, None)  # nothing is trained (or written) from no text
        if first is None:
            raise ValueError(f"--input {' '.join(args.input)}: no text (under --json-keys {' '.join(args.json_keys)})")
        if args.output.exists() and not args.output.is_dir():
            raise ValueError(f"--output {args.output} is a file, not a folder")
        publish(
            args.output, lambda folder: train_bpe_tokenizer(itertools.chain([first], stream), args.vocab_size, folder)
        )
    except (OSError, ValueError) as error:
        print(f"train_tokenizer.py: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises plain Exceptions (e.g. a full disk)
        print(f"train_tokenizer.py: error: writing --output {args.output}: {error}", file=sys.stderr)
        return 2
    from tokenizers import Tokenizer

    out = args.output
    size = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    fewer = f" (--vocab-size {args.vocab_size}: the text has no more pairs to merge)" if size < args.vocab_size else ""
    print(f"> tokenizer with vocab {size}{fewer} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
