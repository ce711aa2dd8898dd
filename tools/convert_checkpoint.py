#!/usr/bin/env python
"""Convert between Hugging Face and Megatron checkpoints of Uni-X.

Thin entry point of ``megatron_unix.cli.convert_checkpoint`` (``--help``); also ``python -m megatron_unix.cli.convert_checkpoint``.
"""

import sys

from megatron_unix.cli.convert_checkpoint import main

if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer uses multiprocessing
    sys.exit(main())
