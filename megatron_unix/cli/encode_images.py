"""Encode images into VQ codes: jsonl lines with "vqcode" (and the input's texts) for preprocess_data.py.

    python tools/encode_images.py --input pairs.jsonl --output pairs_codes.jsonl \\
        --vqgan-config chameleon/tokenizer/vqgan.yaml --vqgan-checkpoint chameleon/tokenizer/vqgan.ckpt
    python tools/encode_images.py --image-dir photos/ --output photos.jsonl --vqgan vqgan_dir \\
        --output-prefix data/photos --tokenizer-model Qwen2.5-1.5B

Input: jsonl(.gz) files or globs of lines with an image path under --image-key (relative to --image-root, by default the
jsonl's folder) or the image itself as base64 or a data: URI under --base64-key; every other key is
copied to the output line. Or --image-dir: the images under a folder, each captioned by its same-stem
.txt file (as "caption"). Images are prepared as the reference does (transparency on white, short
side resized to the model's resolution, centre crop) and encoded in batches, on the GPU when there
is one (in fp32 on every device, as image prompts are at inference). Images with a short side below --min-size (upscaling them more than 2x gives blurry
codes) or an aspect ratio above --max-aspect (the centre crop would lose most of them), missing,
unreadable or truncated files and bad lines are skipped and counted (the first few named by
file:line); --strict stops at the first (exit 2).

The output is written as OUT.partial with a progress record OUT.progress.json after every batch: a
killed run started again with the same arguments resumes where it stopped, and the output is
identical to an uninterrupted run's. Progress goes to stderr, the summary (with codebook usage) to
stdout; with --output-prefix the output is then tokenized into a dataset as preprocess_data.py would,
with its tokenizer, input-key and layout flags (--vq-codebook-size and --image-tokens default to the
VQGAN's).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from megatron_unix.cli import add_vqgan_arguments, refuse_out_of_range, vqgan_flags_error
from megatron_unix.cli.preprocess_data import (
    add_layout_arguments,
    add_tokenizer_arguments,
    build_line_format,
    build_tokenizer,
    layout_checks,
)

MIN_SIZE = 256
MAX_ASPECT = 2.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE_OR_GLOB", help=".jsonl or .jsonl.gz files, in order")
    source.add_argument("--image-dir", type=Path, help="a folder of images (recursively), captions in same-stem .txt")
    p.add_argument("--output", type=Path, required=True, help="jsonl to write")
    p.add_argument("--image-key", default="image", help="key of the image path (or a data: URI)")
    p.add_argument("--base64-key", default="image_base64", help="key of the base64-encoded image")
    p.add_argument("--image-root", type=Path, help="folder of relative image paths (default: the jsonl's folder)")

    add_vqgan_arguments(p.add_argument_group("VQGAN (either a save_pretrained folder or Chameleon's release files)"))

    g = p.add_argument_group("filters")
    g.add_argument("--min-size", type=int, default=MIN_SIZE, help="smallest short side in pixels")
    g.add_argument("--max-aspect", type=float, default=MAX_ASPECT, help="largest long side / short side")
    g.add_argument("--strict", action="store_true", help="the first bad image or line is fatal (else: skipped)")

    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=32, help="images per encoder call")
    g.add_argument("--workers", type=int, default=4, help="image decoding processes (0: in the main process)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--log-interval", type=int, default=1000, help="images between progress lines")

    g = p.add_argument_group("dataset (optional: tokenize the output as preprocess_data.py does)")
    g.add_argument("--output-prefix", help="write a dataset PREFIX.bin/.idx/... from the output")
    add_tokenizer_arguments(p, "HF tokenizer directory or SentencePiece .model (with --output-prefix)")
    add_layout_arguments(p)
    p.set_defaults(vq_codebook_size=None, image_tokens=None)  # the VQGAN's

    args = p.parse_args(argv)
    if message := vqgan_flags_error(args, required=True):
        p.error(message)
    if args.output.suffix == ".gz":
        p.error(f"--output {args.output}: the output is plain jsonl (it is appended to while running)")
    if bool(args.output_prefix) != bool(args.tokenizer_model):
        p.error("--output-prefix and --tokenizer-model go together")
    refuse_out_of_range(
        p,
        args,
        (
            ("--batch-size", args.batch_size >= 1),
            ("--workers", args.workers >= 0),
            ("--min-size", args.min_size >= 1),
            ("--max-aspect", args.max_aspect >= 1),
            ("--log-interval", args.log_interval >= 1),
            *layout_checks(args),
        ),
    )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_unix.files import expand_inputs
    from megatron_unix.image.encode import EncodeError, Filters, encode_images, folder_items, jsonl_items
    from megatron_unix.image.vqgan import VQGAN
    from megatron_unix.inference.loading import device_of

    try:
        inputs = expand_inputs(args.input) if args.input else []
        model = VQGAN.load(args.vqgan, args.vqgan_config, args.vqgan_checkpoint, device_of(args.device))
        tok = _tokenizer(args, model) if args.output_prefix else None  # fail early
        filters = Filters(model.image_size, args.min_size, args.max_aspect)
        if args.input:
            items = partial(jsonl_items, inputs, args.image_key, args.base64_key, args.image_root)
        else:
            items = partial(folder_items, args.image_dir, "caption")
        summary = encode_images(
            items,
            args.output,
            model,
            filters,
            _settings(args, inputs, model.image_size),
            args.batch_size,
            args.workers,
            args.strict,
            log_interval=args.log_interval,
        )
        print(summary.report())
        print(f"output          {args.output}")
        if tok:
            _build_dataset(args, tok)
    except (EncodeError, OSError, ValueError) as e:
        print(f"encode_images.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def _settings(args: argparse.Namespace, inputs: list[Path], size: int) -> dict:
    """What the output depends on: a resumed run must have the same (paths resolved, so that a run
    from another folder is the same run)."""
    paths = {"input": [str(p.resolve()) for p in inputs], "image_dir": _resolved(args.image_dir)}
    keys = {"image_key": args.image_key, "base64_key": args.base64_key, "image_root": _resolved(args.image_root)}
    model = [str(p.resolve()) for p in (args.vqgan, args.vqgan_config, args.vqgan_checkpoint) if p]
    return {**paths, **keys, "vqgan": model, "size": size, "min_size": args.min_size, "max_aspect": args.max_aspect}


def _resolved(path: Path | None) -> str:
    return str(path.resolve()) if path else ""


def _tokenizer(args: argparse.Namespace, model):
    """preprocess_data.py's tokenizer of the flags; its codebook is the VQGAN's."""
    from megatron_unix.image.encode import EncodeError

    if args.vq_codebook_size is None:
        args.vq_codebook_size = model.config.n_embed
    elif args.vq_codebook_size != model.config.n_embed:
        raise EncodeError(f"--vq-codebook-size {args.vq_codebook_size}: the VQGAN has {model.config.n_embed} codes")
    if args.image_tokens is None:
        args.image_tokens = model.codes_per_image
    elif args.image_tokens != model.codes_per_image:
        raise EncodeError(f"--image-tokens {args.image_tokens}: the VQGAN gives {model.codes_per_image} per image")
    return build_tokenizer(args)


def _build_dataset(args: argparse.Namespace, tok) -> None:
    """The output tokenized by the preprocessing library, as preprocess_data.py would with the same flags."""
    from megatron_unix.data.preprocess import PreprocessError, preprocess
    from megatron_unix.image.encode import EncodeError

    prefix = args.output_prefix
    try:
        summary = preprocess([args.output], prefix, tok, build_line_format(args), max(1, args.workers))
    except PreprocessError as e:
        raise EncodeError(f"--output-prefix {prefix}: {e}") from e
    print(summary.report())
    print(f"dataset         {prefix}")


if __name__ == "__main__":
    sys.exit(main())
