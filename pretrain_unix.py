#!/usr/bin/env python
"""Pretrain or fine-tune a Uni-X model with Megatron-Core.

Thin entry point of ``megatron_unix.cli.pretrain`` (``--help``); also ``python -m megatron_unix.cli.pretrain``.
"""

import sys

from megatron_unix.cli.pretrain import main

if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer uses multiprocessing
    sys.exit(main())
