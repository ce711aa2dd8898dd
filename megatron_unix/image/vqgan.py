"""The image tokenizer: taming-transformers' ``VQModel`` as Chameleon ships it (spec §2, §6).

Module and parameter names are taming's (``encoder.*``, ``quantize.embedding.weight``,
``quant_conv.*``, ``post_quant_conv.*``, ``decoder.*``), so Chameleon's ``vqgan.ckpt`` and the
encoder half of transformers' ``ChameleonVQVAE`` load without renaming. Inference only: no losses,
no straight-through gradients.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron_unix.files import remove_stale_temporaries, write_atomically, write_text_atomically

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
GROUPS = 32
"""Taming's GroupNorm groups: every channel count must be a multiple of it."""


class VQGANError(ValueError):
    """A VQGAN file or configuration that cannot be used; the message names the file, key or field."""


@dataclass(frozen=True)
class VQGANConfig:
    """Taming's ``ddconfig`` plus ``n_embed``/``embed_dim``; the defaults are Chameleon's ``vqgan.yaml``
    (attention only in the middle blocks: its ``attn_resolutions`` is empty)."""

    n_embed: int = 8192
    embed_dim: int = 256
    z_channels: int = 256
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    resolution: int = 512
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions or ()))
        if not self.ch_mult or any(self.ch * m % GROUPS for m in self.ch_mult):
            raise VQGANError(f"ch {self.ch} x ch_mult {list(self.ch_mult)}: every width must be a multiple of {GROUPS}")
        if self.resolution % self.downsampling:
            raise VQGANError(f"resolution {self.resolution} is not a multiple of the downsampling {self.downsampling}")

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str) -> VQGANConfig:
        """Our fields from a mapping with possibly more keys (taming's ``ddconfig`` has a few we fix)."""
        if values.get("double_z"):
            raise VQGANError(f"{source}: double_z is true, which is a KL autoencoder, not a VQ model")
        missing = [f.name for f in fields(cls) if f.name not in values and f.name != "dropout"]
        if missing:
            raise VQGANError(f"{source}: no {', '.join(missing)}")
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    @classmethod
    def from_chameleon_yaml(cls, path: str | Path) -> VQGANConfig:
        """``model.params`` of a taming/Chameleon ``vqgan.yaml``: ``ddconfig`` with ``n_embed``, ``embed_dim``."""
        import yaml

        try:
            params = yaml.safe_load(Path(path).read_text())["model"]["params"]
            values = {**params["ddconfig"], "n_embed": params["n_embed"], "embed_dim": params["embed_dim"]}
        except OSError as e:
            raise VQGANError(f"{path}: cannot read the VQGAN config: {e.strerror or e}") from e
        except yaml.YAMLError as e:
            raise VQGANError(f"{path}: not YAML: {e}") from e
        except (KeyError, TypeError) as e:
            raise VQGANError(f"{path}: no model.params.ddconfig/n_embed/embed_dim ({e!r} missing)") from e
        return cls.from_dict(values, str(path))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels (1x1 convolutions as projections)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale c**-0.5, as taming's
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # taming's asymmetric padding


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[ResnetBlock], attn: list[AttnBlock]) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    return level


def _middle(channels: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels, dropout)
    return mid


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if level.attn:
            h = level.attn[i](h)
    return h


def _run_middle(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, c: VQGANConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        width, res = c.ch, c.resolution
        for i, mult in enumerate(c.ch_mult):
            blocks, attn = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(width, c.ch * mult, c.dropout))
                width = c.ch * mult
                if res in c.attn_resolutions:
                    attn.append(AttnBlock(width))
            level = _level(blocks, attn)
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(width)
                res //= 2
            self.down.append(level)
        self.mid = _middle(width, c.dropout)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(_run_middle(self.mid, h))))


class Decoder(nn.Module):
    def __init__(self, c: VQGANConfig) -> None:
        super().__init__()
        width, res = c.ch * c.ch_mult[-1], c.resolution // c.downsampling
        self.conv_in = nn.Conv2d(c.z_channels, width, 3, padding=1)
        self.mid = _middle(width, c.dropout)
        levels = []
        for i in reversed(range(len(c.ch_mult))):
            blocks, attn = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(width, c.ch * c.ch_mult[i], c.dropout))
                width = c.ch * c.ch_mult[i]
                if res in c.attn_resolutions:
                    attn.append(AttnBlock(width))
            level = _level(blocks, attn)
            if i != 0:
                level.upsample = Upsample(width)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(width)
        self.conv_out = nn.Conv2d(width, c.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_middle(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def forward(self, z: Tensor) -> Tensor:
        """Nearest entry of each ``[B, C, h, w]`` latent, ``[B, h*w]`` in raster order. In fp32 whatever the
        autocast (bf16 distances would tie and flip codes), with taming's expansion of the distance (so ties
        resolve as in the reference), a few thousand latents at a time (the full distance matrix of a batch
        of 1024-code images would take gigabytes)."""
        flat = z.float().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        with torch.autocast(z.device.type, enabled=False):
            table = self.embedding.weight.float()
            squares = table.square().sum(1)
            codes = [
                (chunk.square().sum(1, keepdim=True) + squares - 2 * chunk @ table.T).argmin(1)
                for chunk in flat.split(4096)
            ]
        return torch.cat(codes).reshape(z.shape[0], -1)


class VQGAN(nn.Module):
    """Pixels ``[B, 3, H, W]`` in [-1, 1] <-> codes ``[B, h*w]`` (raster order, ``h = H / downsampling``)."""

    def __init__(self, config: VQGANConfig = VQGANConfig()) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)
        self.eval()

    @property
    def image_size(self) -> int:
        return self.config.resolution

    @property
    def grid(self) -> int:
        return self.config.resolution // self.config.downsampling

    @property
    def codes_per_image(self) -> int:
        return self.grid**2

    def latents(self, pixels: Tensor) -> Tensor:
        """The pre-quantization latents ``[B, embed_dim, h, w]`` (after ``quant_conv``)."""
        return self.quant_conv(self.encoder(pixels))

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """Codes of pixels, computed in fp32 whatever the caller's autocast: bf16 latents move codes to
        neighbouring entries, so a dataset encoded on a GPU and an image prompt would differ for one image.
        The one place that decides the encoder's precision."""
        if self.quant_conv.weight.dtype != torch.float32:
            raise VQGANError(f"the VQGAN encodes in fp32, its weights are {self.quant_conv.weight.dtype}: .float() it")
        with torch.autocast(pixels.device.type, enabled=False):
            return self.quantize(self.latents(pixels.float()))

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        b, n = codes.shape
        grid = round(n**0.5)
        if grid * grid != n:
            raise ValueError(f"{n} codes per image is not a square grid")
        z = self.quantize.embedding(codes).reshape(b, grid, grid, -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z)).clamp(-1, 1)

    @classmethod
    def from_chameleon(
        cls,
        config_yaml: str | Path,
        checkpoint: str | Path,
        device: str | torch.device = "cpu",
    ) -> VQGAN:
        """Chameleon's release files (``tokenizer/vqgan.yaml``, ``tokenizer/vqgan.ckpt``: a Lightning-era
        checkpoint, read through :mod:`lightning_checkpoint`'s allow-list), in fp32; the discriminator and
        perceptual-loss tensors (``loss.*``) are dropped."""
        from megatron_unix.image.lightning_checkpoint import CheckpointError, load_state_dict

        model = cls(VQGANConfig.from_chameleon_yaml(config_yaml))
        try:
            stored = load_state_dict(checkpoint)
        except CheckpointError as e:
            raise VQGANError(str(e)) from None
        state = {k: v for k, v in stored.items() if not k.startswith("loss.")}
        return model._load(state, str(checkpoint)).to(device, torch.float32)

    def save_pretrained(self, directory: str | Path) -> None:
        """``config.json`` and ``model.safetensors``, each written under a temporary name and renamed (the
        temporaries that killed earlier saves left are removed)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS_FILE, CONFIG_FILE):
            remove_stale_temporaries(directory / name)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        write_atomically(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
        text = json.dumps(asdict(self.config), indent=2) + "\n"
        write_text_atomically(directory / CONFIG_FILE, text)

    @classmethod
    def load(
        cls,
        directory: str | Path | None = None,
        config_yaml: str | Path | None = None,
        checkpoint: str | Path | None = None,
        device: str | torch.device = "cpu",
    ) -> VQGAN:
        """From a :meth:`save_pretrained` ``directory``, else from Chameleon's ``config_yaml`` + ``checkpoint``."""
        if directory is not None:
            return cls.from_pretrained(directory, device)
        return cls.from_chameleon(config_yaml, checkpoint, device)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> VQGAN:
        """A VQGAN written by :meth:`save_pretrained`, in fp32."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        config_path, weights_path = Path(directory) / CONFIG_FILE, Path(directory) / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise VQGANError(f"{path}: no such file (is {directory} a VQGAN saved with save_pretrained?)")
        try:
            config = VQGANConfig.from_dict(json.loads(config_path.read_text()), str(config_path))
            state = load_file(weights_path)
        except VQGANError:
            raise
        except (OSError, ValueError, SafetensorError) as e:
            raise VQGANError(f"{directory}: cannot read {CONFIG_FILE} / {WEIGHTS_FILE}: {e}") from e
        return cls(config)._load(state, str(weights_path)).to(device, torch.float32)

    def _load(self, state: Mapping[str, Tensor], source: str) -> VQGAN:
        """Load every tensor or refuse, naming the missing, unexpected or misshapen ones."""
        expected = self.state_dict()
        problems = [f"missing {k}" for k in expected if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in expected]
        problems += [
            f"{k} has shape {list(v.shape)}, the config gives {list(expected[k].shape)}"
            for k, v in state.items()
            if k in expected and v.shape != expected[k].shape
        ]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise VQGANError(f"{source}: does not fit the VQGAN config: {'; '.join(problems[:5])}{more}")
        self.load_state_dict(state)
        return self.requires_grad_(False)
