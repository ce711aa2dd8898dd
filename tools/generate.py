#!/usr/bin/env python
"""Generate text, images (text-to-image with classifier-free guidance) or captions with a Uni-X model.

Thin entry point of ``megatron_unix.cli.generate`` (``--help``); also ``python -m megatron_unix.cli.generate``.
"""

import sys

from megatron_unix.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
