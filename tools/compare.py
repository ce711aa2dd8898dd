#!/usr/bin/env python
"""The paper's Table 4 from one command: shared, HardMoE, MoT and Uni-X trained, exported, evaluated, reported.

Thin entry point of ``megatron_unix.cli.compare`` (``--help``); also ``python -m megatron_unix.cli.compare``.
"""

import sys

from megatron_unix.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
