#!/usr/bin/env python
"""Gradient conflict between text and image-text data per layer and weight group (spec §7), or the
per-modality-loss gradient cosine on given batches.

Thin entry point of ``megatron_unix.cli.analyze_gradients`` (``--help``); run it under torchrun for TP/PP.
"""

import sys

from megatron_unix.cli.analyze_gradients import main

if __name__ == "__main__":
    sys.exit(main())
