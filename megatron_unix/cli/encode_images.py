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

Under torchrun or srun every rank encodes a contiguous block of the shards on its LOCAL_RANK-th GPU into
OUT.rank-<r>-of-<W> (and, with --output-prefix, a dataset PREFIX.rank-<r>-of-<W>); when all are done,
rank 0 merges the datasets into PREFIX and joins the outputs into OUT in input order: the bytes one
process writes. A killed job run again resumes each rank; --merge joins what a job's finished ranks left.
Ctrl-C or SIGTERM ends in one line (exit 130 or 143), what was encoded kept.
"""

from __future__ import annotations

import argparse
import io
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import IO

from megatron_unix.cli import (
    Interrupted,
    add_vqgan_arguments,
    refuse_out_of_range,
    stop_on_signals,
    vqgan_flags_error,
)
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
    source.add_argument(
        "--merge",
        action="store_true",
        help="only join the outputs (and datasets) that a job's ranks finished, e.g. after it was killed at the end",
    )
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
    g.add_argument("--log-interval", type=int, default=1000, help="images between progress lines (per rank)")
    g.add_argument("--total-log-interval", type=float, default=60, help="seconds between rank 0's lines of all ranks")
    g.add_argument(
        "--distributed-timeout-minutes",
        type=float,
        default=24 * 60,
        help="how long ranks that are done wait for the others (torchrun/srun)",
    )

    g = p.add_argument_group("dataset (optional: tokenize the output as preprocess_data.py does)")
    g.add_argument("--output-prefix", help="write a dataset PREFIX.bin/.idx/... from the output")
    add_tokenizer_arguments(p, "HF tokenizer directory or SentencePiece .model (with --output-prefix)")
    add_layout_arguments(p)
    p.set_defaults(vq_codebook_size=None, image_tokens=None)  # the VQGAN's

    args = p.parse_args(argv)
    if message := vqgan_flags_error(args, required=not args.merge or bool(args.output_prefix)):
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
            ("--total-log-interval", args.total_log_interval > 0),
            ("--distributed-timeout-minutes", args.distributed_timeout_minutes > 0),
            *layout_checks(args),
        ),
    )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with stop_on_signals():
            from megatron_unix.image.sources import SourceError

            try:
                return _run(args)
            except (SourceError, OSError, ValueError) as e:
                print(f"encode_images.py: error: {e}", file=sys.stderr)
                return 2
    except Interrupted as stop:
        print(f"encode_images.py: {stop}; what was encoded is kept: the same command resumes", file=sys.stderr)
        return stop.exit_status


def _run(args: argparse.Namespace) -> int:
    from megatron_unix.distributed import init_process_group, launched_world
    from megatron_unix.image import sources
    from megatron_unix.image.encode import Filters, encode_images
    from megatron_unix.image.ranks import batches, rank_block
    from megatron_unix.image.vqgan import VQGAN
    from megatron_unix.inference.loading import device_of

    if args.merge:
        return _merge(args)
    world = launched_world()
    if world.size > 1:
        # gloo even on GPUs: the ranks only exchange how they ended, without NCCL's communicators
        init_process_group(args.distributed_timeout_minutes, backend="gloo")
    model = VQGAN.load(args.vqgan, args.vqgan_config, args.vqgan_checkpoint, device_of(args.device))
    tok = _tokenizer(args, model) if args.output_prefix else None  # fail early
    filters = Filters(model.image_size, args.min_size, args.max_aspect)
    options = _source_options(args)
    shards = sources.shards(args.input, options) if args.input else [sources.FolderShard(args.image_dir, options)]
    mine = rank_block(shards, world.rank, world.size)
    settings = _settings(args, model.image_size)
    if world.size > 1:
        return _run_rank(args, world, shards, model, filters, settings, tok)
    summary = encode_images(
        lambda skip: batches(mine, skip, args.batch_size),
        args.output,
        model,
        filters,
        settings,
        args.workers,
        args.strict,
        log_interval=args.log_interval,
    )
    print(summary.report())
    print(f"output          {args.output}")
    if tok:
        print(_build_dataset(args, tok, args.output, args.output_prefix).report())
        print(f"dataset         {args.output_prefix}")
    return 0


def _run_rank(args: argparse.Namespace, world, shards: list, model, filters, settings: dict, tok) -> int:
    """This rank's block of shards into its own output (and dataset); then rank 0 joins them all, unless
    a rank failed: the others' outputs are kept finished, and the job run again resumes the failed."""
    import torch.distributed as dist

    from megatron_unix.image import ranks
    from megatron_unix.image.encode import EncodeError, encode_images
    from megatron_unix.image.sources import SourceError

    log = _Prefixed(sys.stderr, f"[rank {world.rank}/{world.size}] ")
    mine = ranks.rank_block(shards, world.rank, world.size)
    part = ranks.rank_output(args.output, world.rank, world.size)
    counts = ranks.shard_counts(len(shards), world.size)
    total = ranks.TotalProgress(args.output, world.size, counts, args.total_log_interval, sys.stderr)
    with total if world.rank == 0 else nullcontext():
        error = None
        try:
            if args.output.exists():
                raise EncodeError(f"{args.output} exists already (a finished run): remove it to encode again")
            ranks.refuse_other_jobs(args.output, world.size)
            if ranks.finished(part):
                print(f"{part}: finished by an earlier run", file=log)
            else:
                summary = encode_images(
                    lambda skip: ranks.batches(mine, skip, args.batch_size),
                    part,
                    model,
                    filters,
                    {**settings, "rank": world.rank, "world": world.size, "shards": [s.name for s in mine]},
                    args.workers,
                    args.strict,
                    log,
                    args.log_interval,
                    rank_output=True,
                )
                print(f"{len(mine)} shards, {summary.report().splitlines()[0]}", file=log)
            if tok and ranks.read_record(part)["encoded"]:
                _build_dataset(args, tok, part, ranks.rank_prefix(args.output_prefix, world.rank, world.size), log)
        except (SourceError, OSError, ValueError) as e:
            error = str(e)
            print(f"error: {e}", file=log)
        errors = [None] * world.size
        dist.all_gather_object(errors, error)
    if world.rank:
        return 2 if error else 0
    if failed := [f"rank {rank}" for rank, e in enumerate(errors) if e]:
        raise EncodeError(
            f"{', '.join(failed)} of {world.size} failed (above); the others' outputs are kept: "
            f"run the job again once fixed (finished ranks are not encoded again, the rest resume)"
        )
    _join(args, world.size, tok)
    return 0


def _merge(args: argparse.Namespace) -> int:
    """``--merge``: join what a job's ranks left (all finished), e.g. after the job was killed at the end."""
    from megatron_unix.image.ranks import world_of_leftovers
    from megatron_unix.image.vqgan import VQGAN

    world = world_of_leftovers(args.output)
    tok = None
    if args.output_prefix:
        tok = _tokenizer(args, VQGAN.load(args.vqgan, args.vqgan_config, args.vqgan_checkpoint, "cpu"))
    _join(args, world, tok)
    return 0


def _join(args: argparse.Namespace, world: int, tok) -> None:
    """The ranks' datasets merged (those not tokenized yet are, first) and their outputs joined, in rank
    order; then their files are removed."""
    from megatron_unix.data.indexed import VOCABULARY_SUFFIX, output_files
    from megatron_unix.data.preprocess import merge
    from megatron_unix.image import ranks

    summary = ranks.joinable(args.output, world)
    if tok:
        prefixes = []
        for rank in range(world):
            part, prefix = (
                ranks.rank_output(args.output, rank, world),
                ranks.rank_prefix(args.output_prefix, rank, world),
            )
            if ranks.read_record(part)["encoded"]:
                if not all(path.is_file() for path in output_files(prefix)):
                    _build_dataset(args, tok, part, prefix, sys.stderr)
                prefixes.append(prefix)
        docs = merge(prefixes, args.output_prefix)
        tokens, vision = int(docs.lengths.sum()), int(docs.vision_tokens.sum())
        print(
            f"documents       {len(docs):,}, {tokens:,} tokens ({vision:,} vision), merged from {len(prefixes)} ranks"
        )
        print(f"dataset         {args.output_prefix}")
        for prefix in prefixes:
            for path in [*output_files(prefix), Path(prefix + VOCABULARY_SUFFIX)]:
                path.unlink(missing_ok=True)
    ranks.concatenate(args.output, world)
    ranks.remove_rank_files(args.output, world)
    print(summary.report())
    print(f"output          {args.output} (joined from {world} ranks)")


class _Prefixed(io.TextIOBase):
    """A text stream that starts every line with ``prefix`` (a rank's log)."""

    def __init__(self, stream: IO[str], prefix: str) -> None:
        self.stream, self.prefix, self.fresh = stream, prefix, True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            self.stream.write(self.prefix + piece if self.fresh else piece)
            self.fresh = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


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


def _build_dataset(args: argparse.Namespace, tok, jsonl: Path, prefix: str, log: IO[str] | None = None):
    """``jsonl`` tokenized by the preprocessing library, as preprocess_data.py would with the same flags."""
    from megatron_unix.data.preprocess import PreprocessError, preprocess
    from megatron_unix.image.encode import EncodeError

    try:
        return preprocess([jsonl], prefix, tok, build_line_format(args), max(1, args.workers), log=log)
    except PreprocessError as e:
        raise EncodeError(f"--output-prefix {prefix}: {e}") from e


if __name__ == "__main__":
    sys.exit(main())
