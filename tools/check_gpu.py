#!/usr/bin/env python
"""GPU checks that CI cannot run: the varlen attention backend against SDPA in bf16, and a
forward/backward of the Uni-X 1.5B 9:5 shape with throughput and memory.

    python tools/check_gpu.py [--seq-length 8192] [--iters 5]

It imports the installed package: on a machine without the project's install (the lent GPU machine),
run it as ``PYTHONPATH=. python tools/check_gpu.py`` from the repository, or ``pip install --no-deps -e .``.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from megatron_unix.training import distributed

UNIX_1_5B = dict(
    num_layers=28,
    hidden_size=1536,
    ffn_hidden_size=8960,
    num_attention_heads=12,
    num_query_groups=2,
    kv_channels=128,
    vision_encode_layers=9,
    vision_decode_layers=5,
    qk_layernorm=True,
)
VOCAB = 160128


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--iters", type=int, default=5)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tools/check_gpu.py needs a CUDA GPU")
    distributed.initialize(1, 1, seed=1)
    from megatron_unix.data.synthetic import Layout, make_batch, random_rows
    from megatron_unix.model import build_model, make_config
    from megatron_unix.model.builder import parameter_counts
    from megatron_unix.model.forward import stream_forward
    from megatron_unix.training import metrics

    base = make_config(**UNIX_1_5B)  # the Qwen2.5 vocabulary layout is UniXConfig's default
    layout = Layout(base.vq_offset, base.vq_codebook_size, base.boi_id, base.eoi_id, base.eos_id)
    peak = metrics.peak_tflops(None)
    g = torch.Generator().manual_seed(0)
    batch = {k: v.cuda() for k, v in make_batch(random_rows(1, 12, g), args.seq_length, layout, 0).items()}

    # 1. varlen vs sdpa, bf16, a small model so SDPA's dense mask fits.
    small = dict(UNIX_1_5B, num_layers=4, vision_encode_layers=1, vision_decode_layers=1)
    outputs = {}
    for backend in ("sdpa", "varlen"):
        config = make_config(**small, bf16=True, core_attention_backend=backend)
        torch.manual_seed(0)
        model = build_model(config, VOCAB, args.seq_length).cuda().bfloat16()
        with torch.no_grad():
            outputs[backend] = stream_forward(model, batch).float()
        del model
    a, b = outputs["sdpa"], outputs["varlen"]
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    same = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    print(
        f"varlen vs sdpa (bf16, seq {args.seq_length}): max |diff| {(a - b).abs().max().item():.4f}, "
        f"cosine {cos:.6f}, argmax agreement {same:.4f}"
    )

    # 2. the 1.5B 9:5 shape, forward + backward.
    config = make_config(**UNIX_1_5B, bf16=True)
    model = build_model(config, VOCAB, args.seq_length).cuda().bfloat16()
    params, vision = parameter_counts(model)
    torch.cuda.reset_peak_memory_stats()
    for i in range(args.iters + 1):
        if i == 1:
            torch.cuda.synchronize()
            start = time.perf_counter()
        loss = stream_forward(model, batch, batch["labels"]).float().mean()
        loss.backward()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.iters
    tokens_per_s = args.seq_length / seconds
    # Every token passes one copy of each layer: count the dense model's weights (plus the output head).
    active = params - vision
    tflops = 6 * active * args.seq_length / seconds / 1e12
    mfu = f"{tflops / peak:.1%}" if peak else "n/a (unknown GPU)"
    print(
        f"Uni-X 1.5B 9:5: {params:,} parameters, loss {loss.item():.3f}, {tokens_per_s:,.0f} tokens/s, "
        f"{tflops:.0f} TFLOP/s, MFU {mfu} (6*N*T, no attention term), peak memory "
        f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, attention backend "
        f"{model.decoder.layers[0].self_attention.core_attention.backend_name}"
    )


if __name__ == "__main__":
    main()
