"""UniXConfig: Megatron's TransformerConfig plus what makes a model Uni-X (spec §1-2, §4)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_unix import platform
from megatron_unix.data.vocabulary import CODEBOOK_SIZE, QWEN25_BOI, QWEN25_EOI, QWEN25_EOS, QWEN25_VQ_OFFSET

ATTENTION_BACKENDS = ("auto", "sdpa", "varlen", "flash_attn", "te")
LAYER_VARIANTS = ("unix", "hardmoe", "mot")
"""Uni-X and the two baselines of the paper's Table 4 (spec §9), built from the same routing."""


@dataclass
class UniXConfig(TransformerConfig):
    """Dimensions come from TransformerConfig; Uni-X adds the split and the vocabulary layout."""

    vision_encode_layers: int = 0
    """N: the first N layers hold a text and a vision copy."""
    vision_decode_layers: int = 0
    """M: the last M layers hold a text and a vision copy."""
    vq_offset: int = QWEN25_VQ_OFFSET
    """Id of VQ code 0 (= text tokenizer length)."""
    vq_codebook_size: int = CODEBOOK_SIZE
    boi_id: int = QWEN25_BOI
    eoi_id: int = QWEN25_EOI
    eos_id: int = QWEN25_EOS
    separator_ids: tuple[int, ...] = ()
    """Tokens routed to vision besides BOI and the codes (e.g. <|vision_pad|>)."""
    document_isolation: bool = True
    """False reproduces the reference's training: attention spans the whole packed row."""
    tie_word_embeddings: bool = True
    rotary_base: float = 1_000_000.0
    core_attention_backend: str = "auto"
    """One of ATTENTION_BACKENDS; "auto" picks the fastest that this machine has."""
    layer_variant: str = "unix"
    """One of LAYER_VARIANTS: "hardmoe" gives every ``decoder_sparse_step``-th layer a vision MLP,
    "mot" gives every layer vision q/k/v projections, QK norms and MLP under one global attention."""
    decoder_sparse_step: int = 2
    """HardMoE: layer i (0-based) has a vision MLP iff (i + 1) % decoder_sparse_step == 0."""
    ffn_vision_size: int | None = None
    """MoT: width of the vision MLPs; None = ffn_hidden_size (other variants always use that)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        n, m, layers = self.vision_encode_layers, self.vision_decode_layers, self.num_layers
        if n < 0 or m < 0 or n + m > layers:
            raise ValueError(
                f"--vision-encode-layers ({n}) + --vision-decode-layers ({m}) must be within 0..--num-layers ({layers})"
            )
        if self.context_parallel_size > 1:
            raise ValueError(
                "--context-parallel-size > 1 is not supported: Uni-X routes tokens by modality inside a "
                "row, and splitting its segments over context-parallel ranks is not implemented; use "
                "tensor/sequence parallelism for long rows"
            )
        if self.transformer_impl not in platform.TRANSFORMER_IMPLS:
            raise ValueError(
                f"--transformer-impl must be one of {platform.TRANSFORMER_IMPLS}, got {self.transformer_impl!r}"
            )
        if self.transformer_impl == "transformer_engine" and not platform.detect_accelerators().transformer_engine:
            raise ValueError(
                "--transformer-impl transformer_engine: Transformer Engine is not installed here "
                "(use --transformer-impl local)"
            )
        if self.core_attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"--attention-backend must be one of {ATTENTION_BACKENDS}, got {self.core_attention_backend!r}"
            )
        if self.ffn_vision_size is None:
            self.ffn_vision_size = self.ffn_hidden_size
        check_layer_variant(
            self.layer_variant,
            self.decoder_sparse_step,
            self.ffn_vision_size,
            n + m,
            layers,
            self.ffn_hidden_size,
            self.transformer_impl,
        )

    def is_separated(self, layer_index: int) -> bool:
        """Whether global layer ``layer_index`` (0-based) holds a vision copy."""
        return layer_index < self.vision_encode_layers or layer_index >= self.num_layers - self.vision_decode_layers

    @property
    def num_separated_layers(self) -> int:
        return self.vision_encode_layers + self.vision_decode_layers

    @property
    def layer_description(self) -> str:
        """The layer variant and where its vision weights are (for log lines)."""
        if self.layer_variant == "hardmoe":
            return f"HardMoE (a vision MLP every {self.decoder_sparse_step} layers)"
        if self.layer_variant == "mot":
            return f"MoT (vision q/k/v, QK norms and MLP of width {self.ffn_vision_size} in every layer)"
        return f"Uni-X ({self.vision_encode_layers}:{self.vision_decode_layers} separated)"

    def has_vision_copy(self, layer_index: int) -> bool:
        """Whether global layer ``layer_index`` holds vision weights (a whole copy, q/k/v or an MLP)."""
        if self.layer_variant == "hardmoe":
            return (layer_index + 1) % self.decoder_sparse_step == 0
        if self.layer_variant == "mot":
            return True
        return self.is_separated(layer_index)

    def vision_copy_index(self, layer_index: int) -> int:
        """Index of a layer among the layers with vision weights (their stacked checkpoint keys)."""
        return sum(self.has_vision_copy(i) for i in range(layer_index))

    @property
    def num_vision_copy_layers(self) -> int:
        return self.vision_copy_index(self.num_layers)


def check_layer_variant(
    variant: str,
    sparse_step: int,
    ffn_vision_size: int,
    separated: int,
    layers: int,
    ffn_hidden_size: int,
    transformer_impl: str = "local",
) -> None:
    """Refuse, naming the flag, the variant settings that build no meaningful model."""
    if variant not in LAYER_VARIANTS:
        raise ValueError(f"--layer-variant must be one of {LAYER_VARIANTS}, got {variant!r}")
    if sparse_step < 1:
        raise ValueError(f"--decoder-sparse-step must be positive, got {sparse_step}")
    if ffn_vision_size < 1:
        raise ValueError(f"--ffn-vision-size must be positive, got {ffn_vision_size}")
    if variant != "mot" and ffn_vision_size != ffn_hidden_size:
        raise ValueError(
            "--ffn-vision-size is for --layer-variant mot (Uni-X copies and HardMoE vision MLPs are as wide as "
            "the text MLP)"
        )
    if variant == "unix":
        return
    if separated:
        raise ValueError(
            f"--layer-variant {variant} has no separated layers: --vision-encode-layers and "
            "--vision-decode-layers must be 0 (they define Uni-X)"
        )
    if variant == "hardmoe" and sparse_step > layers:
        raise ValueError(
            f"--decoder-sparse-step {sparse_step} exceeds --num-layers {layers}: no layer would get a vision MLP"
        )
    if transformer_impl == "transformer_engine":
        raise ValueError(
            f"--layer-variant {variant} needs --transformer-impl local: Transformer Engine's layer spec fuses the "
            "shared norm into the modality-routed projection"
        )


QWEN_DEFAULTS: dict[str, Any] = dict(
    normalization="RMSNorm",
    layernorm_epsilon=1e-6,
    gated_linear_unit=True,
    activation_func=F.silu,
    add_bias_linear=False,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    bf16=False,
    params_dtype=None,
)


def default_transformer_impl(layer_variant: str = "unix") -> str:
    """The layer modules when none are asked for: the platform's (TE on a GPU machine that has it) for
    Uni-X; Megatron's local modules for the baselines, whose routed projections take the shared norm
    apart (TE's spec fuses it into them)."""
    return platform.default_transformer_impl() if layer_variant == "unix" else "local"


def make_config(**fields: Any) -> UniXConfig:
    """A UniXConfig with Qwen's layer choices and this machine's safe defaults under ``fields``."""
    # cuda_graph_scope=[]: the whole layer, as megatron-core's default "full", which it deprecates with a warning
    merged = {
        **QWEN_DEFAULTS,
        "cuda_graph_scope": [],
        "transformer_impl": default_transformer_impl(fields.get("layer_variant", "unix")),
        **platform.config_defaults(),
        **fields,
    }
    if merged["params_dtype"] is None:
        import torch

        merged["params_dtype"] = torch.bfloat16 if merged.get("bf16") else torch.float32
    return UniXConfig(**merged)


@dataclass(frozen=True)
class ModelArguments:
    """The architecture: the UniXConfig fields that define the weights, plus the vocabulary size.

    A checkpoint stores it (``model_args``, :meth:`to_dict`) so that the model can be rebuilt at any
    parallel layout; :meth:`config` adds a run's settings (parallel sizes, precision, recompute...).
    """

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    vision_encode_layers: int
    vision_decode_layers: int
    qk_layernorm: bool
    add_qkv_bias: bool
    tie_word_embeddings: bool
    rotary_base: float
    layernorm_epsilon: float
    vq_offset: int
    vq_codebook_size: int
    boi_id: int
    eoi_id: int
    eos_id: int
    separator_ids: tuple[int, ...]
    vocab_size: int
    layer_variant: str = "unix"
    decoder_sparse_step: int = 2
    ffn_vision_size: int | None = None
    """None: the text FFN width (stored resolved, so that a resume naming that width agrees)."""

    def __post_init__(self) -> None:
        if self.ffn_vision_size is None:
            object.__setattr__(self, "ffn_vision_size", self.ffn_hidden_size)

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> ModelArguments:
        """From a checkpoint's ``model_args`` (keys of other owners, such as conversion's, are left out;
        fields added later, such as the layer variant, take their defaults in older checkpoints)."""
        values = {f.name: stored[f.name] for f in fields(cls) if f.name in stored}
        return cls(**{**values, "separator_ids": tuple(values["separator_ids"])})

    @classmethod
    def of(cls, config: UniXConfig, vocab_size: int) -> ModelArguments:
        return cls(**{name: getattr(config, name) for name in ARCHITECTURE_FIELDS}, vocab_size=vocab_size)

    def to_dict(self, carried: dict[str, Any] | None = None) -> dict[str, Any]:
        """JSON-friendly (separators as a list), as checkpoints store it; the keys of ``carried`` (a stored
        ``model_args``) that are no field, records of other owners such as conversion's, are kept."""
        own = {**asdict(self), "separator_ids": list(self.separator_ids)}
        return {**own, **{k: v for k, v in (carried or {}).items() if k not in own}}

    def config(self, **run_fields: Any) -> UniXConfig:
        """A config for this architecture with a run's ``run_fields``."""
        return make_config(**{name: getattr(self, name) for name in ARCHITECTURE_FIELDS}, **run_fields)


ARCHITECTURE_FIELDS = tuple(f.name for f in fields(ModelArguments) if f.name != "vocab_size")
"""The UniXConfig fields that define the weights."""
