"""Silence the megatron-core warnings that say nothing actionable, before megatron-core is imported.

In every process megatron-core warns, on import and at start-up, that Transformer Engine or apex is
absent and it falls back to torch (they are optional here: README "Accelerators"), and that the
tokenizer's pad id equals another special id (ours on purpose: rows are padded with EOS and the
padding is excluded by the loss mask, never by pad id); with the pinned torch, its tensor-parallel
collectives and dist-checkpoint loading call torch APIs that torch has deprecated. Repeated per
process these bury the log and no setting of ours changes them, so they are filtered by exact
message (and where they come from), and training prints one line naming the absent accelerators
instead. Any other warning still shows.
"""

from __future__ import annotations

import warnings

KNOWN_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    (r"Transformer Engine and Apex are not installed\. Falling back to ", UserWarning, r"megatron\.core\."),
    (r"Apex is not installed\. Falling back to Torch Norm", UserWarning, r"megatron\.core\."),
    (r"The pad token id in the tokenizer collides with another special token id\. ", UserWarning, r"megatron\.core\."),
    (
        r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated\. ",
        FutureWarning,
        r"torch\.distributed\.",
    ),
    (
        r"`load_state_dict` is deprecated and will be removed in future versions\. Please use `load` instead\.",
        FutureWarning,
        r"megatron\.core\.dist_checkpointing\.",
    ),
    (r"Please use DTensor instead and we are deprecating ShardedTensor\.", FutureWarning, r""),
)
"""(message pattern, category, module pattern): ``re.match`` at the start of the message and of the
name of the module the warning is attributed to (the ShardedTensor one is attributed to whichever
frame called torch, ours on CPU, so its module is left open)."""


def silence_known_warnings() -> None:
    """Install the filters; idempotent (``warnings`` does not duplicate an identical filter)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
