"""Pretrain or fine-tune a Uni-X model with Megatron-Core.

    python pretrain_unix.py --model-preset tiny --tokenizer-model TOK --data-path PREFIX --seq-length 512 \
        --micro-batch-size 2 --global-batch-size 8 --train-iters 100 --save ckpt
    torchrun --nproc-per-node 8 pretrain_unix.py ...        # or srun alone under slurm

See `python pretrain_unix.py --help` for every flag (Megatron-LM's names) and examples/ for
complete launch scripts.
"""

from __future__ import annotations

import sys

from megatron_unix.training.arguments import parse_args


def main() -> int:
    args = parse_args()  # before the heavy imports: --help and flag errors answer at once
    from megatron_unix.training.trainer import NonFiniteLoss, pretrain

    try:
        pretrain(args)
    except (ValueError, OSError) as error:  # bad settings or input, missing, damaged or unwritable files
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteLoss as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
