"""Isolation properties of the production model, and the checks that refuse bad settings."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny, logits
from tiny import TEXT_VOCAB, VQ_CODES, make_batch

from megatron_unix.training.arguments import UNIX_1_5B, UNIX_3B

ROWS = [["t2i", "mid", "i2t"], ["text", "image", "t2i"]]


def _vision_code_positions(tokens: torch.Tensor) -> torch.Tensor:
    return tokens >= TEXT_VOCAB


def test_fully_separated_text_ignores_images(megatron_single):
    model, config = build_tiny(seed=3, vision_encode_layers=2, vision_decode_layers=2)
    batch = make_batch(ROWS, seq=48, seed=3)
    changed = {**batch, "tokens": batch["tokens"].clone()}
    codes = _vision_code_positions(batch["tokens"])
    changed["tokens"][codes] = TEXT_VOCAB + (batch["tokens"][codes] - TEXT_VOCAB + 7) % VQ_CODES
    text = ~codes & (batch["tokens"] != config.boi_id)
    before, after = logits(model, config, batch), logits(model, config, changed)
    assert torch.equal(before[text], after[text])
    assert not torch.allclose(before[codes], after[codes])


@pytest.mark.parametrize("isolation", [True, False])
def test_documents_do_not_see_each_other(megatron_single, isolation):
    model, config = build_tiny(seed=4, document_isolation=isolation)
    batch = make_batch(ROWS, seq=48, seed=4)
    first_doc = batch["document_ids"] == 0
    changed = {**batch, "tokens": batch["tokens"].clone()}
    changed["tokens"][first_doc & (batch["tokens"] < 89)] = 5  # rewrite the text of document 0
    before, after = logits(model, config, batch), logits(model, config, changed)
    later = ~first_doc
    if isolation:
        assert torch.equal(before[later], after[later])
    else:
        assert not torch.allclose(before[later], after[later])


def test_config_refuses_bad_settings():
    from tiny import TINY_MODEL

    from megatron_unix.model import make_config

    with pytest.raises(ValueError, match="--vision-encode-layers"):
        make_config(**{**TINY_MODEL, "vision_encode_layers": 3, "vision_decode_layers": 2})
    with pytest.raises(ValueError, match="--context-parallel-size"):
        make_config(**TINY_MODEL, context_parallel_size=2)
    with pytest.raises(ValueError, match="--attention-backend"):
        make_config(**TINY_MODEL, core_attention_backend="magic")
    with pytest.raises(ValueError, match="--transformer-impl"):
        make_config(**TINY_MODEL, transformer_impl="inference_optimized")


def test_transformer_engine_impl_needs_transformer_engine():
    from tiny import TINY_MODEL

    from megatron_unix import platform
    from megatron_unix.model import make_config

    if platform.detect_accelerators().transformer_engine:
        pytest.skip("Transformer Engine is installed here")
    assert make_config(**TINY_MODEL).transformer_impl == "local"  # the default without TE (or without a GPU)
    with pytest.raises(ValueError, match="--transformer-impl transformer_engine: Transformer Engine is not installed"):
        make_config(**TINY_MODEL, transformer_impl="transformer_engine")


TE_LAYER_KEYS = [  # a Transformer Engine layer's sharded keys: its input norms are fused into linear_qkv / linear_fc1
    "self_attention.linear_qkv.weight",
    "self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_qkv._extra_state",
    "self_attention.linear_proj.weight",
    "self_attention.linear_proj._extra_state",
    "self_attention.q_layernorm.weight",
    "self_attention.k_layernorm.weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc1._extra_state",
    "mlp.linear_fc2.weight",
    "mlp.linear_fc2._extra_state",
]


def test_local_checkpoint_keys_are_transformer_engine_keys(megatron_single):
    """A dist checkpoint of the local spec (text layers and vision copies) uses exactly TE's key names,
    so checkpoints move between --transformer-impl local and transformer_engine; the final norm is
    its own module (under TE it cannot come from the layer spec, whose input-norm slot is empty)."""
    from megatron_unix.model.layers import RMSNorm
    from megatron_unix.model.spec import block_spec

    model, config = build_tiny()
    keys = {v.key for v in model.sharded_state_dict().values() if hasattr(v, "key")}
    expected = {f"decoder.layers.{copy}{k}" for copy in ("", "vision.") for k in TE_LAYER_KEYS}
    assert keys == expected | {"decoder.final_layernorm.weight", "embedding.word_embeddings.weight"}
    assert block_spec(config).layer_norm is RMSNorm and type(model.decoder.final_layernorm) is RMSNorm


def test_backend_that_cannot_run_says_why():
    from megatron_unix.model.attention import select_backend

    assert select_backend("auto", on_gpu=False) == "sdpa"
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        select_backend("varlen", on_gpu=False)


def test_attention_backends_agree_on_segments():
    """The sdpa mask path equals per-segment causal attention computed segment by segment."""
    from megatron_unix.model.attention import sdpa_backend
    from megatron_unix.model.routing import segment_params

    g = torch.Generator().manual_seed(0)
    segments = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
    q, k, v = (torch.randn(10, 4, 8, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA: 2 kv heads
    out = sdpa_backend(q, k, v, segment_params(segments, 10), 8**-0.5, 0.0)
    for seg in segments.unique():
        idx = (segments == seg).nonzero().flatten()
        kk, vv = (x[idx].repeat_interleave(2, dim=1).transpose(0, 1) for x in (k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(q[idx].transpose(0, 1), kk, vv, is_causal=True)
        torch.testing.assert_close(out[idx], ref.transpose(0, 1))


@pytest.mark.parametrize(
    "shape,expected",
    [
        (UNIX_1_5B, 2_211_391_488),
        (UNIX_3B, 4_489_977_344),
        (dict(num_layers=28, hidden_size=1536, ffn_hidden_size=8960, num_attention_heads=12), 1_556_247_040),
    ],
    ids=["unix-1.5b-9:5", "unix-3b-12:6", "shared-1.5b"],
)
def test_published_parameter_counts(megatron_single, shape, expected):
    """Spec §1 table (vocab 160128, tied, Qwen3 style); N = M = 0 gives the "text model alone"."""
    from megatron_unix.model import build_model, make_config

    qwen = dict(num_query_groups=2, kv_channels=128, qk_layernorm=True)
    config = make_config(**{**qwen, **shape}, perform_initialization=False)
    model = build_model(config, 160128, 128)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_routing_segments_and_sequence_parallel_padding():
    from tiny import BOI, EOI, TINY_MODEL

    from megatron_unix.model import build_routing, make_config

    config = make_config(**TINY_MODEL, tensor_model_parallel_size=2, sequence_parallel=True)
    tokens = torch.tensor([[1, 2, BOI, 100, 101, EOI, 3, 4], [5, BOI, 102, EOI, 6, 7, 8, 9]])
    docs = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1, 1, 1]])
    routing = build_routing(tokens, docs, config)
    assert routing.cu_seqlens_q.tolist() == [0, 6, 8, 13, 16]
    text, vision = routing.routes
    assert text.index.tolist() == [0, 1, 5, 6, 7, 8, 11, 12, 13, 14, 15]
    assert vision.index.tolist() == [2, 3, 4, 9, 10]
    # text of doc 0 row 0 is one segment across the image; padded to a multiple of TP=2
    assert text.padded_len == 12 and text.params.cu_seqlens_q.tolist() == [0, 3, 5, 8, 11, 12]
    assert vision.padded_len == 6 and vision.params.cu_seqlens_q.tolist() == [0, 3, 5, 6]
    assert vision.positions.tolist() == [2, 3, 4, 9, 10, 0]


def test_image_only_micro_batch_trains_both_copies(megatron_single):
    """No text token at all: the text copies of separated layers still get (zero) gradients,
    so DDP's hooks fire, and the shared layers train."""
    from megatron_unix.model.forward import stream_forward

    model, config = build_tiny(seed=5)
    tokens = TEXT_VOCAB + torch.arange(2 * 16).reshape(2, 16) % VQ_CODES
    loss = stream_forward(model, {"tokens": tokens}, labels=tokens).mean()
    loss.backward()
    text_copy = model.decoder.layers[0].mlp.linear_fc1.weight
    vision_copy = model.decoder.layers[0].vision.mlp.linear_fc1.weight
    assert text_copy.grad is not None and torch.count_nonzero(text_copy.grad) == 0
    assert torch.count_nonzero(vision_copy.grad) > 0
    assert torch.count_nonzero(model.decoder.layers[1].mlp.linear_fc1.weight.grad) > 0


def test_activation_recompute_gives_the_same_gradients(megatron_single):
    from megatron_unix.model.forward import stream_forward

    batch = make_batch(ROWS, seq=48, seed=6)
    grads = []
    for recompute in ({}, dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)):
        model, _ = build_tiny(seed=6, **recompute)
        stream_forward(model, batch, batch["labels"]).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)
