#!/usr/bin/env python
"""Print a run's first and last text and vision losses and plot them.

Thin entry point of ``megatron_unix.cli.plot_losses`` (``--help``); also ``python -m megatron_unix.cli.plot_losses``.
"""

import sys

from megatron_unix.cli.plot_losses import main

if __name__ == "__main__":
    sys.exit(main())
