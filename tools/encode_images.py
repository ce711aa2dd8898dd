#!/usr/bin/env python
"""Encode images into VQ codes (jsonl for preprocess_data.py), resumable.

Thin entry point of ``megatron_unix.cli.encode_images`` (``--help``); also ``python -m megatron_unix.cli.encode_images``.
"""

import sys

from megatron_unix.cli.encode_images import main

if __name__ == "__main__":
    sys.exit(main())
