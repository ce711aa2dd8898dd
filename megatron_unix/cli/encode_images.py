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
import io
import sys
from contextlib import nullcontext
from functools import partial
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
    source.add_argument("--input", nargs="+", metavar="FILE_OR_GLOB", help=".jsonl or .jsonl.gz files, in order")
    source.add_argument("--image-dir", type=Path, help="a folder of images (recursively), captions in same-stem .txt")
    source.add_argument(
        "--merge",
        action="store_true",
        help="only join the outputs (and datasets) that a job's ranks finished, e.g. after it was killed at the end",
    )
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
            from megatron_unix.image.encode import EncodeError

            try:
                return _run(args)
            except (EncodeError, OSError, ValueError) as e:
                print(f"encode_images.py: error: {e}", file=sys.stderr)
                return 2
    except Interrupted as stop:
        print(f"encode_images.py: {stop}; what was encoded is kept: the same command resumes", file=sys.stderr)
        return stop.exit_status


def _run(args: argparse.Namespace) -> int:
    from megatron_unix.distributed import init_process_group, launched_world
    from megatron_unix.files import expand_inputs
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
    inputs = expand_inputs(args.input) if args.input else []
    shards = _input_shards(args, inputs)
    mine = rank_block(shards, world.rank, world.size)
    settings = _settings(args, inputs, model.image_size)
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


class _Shard:
    """A jsonl file or the image folder, as one shard."""

    def __init__(self, name: str, items) -> None:
        self.name, self._items = name, items

    def items(self, skip: int = 0):
        return self._items(skip=skip)

    def count(self) -> int:
        return sum(1 for _ in self._items())


def _input_shards(args: argparse.Namespace, inputs: list[Path]) -> list:
    from megatron_unix.image.encode import folder_items, jsonl_items

    if args.image_dir:
        return [_Shard(str(args.image_dir), partial(folder_items, args.image_dir, "caption"))]
    keys = (args.image_key, args.base64_key, args.image_root)
    return [_Shard(str(path), partial(jsonl_items, [path], *keys)) for path in inputs]


def _run_rank(args: argparse.Namespace, world, shards: list, model, filters, settings: dict, tok) -> int:
    """This rank's block of shards into its own output (and dataset); then rank 0 joins them all, unless
    a rank failed: the others' outputs are kept finished, and the job run again resumes the failed."""
    import torch.distributed as dist

    from megatron_unix.image import ranks
    from megatron_unix.image.encode import EncodeError, encode_images

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
        except (EncodeError, OSError, ValueError) as e:
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
