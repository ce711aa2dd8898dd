"""megatron-unix: Uni-X unified multimodal pretraining on Megatron-Core.

"spec §N" in docstrings refers to section N of docs/spec.md.
"""

from megatron_unix.known_warnings import silence_known_warnings
from megatron_unix.startup import defer_heavy_imports

silence_known_warnings()  # here, so that it precedes megatron-core's import-time warnings in every entry point
defer_heavy_imports()  # here, so that it precedes megatron-core's import (wandb, torch.compile) in every process

__version__ = "0.1.0"
