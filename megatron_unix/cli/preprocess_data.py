"""Tokenize jsonl(.gz) into a Uni-X dataset (PREFIX.bin/.idx plus PREFIX_* companions), or merge datasets.

    python tools/preprocess_data.py --input 'data/*.jsonl.gz' --output-prefix data/mix \\
        --tokenizer-model Qwen2.5-1.5B --workers 16
    python tools/preprocess_data.py --merge-prefixes data/shard0 data/shard1 --output-prefix data/all

One line is one sample: {"text": ...}; an image-text pair ("caption" or "text", and "vqcode" or
"vqcode_512": a list of ints or a JSON string of one); or an SFT conversation ("conversations" in
LLaVA's form or chat "messages") with the image's codes. Flag names follow Megatron-LM's
preprocess_data.py. Text samples get no EOS unless --append-eod (the reference appends none). Other
keys (id, url, ...) are ignored, but a line with an unknown key that holds what looks like image codes
is bad (skipped, counted), never a text-only sample. Progress goes to stderr,
the summary to stdout; any failure (bad input or settings, no sample at all, --strict at a bad line)
exits 2 with a message and leaves no output files, and the partial files of killed earlier runs for
the prefix are removed.
"""

from __future__ import annotations

import argparse
import inspect
import sys

from megatron_unix.cli import os_error_message, refuse_out_of_range, stops_in_one_line
from megatron_unix.data.jsonl_schema import LineFormat
from megatron_unix.data.tokenizer import MultimodalTokenizer

TOKENIZER_DEFAULTS = {name: p.default for name, p in inspect.signature(MultimodalTokenizer).parameters.items()}


def add_tokenizer_arguments(p: argparse.ArgumentParser, model_help: str) -> None:
    """The tokenizer's flags (``encode_images.py --output-prefix`` takes them too)."""
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-model", help=model_help)
    g.add_argument("--vq-codebook-size", type=int, default=TOKENIZER_DEFAULTS["codebook_size"])
    g.add_argument("--vq-offset", type=int, default=None, help="id of VQ code 0; None: the text tokenizer's length")
    for name in ("boi", "eoi", "eos", "separator"):
        g.add_argument(
            f"--{name}",
            default=TOKENIZER_DEFAULTS[name],
            help=f"{name.upper()} token name" + (" (default: none)" if name == "separator" else ""),
        )


def add_layout_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the input keys and of the layouts, which :func:`build_line_format` reads."""
    fmt = LineFormat()
    g = p.add_argument_group("input keys (the first key a line has is used)")
    g.add_argument("--text-key", nargs="+", default=list(fmt.text_keys), help="text of a text sample")
    g.add_argument("--caption-key", nargs="+", default=list(fmt.caption_keys), help="text of an image-text pair")
    g.add_argument("--vqcode-key", nargs="+", default=list(fmt.vqcode_keys), help="the image's VQ codes")
    g.add_argument("--conversation-key", nargs="+", default=list(fmt.conversation_keys), help="SFT turns")
    g.add_argument(
        "--metadata-key",
        nargs="+",
        default=list(fmt.metadata_keys),
        help="keys to ignore although they hold a list of integers; other unknown keys are ignored, "
        "but one holding an image's worth of integers makes the line bad",
    )

    g = p.add_argument_group("layouts (spec §3)")
    g.add_argument("--image-tokens", type=int, default=fmt.image_tokens, help="VQ codes per image")
    g.add_argument("--t2i-ratio", type=float, default=fmt.t2i_ratio, help="share of pairs laid out as T2I (else I2T)")
    g.add_argument("--seed", type=int, default=fmt.seed, help="with each line's bytes, seeds its random choices")
    g.add_argument("--no-ignore-instruction", action="store_true", help="train on the conditioning tokens too")
    g.add_argument("--append-eod", action="store_true", help="append EOS to text samples (Megatron's convention)")
    g.add_argument("--sft-turn-newlines", type=int, default=fmt.sft_newlines, help="newlines before each SFT turn")


def layout_checks(args: argparse.Namespace) -> tuple[tuple[str, bool], ...]:
    """The range checks of :func:`add_layout_arguments`'s flags, for ``refuse_out_of_range`` (an
    ``--image-tokens`` of None is a default that the caller fills in)."""
    return (
        ("--image-tokens", args.image_tokens is None or args.image_tokens >= 1),
        ("--t2i-ratio", 0 <= args.t2i_ratio <= 1),
        ("--sft-turn-newlines", args.sft_turn_newlines >= 0),
    )


def build_tokenizer(args: argparse.Namespace) -> MultimodalTokenizer:
    """The tokenizer of :func:`add_tokenizer_arguments`'s flags."""
    return MultimodalTokenizer.from_pretrained(
        args.tokenizer_model,
        codebook_size=args.vq_codebook_size,
        boi=args.boi,
        eoi=args.eoi,
        eos=args.eos,
        separator=args.separator or None,
        vq_offset=args.vq_offset,
    )


def build_line_format(args: argparse.Namespace) -> LineFormat:
    """The line format of :func:`add_layout_arguments`'s flags."""
    return LineFormat(
        tuple(args.text_key),
        tuple(args.caption_key),
        tuple(args.vqcode_key),
        tuple(args.conversation_key),
        tuple(args.metadata_key),
        args.image_tokens,
        args.t2i_ratio,
        args.seed,
        not args.no_ignore_instruction,
        args.append_eod,
        args.sft_turn_newlines,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE_OR_GLOB", help=".jsonl or .jsonl.gz files, in order")
    source.add_argument("--merge-prefixes", nargs="+", metavar="PREFIX", help="concatenate these datasets instead")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (one thread each)")
    p.add_argument("--strict", action="store_true", help="the first bad line is fatal (else: skipped, counted)")
    p.add_argument("--log-interval", type=int, default=10000, help="documents between progress lines")

    add_tokenizer_arguments(p, "HF tokenizer directory or SentencePiece .model (needed with --input)")
    add_layout_arguments(p)

    args = p.parse_args(argv)
    if args.input and not args.tokenizer_model:
        p.error("--input needs --tokenizer-model")
    refuse_out_of_range(
        p,
        args,
        (
            ("--workers", args.workers >= 1),
            ("--log-interval", args.log_interval >= 1),
            *layout_checks(args),
        ),
    )
    return args


@stops_in_one_line("preprocess_data.py", parse_args, lambda args: "nothing written")
def main(args: argparse.Namespace) -> int:
    """Preprocess or merge (the workers leave a stop to this process: the pool is ended on the way out)."""
    from megatron_unix.data.preprocess import PreprocessError, merge, preprocess  # (a stop here: no name unbound)

    try:
        if args.merge_prefixes:
            docs = merge(args.merge_prefixes, args.output_prefix)
            print(
                f"merged {len(args.merge_prefixes)} datasets into {args.output_prefix}: {len(docs):,} documents, "
                f"{int(docs.lengths.sum()):,} tokens ({int(docs.vision_tokens.sum()):,} vision)"
            )
            return 0
        tok = build_tokenizer(args)
        fmt = build_line_format(args)
        summary = preprocess(args.input, args.output_prefix, tok, fmt, args.workers, args.strict, args.log_interval)
    except (PreprocessError, OSError, ValueError) as e:
        if isinstance(e, OSError):
            e = os_error_message(e, f"--output-prefix {args.output_prefix} (nothing written)")
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    print(summary.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
