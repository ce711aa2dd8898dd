#!/usr/bin/env python
"""Tokenize jsonl(.gz) into a Uni-X dataset, or merge datasets.

Thin entry point of ``megatron_unix.cli.preprocess_data`` (``--help``); also ``python -m megatron_unix.cli.preprocess_data``.
"""

import sys

from megatron_unix.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
