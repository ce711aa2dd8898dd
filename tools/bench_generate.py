#!/usr/bin/env python
"""Throughput of text-to-image generation (spec §6 CFG loop) with the KV cache and without it, and of
the VQGAN's encode and decode.

    python tools/bench_generate.py                          # small random model, CPU: a couple of minutes
    python tools/bench_generate.py --preset unix-1.5b --codes-per-image 1024 --vqgan-resolution 512   # GPU

The model is a random HF Uni-X model (remote-code classes) of the given shape; prompts are random text
ids + BOI. Tokens/s counts generated image tokens (codes and separators) of all images of a batch; each
image is two rows (conditional and unconditional), one with --cfg-scale 1. "recompute" forwards the whole sequence at every
step (``use_cache=False``), the cost the cache removes. bf16 on a GPU, fp32 on CPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from megatron_unix.data.vocabulary import QWEN25_VQ_OFFSET
from megatron_unix.inference.generate import generate_images
from megatron_unix.inference.loading import default_dtype, device_of
from megatron_unix.inference.sampling import SamplingParams, VocabLayout
from megatron_unix.training.arguments import UNIX_1_5B

SHAPE_FIELDS = (
    "hidden_size",
    "ffn_hidden_size",
    "num_layers",
    "num_attention_heads",
    "num_query_groups",
    "kv_channels",
    "vision_encode_layers",
    "vision_decode_layers",
)
PRESETS = {
    "small": dict(
        hidden_size=128,
        ffn_hidden_size=352,
        num_layers=4,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=32,
        vision_encode_layers=1,
        vision_decode_layers=1,
        text_vocab=4096,
    ),
    "unix-1.5b": {**{k: UNIX_1_5B[k] for k in SHAPE_FIELDS}, "text_vocab": QWEN25_VQ_OFFSET},
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model shape (flags below override)")
    for name in PRESETS["small"]:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--codebook-size", type=int, default=8192)
    p.add_argument("--codes-per-image", type=int, default=32, help="1024 for real images")
    p.add_argument("--prompt-length", type=int, default=16, help="conditional prompt tokens (BOI included)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], help="images per batch")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--vqgan-resolution", type=int, default=None, help="default: 512 on GPU, 128 on CPU")
    p.add_argument("--vqgan-batch-size", type=int, default=4)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    return p


def random_model(shape: dict[str, int], codebook: int, device: torch.device) -> torch.nn.Module:
    from megatron_unix.conversion.hf_config import hf_config_object, unix_config_json
    from megatron_unix.conversion.hf_io import model_class
    from megatron_unix.model import make_config

    text = shape["text_vocab"]
    config = make_config(
        num_layers=shape["num_layers"],
        hidden_size=shape["hidden_size"],
        ffn_hidden_size=shape["ffn_hidden_size"],
        num_attention_heads=shape["num_attention_heads"],
        num_query_groups=shape["num_query_groups"],
        kv_channels=shape["kv_channels"],
        vision_encode_layers=shape["vision_encode_layers"],
        vision_decode_layers=shape["vision_decode_layers"],
        qk_layernorm=True,
        vq_offset=text,
        vq_codebook_size=codebook,
        boi_id=text - 13,
        eoi_id=text - 12,
        eos_id=0,
        tie_word_embeddings=True,
    )
    hf_config = hf_config_object(unix_config_json(config, text + codebook, separator_texts=[]))
    with torch.device(device):
        model = model_class(hf_config.model_type, "unix")(hf_config).to(default_dtype(device))
    return model.eval()


def timed(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def t2i_tokens_per_second(
    model: torch.nn.Module,
    text_vocab: int,
    codebook_size: int,
    batch: int,
    codes_per_image: int,
    use_cache: bool = True,
    prompt_length: int = 16,
    cfg_scale: float = 4.0,
    seed: int = 0,
) -> float:
    """Generated image tokens per second of ``batch`` images (2 rows each: CFG) with random prompts, after a
    2-token warm-up of the same batch size."""
    device = next(model.parameters()).device
    layout = VocabLayout(
        vq_offset=text_vocab, codebook_size=codebook_size, boi_id=text_vocab - 13, eoi_id=text_vocab - 12, eos_id=0
    )
    params = SamplingParams(temperature=0.99, top_k=4096, top_p=0.96)
    g = torch.Generator().manual_seed(seed)

    def run(use_cache: bool, codes: int) -> None:
        prompts = [
            torch.randint(100, text_vocab - 100, (prompt_length - 1,), generator=g).tolist() for _ in range(batch)
        ]
        generate_images(
            model,
            layout,
            [[*p, layout.boi_id] for p in prompts],
            [5, 6, 7, layout.boi_id],
            params,
            list(range(batch)),
            cfg_scale=cfg_scale,
            codes_per_image=codes,
            use_cache=use_cache,
        )

    run(True, 2)  # warm-up
    return batch * codes_per_image / timed(lambda: run(use_cache, codes_per_image), device)


def bench_generation(args: argparse.Namespace, shape: dict[str, int], device: torch.device) -> None:
    model = random_model(shape, args.codebook_size, device)
    text = shape["text_vocab"]
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"T2I generation: {params_m:.1f}M-parameter random Uni-X (hidden {shape['hidden_size']}, "
        f"{shape['num_layers']} layers, N:M {shape['vision_encode_layers']}:{shape['vision_decode_layers']}, "
        f"vocab {text + args.codebook_size}), {args.codes_per_image} codes/image, prompt {args.prompt_length} "
        f"tokens, CFG (2 rows/image), {device.type} {str(default_dtype(device)).removeprefix('torch.')}"
    )
    print(f"{'images/batch':>12} {'KV cache tok/s':>15} {'recompute tok/s':>16} {'speed-up':>9}")
    for batch in args.batch_sizes:
        rates = [
            t2i_tokens_per_second(
                model,
                text,
                args.codebook_size,
                batch,
                args.codes_per_image,
                use_cache,
                args.prompt_length,
                args.cfg_scale,
            )
            for use_cache in (True, False)
        ]
        print(f"{batch:>12} {rates[0]:>15.1f} {rates[1]:>16.1f} {rates[0] / rates[1]:>8.1f}x", flush=True)


def vqgan_images_per_second(resolution: int, batch: int, device: torch.device, repeats: int = 1) -> tuple[float, float]:
    """(encode, decode) images/s of a random VQGAN of Chameleon's shape (fp32), after a 1-image warm-up."""
    from megatron_unix.image.vqgan import VQGAN, VQGANConfig

    vqgan = VQGAN(VQGANConfig(resolution=resolution)).to(device)
    pixels = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    codes = vqgan.encode(pixels[:1])  # warm-up
    vqgan.decode(codes)
    encode = batch * repeats / timed(lambda: [vqgan.encode(pixels) for _ in range(repeats)], device)
    codes = codes.expand(batch, -1)
    decode = batch * repeats / timed(lambda: [vqgan.decode(codes) for _ in range(repeats)], device)
    return encode, decode


def bench_vqgan(args: argparse.Namespace, device: torch.device) -> None:
    resolution = args.vqgan_resolution or (512 if device.type == "cuda" else 128)
    encode, decode = vqgan_images_per_second(resolution, args.vqgan_batch_size, device)
    codes = (resolution // 16) ** 2
    print(
        f"VQGAN (Chameleon shape, {resolution}x{resolution} -> {codes} codes, batch {args.vqgan_batch_size}, fp32): "
        f"encode {encode:.2f} images/s, decode {decode:.2f} images/s"
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in PRESETS[args.preset].items()}
    device = device_of(args.device)
    torch.manual_seed(0)
    with torch.inference_mode():
        bench_generation(args, shape, device)
        bench_vqgan(args, device)


if __name__ == "__main__":
    main()
