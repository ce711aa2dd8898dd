#!/usr/bin/env python
"""The GPU check (issue 20): correctness, throughput, fit, generation and a profile of the stack on one
GPU, in one run that must work the first time on a machine lent for minutes; ``--smoke`` runs every step
on the CPU at tiny sizes (CI does: tests/test_gpu_check.py).

    python tools/gpu_check.py --out DIR                 # the GPU run (DIR defaults to $OUT)
    python tools/gpu_check.py --smoke --out DIR         # every step on the CPU, tiny sizes: minutes on 2 cores
    python tools/gpu_check.py --steps throughput fit_3b --work W   # rerun some steps (setup reused from W)

The lent machine (one H200; Python 3.12, torch 2.11, transformers 5.17; no megatron-core, Transformer
Engine, flash-attn, apex or wandb; no network) gets what it lacks from the git-ignored folder ``.whl/``,
filled here once (psutil is there already; add ``psutil`` to the download only where
``python3 -c "import psutil"`` fails):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \\
        -d .whl megatron-core==0.16.1     # megatron_core-0.16.1-cp312-cp312-manylinux_2_24_x86_64...whl, 2.6 MB

and the device tool's ``run`` with ``carry: [".whl"]``, ``timeout_s: 600`` and the command

    bash tools/gpu_check.sh --out $OUT

which does ``pip install --no-index --no-deps --target /tmp/site .whl/*.whl`` when megatron-core is absent,
sets ``PYTHONPATH=/tmp/site:$PWD`` (the project itself travels as the working tree) and runs this script.
What comes back in ``$OUT``: ``gpu_check.log`` (every command and its whole output), ``summary.json`` (per
step: status pass/fail/error, figures, checks with their bounds, seconds against the budget) and
``profile.txt`` (torch.profiler's top kernels of one 1.5B training step).

Steps, in the order they run (the most needed first: a run cut short by ``--time-limit`` keeps those),
with the budget printed before the run (seconds on one H200; estimates, nothing has run there yet):

  setup           40  environment (torch, GPU, transformers, megatron-core, varlen signature); the quickstart
                      data (tokenizer trained on examples/data, preprocessed); a tokenizer with Qwen2.5's ids
                      (151643 text ids, its 22 specials at 151643.., 271 reserved: 151936 entries, Qwen's
                      padded embedding) so that VQ codes start at 151936 and the vocabulary is 160128 as spec §8
                      measured, and synthetic packed data (text, images of 1024 codes, T2I, I2T, interleaved)
                      written with the production DatasetWriter and its _vocab.json (no
                      --allow-unrecorded-vocabulary anywhere)
  correctness     80  tiny preset, quickstart data, 20 iterations through pretrain_unix.py, bf16 +
                      --use-distributed-optimizer, from the weights of a CPU fp32 run (one iteration at --lr 0:
                      its loss is the reference, its checkpoint the shared init); save at 10, --load resume
  throughput     130  pretrain_unix.py, Qwen2.5-1.5B shape, vocab 160128, seq 8192, micro-batch 1, bf16,
                      distributed optimizer, 2 warm-up + 10 timed iterations each: Uni-X 9:5, shared
                      (--vision-encode-layers 0 --vision-decode-layers 0), HardMoE, MoT (--layer-variant)
  varlen_vs_sdpa  45  4 layers of the 1.5B shape, seq 8192, bf16, one model: logits, loss and every gradient
                      with the varlen backend against SDPA
  vqgan           40  VQGAN encoder (Chameleon's shape, 512 px): codes on the GPU (TF32 off, on) vs the CPU
  fit_3b          60  Uni-X 3B 12:6 at seq 8192 through pretrain_unix.py, 2 + 3 iterations (again with
                      --recompute-granularity full if it runs out of memory): memory and tokens/s
  profile         45  one Uni-X 1.5B training step (the Trainer's own, after 2 warm-up steps) under
                      torch.profiler: the top kernels into profile.txt
  generation      90  T2I with CFG, KV cache, 1024 codes, random 1.5B Uni-X in bf16, batch 1, 8, 32;
                      the VQGAN (512 px, fp32) encode and decode images/s

The budgets add up to 530 s (under the device tool's 600 s per command); ``--time-limit`` (default 570 s)
starts no step after it, and summary.json is rewritten after every step, so a run cut short still says
what it measured. Each step runs in its own process: a crash or an out-of-memory in one leaves the others,
and every peak-memory figure is that step's alone.

Bounds (only on a GPU; ``--smoke`` checks that every step ran and that CPU-vs-CPU figures agree).
Hard (a miss fails the step and the exit status): first-iteration loss bf16 vs fp32 within 1% (bf16
rounds weights and activations to 8 bits of mantissa: ~0.4% per operation, averaging out over the
sum); the loss falls (mean of the last 3 iterations at least 1 nat below the first); the resumed
run's next loss equals the uninterrupted one's within 1e-4 relative; varlen vs SDPA: logits cosine >=
0.999, argmax agreement >= 0.80 (random weights have near-ties), loss within 1%, whole-gradient cosine
>= 0.99 and every tensor's >= 0.90; VQGAN codes GPU (TF32 off) vs CPU >= 99% equal; Uni-X 1.5B 9:5
>= 31.1k tokens/s (the floor: HF transformers Qwen3 at this shape); the 3B run completes. Goals
(reported, never failing): MFU >= 45%, Uni-X >= 1.00x shared, the paper's ratios to shared (Uni-X
0.952, HardMoE 0.895, MoT 0.773), VQGAN encode >= 500 images/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("setup", "correctness", "throughput", "varlen_vs_sdpa", "vqgan", "fit_3b", "profile", "generation")
QWEN25_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
"""Qwen2.5's specials in id order from 151643 (after its 151643 BPE ids)."""
PAPER_RATIOS = {"unix": 0.952, "hardmoe": 0.895, "mot": 0.773}
"""Throughput relative to the shared model, the paper's 1.5B ablation (spec §8)."""
FLOOR_TOKENS_PER_S = 31_100
"""HF transformers Qwen3 at the 1.5B shape, vocab 160128, seq 8192 on one H200 (spec §8)."""
GOAL_MFU = 0.45
GOAL_VQGAN_ENCODE = 500.0
VARIANTS = {
    "unix": [],
    "shared": ["--vision-encode-layers", "0", "--vision-decode-layers", "0"],
    "hardmoe": ["--layer-variant", "hardmoe"],
    "mot": ["--layer-variant", "mot"],
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and ``--smoke``."""

    text_words: int  # ordinary ids of the synthetic tokenizer, below Qwen's 22 specials
    reserved: int  # reserved specials after them (Qwen's padded embedding rows)
    image_codes: int
    doc_text: tuple[int, int]  # text tokens per synthetic document
    data_tokens: int
    train_model: str  # --model-preset of throughput, varlen and profile
    fit_model: str
    seq: int
    warmup: int
    timed: int
    fit_timed: int
    correctness_iters: int
    correctness_gbs: int
    vqgan_resolution: int
    vqgan_images: int
    vqgan_bench_batch: int
    gen_preset: str  # tools/bench_generate.py's
    gen_batches: tuple[int, ...]
    gen_codes: int
    budgets: dict[str, int]

    @property
    def vq_offset(self) -> int:
        return self.text_words + len(QWEN25_SPECIALS) + self.reserved


FULL = Sizes(
    text_words=151643,
    reserved=271,
    image_codes=1024,
    doc_text=(50, 1500),
    data_tokens=400_000,
    train_model="unix-1.5b",
    fit_model="unix-3b",
    seq=8192,
    warmup=2,
    timed=10,
    fit_timed=3,
    correctness_iters=20,
    correctness_gbs=4,
    vqgan_resolution=512,
    vqgan_images=4,
    vqgan_bench_batch=16,
    gen_preset="unix-1.5b",
    gen_batches=(1, 8, 32),
    gen_codes=1024,
    budgets=dict(
        setup=40, correctness=80, throughput=130, varlen_vs_sdpa=45, vqgan=40, fit_3b=60, profile=45, generation=90
    ),
)
SMOKE = Sizes(
    text_words=500,
    reserved=3,
    image_codes=16,
    doc_text=(5, 40),
    data_tokens=20_000,
    train_model="tiny",
    fit_model="tiny",
    seq=128,
    warmup=1,
    timed=1,
    fit_timed=1,
    correctness_iters=4,
    correctness_gbs=2,
    vqgan_resolution=64,
    vqgan_images=2,
    vqgan_bench_batch=2,
    gen_preset="small",
    gen_batches=(1, 2),
    gen_codes=4,
    budgets=dict(
        setup=20, correctness=40, throughput=50, varlen_vs_sdpa=10, vqgan=10, fit_3b=15, profile=15, generation=15
    ),
)
CODEBOOK = 8192


class StepError(Exception):
    """A step could not produce its figures (a command failed, timed out, or wrote nothing)."""


# ---------------------------------------------------------------------------------------------- data


def layout_tokenizer(path: Path, words: int, reserved: int) -> None:
    """A tokenizer with Qwen2.5's id layout and no training: ``words`` ordinary tokens, then Qwen's 22
    specials (``<|endoftext|>`` = ``words``), then ``reserved`` specials; VQ codes follow (the offset is
    the tokenizer's length, spec §2). With 151643 words the specials sit at Qwen2.5's ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens([*QWEN25_SPECIALS, *(f"<|reserved_{i}|>" for i in range(reserved))])
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(
        path
    )


def synthetic_dataset(prefix: Path, tokenizer_dir: Path, sizes: Sizes, seed: int = 0) -> dict[str, Any]:
    """Random documents of every kind of spec §3 (text, image, T2I, I2T, interleaved), written as
    preprocessing writes them (tokens, loss-mask runs, vision counts, the vocabulary record)."""
    import numpy as np
    import torch

    from megatron_unix.data.indexed import DatasetWriter
    from megatron_unix.data.synthetic import KINDS, Layout, document
    from megatron_unix.data.tokenizer import MultimodalTokenizer
    from megatron_unix.data.vocabulary import vision_mask

    tok = MultimodalTokenizer.from_pretrained(tokenizer_dir, codebook_size=CODEBOOK)
    if tok.vq_offset != sizes.vq_offset:
        raise StepError(f"{tokenizer_dir} has {tok.vq_offset} entries, expected {sizes.vq_offset}")
    layout = Layout(tok.vq_offset, CODEBOOK, tok.boi_id, tok.eoi_id, tok.eos_id, image_codes=sizes.image_codes)
    g = torch.Generator().manual_seed(seed)
    total = documents = vision = 0
    with DatasetWriter(prefix, tok.model_config_fields()) as writer:
        while total < sizes.data_tokens:
            kind = KINDS[int(torch.randint(0, len(KINDS), (1,), generator=g))]
            text_len = int(torch.randint(sizes.doc_text[0], sizes.doc_text[1] + 1, (1,), generator=g))
            doc = document(kind, layout, g, text_len)
            count = int(vision_mask(np.asarray(doc), tok.vq_offset, tok.boi_id, tok.separator_ids).sum())
            writer.add(doc, [True] * len(doc), count)
            total, documents, vision = total + len(doc), documents + 1, vision + count
        writer.commit()
    return dict(
        documents=documents,
        tokens=total,
        vision_fraction=round(vision / total, 3),
        vq_offset=tok.vq_offset,
        vocab_size=tok.vocab_size,
        boi=tok.boi_id,
        eoi=tok.eoi_id,
        eos=tok.eos_id,
    )


def quickstart_data(folder: Path) -> None:
    """examples/quickstart_data.sh's tokenizer and datasets (the shipped text and image-text pairs)."""
    data = ROOT / "examples" / "data"
    commands = [
        ["tools/train_tokenizer.py", "--input", data / "text.jsonl", "--vocab-size", "1000", "--output", folder / "tokenizer"],
        ["tools/preprocess_data.py", "--input", data / "text.jsonl", "--output-prefix", folder / "data" / "text",
         "--tokenizer-model", folder / "tokenizer", "--append-eod", "--workers", "2"],
        ["tools/preprocess_data.py", "--input", data / "image_text.jsonl.gz", "--output-prefix",
         folder / "data" / "image_text", "--tokenizer-model", folder / "tokenizer", "--workers", "2"],
    ]  # fmt: skip
    for command in commands:
        proc = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, capture_output=True, text=True)
        print(proc.stdout + proc.stderr, flush=True)
        if proc.returncode:
            raise StepError(f"{command[0]} exited with {proc.returncode}")


# ------------------------------------------------------------------------------ steps in a child process


def child_setup(sizes: Sizes, work: Path, out: Path) -> dict[str, Any]:
    import platform as host

    import torch
    import transformers
    from megatron.core import package_info

    from megatron_unix import platform
    from megatron_unix.model.attention import _accepts_enable_gqa

    figures: dict[str, Any] = dict(
        python=host.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        megatron_core=package_info.__version__,
        cuda=torch.cuda.is_available(),
        accelerators_absent=platform.detect_accelerators().absent(),
    )
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures.update(device=props.name, device_memory_gib=round(props.total_memory / 2**30, 1))
        from torch.nn.attention.varlen import varlen_attn

        figures["varlen_takes_enable_gqa"] = _accepts_enable_gqa(varlen_attn)
    quickstart_data(work / "quickstart")
    layout_tokenizer(work / "tokenizer", sizes.text_words, sizes.reserved)
    figures["synthetic"] = synthetic_dataset(work / "synthetic", work / "tokenizer", sizes)
    (work / "setup.done").touch()
    return figures


def _set_backend(model, backend: str) -> None:
    from megatron_unix.model.attention import UniXCoreAttention

    for module in model.modules():
        if isinstance(module, UniXCoreAttention):
            module.backend_name = backend


def _cosine(a, b, chunk: int = 1 << 26) -> float:
    """Cosine of two tensors of any size, summed in fp64 a chunk at a time (the 1.5B logits are 1.3G values)."""
    a, b = a.flatten(), b.flatten()
    dot = aa = bb = 0.0
    for x, y in zip(a.split(chunk), b.split(chunk)):
        x, y = x.double(), y.double()
        dot, aa, bb = dot + (x * y).sum().item(), aa + (x * x).sum().item(), bb + (y * y).sum().item()
    return dot / (aa * bb) ** 0.5


def child_varlen_vs_sdpa(sizes: Sizes, work: Path, out: Path) -> dict[str, Any]:
    """One model (so one set of weights), its attention switched between backends: logits, loss and the
    gradient of every parameter. On the CPU (``--smoke``) varlen cannot run: SDPA against itself."""
    import torch

    from megatron_unix.training import distributed

    distributed.initialize(1, 1, seed=1)
    from megatron_unix.data.synthetic import Layout, make_batch, random_rows
    from megatron_unix.model import build_model, make_config
    from megatron_unix.model.forward import stream_forward
    from megatron_unix.training.arguments import MODEL_PRESETS

    cuda = torch.cuda.is_available()
    text = sizes.text_words
    ids = dict(vq_offset=sizes.vq_offset, vq_codebook_size=CODEBOOK, boi_id=text + 9, eoi_id=text + 10, eos_id=text)
    shape = dict(MODEL_PRESETS[sizes.train_model], num_layers=4, vision_encode_layers=1, vision_decode_layers=1)
    config = make_config(**shape, **ids, bf16=cuda, core_attention_backend="sdpa")
    model = build_model(config, sizes.vq_offset + CODEBOOK, sizes.seq).to("cuda" if cuda else "cpu")
    layout = Layout(sizes.vq_offset, CODEBOOK, ids["boi_id"], ids["eoi_id"], text, image_codes=sizes.image_codes)
    batch = make_batch(random_rows(1, 12, torch.Generator().manual_seed(0)), sizes.seq, layout, 0)
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
    mask = batch["loss_mask"].float()
    backends = ("sdpa", "varlen") if cuda else ("sdpa", "sdpa")
    found = []
    for backend in backends:
        _set_backend(model, backend)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            logits = stream_forward(model, batch)
        loss = (stream_forward(model, batch, batch["labels"]).float() * mask).sum() / mask.sum()
        loss.backward()
        grads = {n: p.grad.float().flatten() for n, p in model.named_parameters() if p.grad is not None}
        found.append((logits, loss.item(), grads))
    (la, loss_a, ga), (lb, loss_b, gb) = found
    per_tensor = {n: _cosine(ga[n], gb[n]) for n in ga}
    worst = min(per_tensor, key=per_tensor.get)
    return dict(
        backends=list(backends),
        shape=f"{sizes.train_model} with 4 layers (1:1), seq {sizes.seq}, {'bf16' if cuda else 'fp32'}",
        logits_cosine=_cosine(la, lb),
        logits_max_abs_diff=(la - lb).abs().max().item(),
        argmax_agreement=(la.argmax(-1) == lb.argmax(-1)).float().mean().item(),
        loss=[loss_a, loss_b],
        loss_rel_diff=abs(loss_a - loss_b) / abs(loss_a),
        grad_cosine=_cosine(torch.cat(list(ga.values())), torch.cat(list(gb.values()))),
        grad_tensors=len(per_tensor),
        grad_worst_tensor=worst,
        grad_worst_cosine=per_tensor[worst],
    )


def _smooth_images(count: int, resolution: int, seed: int):
    """Pixels in [-1, 1] with image-like structure (smooth colour fields), not white noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, max(2, resolution // 32), max(2, resolution // 32), generator=g)
    return (
        torch.nn.functional.interpolate(coarse, size=resolution, mode="bicubic", align_corners=False).clamp(0, 1) * 2
        - 1
    )


def child_vqgan(sizes: Sizes, work: Path, out: Path) -> dict[str, Any]:
    """Codes of the same images and weights on the GPU (TF32 off, then on) and on the CPU. The codebook is
    made of latents of other images (as a trained codebook lies among the latents), so nearest entries
    are as close as in real use and not trivially far apart as with random entries."""
    import torch

    from megatron_unix.image.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(resolution=sizes.vqgan_resolution))
    with torch.no_grad():
        latents = vqgan.latents(_smooth_images(sizes.vqgan_images, sizes.vqgan_resolution, 1))
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        picks = flat[torch.randint(0, len(flat), (CODEBOOK,))]
        vqgan.quantize.embedding.weight.copy_(picks + 0.05 * flat.std() * torch.randn_like(picks))
    pixels = _smooth_images(sizes.vqgan_images, sizes.vqgan_resolution, 2)
    cpu_codes = vqgan.encode(pixels)
    cuda = torch.cuda.is_available()
    figures: dict[str, Any] = dict(
        images=sizes.vqgan_images,
        resolution=sizes.vqgan_resolution,
        codes_per_image=vqgan.codes_per_image,
        distinct_codes=int(cpu_codes.unique().numel()),
        torch_defaults=dict(
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32
        ),
        compared="cuda vs cpu" if cuda else "cpu vs cpu",
    )
    if cuda:
        vqgan = vqgan.cuda()
        pixels = pixels.cuda()
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        codes = vqgan.encode(pixels).cpu()
        figures[f"equal_tf32_{'on' if tf32 else 'off'}"] = (codes == cpu_codes).float().mean().item()
    return figures


def child_generation(sizes: Sizes, work: Path, out: Path) -> dict[str, Any]:
    """tools/bench_generate.py's T2I and VQGAN measurements (KV cache only), on the GPU in bf16."""
    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    import bench_generate

    from megatron_unix.inference.loading import default_device

    device = default_device()
    shape = bench_generate.PRESETS[sizes.gen_preset]
    torch.manual_seed(0)
    figures: dict[str, Any] = dict(preset=sizes.gen_preset, codes_per_image=sizes.gen_codes, cfg_rows_per_image=2)
    with torch.inference_mode():
        model = bench_generate.random_model(shape, CODEBOOK, device)
        figures["parameters"] = sum(p.numel() for p in model.parameters())
        figures["dtype"] = str(next(model.parameters()).dtype)
        for batch in sizes.gen_batches:
            figures[f"t2i_tokens_per_s_batch_{batch}"] = bench_generate.t2i_tokens_per_second(
                model, shape["text_vocab"], CODEBOOK, batch, sizes.gen_codes
            )
            print(f"batch {batch}: {figures[f't2i_tokens_per_s_batch_{batch}']:.1f} tokens/s", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        encode, decode = bench_generate.vqgan_images_per_second(
            sizes.vqgan_resolution, sizes.vqgan_bench_batch, device, repeats=2
        )
    figures.update(
        vqgan_resolution=sizes.vqgan_resolution,
        vqgan_batch=sizes.vqgan_bench_batch,
        vqgan_encode_images_per_s=encode,
        vqgan_decode_images_per_s=decode,
    )
    return figures


def child_profile(sizes: Sizes, work: Path, out: Path) -> dict[str, Any]:
    """One training step of the Uni-X 1.5B throughput run (same flags), the Trainer's own ``train_step``,
    after two warm-up steps; the top kernels by their own device time (CPU time on the CPU)."""
    import torch

    from megatron_unix.training.arguments import parse_args
    from megatron_unix.training.trainer import build_trainer

    cuda = torch.cuda.is_available()
    trainer = build_trainer(parse_args(training_flags(sizes, work, "unix", sizes.train_model, 3, None)))

    def step() -> None:
        trainer.train_step([next(trainer.train_data) for _ in range(trainer.num_micro)])
        if cuda:
            torch.cuda.synchronize()

    step()
    step()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        step()
    averages = profiler.key_averages()
    # torch >= 2.4 names the GPU time "device"; older releases only "cuda"
    names = ("self_device_time_total", "self_cuda_time_total") if cuda else ("self_cpu_time_total",)
    key = next(name for name in names if hasattr(averages[0], name))
    table = averages.table(sort_by=key, row_limit=40, max_name_column_width=90)
    (out / "profile.txt").write_text(
        f"one training step: --model-preset {sizes.train_model}, seq {sizes.seq}, sorted by {key}\n{table}\n"
    )
    rows = sorted((e for e in averages if getattr(e, key) > 0), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in rows)
    return dict(
        sorted_by=key,
        step_ms=total / 1000,
        top=[dict(name=e.key[:120], share=round(getattr(e, key) / total, 4), calls=e.count) for e in rows[:10]],
    )


CHILD_STEPS: dict[str, Callable[[Sizes, Path, Path], dict[str, Any]]] = {
    "setup": child_setup,
    "varlen_vs_sdpa": child_varlen_vs_sdpa,
    "vqgan": child_vqgan,
    "generation": child_generation,
    "profile": child_profile,
}


# ------------------------------------------------------------------------------ the runs of pretrain_unix.py


def training_flags(
    sizes: Sizes, work: Path, variant: str, preset: str, iters: int, metrics: Path | None, recompute: bool = False
) -> list[str]:
    """pretrain_unix.py's flags for a throughput-style run on the synthetic data."""
    flags = [
        "--model-preset", preset, *VARIANTS[variant],
        "--tokenizer-model", str(work / "tokenizer"), "--vq-codebook-size", str(CODEBOOK),
        "--data-path", str(work / "synthetic"), "--split", "100,0,0", "--data-cache-path", str(work / "cache"),
        "--seq-length", str(sizes.seq), "--micro-batch-size", "1", "--global-batch-size", "1",
        "--train-iters", str(iters), "--lr", "1e-4", "--lr-warmup-iters", "1", "--log-interval", "1",
    ]  # fmt: skip
    if metrics is not None:
        flags += ["--metrics-file", str(metrics)]
    if recompute:
        flags += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    return flags + precision_flags(sizes)


def precision_flags(sizes: Sizes) -> list[str]:
    """The GPU run's: bf16, Megatron's distributed optimizer, and the varlen attention named (not "auto"), so
    that a machine without it fails loudly instead of measuring SDPA."""
    return [] if sizes is SMOKE else ["--bf16", "--use-distributed-optimizer", "--attention-backend", "varlen"]


def iteration_records(metrics: Path) -> dict[int, dict[str, Any]]:
    if not metrics.is_file():
        raise StepError(f"{metrics} was not written")
    records = (json.loads(line) for line in metrics.read_text().splitlines())
    return {r["iteration"]: r for r in records if "tokens_per_sec" in r}


def throughput_of(records: dict[int, dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Tokens/s over the timed iterations (total tokens / total time), their mean TFLOP/s and MFU, the peak
    memory of the run."""
    timed = [r for i, r in sorted(records.items()) if i > warmup]
    if not timed:
        raise StepError(f"no iteration after the {warmup} warm-up ones was logged")
    seconds = sum(r["iteration_ms"] for r in timed) / 1000
    tokens = sum(r["tokens_per_sec"] * r["iteration_ms"] / 1000 for r in timed)
    mfu = [r["mfu"] for r in timed if r["mfu"] is not None]
    return dict(
        tokens_per_s=tokens / seconds,
        tflops=sum(r["tflops"] for r in timed) / len(timed),
        mfu=sum(mfu) / len(mfu) if mfu else None,
        peak_mem_gib=max(r["mem_gib"] for r in records.values()),
        timed_iterations=len(timed),
        iteration_ms=[round(r["iteration_ms"], 1) for r in timed],
        loss=timed[-1]["loss"],
    )


# ------------------------------------------------------------------------------------------- the driver


@dataclasses.dataclass
class Check:
    name: str
    value: Any
    bound: str
    ok: bool
    hard: bool


class Run:
    """Runs the steps, each guarded and timed, and keeps the log and summary.json current after each."""

    def __init__(self, sizes: Sizes, out: Path, work: Path, time_limit: float, smoke: bool) -> None:
        self.sizes, self.out, self.work, self.smoke = sizes, out, work, smoke
        self.deadline = time.monotonic() + time_limit
        self.log_path = out / "gpu_check.log"
        self.summary: dict[str, Any] = dict(
            mode="smoke (CPU, tiny sizes)" if smoke else "gpu", work=str(work), steps={}, started=time.time()
        )
        self.on_gpu = not smoke  # a GPU run refuses to go on without one (the setup step)

    # output
    def log(self, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log(text)

    def write_summary(self) -> None:
        from megatron_unix.files import write_text_atomically

        write_text_atomically(self.out / "summary.json", json.dumps(self.summary, indent=1, default=str) + "\n")

    # commands
    def env(self, cpu: bool) -> dict[str, str]:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        if cpu or self.smoke:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def command(self, argv: list[str], budget: float, cpu: bool = False) -> str:
        """Run ``argv`` with its whole output appended to the log; its output, or StepError."""
        remaining = self.deadline - time.monotonic()  # on a shared CI machine only the whole run is bounded
        timeout = max(10.0, remaining if self.smoke else min(remaining, max(60.0, 3 * budget)))
        self.log(f"$ {shlex.join(argv)}")
        start_offset = self.log_path.stat().st_size
        start = time.monotonic()
        with open(self.log_path, "a") as sink:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=self.env(cpu), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise StepError(f"{Path(argv[1]).name} timed out after {timeout:.0f} s") from None
        with open(self.log_path) as f:
            f.seek(start_offset)
            output = f.read()
        self.log(f"(exit {code}, {time.monotonic() - start:.1f} s)")
        if code:
            last = [line for line in output.splitlines() if line.strip()][-1:] or ["no output"]
            raise StepError(f"{Path(argv[1]).name} exited with {code}: {last[0][-300:]}")
        return output

    def pretrain(self, flags: list[str], budget: float, cpu: bool = False) -> str:
        return self.command([sys.executable, str(ROOT / "pretrain_unix.py"), *flags], budget, cpu)

    def child(self, name: str, budget: float) -> dict[str, Any]:
        result = self.work / f"{name}.json"
        result.unlink(missing_ok=True)
        argv = [sys.executable, str(Path(__file__).resolve()), "--run-step", name]
        argv += ["--work", str(self.work), "--out", str(self.out), "--result", str(result)]
        self.command(argv + (["--smoke"] if self.smoke else []), budget)
        return json.loads(result.read_text())

    # steps
    def step(self, name: str) -> None:
        budget = self.sizes.budgets[name]
        record: dict[str, Any] = dict(status="error", budget_s=budget, figures={}, checks=[])
        self.summary["steps"][name] = record
        self.say(f"\n== {name} (budget {budget} s)")
        start = time.monotonic()
        try:
            if self.deadline - time.monotonic() < 10:
                raise StepError("not run: --time-limit spent")
            if name != "setup" and not (self.work / "setup.done").exists():
                raise StepError(f"needs the setup step's files in {self.work}")
            checks: list[Check] = []
            record["figures"] = getattr(self, f"step_{name}")(budget, checks)
            record["checks"] = [dataclasses.asdict(c) for c in checks]
            failed = [c for c in checks if c.hard and not c.ok]
            record["status"] = "fail" if failed else "pass"
            for c in checks:
                mark = "ok  " if c.ok else ("FAIL" if c.hard else "miss")
                self.say(f"   [{mark}] {c.name}: {_show(c.value)} (bound {c.bound}{'' if c.hard else ', goal'})")
        except Exception as error:  # a step's failure is recorded; the next steps still run
            record["error"] = f"{type(error).__name__}: {error}"
            self.log(traceback.format_exc())
        record["seconds"] = round(time.monotonic() - start, 1)
        self.say(f"== {name}: {record['status']} in {record['seconds']} s (budget {budget} s)")
        if record.get("error"):
            self.say(f"   {record['error']}")
        for key, value in record["figures"].items():
            self.log(f"   {key}: {_show(value)}")
        self.write_summary()

    def step_setup(self, budget: float, checks: list[Check]) -> dict[str, Any]:
        figures = self.child("setup", budget)
        if not self.smoke and not figures["cuda"]:
            raise StepError("no CUDA GPU here: run with --smoke")
        return figures

    def step_correctness(self, budget: float, checks: list[Check]) -> dict[str, Any]:
        s, work = self.sizes, self.work
        quick = work / "quickstart"
        common = [
            "--model-preset", "tiny", "--tokenizer-model", str(quick / "tokenizer"),
            "--data-path", "0.5", str(quick / "data" / "text"), "0.5", str(quick / "data" / "image_text"),
            "--split", "100,0,0", "--data-cache-path", str(work / "quickstart_cache"), "--seq-length", "1152",
            "--micro-batch-size", "1", "--global-batch-size", str(s.correctness_gbs), "--log-interval", "1",
            "--clip-grad", "1.0", "--weight-decay", "0.01",
        ]  # fmt: skip
        for folder in ("init", "train", "resume"):
            shutil.rmtree(work / folder, ignore_errors=True)
        # The shared init and the fp32 reference: one CPU iteration at learning rate 0 (weights unchanged).
        self.pretrain(common + ["--train-iters", "1", "--lr", "0", "--save", str(work / "init")], budget, cpu=True)
        reference = iteration_records(work / "init" / "metrics.jsonl")[1]["loss"]
        iters, half = s.correctness_iters, s.correctness_iters // 2
        train = common + ["--train-iters", str(iters), "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "2"]
        train += precision_flags(s)
        self.pretrain(
            train + ["--pretrained-checkpoint", str(work / "init"), "--save", str(work / "train")]
            + ["--save-interval", str(half)],
            budget,
        )  # fmt: skip
        losses = {i: r["loss"] for i, r in iteration_records(work / "train" / "metrics.jsonl").items()}
        # Resume from the iteration-`half` checkpoint of that run: a directory holding it as the latest.
        name = f"iter_{half:07d}"
        shutil.copytree(work / "train" / name, work / "resume" / name)
        (work / "resume" / "latest_checkpointed_iteration.txt").write_text(f"{half}\n")
        self.pretrain(train + ["--load", str(work / "resume"), "--save", str(work / "resume")]
                      + ["--exit-interval", str(half + 1)], budget)  # fmt: skip
        resumed = iteration_records(work / "resume" / "metrics.jsonl")[half + 1]["loss"]
        first, last3 = losses[1], sum(losses[i] for i in range(iters - 2, iters + 1)) / 3
        bf16 = self.on_gpu
        checks += [
            Check("first loss vs CPU fp32 (relative)", abs(first - reference) / reference,
                  "<= 0.01" if bf16 else "<= 1e-5", abs(first - reference) / reference <= (0.01 if bf16 else 1e-5), True),
            Check("loss falls: first - mean of last 3 (nats)", first - last3, ">= 1.0" if bf16 else ">= 0.05",
                  first - last3 >= (1.0 if bf16 else 0.05), True),
            Check(f"resumed loss at {half + 1} vs uninterrupted (relative)", abs(resumed - losses[half + 1]) / losses[half + 1],
                  "<= 1e-4", abs(resumed - losses[half + 1]) <= 1e-4 * losses[half + 1], True),
        ]  # fmt: skip
        return dict(
            cpu_fp32_first_loss=reference,
            first_loss=first,
            losses=[round(losses[i], 4) for i in sorted(losses)],
            resumed_loss=resumed,
            uninterrupted_loss=losses[half + 1],
            precision="bf16 + distributed optimizer" if bf16 else "fp32 (CPU)",
        )

    def step_throughput(self, budget: float, checks: list[Check]) -> dict[str, Any]:
        s = self.sizes
        figures: dict[str, Any] = dict(model=s.train_model, seq=s.seq, vocab=s.vq_offset + CODEBOOK)
        errors = []
        for variant in VARIANTS:
            metrics = self.work / f"throughput_{variant}.jsonl"
            metrics.unlink(missing_ok=True)
            try:
                self.pretrain(
                    training_flags(s, self.work, variant, s.train_model, s.warmup + s.timed, metrics), budget / 4
                )
                figures[variant] = throughput_of(iteration_records(metrics), s.warmup)
            except StepError as error:  # the other variants are still measured
                errors.append(f"{variant}: {error}")
                self.say(f"   {variant}: {error}")
                continue
            self.say(f"   {variant}: {_show(figures[variant])}")
        shared = figures.get("shared", {}).get("tokens_per_s")
        for variant, paper in PAPER_RATIOS.items():
            if shared and variant in figures:
                figures[variant].update(ratio_to_shared=figures[variant]["tokens_per_s"] / shared, paper_ratio=paper)
                self.say(f"   {variant} / shared: {figures[variant]['ratio_to_shared']:.3f} (paper {paper})")
        if errors:
            figures["errors"] = errors
        checks.append(Check("variants measured", len(VARIANTS) - len(errors), f"== {len(VARIANTS)}", not errors, True))
        unix = figures.get("unix")
        if self.on_gpu and unix:
            checks += [
                Check("Uni-X 1.5B 9:5 tokens/s", unix["tokens_per_s"], f">= {FLOOR_TOKENS_PER_S}",
                      unix["tokens_per_s"] >= FLOOR_TOKENS_PER_S, True),
                Check("Uni-X 1.5B 9:5 MFU", unix["mfu"], f">= {GOAL_MFU}", (unix["mfu"] or 0) >= GOAL_MFU, False),
            ]  # fmt: skip
            if "ratio_to_shared" in unix:
                checks.append(
                    Check("Uni-X / shared", unix["ratio_to_shared"], ">= 1.00", unix["ratio_to_shared"] >= 1, False)
                )
        return figures

    def step_fit_3b(self, budget: float, checks: list[Check]) -> dict[str, Any]:
        s = self.sizes
        metrics = self.work / "fit.jsonl"
        recompute = self.smoke  # the smoke run exercises the recompute flags; the GPU run tries without first
        for _attempt in range(2):
            metrics.unlink(missing_ok=True)
            flags = training_flags(s, self.work, "unix", s.fit_model, s.warmup + s.fit_timed, metrics, recompute)
            try:
                self.pretrain(flags, budget)
                break
            except StepError as error:
                if recompute or "out of memory" not in self.log_path.read_text()[-20000:].lower():
                    raise
                self.say(f"   out of memory without recompute ({error}); again with --recompute-granularity full")
                recompute = True
        figures = dict(
            model=s.fit_model, seq=s.seq, recompute=recompute, **throughput_of(iteration_records(metrics), s.warmup)
        )
        checks.append(Check("completes", True, "runs", True, True))
        return figures

    def step_varlen_vs_sdpa(self, budget: float, checks: list[Check]) -> dict[str, Any]:
        f = self.child("varlen_vs_sdpa", budget)
        exact = not self.on_gpu  # SDPA against itself on the CPU: the figures must agree exactly
        checks += [
            Check("logits cosine", f["logits_cosine"], ">= 0.999", f["logits_cosine"] >= (1 - 1e-12 if exact else 0.999), True),
            Check("argmax agreement", f["argmax_agreement"], ">= 0.80", f["argmax_agreement"] >= (1 if exact else 0.8), True),
            Check("loss (relative)", f["loss_rel_diff"], "<= 0.01", f["loss_rel_diff"] <= (0 if exact else 0.01), True),
            Check("gradient cosine, all parameters", f["grad_cosine"], ">= 0.99", f["grad_cosine"] >= (1 - 1e-12 if exact else 0.99), True),
            Check(f"gradient cosine, worst tensor ({f['grad_worst_tensor']})", f["grad_worst_cosine"], ">= 0.90",
                  f["grad_worst_cosine"] >= (1 - 1e-12 if exact else 0.9), True),
        ]  # fmt: skip
        return f

    def step_vqgan(self, budget: float, checks: list[Check]) -> dict[str, Any]:
        f = self.child("vqgan", budget)
        checks += [
            Check("codes equal, TF32 off", f["equal_tf32_off"], ">= 0.99", f["equal_tf32_off"] >= 0.99, True),
            Check("codes equal, TF32 on", f["equal_tf32_on"], "reported", True, False),
        ]
        return f

    def step_profile(self, budget: float, checks: list[Check]) -> dict[str, Any]:
        f = self.child("profile", budget)
        for row in f["top"][:5]:
            self.say(f"   {row['share']:6.1%}  {row['name'][:100]}")
        return f

    def step_generation(self, budget: float, checks: list[Check]) -> dict[str, Any]:
        f = self.child("generation", budget)
        if self.on_gpu:
            encode = f["vqgan_encode_images_per_s"]
            checks.append(
                Check(
                    "VQGAN encode images/s", encode, f">= {GOAL_VQGAN_ENCODE:.0f}", encode >= GOAL_VQGAN_ENCODE, False
                )
            )
        return f


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--out", default=os.environ.get("OUT"), help="where the log, summary.json and profile.txt go (default: $OUT)"
    )
    p.add_argument("--smoke", action="store_true", help="every step on the CPU at tiny sizes (what CI runs)")
    p.add_argument(
        "--steps",
        nargs="+",
        choices=STEPS,
        default=list(STEPS),
        help="run only these (setup is added when --work lacks it)",
    )
    p.add_argument(
        "--work",
        default=None,
        help="scratch folder for data and checkpoints (default: a new temporary one, removed at the end)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds for the whole run; steps not started by then are errors (default: 570, smoke 1200)",
    )
    p.add_argument("--run-step", choices=sorted(CHILD_STEPS), help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.run_step:  # a child: one step's figures into --result
        try:
            figures = CHILD_STEPS[args.run_step](sizes, Path(args.work), Path(args.out))
        finally:
            import torch.distributed as dist

            if dist.is_initialized():  # else the exit waits on the process group
                dist.destroy_process_group()
        Path(args.result).write_text(json.dumps(figures, default=str))
        return 0
    if not args.out:
        print("error: --out DIR is required (or $OUT)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    work.mkdir(parents=True, exist_ok=True)
    steps = [s for s in STEPS if s in args.steps or (s == "setup" and not (work / "setup.done").exists())]
    run = Run(sizes, out, work, args.time_limit or (1200 if args.smoke else 570), args.smoke)
    run.say(f"GPU check ({run.summary['mode']}); work folder {work}; out {out}")
    run.say("budget per step (s): " + ", ".join(f"{s} {sizes.budgets[s]}" for s in steps))
    run.say(
        f"total budget {sum(sizes.budgets[s] for s in steps)} s; time limit {run.deadline - time.monotonic():.0f} s"
    )
    start = time.monotonic()
    try:
        for name in steps:
            run.step(name)
    finally:
        run.summary["seconds"] = round(time.monotonic() - start, 1)
        statuses = {name: record["status"] for name, record in run.summary["steps"].items()}
        run.summary["passed"] = all(status == "pass" for status in statuses.values())
        run.write_summary()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    run.say(f"\n== summary ({run.summary['seconds']} s): " + ", ".join(f"{k} {v}" for k, v in statuses.items()))
    return 0 if run.summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
