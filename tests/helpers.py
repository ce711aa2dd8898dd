"""Build a tiny production model and express its weights in the reference's HF names; damage a checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tiny import TINY_MODEL, TINY_VOCAB


def build_tiny(seed: int = 0, **overrides):
    """A TP=1/PP=1 Uni-X with random norms and biases (Megatron initialises those to 1 and 0)."""
    from megatron_unix import platform
    from megatron_unix.model import build_model, make_config

    platform.seed_model_parallel(seed)
    config = make_config(**{**TINY_MODEL, **overrides})
    model = build_model(config, TINY_VOCAB, 64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.copy_(0.5 + torch.rand(param.shape, generator=g))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=g))
    return model, config


def reference_cfg(config) -> dict:
    return dict(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_query_groups,
        head_dim=config.kv_channels,
        rms_eps=config.layernorm_epsilon,
        rope_theta=config.rotary_base,
        n_encode=config.vision_encode_layers,
        n_decode=config.vision_decode_layers,
        vq_offset=config.vq_offset,
        boi_id=config.boi_id,
        separator_ids=list(config.separator_ids),
        document_isolation=config.document_isolation,
    )


def hf_weights(model, config) -> dict[str, torch.Tensor]:
    from megatron_unix.conversion.mappings import megatron_to_hf

    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    return megatron_to_hf(state, config, TINY_VOCAB)


def logits(model, config, batch) -> torch.Tensor:
    """Production logits [b, s, vocab] (padding columns dropped)."""
    from megatron_unix.model.forward import stream_forward

    out = stream_forward(model, batch)
    return out[..., :TINY_VOCAB].reshape(*batch["tokens"].shape, TINY_VOCAB)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def check_against_reference(model, config, batch, reference: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> None:
    """The Megatron model (fp32) against a plain-PyTorch ``reference(weights) -> logits`` run on its weights
    under HF names: logits, the masked mean loss and every gradient, so the key table is checked too (a
    tensor under the wrong name or layer changes the numbers)."""
    from megatron_unix.conversion.mappings import megatron_to_hf
    from megatron_unix.model.forward import stream_forward

    weights = {k: v.detach().clone().requires_grad_(True) for k, v in hf_weights(model, config).items()}
    expected = reference(weights)
    assert relative_error(logits(model, config, batch).detach(), expected.detach()) < 1e-5
    mask = batch["loss_mask"].reshape(-1).float()
    loss = (stream_forward(model, batch, batch["labels"]).reshape(-1) * mask).sum() / mask.sum()
    flat = expected.reshape(-1, expected.shape[-1])
    per_token = torch.nn.functional.cross_entropy(flat, batch["labels"].reshape(-1).long(), reduction="none")
    ref_loss = (per_token * mask).sum() / mask.sum()
    loss.backward()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())
    grads = megatron_to_hf({n: p.grad for n, p in model.named_parameters()}, config, TINY_VOCAB)
    assert set(grads) == set(weights)
    for key, grad in grads.items():
        assert relative_error(grad, weights[key].grad) < 1e-4, key


def largest_item(checkpoint: Path) -> tuple[str, int, int]:
    """File, offset and length of a DCP checkpoint's largest stored tensor: its middle is raw tensor bytes."""
    from torch.distributed.checkpoint import FileSystemReader

    item = max(FileSystemReader(str(checkpoint)).read_metadata().storage_data.values(), key=lambda i: i.length)
    return item.relative_path, item.offset, item.length


def garble(checkpoint: Path) -> str:
    """Flip 8 bytes inside the largest tensor (it still loads, with other values); returns the file's name."""
    name, offset, length = largest_item(checkpoint)
    with open(checkpoint / name, "r+b") as stream:
        stream.seek(offset + length // 2)
        data = stream.read(8)
        stream.seek(offset + length // 2)
        stream.write(bytes(b ^ 0xFF for b in data))
    return name
