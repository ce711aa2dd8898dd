"""Command-line arguments of pretrain_unix.py, with Megatron-LM's flag names, and their validation.

This module imports nothing heavy at the top (megatron-core, torch and the model are imported where
they are used), so ``pretrain_unix.py --help`` answers at once.

Architecture flags default to ``None``: a run that loads a checkpoint takes them from the
checkpoint (see :func:`architecture_flags`), a fresh run needs them (or the tiny defaults of
a ``--model-preset``). :func:`validate` runs before any process group or model exists, so a bad
setting fails in seconds with the flag named.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import warnings
from typing import Any, Sequence

from megatron_unix.data.vocabulary import CODEBOOK_SIZE

MODEL_FLAGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels")
"""The architecture flags a fresh run must give (or --model-preset tiny)."""

ARCHITECTURE_DEFAULTS = dict(
    vision_encode_layers=0,
    vision_decode_layers=0,
    qk_layernorm=False,
    add_qkv_bias=False,
    tie_word_embeddings=True,
    rotary_base=1e6,
    layernorm_epsilon=1e-6,
    layer_variant="unix",
    decoder_sparse_step=2,
)
"""What a fresh run uses for the architecture flags it leaves unset (Qwen's choices; N = M = 0 is the
shared baseline)."""

TINY_PRESET = dict(
    num_layers=4,
    hidden_size=128,
    ffn_hidden_size=384,
    num_attention_heads=4,
    num_query_groups=2,
    kv_channels=32,
    vision_encode_layers=1,
    vision_decode_layers=1,
    qk_layernorm=True,
    add_qkv_bias=False,
    tie_word_embeddings=True,
    rotary_base=1e6,
    layernorm_epsilon=1e-6,
)

UNIX_1_5B = dict(
    TINY_PRESET,
    num_layers=28,
    hidden_size=1536,
    ffn_hidden_size=8960,
    num_attention_heads=12,
    num_query_groups=2,
    kv_channels=128,
    vision_encode_layers=9,
    vision_decode_layers=5,
)
UNIX_3B = dict(
    UNIX_1_5B,
    num_layers=36,
    hidden_size=2048,
    ffn_hidden_size=11008,
    num_attention_heads=16,
    vision_encode_layers=12,
    vision_decode_layers=6,
)
MODEL_PRESETS = {"tiny": TINY_PRESET, "unix-1.5b": UNIX_1_5B, "unix-3b": UNIX_3B}
"""``--model-preset``: the tiny CPU model and the published sizes of spec §1 (Qwen2.5 dimensions, Qwen3
layer style: QK norm, no q/k/v bias, tied embeddings); the one place tools take these shapes from."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" only where it informs: not for on/off switches (their stored default says
    nothing about the switch), not for unset values, not where the help already states the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """Every flag of pretrain_unix.py; building it imports nothing heavy, so ``--help`` is instant."""
    p = argparse.ArgumentParser(
        description="Pretrain or fine-tune a Uni-X model with Megatron-Core.", formatter_class=HelpFormatter
    )
    g = p.add_argument_group("model (unset flags come from the checkpoint, else Qwen's choices)")
    for name, what in (
        ("num_layers", "transformer layers L"),
        ("hidden_size", "hidden size"),
        ("ffn_hidden_size", "MLP intermediate size"),
        ("num_attention_heads", "attention heads"),
        ("num_query_groups", "key/value heads (grouped-query attention)"),
        ("kv_channels", "head dimension"),
        ("vision_encode_layers", "N: the first N layers get a vision copy (default 0)"),
        ("vision_decode_layers", "M: the last M layers get a vision copy (default 0)"),
    ):
        g.add_argument(_flag(name), type=int, default=None, help=what)
    g.add_argument(
        "--group-query-attention",
        action="store_true",
        help="accepted for Megatron-LM compatibility; --num-query-groups decides",
    )
    g.add_argument("--qk-layernorm", action="store_true", default=None, help="per-head RMSNorm on q and k (Qwen3)")
    g.add_argument("--add-qkv-bias", action="store_true", default=None, help="bias on q, k and v (Qwen2)")
    g.add_argument(
        "--untie-embeddings-and-output-weights",
        dest="tie_word_embeddings",
        action="store_false",
        default=None,
        help="a separate output head (default: tied to the embedding)",
    )
    g.add_argument(
        "--rotary-base",
        type=float,
        default=None,
        help=f"rotary embedding base (default {ARCHITECTURE_DEFAULTS['rotary_base']:g})",
    )
    g.add_argument(
        "--norm-epsilon",
        dest="layernorm_epsilon",
        type=float,
        default=None,
        help=f"RMSNorm epsilon (default {ARCHITECTURE_DEFAULTS['layernorm_epsilon']:g})",
    )
    g.add_argument(
        "--layer-variant",
        choices=["unix", "hardmoe", "mot"],
        default=None,
        help="unix, or a baseline of the paper's Table 4: hardmoe (a vision MLP every --decoder-sparse-step "
        "layers) or mot (vision q/k/v, QK norms and MLP in every layer, one global attention); the baselines "
        "need --vision-encode-layers 0 --vision-decode-layers 0 (default unix)",
    )
    g.add_argument(
        "--decoder-sparse-step",
        type=int,
        default=None,
        help="hardmoe: layer i has a vision MLP iff (i + 1) %% K == 0 (default 2)",
    )
    g.add_argument(
        "--ffn-vision-size", type=int, default=None, help="mot: width of the vision MLPs (default: --ffn-hidden-size)"
    )
    g.add_argument(
        "--model-preset",
        choices=sorted(MODEL_PRESETS),
        default=None,
        help="fill unset architecture flags with a shape: tiny (CPU-sized), or the published Uni-X 1.5B (9:5) "
        "and 3B (12:6) of Qwen2.5's dimensions",
    )
    g.add_argument(
        "--no-document-isolation",
        dest="document_isolation",
        action="store_false",
        help="attend across packed documents, as the reference actually trained (default: documents "
        "never see each other)",
    )
    g.add_argument(
        "--attention-backend",
        default="auto",
        choices=["auto", "sdpa", "varlen", "flash_attn", "te"],
        help="core attention kernel; auto picks the fastest this machine has",
    )
    g.add_argument(
        "--transformer-impl",
        default=None,
        help="local or transformer_engine: the layer modules (default: transformer_engine on a GPU "
        "machine with TE installed, else local); checkpoints load under either",
    )
    g.add_argument(
        "--recompute-granularity",
        choices=["full", "selective"],
        default=None,
        help="activation recompute (default: none)",
    )
    g.add_argument(
        "--recompute-method",
        choices=["uniform", "block"],
        default="uniform",
        help="with --recompute-granularity full: how layers are grouped",
    )
    g.add_argument(
        "--recompute-num-layers",
        type=int,
        default=1,
        help="with --recompute-granularity full: layers per recompute group",
    )
    g.add_argument("--init-method-std", type=float, default=0.02, help="std of fresh weights")

    g = p.add_argument_group("tokenizer and data")
    g.add_argument("--tokenizer-model", help="HF tokenizer directory or SentencePiece .model the data was made with")
    g.add_argument(
        "--vq-codebook-size", type=int, default=None, help=f"VQ codes (default: the checkpoint's, else {CODEBOOK_SIZE})"
    )
    g.add_argument("--boi", default="<|vision_start|>", help="begin-of-image token (routed as vision)")
    g.add_argument("--eoi", default="<|vision_end|>", help="end-of-image token (text)")
    g.add_argument("--eos", default="<|endoftext|>", help="end-of-sequence token")
    g.add_argument(
        "--separator",
        default=None,
        help="token routed as vision besides BOI and codes, e.g. '<|vision_pad|>' (default: none)",
    )
    g.add_argument(
        "--data-path",
        nargs="+",
        default=None,
        help="dataset prefixes from tools/preprocess_data.py, optionally weighted: 0.7 a 0.3 b",
    )
    g.add_argument("--split", default="969,30,1", help="train,valid,test weights")
    g.add_argument(
        "--data-cache-path", default=None, help="where packing indices are cached (default: beside the data)"
    )
    g.add_argument(
        "--allow-unrecorded-vocabulary",
        action="store_true",
        help="train on a --data-path prefix without PREFIX_vocab.json (made before it was recorded)",
    )
    g.add_argument(
        "--long-text",
        choices=["truncate", "split"],
        default="truncate",
        help="a text sample longer than a row: cut it, or continue it over rows",
    )
    g.add_argument("--seq-length", type=int, default=None, help="tokens per packed row (required)")
    g.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="data loader worker processes (0: read in the training process; rows are mmap reads)",
    )

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP: ranks that split each layer")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP: stages the layers are cut into")
    g.add_argument("--sequence-parallel", action="store_true", help="split norms and dropout along the sequence (TP>1)")
    g.add_argument(
        "--use-distributed-optimizer", action="store_true", help="shard optimizer state over data-parallel ranks (GPU)"
    )
    g.add_argument("--overlap-grad-reduce", action="store_true", help="overlap the gradient all-reduce with backward")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10, help="collective timeout")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1, help="rows per forward pass per rank")
    g.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="rows per optimizer step over all ranks (default: micro batch x data-parallel size)",
    )
    g.add_argument("--train-iters", type=int, required=True, help="optimizer steps of the whole run")
    g.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warmup steps")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="steps of the decay (default: --train-iters)")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine", help="decay shape")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="Adam beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping; 0 disables it")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    g.add_argument("--seed", type=int, default=1234, help="weights, data order and dropout")
    g.add_argument(
        "--skip-nonfinite-steps",
        action="store_true",
        help="skip an iteration whose loss or grad norm is NaN/inf instead of stopping",
    )

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory to write (and metrics.jsonl)")
    g.add_argument("--load", default=None, help="checkpoint directory to resume from (all state)")
    g.add_argument(
        "--pretrained-checkpoint",
        default=None,
        help="start from these weights with fresh optimizer state (used when --load has none)",
    )
    g.add_argument("--save-interval", type=int, default=None, help="save every this many iterations")
    g.add_argument(
        "--keep-last-checkpoints", type=int, default=None, help="delete older iter_* directories (default: keep all)"
    )
    g.add_argument("--no-load-optim", action="store_true", help="resume without the optimizer state")
    g.add_argument("--no-load-rng", action="store_true", help="resume without the random-number states")
    g.add_argument(
        "--no-verify-checkpoint",
        action="store_false",
        dest="verify_checkpoint",
        help="load without checking the checkpoint's files against its checksums.json",
    )
    g.add_argument("--finetune", action="store_true", help="load weights only; reset iteration and data")
    g.add_argument(
        "--override-opt-param-scheduler",
        action="store_true",
        help="on resume, use this run's LR/WD schedule flags instead of the checkpoint's",
    )
    g.add_argument(
        "--use-checkpoint-opt-param-scheduler",
        action="store_true",
        help="on resume, take the LR/WD schedule from the checkpoint (without either flag, a changed "
        "schedule is an error)",
    )
    g.add_argument("--exit-interval", type=int, default=None, help="save and stop at a multiple of this iteration")
    g.add_argument(
        "--exit-duration-in-mins", type=float, default=None, help="save and stop after this many minutes of wall time"
    )
    g.add_argument(
        "--no-exit-signal-handler",
        dest="exit_signal_handler",
        action="store_false",
        help="do not save and exit on SIGTERM (slurm preemption)",
    )

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10, help="iterations between log lines (iteration 1 too)")
    g.add_argument("--eval-interval", type=int, default=None, help="iterations between validations (default: none)")
    g.add_argument("--eval-iters", type=int, default=10, help="batches per validation")
    g.add_argument(
        "--metrics-file", default=None, help="JSON lines of every logged iteration (default: SAVE/metrics.jsonl)"
    )
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard events there")
    g.add_argument("--wandb-project", default=None, help="log to this Weights & Biases project")
    g.add_argument("--wandb-exp-name", default=None, help="Weights & Biases run name")
    g.add_argument("--wandb-save-dir", default=None, help="Weights & Biases local directory")
    g.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="per-device peak for MFU (default: known GPUs' bf16 peak; none on CPU)",
    )
    g.add_argument(
        "--grad-conflict-interval",
        type=int,
        default=0,
        help="every this many iterations, log per layer and weight group the cosine between the gradients of "
        "the text-target and vision-target parts of the loss on that iteration's batch (grad_cos/layerNN/GROUP); "
        "costs 2 extra forward-backward passes over the batch on those iterations (about 3x their time) and "
        "an fp32 copy of the analysed layers' gradients (4 bytes per layer parameter / TP / PP); the training "
        "itself is unchanged (default: 0, off)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None, defaults: dict[str, Any] | None = None) -> argparse.Namespace:
    """Parsed flags with the model preset applied; ``defaults`` replace the parser's (a tool that starts from
    a checkpoint's recorded run). ``--transformer-impl`` stays None when not given: its default depends on
    the merged architecture (:func:`transformer_impl`), and the run records what it resolved to."""
    parser = build_parser()
    parser.set_defaults(**(defaults or {}))
    args = parser.parse_args(argv)
    baseline = args.layer_variant in ("hardmoe", "mot")
    if args.model_preset:
        for name, value in MODEL_PRESETS[args.model_preset].items():
            if getattr(args, name) is None:
                setattr(args, name, 0 if baseline and name.startswith("vision_") else value)
    return args


def architecture_flags(args: argparse.Namespace, stored: dict[str, Any] | None) -> dict[str, Any]:
    """The architecture's values from the flags, else the starting checkpoint's ``model_args``
    (``stored``), else Qwen's defaults; a flag that contradicts the checkpoint is an error. Fields only
    a checkpoint or the tokenizer sets (the vocabulary layout) are None for a fresh run."""
    from megatron_unix.model.config import ModelArguments

    stored = stored or {}
    shape = {}
    for field in dataclasses.fields(ModelArguments):
        name = field.name
        given = getattr(args, name, None)
        if given is not None and name in stored and _normalise(given) != _normalise(stored[name]):
            raise ValueError(f"{_flag(name)} {given} contradicts the checkpoint, which has {stored[name]}")
        shape[name] = next(
            (v for v in (given, stored.get(name), ARCHITECTURE_DEFAULTS.get(name)) if v is not None), None
        )
    if shape["ffn_vision_size"] is None:  # the vision MLPs are as wide as the text MLP unless MoT says
        shape["ffn_vision_size"] = shape["ffn_hidden_size"]
    return shape


def _normalise(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def world_size_from_env() -> int:
    """torchrun's world, else the srun step's tasks (not the job's: the batch script is one process)."""
    return int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_STEP_NUM_TASKS", "1")))


def validate(args: argparse.Namespace, world_size: int, shape: dict[str, Any] | None = None) -> None:
    """Every setting that can be checked before start-up; errors name the flag. Reads, never writes,
    ``args``. ``shape`` is the architecture as merged with the starting checkpoint's
    (:func:`architecture_flags`), a fresh run's by default: what no checkpoint gives, flags must."""
    _check_ranges(args)
    shape = shape or architecture_flags(args, None)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    missing = [n for n in MODEL_FLAGS if shape[n] is None]
    if missing:
        raise ValueError(
            f"{', '.join(map(_flag, missing))} must be given (or --model-preset tiny, or --load a checkpoint)"
        )
    heads, groups, layers = shape["num_attention_heads"], shape["num_query_groups"], shape["num_layers"]
    _check_layer_variant(args, shape)
    if heads % tp:
        raise ValueError(f"--tensor-model-parallel-size ({tp}) must divide --num-attention-heads ({heads})")
    if groups % tp:
        raise ValueError(f"--tensor-model-parallel-size ({tp}) must divide --num-query-groups ({groups})")
    for flag, width in (
        ("--ffn-hidden-size", shape["ffn_hidden_size"]),
        ("--ffn-vision-size", shape["ffn_vision_size"]),
    ):
        if width % tp:
            raise ValueError(f"--tensor-model-parallel-size ({tp}) must divide {flag} ({width})")
    if layers < pp or layers % pp:
        raise ValueError(
            f"--pipeline-model-parallel-size ({pp}) must divide --num-layers ({layers}) so that every stage has layers"
        )
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size ({tp}) x "
            f"--pipeline-model-parallel-size ({pp})"
        )
    dp = world_size // (tp * pp)
    if args.global_batch_size is not None and args.global_batch_size % (args.micro_batch_size * dp):
        raise ValueError(
            f"--global-batch-size ({args.global_batch_size}) must be divisible by --micro-batch-size "
            f"({args.micro_batch_size}) x data-parallel size ({dp})"
        )
    decay_iters = args.lr_decay_iters or args.train_iters
    if args.train_iters and args.lr_warmup_iters >= decay_iters:
        raise ValueError(
            f"--lr-warmup-iters ({args.lr_warmup_iters}) must be smaller than --lr-decay-iters "
            f"(or --train-iters): {decay_iters}"
        )
    if args.sequence_parallel and tp == 1:
        raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.seq_length is None:
        raise ValueError("--seq-length must be given")
    if args.sequence_parallel and (args.seq_length * args.micro_batch_size) % tp:
        raise ValueError(
            f"--sequence-parallel needs --seq-length x --micro-batch-size "
            f"({args.seq_length * args.micro_batch_size}) divisible by --tensor-model-parallel-size ({tp})"
        )
    if not args.data_path:
        raise ValueError("--data-path must name at least one dataset prefix (see tools/preprocess_data.py)")
    from megatron_unix.data.indexed import require_files

    for prefix in data_prefixes(args.data_path):
        try:
            require_files(prefix)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--data-path {prefix}: {error}") from None
    if args.tokenizer_model is None:
        raise ValueError("--tokenizer-model must name the tokenizer the data was preprocessed with")
    if args.save_interval and not args.save:
        raise ValueError("--save-interval needs --save")
    if args.bf16 and not _has_cuda():
        raise ValueError("--bf16 needs a GPU: Megatron's mixed-precision optimizer is CUDA-only (CPU runs fp32)")
    if args.use_distributed_optimizer and not _has_cuda():
        raise ValueError("--use-distributed-optimizer needs a GPU (Megatron's distributed optimizer is CUDA-only)")
    if args.grad_conflict_interval and args.use_distributed_optimizer and dp > 1:
        raise ValueError(
            "--grad-conflict-interval needs every rank's whole reduced gradient: the distributed optimizer only "
            "reduce-scatters it (use it without --use-distributed-optimizer, or measure offline with "
            "tools/analyze_gradients.py)"
        )


def _check_layer_variant(args: argparse.Namespace, shape: dict[str, Any]) -> None:
    """The variant flags against the merged shape, as the model would refuse them, but before start-up."""
    from megatron_unix.model.config import check_layer_variant

    variant = shape["layer_variant"]
    if args.decoder_sparse_step is not None and variant != "hardmoe":
        raise ValueError(f"--decoder-sparse-step is for --layer-variant hardmoe (this model is {variant})")
    check_layer_variant(
        variant,
        shape["decoder_sparse_step"],
        shape["ffn_vision_size"],
        shape["vision_encode_layers"] + shape["vision_decode_layers"],
        shape["num_layers"],
        shape["ffn_hidden_size"],
        transformer_impl(args, shape),
    )


def transformer_impl(args: argparse.Namespace, shape: dict[str, Any]) -> str:
    """``--transformer-impl``, else the default for the merged architecture's layer variant (the variant
    may come from the checkpoint, so the default is decided here, not when the flags are parsed)."""
    from megatron_unix.model.config import default_transformer_impl

    return args.transformer_impl or default_transformer_impl(shape["layer_variant"])


def _check_ranges(args: argparse.Namespace) -> None:
    """Numbers whose wrong value would otherwise surface as a traceback far from their flag."""
    for name in (
        "seq_length",
        "micro_batch_size",
        "global_batch_size",
        "lr_decay_iters",
        "log_interval",
        "eval_interval",
        "save_interval",
        "exit_interval",
        "exit_duration_in_mins",
        "keep_last_checkpoints",
    ):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ValueError(f"{_flag(name)} must be positive, got {value}")
    for name in ("train_iters", "lr", "min_lr", "lr_warmup_iters", "weight_decay", "grad_conflict_interval"):
        if getattr(args, name) < 0:
            raise ValueError(f"{_flag(name)} must not be negative, got {getattr(args, name)}")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr ({args.min_lr}) must not exceed --lr ({args.lr})")
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

    try:  # Megatron's own reading (missing weights are 0), which divides by the sum
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy's 0/0: reported below instead
            weights = parse_and_normalize_split(args.split)
    except AssertionError:  # more than three weights
        weights = [math.nan]
    if not all(0 <= w <= 1 for w in weights):  # NaN fails too
        raise ValueError(
            f"--split {args.split!r} must be up to three non-negative weights with a positive sum "
            "(train,valid,test), e.g. 969,30,1"
        )


def data_prefixes(data_path: list[str]) -> list[str]:
    """The prefixes of ``--data-path``, parsed exactly as the dataset builder parses them."""
    from megatron.core.datasets.utils import get_blend_from_list

    return get_blend_from_list(data_path)[0]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
