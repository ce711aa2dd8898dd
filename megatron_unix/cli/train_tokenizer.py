"""Train a small byte-level BPE tokenizer (with Qwen's special tokens) from jsonl or text files.

For quickstarts and experiments where no pretrained tokenizer is at hand; real runs use the base
model's tokenizer (e.g. Qwen2.5's directory).

    python tools/train_tokenizer.py --input examples/data/text.jsonl --vocab-size 2000 --output tok/
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
from typing import Iterator

from megatron_unix.data.tokenizer import train_bpe_tokenizer


def texts(pattern: str, keys: list[str]) -> Iterator[str]:
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise SystemExit(f"error: --input {pattern}: no such file")
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if ".jsonl" not in path:
                    yield line
                    continue
                record = json.loads(line)
                yield from (record[k] for k in keys if isinstance(record.get(k), str))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="file or glob: .jsonl(.gz) or plain text")
    p.add_argument("--json-keys", nargs="+", default=["text", "caption"])
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--output", required=True)
    args = p.parse_args()
    out = train_bpe_tokenizer(texts(args.input, args.json_keys), args.vocab_size, args.output)
    print(f"> tokenizer with vocab {args.vocab_size} written to {out}")


if __name__ == "__main__":
    main()
