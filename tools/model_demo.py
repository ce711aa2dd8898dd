#!/usr/bin/env python
"""Train a tiny Uni-X for a few iterations on synthetic packed rows and print the losses.

A smoke run of the whole model path (routing, separated layers, segment attention, Megatron
schedules, gradient norm) on built-in defaults; runs on a CPU in well under a minute:

    python tools/model_demo.py
    torchrun --nproc-per-node 2 tools/model_demo.py --tensor-model-parallel-size 2 --sequence-parallel
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_unix.training import distributed  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--vision-encode-layers", type=int, default=2)
    p.add_argument("--vision-decode-layers", type=int, default=1)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--train-iters", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--no-document-isolation", action="store_true")
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    distributed.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.seed)
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_unix import platform
    from megatron_unix.data.synthetic import Layout, make_batch, random_rows
    from megatron_unix.model import build_model, make_config
    from megatron_unix.training.step import forward_step, grad_norm

    text_vocab, codes = 1000, 512
    layout = Layout(vq_offset=text_vocab, vq_codes=codes, boi_id=990, eoi_id=991, eos_id=992, image_codes=64)
    config = make_config(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=3 * args.hidden_size,
        num_attention_heads=4, num_query_groups=2, kv_channels=args.hidden_size // 4, qk_layernorm=True,
        vision_encode_layers=args.vision_encode_layers, vision_decode_layers=args.vision_decode_layers,
        vq_offset=text_vocab, vq_codebook_size=codes, boi_id=990, eoi_id=991, eos_id=992,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size, sequence_parallel=args.sequence_parallel,
        document_isolation=not args.no_document_isolation, pipeline_dtype=torch.float32,
    )
    model = build_model(config, text_vocab + codes, args.seq_length)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    config.no_sync_func, config.finalize_model_grads_func = ddp.no_sync, finalize_model_grads
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=args.lr, weight_decay=0.0)
    run = get_forward_backward_func()
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        params = sum(p.numel() for p in model.parameters())
        print(f"> accelerators: {platform.detect_accelerators().describe()}")
        print(f"> Uni-X {args.num_layers} layers ({args.vision_encode_layers}:{args.vision_decode_layers} separated), "
              f"{params:,} parameters on this rank, attention backend "
              f"{model.decoder.layers[0].self_attention.core_attention.backend_name}")
    g = torch.Generator().manual_seed(args.seed + ps.get_data_parallel_rank())
    for iteration in range(1, args.train_iters + 1):
        start = time.perf_counter()
        batch = make_batch(random_rows(args.micro_batch_size, 4, g), args.seq_length, layout, seed=int(torch.randint(0, 2**31, (1,), generator=g)))
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        results = run(forward_step_func=forward_step, data_iterator=iter([batch]), model=[ddp], num_microbatches=1,
                      seq_length=batch["tokens"].numel(), micro_batch_size=1)
        for p in ddp.parameters():
            p.grad = p.main_grad
        norm = grad_norm([ddp])
        optimizer.step()
        if results and ps.get_tensor_model_parallel_rank() == 0:
            text_sum, text_n, vis_sum, vis_n = results[0]["modality_sums"].tolist()
            tokens_per_s = batch["tokens"].numel() / (time.perf_counter() - start)
            print(f" iteration {iteration:4d}/{args.train_iters} | lm loss {results[0]['lm loss'].item():.4f} | "
                  f"text loss {text_sum / max(text_n, 1):.4f} | vision loss {vis_sum / max(vis_n, 1):.4f} | "
                  f"grad norm {norm:.3f} | tokens/s {tokens_per_s:,.0f}", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
