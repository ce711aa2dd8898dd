"""megatron-unix: Uni-X unified multimodal pretraining on Megatron-Core.

"spec §N" in docstrings refers to section N of docs/spec.md.
"""

from megatron_unix.known_warnings import silence_known_warnings

silence_known_warnings()  # here, so that it precedes megatron-core's import-time warnings in every entry point

__version__ = "0.1.0"
