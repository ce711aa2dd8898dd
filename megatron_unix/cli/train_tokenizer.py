"""Train a small byte-level BPE tokenizer (with Qwen's special tokens) from jsonl or text files.

For quickstarts and experiments where no pretrained tokenizer is at hand; real runs use the base
model's tokenizer (e.g. Qwen2.5's directory).

    python tools/train_tokenizer.py --input examples/data/text.jsonl --vocab-size 2000 --output tok/

Inputs are files or globs, plain or gzip-compressed, as preprocess_data.py reads them: .jsonl lines give
the strings under --json-keys, other files their lines. The tokenizer has --vocab-size entries at most:
fewer when the text has no more pairs to merge (the size is printed). A bad input exits 2 naming it.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import sys
from collections.abc import Iterator, Sequence
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
                        record = json.loads(line)
                    except ValueError as error:
                        raise ValueError(f"{path}:{number}: not a JSON record ({error})") from None
                    if not isinstance(record, dict):
                        raise ValueError(f"{path}:{number}: not a JSON object")
                    yield from (record[k] for k in keys if isinstance(record.get(k), str))
        except (OSError, EOFError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: {error}") from None


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
        out = train_bpe_tokenizer(itertools.chain([first], stream), args.vocab_size, args.output)
    except (OSError, ValueError) as error:
        print(f"train_tokenizer.py: error: {error}", file=sys.stderr)
        return 2
    from tokenizers import Tokenizer

    size = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    fewer = f" (--vocab-size {args.vocab_size}: the text has no more pairs to merge)" if size < args.vocab_size else ""
    print(f"> tokenizer with vocab {size}{fewer} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
