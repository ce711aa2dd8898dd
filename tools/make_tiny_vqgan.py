#!/usr/bin/env python
"""Write a RANDOM, UNTRAINED tiny VQGAN folder for trying the image programs without Chameleon's release.

Thin entry point of ``megatron_unix.cli.make_tiny_vqgan`` (``--help``); also ``python -m megatron_unix.cli.make_tiny_vqgan``.
"""

import sys

from megatron_unix.cli.make_tiny_vqgan import main

if __name__ == "__main__":
    sys.exit(main())
