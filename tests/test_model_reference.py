"""The Megatron Uni-X model against the plain-PyTorch reference written from the spec."""

from __future__ import annotations

import pytest
from helpers import build_tiny, check_against_reference, reference_cfg
from tiny import SEP, make_batch
from unix_reference import unix_reference_forward

CONFIGS = {
    "qwen3-style-tied-1:1": dict(),
    "qwen2-style-untied-2:1": dict(
        qk_layernorm=False, add_qkv_bias=True, tie_word_embeddings=False, vision_encode_layers=2, vision_decode_layers=1
    ),
    "shared-baseline-0:0": dict(vision_encode_layers=0, vision_decode_layers=0),
    "all-separated-2:2-with-separator": dict(vision_encode_layers=2, vision_decode_layers=2, separator_ids=(SEP,)),
    "no-document-isolation": dict(document_isolation=False),
}
ROWS = [["text", "t2i", "mid"], ["i2t", "image", "text", "t2i"], ["mid", "i2t"]]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_gradients_match_reference(megatron_single, name):
    model, config = build_tiny(seed=len(name), **CONFIGS[name])
    batch = make_batch(ROWS, seq=40, seed=len(name))
    if config.separator_ids:  # put a separator inside an image
        batch["tokens"][0, 20] = SEP
    cfg = reference_cfg(config)
    check_against_reference(
        model,
        config,
        batch,
        lambda weights: unix_reference_forward(weights, cfg, batch["tokens"], batch["document_ids"]),
    )
