#!/usr/bin/env python
"""Evaluate a Uni-X checkpoint on the paper's benchmarks; one subcommand per family.

Thin entry point of ``megatron_unix.cli.evaluate`` (``--help``); also ``python -m megatron_unix.cli.evaluate``.
"""

import sys

from megatron_unix.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
