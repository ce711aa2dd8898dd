"""Convert between Hugging Face checkpoints and Megatron checkpoints of Uni-X (CPU, one process).

    python tools/convert_checkpoint.py import-hf --hf-dir Qwen2.5-1.5B --save ckpt/unix-1.5b \\
        --vision-encode-layers 9 --vision-decode-layers 5 [--layer-style qwen3] [--verify]
    python tools/convert_checkpoint.py export-hf --load ckpt/unix-1.5b --save hf/unix-1.5b [--verify]

import-hf reads a Qwen2/Qwen2.5 or Qwen3 text model (vocabulary expanded, vision copies created)
or a reference-format Uni-X checkpoint (everything from its config.json) and writes iteration 0,
loadable at any TP/PP. export-hf writes the reference format (bf16 safetensors, HF sharding,
tokenizer, remote code for trust_remote_code). Exit status: 0 ok, 1 verification failed, 2 refused.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megatron_unix.data.vocabulary import CODEBOOK_SIZE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    imp = commands.add_parser("import-hf", help="HF checkpoint directory -> Megatron checkpoint")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--save", required=True, help="Megatron save directory (iteration 0 is written)")
    imp.add_argument("--vision-encode-layers", type=int, default=None, help="N (text sources; default 0)")
    imp.add_argument("--vision-decode-layers", type=int, default=None, help="M (text sources; default 0)")
    imp.add_argument(
        "--vision-init",
        choices=["copy", "random"],
        default=None,
        help="text sources: the vision parts start as copies of their text twins (copy) or fresh (random: norms 1, "
        "biases 0, N(0, initializer_range)); default as the reference starts the variant: copy for unix, "
        "random for hardmoe and mot (the reference's baseline classes have no init_vision_weights)",
    )
    imp.add_argument(
        "--layer-variant",
        choices=["unix", "hardmoe", "mot"],
        default="unix",
        help="text sources: Uni-X, or a baseline of spec §9 (hardmoe: a vision MLP every --decoder-sparse-step "
        "layers; mot: vision q/k/v, QK norms and MLP in every layer), its vision parts as --vision-init says",
    )
    imp.add_argument(
        "--decoder-sparse-step", type=int, default=2, help="hardmoe: layer i has a vision MLP iff (i+1) %% K == 0"
    )
    imp.add_argument("--vq-codebook-size", type=int, default=None, help=f"text sources; default {CODEBOOK_SIZE}")
    imp.add_argument("--vq-offset", type=int, default=None, help="default: length of the tokenizer in --hf-dir")
    imp.add_argument(
        "--layer-style",
        choices=["qwen2", "qwen3"],
        default=None,
        help="default: the source's; qwen2 -> qwen3 drops q/k/v bias and adds QK norm of ones",
    )
    imp.add_argument(
        "--separator",
        default=None,
        help="text sources: a token routed as vision besides BOI and codes, e.g. '<|vision_pad|>' "
        "(default: none, as the reference's add_sep_for_vis=0)",
    )
    imp.add_argument("--seed", type=int, default=1234, help="for --vision-init random")
    imp.add_argument("--verify", action="store_true", help="compare logits with the HF models on sample inputs")

    exp = commands.add_parser("export-hf", help="Megatron checkpoint -> HF directory (reference format)")
    exp.add_argument("--load", required=True, help="Megatron save directory or iter_* directory")
    exp.add_argument("--save", required=True, help="new (or empty) HF directory")
    exp.add_argument("--max-shard-size", default="5GB", help="HF sharding, e.g. 5GB or 500MB")
    exp.add_argument("--verify", action="store_true", help="compare logits with the written HF model (bf16)")
    exp.add_argument(
        "--no-verify-checkpoint",
        action="store_false",
        dest="verify_checkpoint",
        help="load without checking the checkpoint's files against its checksums.json",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_unix.conversion import convert
    from megatron_unix.conversion.verify import VerificationFailed
    from megatron_unix.training import distributed

    try:
        distributed.initialize(1, 1, seed=1234)
        if args.command == "import-hf":
            options = convert.ImportOptions(
                vision_encode_layers=args.vision_encode_layers,
                vision_decode_layers=args.vision_decode_layers,
                vision_init=args.vision_init,
                layer_variant=args.layer_variant,
                decoder_sparse_step=args.decoder_sparse_step,
                vq_codebook_size=args.vq_codebook_size,
                vq_offset=args.vq_offset,
                layer_style=args.layer_style,
                separator=args.separator,
                seed=args.seed,
            )
            convert.import_hf(args.hf_dir, args.save, options, verify=args.verify)
        else:
            convert.export_hf(
                args.load,
                args.save,
                verify=args.verify,
                max_shard_size=args.max_shard_size,
                verify_checkpoint=args.verify_checkpoint,
            )
    except VerificationFailed as error:
        print(f"convert_checkpoint: {error}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:
        print(f"convert_checkpoint: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's writer uses multiprocessing
    sys.exit(main())
