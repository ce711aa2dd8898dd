"""One training step of a tiny Uni-X under torchrun; writes loss, grad norm and logits as JSON.

Used by tests/test_parallel.py to compare TP/PP/SP/DP runs against the single-process run. The
weights come from a dist checkpoint written by the single-process run (``--save``), so parallel
runs also exercise loading at another TP/PP (``--load``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from megatron_unix.training import distributed

VARIANTS = {
    "unix": {},
    "hardmoe": dict(layer_variant="hardmoe", decoder_sparse_step=2, vision_encode_layers=0, vision_decode_layers=0),
    "mot": dict(layer_variant="mot", ffn_vision_size=80, vision_encode_layers=0, vision_decode_layers=0),
}
"""The model of each layer variant (spec §9), on TINY_MODEL's shape."""


def grad_norm(model_chunks: list[torch.nn.Module]) -> float:
    """L2 norm of all gradients, each parameter counted once across TP, PP and tied copies: an
    independent check of the norm Megatron's optimizer computes."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.transformer.module import param_is_not_shared

    grads = []
    for chunk in model_chunks:
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is None or not param_is_not_shared(param):
                continue
            if tensor_parallel.param_is_not_tensor_parallel_duplicate(param):
                grads.append(grad.float())
    return get_grad_norm_fp32(grads, grad_stats_parallel_group=ps.get_model_parallel_group())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--save")
    parser.add_argument("--load")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batches", default="mixed", choices=["mixed", "split-modality"])
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--overlap-grad-reduce", action="store_true")
    parser.add_argument("--variant", default="unix", choices=list(VARIANTS))
    args = parser.parse_args()

    distributed.initialize(args.tp, args.pp, seed=7)
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from tiny import TINY_MODEL, TINY_VOCAB, make_batches

    from megatron_unix.model import build_model, make_config
    from megatron_unix.model.forward import stream_forward
    from megatron_unix.training.setup import wrap_model
    from megatron_unix.training.step import Routed, run_schedule

    config = make_config(
        **{**TINY_MODEL, **VARIANTS[args.variant]},
        tensor_model_parallel_size=args.tp,
        pipeline_model_parallel_size=args.pp,
        sequence_parallel=args.sp,
        pipeline_dtype=torch.float32,
    )
    model = build_model(config, TINY_VOCAB, 64)
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), args.save)
    if args.load:
        model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), args.load))
    ddp = wrap_model(config, model, overlap_grad_reduce=args.overlap_grad_reduce, bucket_size=2000)

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batches = make_batches(args.batches, args.micro_batches * dp)[dp_rank::dp]
    seq = batches[0]["tokens"].numel()
    run = get_forward_backward_func()
    ddp.zero_grad_buffer()
    results = run_schedule(ddp, [Routed.of(batch, config) for batch in batches])
    norm = grad_norm([ddp])

    def logits_step(data_iterator, chunk):
        out = stream_forward(chunk, next(data_iterator))
        return out, lambda o, non_loss_data=True: gather_from_tensor_model_parallel_region(o)

    ddp.eval()
    logits = run(
        forward_step_func=logits_step,
        data_iterator=iter(batches[:1]),
        model=[ddp],
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=1,
        forward_only=True,
        collect_non_loss_data=True,
    )
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        loss = torch.stack([r["lm loss"] for r in results]).mean()
        torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
        if dp_rank == 0:
            torch.save(logits[0][..., :TINY_VOCAB].clone(), args.out + ".logits.pt")
            Path(args.out).write_text(json.dumps({"loss": loss.item() / dp, "grad_norm": float(norm)}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
