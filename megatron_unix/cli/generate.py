"""Generate text, images (text-to-image with classifier-free guidance) or captions with a Uni-X model.

    python tools/generate.py --hf hf/unix-1.5b --mode t2i --prompt "a red bicycle" --samples-per-prompt 4 \\
        --vqgan-config tokenizer/vqgan.yaml --vqgan-checkpoint tokenizer/vqgan.ckpt --output-dir out/
    python tools/generate.py --load ckpt/unix-1.5b --mode text --prompt "The capital of France is"
    python tools/generate.py --hf hf/unix-1.5b --mode i2t --image cat.png --vqgan vqgan/ [--prompt QUESTION]

t2i follows spec §6: ``[caption + " Generate an image based on this description." + BOI; "<unconditional>"
+ BOI]``, guidance on raw logits, then VQ ids only, temperature, top-k, top-p; exactly
--codes-per-image codes (separators forced where config.json says), then EOI. It writes one PNG per
sample, grid.png (a row per prompt) and samples.jsonl (prompt, sample, seed, codes), each file whole or
not at all; samples.jsonl is rewritten after every batch and lists the images written so far. Sample i of
prompt p draws from its own seed (derived from --seed, p, i), so it does not depend on
--batch-size. text and i2t print their results (and write samples.jsonl with --output-dir).
On a GPU the model runs in bf16, on CPU in fp32. Exit status: 0 ok, 2 refused (a flag or file, named).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from megatron_unix.cli import (
    MODEL_PATHS,
    add_model_arguments,
    add_vqgan_arguments,
    missing_flag_path,
    not_a_folder,
    out_of_range,
    sampling_checks,
    stops_in_one_line,
    vqgan_flags_error,
)

if TYPE_CHECKING:
    from megatron_unix.inference.loading import LoadedModel
    from megatron_unix.inference.sampling import SamplingParams

MODES = ("text", "t2i", "i2t")
T2I_SAMPLING = dict(temperature=0.99, top_k=4096, top_p=0.96)
"""Spec §6 reference defaults for images; text and captions default to plain sampling (1.0, off, off)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--mode", choices=MODES, default="text")
    parser.add_argument("--prompt", action="append", default=[], help="repeatable; i2t: the question (one)")
    parser.add_argument("--prompts-file", type=Path, help="one prompt per line (.txt), or .jsonl with a 'prompt' key")
    parser.add_argument("--image", action="append", default=[], type=Path, help="i2t: image file (repeatable)")
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward batch (t2i: x2 rows for CFG)")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="t2i guidance scale s (spec §6)")
    parser.add_argument("--temperature", type=float, default=None, help="default: t2i 0.99, else 1.0")
    parser.add_argument("--top-k", type=int, default=None, help="0: off; default: t2i 4096, else 0")
    parser.add_argument("--top-p", type=float, default=None, help="1: off; default: t2i 0.96, else 1.0")
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="text and i2t")
    parser.add_argument("--codes-per-image", type=int, default=None, help="default: the VQGAN's, else 1024")
    add_vqgan_arguments(parser)
    parser.add_argument("--output-dir", type=Path, help="t2i: required; text/i2t: writes samples.jsonl")
    return parser


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file is None:
        return prompts
    try:
        lines = [line.strip() for line in args.prompts_file.read_text().splitlines()]
    except OSError as error:
        raise ValueError(f"--prompts-file {args.prompts_file}: {error.strerror}") from None
    if args.prompts_file.suffix != ".jsonl":
        return prompts + [line for line in lines if line]
    for number, line in enumerate(lines, 1):
        if line:
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f"--prompts-file {args.prompts_file}:{number}: not a JSON object with 'prompt'"
                ) from None
    return prompts


def check(args: argparse.Namespace, prompts: list[str]) -> None:
    """Everything that can be refused before a model is loaded, naming the flag or file."""
    message = out_of_range(
        args,
        (
            ("--samples-per-prompt", args.samples_per_prompt >= 1),
            ("--batch-size", args.batch_size >= 1),
            ("--max-new-tokens", args.max_new_tokens >= 1),
            ("--codes-per-image", args.codes_per_image is None or args.codes_per_image >= 1),
            *sampling_checks(args),
        ),
    )
    if message:
        raise ValueError(message)
    paths = (*MODEL_PATHS, "--image")
    if message := missing_flag_path(args, paths) or vqgan_flags_error(args, required=False):
        raise ValueError(message)
    if message := not_a_folder("--output-dir", args.output_dir):
        raise ValueError(message)
    if args.mode == "i2t":
        if not args.image:
            raise ValueError("--mode i2t needs --image")
        if not (args.vqgan or args.vqgan_config):
            raise ValueError("--mode i2t needs a VQGAN: --vqgan or --vqgan-config/--vqgan-checkpoint")
        if len(prompts) > 1:
            raise ValueError("--mode i2t takes one --prompt (the question)")
    elif not prompts and args.prompts_file is not None:
        raise ValueError(f"--prompts-file {args.prompts_file}: no prompt in it")
    elif not prompts:
        raise ValueError(f"--mode {args.mode} needs --prompt or --prompts-file")
    elif args.image:
        raise ValueError(f"--image is for --mode i2t, not {args.mode}")
    if args.mode == "t2i" and args.output_dir is None:
        raise ValueError("--mode t2i needs --output-dir")


class Progress:
    """Token positions of one batch: tqdm on a terminal; elsewhere (batch-job logs) ten plain lines."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        from tqdm import tqdm

        from megatron_unix.progress import Clock

        stream = stream or sys.stderr  # at call time: a default bound at import keeps a stream later closed
        self.bar = tqdm(total=total, desc=label, unit="tok", file=stream) if stream.isatty() else None
        self.total, self.label, self.stream = total, label, stream
        self.done, self.clock = 0, Clock()

    def step(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()
        elif self.done * 10 // self.total > (self.done - 1) * 10 // self.total:  # each tenth
            print(
                f"[generate] {self.label}: {self.done}/{self.total} tokens, {self.clock.rate(self.done):.1f}/s",
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class Item:
    """Sample ``sample`` of prompt ``index``, with its own seed."""

    index: int
    prompt: str
    sample: int
    seed: int

    def record(self, **result: Any) -> dict[str, Any]:
        """A samples.jsonl line."""
        return dict(prompt=self.prompt, prompt_index=self.index, sample=self.sample, seed=self.seed, **result)


def items(prompts: Sequence[str], samples: int, seed: int) -> list[Item]:
    from megatron_unix.inference.sampling import derived_seed

    return [Item(p, text, i, derived_seed(seed, p, i)) for p, text in enumerate(prompts) for i in range(samples)]


def batches(all_items: list[Item], size: int) -> Iterator[tuple[str, list[Item]]]:
    count = -(-len(all_items) // size)
    for b in range(count):
        yield f"batch {b + 1}/{count}", all_items[b * size : (b + 1) * size]


def sampling(args: argparse.Namespace) -> SamplingParams:
    from megatron_unix.inference.sampling import SamplingParams

    defaults = T2I_SAMPLING if args.mode == "t2i" else dict(temperature=1.0, top_k=0, top_p=1.0)
    given = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return SamplingParams(greedy=args.greedy, **{k: defaults[k] if v is None else v for k, v in given.items()})


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """samples.jsonl, whole (rewritten after each t2i batch: it lists exactly the images written)."""
    from megatron_unix.files import write_text_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in records))


def save_png(image: Any, path: Path) -> None:
    """A PNG written whole or not at all (a full disk leaves no truncated image)."""
    from megatron_unix.files import write_atomically

    write_atomically(path, lambda temporary: image.save(temporary, format="PNG"))


def run_t2i(
    args: argparse.Namespace, loaded: LoadedModel, vqgan: Any, prompts: list[str], params: SamplingParams
) -> list[dict[str, Any]]:
    from megatron_unix.inference import generate
    from megatron_unix.inference.images import decode_codes, image_grid

    codes_per_image = args.codes_per_image or (vqgan.codes_per_image if vqgan else 1024)
    if vqgan is not None and codes_per_image != vqgan.codes_per_image:
        raise ValueError(f"--codes-per-image {codes_per_image}: the VQGAN decodes {vqgan.codes_per_image}")
    if vqgan is None:
        print("[generate] no VQGAN given: codes only (samples.jsonl), no PNG", file=sys.stderr)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tok, layout = loaded.tokenizer, loaded.layout
    unconditional = generate.unconditional_prompt(tok, layout)
    contexts = [generate.t2i_prompt(tok, layout, prompt) for prompt in prompts]
    records, pictures = [], []
    for label, batch in batches(items(prompts, args.samples_per_prompt, args.seed), args.batch_size):
        progress = Progress(len(layout.image_schedule(codes_per_image)), label)
        tokens = generate.generate_images(
            loaded.model,
            layout,
            [contexts[item.index] for item in batch],
            unconditional,
            params,
            [item.seed for item in batch],
            cfg_scale=args.cfg_scale,
            codes_per_image=codes_per_image,
            on_step=progress.step,
        )
        progress.close()
        codes = [layout.codes(t) for t in tokens]
        images = decode_codes(vqgan, codes) if vqgan is not None else [None] * len(batch)
        for item, item_codes, image in zip(batch, codes, images):
            file = {}
            if image is not None:
                file["image"] = f"{item.index:04d}_{item.sample:02d}.png"
                save_png(image, args.output_dir / file["image"])
                pictures.append(image)
            records.append(item.record(**file, codes=item_codes))
        write_jsonl(args.output_dir / "samples.jsonl", records)
    if pictures:
        save_png(image_grid(pictures, args.samples_per_prompt), args.output_dir / "grid.png")
    return records


def run_text(
    args: argparse.Namespace, loaded: LoadedModel, contexts: list[list[int]], labels: list[str], params: SamplingParams
) -> list[dict[str, Any]]:
    """text and i2t: ``contexts[p]`` is the token prompt of ``labels[p]``."""
    from megatron_unix.inference import generate

    records = []
    for label, batch in batches(items(labels, args.samples_per_prompt, args.seed), args.batch_size):
        progress = Progress(args.max_new_tokens, label)
        answers = generate.generate_text(
            loaded.model,
            loaded.layout,
            [contexts[item.index] for item in batch],
            params,
            [item.seed for item in batch],
            args.max_new_tokens,
            on_step=progress.step,
        )
        progress.close()
        for item, answer in zip(batch, answers):
            text = loaded.tokenizer.decode(answer)
            print(f"[{item.index}.{item.sample}] {item.prompt}\n{text}\n", flush=True)
            records.append(item.record(text=text, tokens=answer))
    return records


def generate_all(args: argparse.Namespace, prompts: list[str]) -> list[dict[str, Any]]:

    from megatron_unix.image.vqgan import VQGAN
    from megatron_unix.inference import generate
    from megatron_unix.inference.images import check_codebook, encode_files
    from megatron_unix.inference.loading import device_of, load_model

    params = sampling(args)
    device = device_of(args.device)
    vqgan = None
    if args.vqgan or args.vqgan_config:
        vqgan = VQGAN.load(args.vqgan, args.vqgan_config, args.vqgan_checkpoint, device)
    codes = encode_files(vqgan, args.image, args.batch_size) if args.mode == "i2t" else []  # bad files refused early
    loaded = load_model(args, device)
    if vqgan is not None:
        check_codebook(vqgan, loaded.layout.codebook_size)
    if args.mode == "t2i":
        return run_t2i(args, loaded, vqgan, prompts, params)
    if args.mode == "text":
        return run_text(args, loaded, [loaded.tokenizer.encode(p) for p in prompts], prompts, params)
    question = prompts[0] if prompts else generate.I2T_QUESTION
    contexts = [generate.i2t_prompt(loaded.tokenizer, loaded.layout, c, question) for c in codes]
    return run_text(args, loaded, contexts, [f"{path}: {question}" for path in args.image], params)


def kept(args: argparse.Namespace) -> str:
    """What a stop leaves: t2i's finished batches (images and samples.jsonl are rewritten whole after each)."""
    if args.mode == "t2i":
        return f"{args.output_dir / 'samples.jsonl'} lists the images of the finished batches, each file whole"
    return "the samples printed above are whole; no samples.jsonl written"


@stops_in_one_line("generate", lambda argv: build_parser().parse_args(argv), kept)
def main(args: argparse.Namespace) -> int:
    try:
        prompts = read_prompts(args)
        check(args, prompts)
        records = generate_all(args, prompts)
        if args.output_dir is not None:
            write_jsonl(args.output_dir / "samples.jsonl", records)
            print(f"[generate] {len(records)} samples: {args.output_dir / 'samples.jsonl'}", file=sys.stderr)
    except (ValueError, OSError) as error:
        print(f"generate: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
