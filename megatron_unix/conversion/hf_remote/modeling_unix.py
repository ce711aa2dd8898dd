"""Uni-X and the Table-4 baselines as causal LMs for Hugging Face remote code (spec §1, §5, §6, §9);
copied verbatim into exports.

This file runs under the *user's* transformers, so it owns everything that changes between
versions: the layers (RMSNorm, rotary, attention, MLP: parameter names exactly spec §5), the
attention masks and the KV cache. From transformers it takes only ``PreTrainedModel`` (loading,
saving, tying), ``GenerationMixin`` and ``CausalLMOutputWithPast``. Tested with transformers 4.53.3 (the
reference's pin) and 5.24.0; see ``TRANSFORMERS_SUPPORTED``.

The first N and last M layers are separated: each token goes through its modality's copy and
attends causally only to earlier tokens of its own modality; the middle layers are shared.
Rotary positions are the original positions. One document per row (no packing); a 2-D
``attention_mask`` with left padding is supported for batched generation.

A separated layer runs *both* copies over the whole sequence with the mask "causal AND same
modality" and keeps, per token, the output of its modality's copy. That is exact (every query sees
at least itself, so no softmax row is empty) and simple, at twice the compute and KV memory of
those layers; the reference's gather per modality avoids the 2x. Each copy has its own cache slot,
so cached keys/values are per modality (spec §6).

The baselines (spec §9) route by the same vision mask inside a layer, under one global causal
attention: HardMoE gives every ``decoder_sparse_step``-th layer a vision MLP (``mlp.vis_*_proj``), MoT
gives every layer vision q/k/v projections and QK norms (``self_attn.vis_*``) and a vision MLP
(``mlp.vision_*_proj``). A routed projection runs each copy on its own tokens only.
"""

import warnings

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_unix import (
    VIS_SEP_TOKEN_IDS,
    HardMoeQwen2Config,
    HardMoeQwen3Config,
    MoTQwen2Config,
    MoTQwen3Config,
    UniQwen2Config,
    UniQwen3Config,
    head_dim,
    rope_theta,
    unix_field,
)

TRANSFORMERS_SUPPORTED = (Version("4.53.3"), Version("6.0"))
"""[lowest, first unsupported): the range this file is written for; CI tests both ends' releases."""

if not TRANSFORMERS_SUPPORTED[0] <= Version(transformers.__version__) < TRANSFORMERS_SUPPORTED[1]:
    warnings.warn(
        f"Uni-X remote code supports transformers >={TRANSFORMERS_SUPPORTED[0]},<{TRANSFORMERS_SUPPORTED[1]}; "
        f"this is {transformers.__version__}",
        stacklevel=2,
    )

CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
"""The output field generate() reads the cache from: ``past_key_values`` in 4.x, renamed ``cache`` in 5.2x."""

UNSUPPORTED_VARIANTS = {"skip_connection_loc": -1, "add_share_ffn": 0, "all_modal_visible": 0}
"""Reference variants this code does not implement, with the value that means "off"."""


def check_supported(config) -> None:
    """Refuse, naming the field, what this code would compute differently from the checkpoint's model
    (megatron-unix's converter applies the same refusals to what it imports)."""

    def rope_type(field: str) -> str:
        return (getattr(config, field, None) or {}).get("rope_type", "default")

    plain_rope = "only plain rotary embeddings (rope_type 'default') are implemented"
    problems = {
        field: (unix_field(config, field) != off, "a reference variant this code does not implement")
        for field, off in UNSUPPORTED_VARIANTS.items()
    }
    problems.update(
        hidden_act=(getattr(config, "hidden_act", "silu") != "silu", "the layers use SwiGLU (silu)"),
        rope_parameters=(rope_type("rope_parameters") != "default", plain_rope),  # transformers 5.x
        rope_scaling=(rope_type("rope_scaling") != "default", plain_rope),  # transformers 4.x
        use_sliding_window=(
            bool(getattr(config, "use_sliding_window", False)),
            "Uni-X attends over the whole sequence",
        ),
        attention_bias=(
            bool(getattr(config, "attention_bias", False)),
            "a Qwen3 attention bias includes o_proj.bias, which these layers do not have",
        ),
    )
    for field, (bad, why) in problems.items():
        if bad:
            raise ValueError(f"{field}={getattr(config, field, None)!r} is not supported: {why}")


def separator_ids(config) -> list[int]:
    """Ids routed as vision besides VQ codes and BOI: the resolved ``vis_sep_token_ids`` when
    ``add_sep_for_vis``. A reference config names separators by token text only; its own code
    resolves them with its tokenizer, which a model cannot do: convert it with import-hf/export-hf."""
    if not int(unix_field(config, "add_sep_for_vis")):
        return []
    ids = getattr(config, VIS_SEP_TOKEN_IDS, None)
    if ids is None:
        raise ValueError(
            f"add_sep_for_vis=1 with vis_sep_tokens={unix_field(config, 'vis_sep_tokens')!r} (token "
            f"texts) but no {VIS_SEP_TOKEN_IDS}: export the checkpoint with megatron-unix's "
            "convert_checkpoint.py, which resolves them through the tokenizer"
        )
    return [int(i) for i in ids]


class UniXCache:
    """Keys/values per slot (text/shared layers 0..L-1, then the vision copies) and the modality of
    every cached token. Owned here, not a transformers ``Cache``: generate() stores it between steps,
    asks ``get_seq_length``, and for beam search and (5.x) assisted decoding reorders and crops it.
    Assisted or prompt-lookup decoding under transformers 4.x is not supported (its cropping helper
    knows only its own cache classes)."""

    is_compileable = False
    is_croppable = True

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.vision: torch.Tensor | None = None  # [batch, cached tokens]

    @property
    def is_linear(self) -> list[bool]:  # transformers 5.x: no linear-attention (state) layers here
        return [False]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.vision is None else self.vision.shape[1]

    def append_modality(self, vision: torch.Tensor) -> torch.Tensor:
        """Record this step's modality; returns the modality of every cached token [batch, kv]."""
        self.vision = vision if self.vision is None else torch.cat([self.vision, vision], dim=1)
        return self.vision

    def update(self, slot: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if slot in self.keys:
            key = torch.cat([self.keys[slot], key], dim=2)
            value = torch.cat([self.values[slot], value], dim=2)
        self.keys[slot], self.values[slot] = key, value
        return key, value

    def crop(self, length: int) -> None:
        """Drop the last ``-length`` tokens (negative; 0 drops nothing: transformers 5.x), or keep the
        first ``length`` (positive: 4.x); a cache already that short is left as it is."""
        cached = self.get_seq_length()
        keep = cached + length if length <= 0 else min(length, cached)
        if keep < cached:
            self._apply(lambda t, dim: t.narrow(dim, 0, max(keep, 0)))

    def activate_past_recording(self) -> None:
        """transformers 5.x asks this before it may crop; every past token is kept anyway."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t, dim: t.index_select(0, beam_idx.to(t.device)))

    def _apply(self, fn) -> None:
        for store in (self.keys, self.values):
            for slot, tensor in store.items():
                store[slot] = fn(tensor, 2)
        if self.vision is not None:
            self.vision = fn(self.vision, 1)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """Rotary embedding over the whole head dim, rotate-half convention (spec §1). The frequencies
    are computed per call, not kept in a buffer: from_pretrained builds modules on the meta device,
    and a non-persistent buffer would not survive that in every transformers version."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = (
            torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=positions.device).float() / self.head_dim
        )
        inv_freq = 1.0 / (self.theta**exponents)
        freqs = positions[..., None].float() * inv_freq  # [b, s, d/2]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [b, 1, s, d]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def routed(x: torch.Tensor, vision: torch.Tensor, text_fn, vision_fn) -> torch.Tensor:
    """``text_fn`` on the text tokens of ``x`` [b, s, ...] and ``vision_fn`` on the vision ones (``vision``
    [b, s]), each over its own tokens only, put back in place."""
    if not vision.any():
        return text_fn(x)
    if vision.all():
        return vision_fn(x)
    text, image = text_fn(x[~vision]), vision_fn(x[vision])
    out = text.new_empty(*vision.shape, *text.shape[1:])
    out[~vision], out[vision] = text, image
    return out


class Attention(nn.Module):
    """Grouped-query attention; Qwen3 style has per-head QK norm, Qwen2 style q/k/v bias. With
    ``vision_qkv`` (MoT) vision tokens take their own q/k/v projections and QK norms (``vis_*``); the
    output projection is shared."""

    def __init__(self, config, qk_norm: bool, qkv_bias: bool, vision_qkv: bool = False) -> None:
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim(config)
        hidden = config.hidden_size
        self.prefixes = ("", "vis_") if vision_qkv else ("",)
        for prefix in self.prefixes:
            for name, heads in (("q", self.heads), ("k", self.kv_heads), ("v", self.kv_heads)):
                self.add_module(f"{prefix}{name}_proj", nn.Linear(hidden, heads * self.head_dim, bias=qkv_bias))
            if qk_norm:
                self.add_module(f"{prefix}q_norm", RMSNorm(self.head_dim, config.rms_norm_eps))
                self.add_module(f"{prefix}k_norm", RMSNorm(self.head_dim, config.rms_norm_eps))
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        self.qk_norm = qk_norm

    def project(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        """q, k, v of tokens ``x`` [..., hidden] through the ``prefix`` copy, as [..., heads + 2 kv heads, d]."""
        q = getattr(self, f"{prefix}q_proj")(x).unflatten(-1, (self.heads, self.head_dim))
        k = getattr(self, f"{prefix}k_proj")(x).unflatten(-1, (self.kv_heads, self.head_dim))
        v = getattr(self, f"{prefix}v_proj")(x).unflatten(-1, (self.kv_heads, self.head_dim))
        if self.qk_norm:
            q, k = getattr(self, f"{prefix}q_norm")(q), getattr(self, f"{prefix}k_norm")(k)
        return torch.cat([q, k, v], dim=-2)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: UniXCache | None,
        slot: int,
        vision: torch.Tensor,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        if len(self.prefixes) == 1:
            qkv = self.project(x, "")
        else:
            qkv = routed(x, vision, lambda t: self.project(t, ""), lambda t: self.project(t, "vis_"))
        q, k, v = qkv.transpose(1, 2).split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        if cache is not None:
            k, v = cache.update(slot, k, v)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU MLP; with a ``vision`` (prefix, width), vision tokens take their own (HardMoE: ``vis_`` at the
    text width; MoT: ``vision_`` at ``ffn_vision_size``)."""

    def __init__(self, config, vision: tuple[str, int] | None = None) -> None:
        super().__init__()
        self.copies = [("", config.intermediate_size)] + ([vision] if vision else [])
        for prefix, width in self.copies:
            self.add_module(f"{prefix}gate_proj", nn.Linear(config.hidden_size, width, bias=False))
            self.add_module(f"{prefix}up_proj", nn.Linear(config.hidden_size, width, bias=False))
            self.add_module(f"{prefix}down_proj", nn.Linear(width, config.hidden_size, bias=False))

    def swiglu(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        gate, up, down = (getattr(self, f"{prefix}{name}_proj") for name in ("gate", "up", "down"))
        return down(F.silu(gate(x)) * up(x))

    def forward(self, x: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        if len(self.copies) == 1:
            return self.swiglu(x, "")
        return routed(x, vision, lambda t: self.swiglu(t, ""), lambda t: self.swiglu(t, self.copies[1][0]))


class DecoderLayer(nn.Module):
    """Pre-norm attention and SwiGLU MLP; ``slot`` is its place in the KV cache; ``vision_qkv`` and
    ``vision_mlp`` give it a baseline's vision parts."""

    def __init__(self, config, slot: int, vision_qkv: bool = False, vision_mlp: tuple[str, int] | None = None) -> None:
        super().__init__()
        qwen3 = config.model_type == "qwen3"
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, qk_norm=qwen3, qkv_bias=not qwen3, vision_qkv=vision_qkv)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, vision_mlp)
        self.slot = slot

    def forward(
        self, h: torch.Tensor, rotary, mask: torch.Tensor, cache: UniXCache | None, vision: torch.Tensor
    ) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rotary, mask, cache, self.slot, vision)
        return h + self.mlp(self.post_attention_layernorm(h), vision)


def baseline_layer(config, variant: str, i: int) -> DecoderLayer:
    """Layer ``i`` of a baseline (spec §9): HardMoE's vision MLP where (i + 1) % decoder_sparse_step == 0;
    MoT's vision q/k/v, QK norms and MLP of ``ffn_vision_size`` in every layer."""
    if variant == "hardmoe":
        step = int(unix_field(config, "decoder_sparse_step"))
        if step < 1:
            raise ValueError(f"decoder_sparse_step={step} must be positive")
        return DecoderLayer(config, i, vision_mlp=("vis_", config.intermediate_size) if (i + 1) % step == 0 else None)
    return DecoderLayer(config, i, vision_qkv=True, vision_mlp=("vision_", int(unix_field(config, "ffn_vision_size"))))


class UniXModel(nn.Module):
    """Embedding, text/shared layers, vision copies of the separated layers, final norm; for a baseline
    ``variant``, its layers with their vision parts and no separated layers (the Uni-X split fields of
    its config.json are ignored, as the reference's classes ignore them).

    Cache slots: 0..L-1 text/shared layers, L..L+N-1 vision encode copies, L+N..L+N+M-1 vision
    decode copies.
    """

    def __init__(self, config, variant: str = "unix") -> None:
        super().__init__()
        L = config.num_hidden_layers
        N, M = unix_field(config, "num_vision_encode_layers"), unix_field(config, "num_vision_decode_layers")
        if variant != "unix":
            N = M = 0
        if N < 0 or M < 0 or N + M > L:
            raise ValueError(
                f"num_vision_encode_layers={N} + num_vision_decode_layers={M} must be within num_hidden_layers={L}"
            )
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) if variant == "unix" else baseline_layer(config, variant, i) for i in range(L)
        )
        self.vision_encode_layers = nn.ModuleList(DecoderLayer(config, L + i) for i in range(N))
        self.vision_decode_layers = nn.ModuleList(DecoderLayer(config, L + N + j) for j in range(M))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(head_dim(config), rope_theta(config))
        self.text_vocab = unix_field(config, "real_text_vocab_size")
        self.vision_ids = [unix_field(config, "vision_start_id"), *separator_ids(config)]

    def is_vision(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Spec §1 routing: VQ codes, BOI and separators are vision; everything else is text."""
        specials = torch.tensor(self.vision_ids, device=input_ids.device)
        return (input_ids >= self.text_vocab) | torch.isin(input_ids, specials)

    def vision_copy(self, i: int) -> nn.Module | None:
        """The vision copy of layer i, or None for a shared layer."""
        L, N, M = len(self.layers), len(self.vision_encode_layers), len(self.vision_decode_layers)
        if i < N:
            return self.vision_encode_layers[i]
        if i >= L - M:
            return self.vision_decode_layers[i - (L - M)]
        return None

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: UniXCache | None,
    ) -> torch.Tensor:
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("Uni-X builds its own attention masks: pass a 2-D padding mask [batch, past + new]")
        h = self.embed_tokens(input_ids)
        q_len = input_ids.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        vision = self.is_vision(input_ids)
        key_vision = cache.append_modality(vision) if cache is not None else vision
        if position_ids is None:  # as generate(): positions count from the first real (non-padding) token
            position_ids = (
                torch.arange(past, past + q_len, device=h.device)[None]
                if attention_mask is None
                else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            )

        q_index = torch.arange(past, past + q_len, device=h.device)[:, None]
        k_index = torch.arange(key_vision.shape[1], device=h.device)[None]
        visible = (k_index <= q_index)[None]  # [1, q, kv] causal
        if attention_mask is not None:
            visible = visible & attention_mask.bool()[:, None, :]  # drop padding keys
        itself = (k_index == q_index)[None]  # keeps every softmax row non-empty (padding queries included)
        same_modality = key_vision[:, None, :] == vision[:, :, None]  # [b, q, kv]
        shared_mask = (visible | itself)[:, None]  # [b, 1, q, kv]
        separated_mask = (visible & same_modality | itself)[:, None]

        rotary = self.rotary(position_ids, h.dtype)
        for i, layer in enumerate(self.layers):
            copy = self.vision_copy(i)
            if copy is None:
                h = layer(h, rotary, shared_mask, cache, vision)
            else:
                h = torch.where(
                    vision[..., None],
                    copy(h, rotary, separated_mask, cache, vision),
                    layer(h, rotary, separated_mask, cache, vision),
                )
        return self.norm(h)


class UniXForCausalLM(PreTrainedModel, GenerationMixin):
    """LM head model shared by every variant and layer style (the subclasses pick the config class,
    the ``variant`` and the ``style``)."""

    variant = "unix"
    style = "qwen3"
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # iterates as a list for 4.x
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config) -> None:
        super().__init__(config)
        check_supported(config)
        self.model = UniXModel(config, self.variant)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: UniXCache | None = None,
        cache: UniXCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits for ``input_ids`` (routing needs the ids, so there is no ``inputs_embeds``).

        The cache arrives as ``past_key_values`` (transformers 4.x) or ``cache`` (5.x). generate()
        may hand the first step an empty cache of its own; it is replaced by a :class:`UniXCache`.
        """
        if input_ids is None:
            raise ValueError("Uni-X routes tokens by id: pass input_ids")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = cache if cache is not None else past_key_values
        if not isinstance(cache, UniXCache):
            if cache is not None and cache.get_seq_length() > 0:
                raise TypeError(f"Uni-X keeps its own cache (UniXCache), not a filled {type(cache).__name__}")
            cache = UniXCache() if use_cache else None
        hidden = self.model(input_ids, attention_mask, position_ids, cache)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:  # next-token cross-entropy over positions whose label is not -100
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})


class UniQwen3ForCausalLM(UniXForCausalLM):
    """Uni-X with Qwen3-style layers (the reference's checkpoints)."""

    config_class = UniQwen3Config


class UniQwen2ForCausalLM(UniXForCausalLM):
    """Uni-X with Qwen2-style layers (q/k/v bias, no QK norm)."""

    config_class = UniQwen2Config
    style = "qwen2"


class HardMoeQwen3CausalLM(UniXForCausalLM):
    """HardMoE with Qwen3-style layers, under the reference's class name (``modeling/moe_qwen.py``)."""

    config_class = HardMoeQwen3Config
    variant = "hardmoe"


class HardMoeQwen2CausalLM(UniXForCausalLM):
    """HardMoE with Qwen2-style layers."""

    config_class = HardMoeQwen2Config
    variant, style = "hardmoe", "qwen2"


MOT_UNUSED = [r"self_attn\.vis_o_proj\."]
"""The reference's MoT creates a vision output projection it never uses: accepted and dropped on load."""


class MoTQwen3ForCausalLM(UniXForCausalLM):
    """MoT with Qwen3-style layers, under the reference's class name (``modeling/mot_qwen.py``)."""

    config_class = MoTQwen3Config
    variant = "mot"
    _keys_to_ignore_on_load_unexpected = MOT_UNUSED


class MoTQwen2ForCausalLM(UniXForCausalLM):
    """MoT with Qwen2-style layers."""

    config_class = MoTQwen2Config
    variant, style = "mot", "qwen2"
    _keys_to_ignore_on_load_unexpected = MOT_UNUSED


CAUSAL_LM_CLASSES: dict[tuple[str, str], type[UniXForCausalLM]] = {
    (cls.style, cls.variant): cls
    for cls in (
        UniQwen3ForCausalLM,
        UniQwen2ForCausalLM,
        HardMoeQwen3CausalLM,
        HardMoeQwen2CausalLM,
        MoTQwen3ForCausalLM,
        MoTQwen2ForCausalLM,
    )
}
"""(layer style, variant) -> class; its name is what config.json ``architectures`` records."""
