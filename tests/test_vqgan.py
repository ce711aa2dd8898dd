"""The VQGAN (taming/Chameleon layout) and the reference's pixel transforms, on tiny models on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from megatron_unix.image import VQGAN, VQGANConfig, VQGANError, to_image, to_pixels
from megatron_unix.image.transforms import PIXEL_VALUES

TINY = VQGANConfig(
    n_embed=64,
    embed_dim=8,
    z_channels=16,
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(16,),
    resolution=32,
)


def tiny_vqgan(seed: int = 0, config: VQGANConfig = TINY) -> VQGAN:
    """Random weights (GroupNorm affines and biases too, so that no parameter is inert) and a codebook drawn
    from the latents of random images, so that images use many codes."""
    torch.manual_seed(seed)
    model = VQGAN(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm1.weight") else 0))
        latents = (
            model.latents(pixels(4, config.resolution, seed + 100)).permute(0, 2, 3, 1).reshape(-1, config.embed_dim)
        )
        model.quantize.embedding.weight.copy_(latents[torch.randperm(len(latents))[: config.n_embed]])
    return model


def pixels(n: int, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_chameleon_defaults_give_1024_codes_of_8192():
    model = VQGAN()
    assert (model.image_size, model.grid, model.codes_per_image) == (512, 32, 1024)
    assert model.quantize.embedding.weight.shape == (8192, 256)
    assert model.quant_conv.weight.shape == (256, 256, 1, 1) and model.encoder.conv_out.out_channels == 256
    assert not any("attn" in k for k in model.state_dict() if ".down." in k or ".up." in k)


def test_encoder_matches_transformers_chameleon_vqvae():
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    ours = tiny_vqgan()
    theirs = ChameleonVQVAE(
        ChameleonVQVAEConfig(
            embed_dim=TINY.embed_dim,
            num_embeddings=TINY.n_embed,
            latent_channels=TINY.z_channels,
            resolution=TINY.resolution,
            base_channels=TINY.ch,
            channel_multiplier=list(TINY.ch_mult),
            num_res_blocks=TINY.num_res_blocks,
            attn_resolutions=list(TINY.attn_resolutions),
        )
    ).eval()
    state = {k: v for k, v in ours.state_dict().items() if not k.startswith("decoder.")}
    assert set(state) == set(theirs.state_dict()), "the key names differ from transformers'"
    theirs.load_state_dict(state)
    x = pixels(3)
    with torch.no_grad():
        out = theirs.encode(x)
        hidden = ours.encoder(x)
        torch.testing.assert_close(hidden, out.last_hidden_state, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.latents(x), theirs.quant_conv(out.last_hidden_state), rtol=1e-4, atol=1e-4)
    codes = ours.encode(x)
    assert codes.shape == (3, ours.codes_per_image) and codes.dtype == torch.long
    assert torch.equal(codes, out.image_tokens.reshape(3, -1))
    assert codes.unique().numel() > 5, "a degenerate encoder would make this comparison vacuous"


def test_decode_shape_range_and_codes_are_raster_order():
    model = tiny_vqgan()
    with torch.no_grad():
        model.decoder.conv_out.weight.mul_(50)  # outputs well beyond [-1, 1] before the clamp
    codes = torch.randint(0, TINY.n_embed, (2, model.codes_per_image))
    out = model.decode(codes)
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1 and (out.abs() == 1).any(), "the output is clamped to [-1, 1]"
    # raster order: code i of an image is latent (row i // grid, column i % grid)
    latents = model.latents(pixels(1))
    flat = latents[0].permute(1, 2, 0).reshape(-1, TINY.embed_dim)
    nearest = torch.cdist(flat, model.quantize.embedding.weight).argmin(1)
    assert torch.equal(model.encode(pixels(1))[0], nearest)


def write_chameleon(tmp_path, state: dict, config: VQGANConfig = TINY, extra: dict | None = None):
    ddconfig = {
        "double_z": False,
        "z_channels": config.z_channels,
        "resolution": config.resolution,
        "in_channels": 3,
        "out_ch": 3,
        "ch": config.ch,
        "ch_mult": list(config.ch_mult),
        "num_res_blocks": config.num_res_blocks,
        "attn_resolutions": list(config.attn_resolutions),
        "dropout": 0.0,
    }
    params = {"embed_dim": config.embed_dim, "n_embed": config.n_embed, "ddconfig": ddconfig, "lossconfig": {}}
    (tmp_path / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"target": "taming.VQModel", "params": params}}))
    torch.save({"state_dict": {**state, **(extra or {})}, "epoch": 3}, tmp_path / "vqgan.ckpt")
    return tmp_path / "vqgan.yaml", tmp_path / "vqgan.ckpt"


def test_from_chameleon_loads_and_ignores_loss_tensors(tmp_path):
    model = tiny_vqgan()
    loss = {"loss.discriminator.main.0.weight": torch.ones(4, 3, 4, 4), "loss.logvar": torch.zeros(())}
    loaded = VQGAN.from_chameleon(*write_chameleon(tmp_path, model.state_dict(), extra=loss))
    assert loaded.config == TINY
    x = pixels(2)
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda s: s.pop("decoder.up.1.block.0.conv1.weight"), "missing decoder.up.1.block.0.conv1.weight"),
        (lambda s: s.update({"quantize.embedding.weight": torch.zeros(32, 8)}), "quantize.embedding.weight has shape"),
        (lambda s: s.update({"encoder.extra.weight": torch.zeros(1)}), "unexpected encoder.extra.weight"),
    ],
)
def test_from_chameleon_refuses_a_tensor_by_name(tmp_path, change, named):
    state = dict(tiny_vqgan().state_dict())
    change(state)
    with pytest.raises(VQGANError, match=named):
        VQGAN.from_chameleon(*write_chameleon(tmp_path, state))


def test_from_chameleon_names_a_missing_or_unreadable_file(tmp_path):
    config, ckpt = write_chameleon(tmp_path, tiny_vqgan().state_dict())
    with pytest.raises(VQGANError, match="nothere.ckpt: no such file"):
        VQGAN.from_chameleon(config, tmp_path / "nothere.ckpt")
    with pytest.raises(VQGANError, match="nothere.yaml"):
        VQGAN.from_chameleon(tmp_path / "nothere.yaml", ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(VQGANError, match="vqgan.ckpt: not a readable"):
        VQGAN.from_chameleon(config, ckpt)
    config.write_text("model: {params: {n_embed: 4}}")
    with pytest.raises(VQGANError, match="vqgan.yaml: no model.params.ddconfig"):
        VQGAN.from_chameleon(config, ckpt)


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = tiny_vqgan(seed=3)
    model.save_pretrained(tmp_path / "v")
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["config.json", "model.safetensors"]
    loaded = VQGAN.from_pretrained(tmp_path / "v")
    assert loaded.config == TINY
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(VQGANError, match="config.json: no such file"):
        VQGAN.from_pretrained(tmp_path)
    (tmp_path / "v" / "model.safetensors").unlink()
    with pytest.raises(VQGANError, match="model.safetensors: no such file"):
        VQGAN.from_pretrained(tmp_path / "v")


def test_widths_must_suit_group_norm():
    with pytest.raises(VQGANError, match="multiple of 32"):
        VQGANConfig(ch=8)


def test_rgba_is_blended_on_white():
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[:, :30] = [10, 20, 30, 255]  # left half opaque, right half fully transparent
    x = to_pixels(Image.fromarray(rgba, "RGBA"), size=40)
    assert x.shape == (3, 40, 40)
    assert torch.all(x[:, :, -5:] == 1.0), "transparent pixels become white"
    assert torch.allclose(x[:, 5, 2], torch.tensor([10, 20, 30]) / 127.5 - 1)
    half = np.full((8, 8, 4), [0, 0, 0, 128], np.uint8)  # half-transparent black: 255 * (1 - 128/255) = 127
    assert torch.all(to_pixels(Image.fromarray(half, "RGBA"), size=8) == float(PIXEL_VALUES[127]))
    la = Image.fromarray(np.dstack([np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)]), "LA")
    assert torch.all(to_pixels(la, size=8) == 1.0)


def test_short_side_resize_and_centre_crop():
    # 300 x 100: short side 100 -> 30, long side 90; the crop keeps columns 30..59 of the resized image
    stripes = np.zeros((100, 300, 3), np.uint8)
    stripes[:, 100:200] = 255  # the middle third is white
    x = to_pixels(Image.fromarray(stripes), size=30)
    assert x.shape == (3, 30, 30)
    assert torch.all(x[:, :, 3:-3] == 1.0) and x[:, :, 0].mean() < 0.9
    reference = np.asarray(Image.fromarray(stripes).resize((90, 30), Image.LANCZOS))[:, 30:60]
    assert torch.equal(x, torch.from_numpy(reference / 127.5 - 1).permute(2, 0, 1).float())
    tall = to_pixels(Image.fromarray(np.ascontiguousarray(stripes.transpose(1, 0, 2))), size=30)
    assert torch.equal(tall, x.transpose(1, 2))


def test_round_trip_to_image_of_to_pixels():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    x = to_pixels(Image.fromarray(array))
    assert x.min() >= -1 and x.max() <= 1
    back = np.asarray(to_image(x)).astype(int)
    assert back.shape == (512, 512, 3) and np.abs(back - array).max() <= 1
    assert to_image(torch.full((3, 4, 4), 7.0)).getpixel((0, 0)) == (255, 255, 255), "clamped"


def test_encode_is_fp32_under_any_autocast():
    """Precision is decided in VQGAN.encode: a caller's bf16 autocast changes no code."""
    model, x = tiny_vqgan(seed=2), pixels(3)
    expected = model.encode(x)
    with torch.autocast("cpu", torch.bfloat16):
        assert model.latents(x).dtype == torch.bfloat16, "the autocast does act on the model"
        assert torch.equal(model.encode(x), expected)
    with pytest.raises(VQGANError, match="encodes in fp32"):
        model.to(torch.bfloat16).encode(x)
