"""The Megatron Uni-X model against the plain-PyTorch reference written from the spec."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny, hf_weights, logits, reference_cfg
from tiny import SEP, make_batch
from unix_reference import reference_loss, unix_reference_forward

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


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_gradients_match_reference(megatron_single, name):
    model, config = build_tiny(seed=len(name), **CONFIGS[name])
    batch = make_batch(ROWS, seq=40, seed=len(name))
    if config.separator_ids:  # put a separator inside an image
        batch["tokens"][0, 20] = SEP

    got = logits(model, config, batch)
    weights = {k: v.detach().clone().requires_grad_(True) for k, v in hf_weights(model, config).items()}
    cfg = reference_cfg(config)
    expected = unix_reference_forward(weights, cfg, batch["tokens"], batch["document_ids"])
    assert _relative_error(got.detach(), expected) < 1e-5

    from megatron_unix.model.forward import stream_forward

    per_token = stream_forward(model, batch, batch["labels"])
    mask = batch["loss_mask"].reshape(1, -1)
    loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    ref_loss = reference_loss(weights, cfg, batch["tokens"], batch["document_ids"], batch["labels"], batch["loss_mask"])
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())

    from tiny import TINY_VOCAB

    from megatron_unix.conversion.mappings import megatron_to_hf

    grads = megatron_to_hf({n: p.grad for n, p in model.named_parameters()}, config, TINY_VOCAB)
    assert set(grads) == set(weights)
    for key, grad in grads.items():
        assert _relative_error(grad, weights[key].grad) < 1e-4, key
