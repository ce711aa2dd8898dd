"""Encode images into VQ codes: jsonl lines with "vqcode" (and the input's texts) for preprocess_data.py.

    python tools/encode_images.py --input pairs.jsonl --output pairs_codes.jsonl \\
        --vqgan-config chameleon/tokenizer/vqgan.yaml --vqgan-checkpoint chameleon/tokenizer/vqgan.ckpt
    python tools/encode_images.py --input 'finevision/*.parquet' --output sft_codes.jsonl --vqgan vqgan_dir
    python tools/encode_images.py --input 'laion/*.tar' --output pairs.jsonl --vqgan vqgan_dir \\
        --output-prefix data/pairs --tokenizer-model Qwen2.5-1.5B

Inputs (--input: files, globs, folders, in the order given):
- jsonl(.gz): an image path under --image-key (relative to --image-root, by default the jsonl's folder)
  or the image as base64 or a data: URI under --base64-key; every other key is copied to the output;
- parquet (Hugging Face datasets), read a row group at a time: the image column (--image-column) holds
  {"bytes", "path"} structs, lists of them, bytes or paths; the other columns (--text-column: those
  only) are copied;
- webdataset tars (.tar, .tar.gz, .tgz; what img2dataset writes): KEY.jpg/png/webp... with KEY.txt as
  the caption (under the first --caption-key) and KEY.json's fields;
- folders (or --image-dir): the images under it, each captioned by its same-stem .txt file.
A record is an image-text pair (a caption under --caption-key) or a conversation, which preprocess_data.py
lays out as SFT (loss on the answers): LLaVA "conversations" or chat "messages" (--conversation-key), or
FineVision's "texts" turns of {"user", "assistant"} (--turns-key; written as LLaVA conversations). The
SFT layout holds one image, before the first turn: a conversation with one image and no <image> or
one in its first turn is taken; others (several images, <image> in a later turn) are skipped as
unsupported_layout.

Images are prepared as the reference does (transparency on white, palette, CMYK and grey to RGB, short
side resized to the model's resolution, centre crop) and encoded in batches, on the GPU when there is
one (in fp32 on every device, as image prompts are at inference). Bad records are skipped and counted
by reason, the first few named by file and line (jsonl), row (parquet, counted from 0) or member
(tar): images missing, unreadable, truncated, of 16-bit pixels, with a short side below --min-size
(upscaling them more than 2x gives blurry codes) or an aspect ratio above --max-aspect (the centre crop
would lose most of them); records without image or text, bad lines, unsupported conversations; a
corrupt parquet row group (each of its rows) or tar (where reading stopped). --strict stops at the
first (exit 2).

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
    source.add_argument(
        "--input", nargs="+", metavar="FILE_OR_GLOB", help="jsonl(.gz), .parquet, .tar(.gz) files or folders, in order"
    )
    source.add_argument("--image-dir", type=Path, help="a folder of images (recursively), captions in same-stem .txt")
    p.add_argument("--output", type=Path, required=True, help="jsonl to write")
    g = p.add_argument_group("inputs (where images and texts are; of a key list the first one a record has)")
    g.add_argument("--image-key", default="image", help="jsonl: key of the image path (or a data: URI)")
    g.add_argument("--base64-key", default="image_base64", help="jsonl: key of the base64-encoded image")
    g.add_argument("--image-root", type=Path, help="folder of relative image paths (default: the input's folder)")
    g.add_argument("--image-column", nargs="+", default=["images", "image"], help="parquet: the image column")
    g.add_argument(
        "--text-column", nargs="+", default=[], help="parquet: the columns to copy (default: all but the image's)"
    )
    g.add_argument("--turns-key", nargs="+", default=["texts"], help="FineVision's {user, assistant} turns")

    add_vqgan_arguments(p.add_argument_group("VQGAN (either a save_pretrained folder or Chameleon's release files)"))

    g = p.add_argument_group("filters")
    g.add_argument("--min-size", type=int, default=MIN_SIZE, help="smallest short side in pixels")
    g.add_argument("--max-aspect", type=float, default=MAX_ASPECT, help="largest long side / short side")
    g.add_argument("--strict", action="store_true", help="the first bad image or record is fatal (else: skipped)")

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
    from megatron_unix.image.encode import Filters, encode_images
    from megatron_unix.image.sources import FolderShard, SourceError, chained, shards
    from megatron_unix.image.vqgan import VQGAN
    from megatron_unix.inference.loading import device_of

    try:
        options = _source_options(args)
        inputs = shards(args.input, options) if args.input else [FolderShard(args.image_dir, options)]
        model = VQGAN.load(args.vqgan, args.vqgan_config, args.vqgan_checkpoint, device_of(args.device))
        tok = _tokenizer(args, model) if args.output_prefix else None  # fail early
        filters = Filters(model.image_size, args.min_size, args.max_aspect)
        summary = encode_images(
            partial(chained, inputs),
            args.output,
            model,
            filters,
            _settings(args, model.image_size),
            args.batch_size,
            args.workers,
            args.strict,
            log_interval=args.log_interval,
        )
        print(summary.report())
        print(f"output          {args.output}")
        if tok:
            _build_dataset(args, tok)
    except (SourceError, OSError, ValueError) as e:
        print(f"encode_images.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def _source_options(args: argparse.Namespace):
    """The sources' options of the flags (image.sources imports torch: not for --help)."""
    from megatron_unix.image.records import RecordKeys
    from megatron_unix.image.sources import SourceOptions

    keys = RecordKeys(tuple(args.caption_key), tuple(args.conversation_key), tuple(args.turns_key))
    return SourceOptions(
        args.image_key, args.base64_key, args.image_root, tuple(args.image_column), tuple(args.text_column), keys
    )


def _settings(args: argparse.Namespace, size: int) -> dict:
    """What the output depends on: a resumed run must have the same (paths resolved, so that a run
    from another folder is the same run; the shards are the files the inputs named then)."""
    from megatron_unix.files import expand_inputs

    inputs = expand_inputs(args.input) if args.input else []
    paths = {"input": [str(p.resolve()) for p in inputs], "image_dir": _resolved(args.image_dir)}
    keys = {"image_key": args.image_key, "base64_key": args.base64_key, "image_root": _resolved(args.image_root)}
    keys |= {
        k: getattr(args, k) for k in ("image_column", "text_column", "turns_key", "caption_key", "conversation_key")
    }
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
