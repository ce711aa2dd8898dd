#!/usr/bin/env python
"""N-gram conditional entropy (bits) of text tokens and of image codes of preprocessed datasets.

Thin entry point of ``megatron_unix.cli.conditional_entropy`` (``--help``); also
``python -m megatron_unix.cli.conditional_entropy``.
"""

import sys

from megatron_unix.cli.conditional_entropy import main

if __name__ == "__main__":
    sys.exit(main())
