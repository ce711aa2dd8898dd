"""Write a RANDOM, UNTRAINED tiny VQGAN folder for trying the image programs without Chameleon's release.

    python tools/make_tiny_vqgan.py --output tiny-vqgan          # 8192 codes, 32x32 per 64-pixel image
    python tools/generate.py --load quickstart-output/checkpoints --mode t2i --prompt "a red square" \\
        --vqgan tiny-vqgan --output-dir t2i/

Its codes mean nothing (images decode to noise, and encode to arbitrary codes), so it only shows that
the pipeline runs: encode_images, t2i, i2t and the understanding/generation evaluations take it as
``--vqgan DIR``. The defaults fit the quickstart's model (an 8192-entry codebook, 1024 codes per image).
The folder says what it is (``config.json``'s ``untrained`` note, ``README.md``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_unix.cli import refuse_out_of_range


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.epilog = "\n".join(__doc__.splitlines()[2:])
    p.add_argument("--output", type=Path, required=True, help="the folder to write (config.json, model.safetensors)")
    p.add_argument("--codebook-size", type=int, default=8192, help="codes (the model's vision vocabulary)")
    p.add_argument("--grid", type=int, default=32, help="codes per image side (an image is 2 x grid pixels wide)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    refuse_out_of_range(p, args, (("--codebook-size", args.codebook_size >= 1), ("--grid", args.grid >= 1)))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_unix.image.random_vqgan import NOTE, save_random_vqgan

    if args.output.exists() and any(args.output.iterdir()):
        print(f"make_tiny_vqgan.py: error: --output {args.output} is not empty", file=sys.stderr)
        return 2
    try:
        model = save_random_vqgan(args.output, args.codebook_size, args.grid, args.seed)
    except OSError as error:
        print(f"make_tiny_vqgan.py: error: {error}", file=sys.stderr)
        return 2
    print(
        f"{NOTE}\nwrote {args.output}: {model.config.n_embed} codes, {model.codes_per_image} per {model.image_size}-pixel image"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
