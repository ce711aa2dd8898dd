#!/usr/bin/env python
"""Train a small byte-level BPE tokenizer with Qwen's special tokens.

Thin entry point of ``megatron_unix.cli.train_tokenizer`` (``--help``); also ``python -m megatron_unix.cli.train_tokenizer``.
"""

import sys

from megatron_unix.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
