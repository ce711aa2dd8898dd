"""Uni-X causal LM for Hugging Face remote code (spec §1, §5, §6); copied verbatim into exports.

The first N and last M layers are separated: each token goes through its modality's copy and
attends causally only to earlier tokens of its own modality; the middle layers are shared.
Rotary positions are the original positions. One document per row (no packing); a 2-D
`attention_mask` with left padding is supported for batched generation.

A separated layer runs *both* copies over the whole sequence with the mask "causal AND same
modality" and keeps, per token, the output of its modality's copy. That is exact (every query sees
at least itself, so no softmax row is empty) and simple, at twice the compute and KV memory of
those layers; the reference's gather per modality avoids the 2x. Each vision copy has its own slot
in the DynamicCache, so cached keys/values are per modality (spec §6): a text query only ever
reads text-copy entries of text tokens, a vision query vision-copy entries of vision tokens.
"""

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding

from .configuration_unix import UniQwen2Config, UniQwen3Config

# model_type -> (decoder layer, RMSNorm, rotary embedding): transformers' own classes, so the
# parameter names are exactly those of spec §5.
_LAYER_STYLES = {
    "qwen3": (Qwen3DecoderLayer, Qwen3RMSNorm, Qwen3RotaryEmbedding),
    "qwen2": (Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding),
}


def _vision_copy(layer_cls: type[nn.Module], config, text_index: int, cache_index: int) -> nn.Module:
    """The vision copy of text layer `text_index`, writing its keys/values to cache slot `cache_index`."""
    layer = layer_cls(config, text_index)  # built like its text twin (same layer type)
    layer.self_attn.layer_idx = cache_index
    return layer


class UniXModel(nn.Module):
    """Embedding, text/shared layers, vision copies of the separated layers, final norm.

    Cache slots: 0..L-1 text/shared layers, L..L+N-1 vision encode copies, L+N..L+N+M-1 vision
    decode copies, and L+N+M the modality (1 = vision) of every cached token, stored as a cache
    layer so that cropping, reordering and batch selection keep it in step with the keys.
    """

    def __init__(self, config: UniQwen3Config | UniQwen2Config):
        super().__init__()
        layer_cls, norm_cls, rotary_cls = _LAYER_STYLES[config.model_type]
        L, N, M = config.num_hidden_layers, config.num_vision_encode_layers, config.num_vision_decode_layers
        if N < 0 or M < 0 or N + M > L:
            raise ValueError(f"num_vision_encode_layers={N} + num_vision_decode_layers={M} must be within "
                             f"num_hidden_layers={L}")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(layer_cls(config, i) for i in range(L))
        self.vision_encode_layers = nn.ModuleList(_vision_copy(layer_cls, config, i, L + i) for i in range(N))
        self.vision_decode_layers = nn.ModuleList(
            _vision_copy(layer_cls, config, L - M + j, L + N + j) for j in range(M))
        self.norm = norm_cls(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = rotary_cls(config)
        self.text_vocab = config.real_text_vocab_size
        self.vision_ids = [config.vision_start_id, *config.separator_ids()]
        self.modality_slot = L + N + M

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

    def _cached_modality(self, cache: Cache, vision: torch.Tensor) -> torch.Tensor:
        """Append this step's modality to the cache's modality slot; return it for all tokens [b, kv]."""
        if not isinstance(cache, DynamicCache):
            raise TypeError("Uni-X needs a DynamicCache (its vision copies and modality use extra cache slots)")
        while len(cache.layers) <= self.modality_slot:  # generate() sizes the cache for the L text layers only
            cache.layers.append(DynamicLayer())
        flags = vision[:, None, :, None]
        return cache.update(flags, flags, self.modality_slot)[0][:, 0, :, 0]

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None,
                position_ids: torch.LongTensor | None, cache: Cache | None) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        q_len = input_ids.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        vision = self.is_vision(input_ids)
        key_vision = self._cached_modality(cache, vision) if cache is not None else vision
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("Uni-X builds its own attention masks: pass a 2-D padding mask [batch, past + new]")
        if position_ids is None:  # as generate(): positions count from the first real (non-padding) token
            position_ids = (torch.arange(past, past + q_len, device=h.device)[None] if attention_mask is None
                            else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:])

        q_index = torch.arange(past, past + q_len, device=h.device)[:, None]
        k_index = torch.arange(key_vision.shape[1], device=h.device)[None]
        visible = (k_index <= q_index)[None]                                     # [1, q, kv] causal
        if attention_mask is not None:
            visible = visible & attention_mask.bool()[:, None, :]               # drop padding keys
        same_modality = key_vision[:, None, :] == vision[:, :, None]            # [b, q, kv]
        itself = (k_index == q_index)[None]  # keeps every softmax row non-empty (padding queries included)
        shared_mask = self._additive(visible | itself, h.dtype)
        separated_mask = self._additive(visible & same_modality | itself, h.dtype)

        position_embeddings = self.rotary_emb(h, position_ids)
        for i, layer in enumerate(self.layers):
            copy = self.vision_copy(i)
            mask = shared_mask if copy is None else separated_mask
            out = layer(h, attention_mask=mask, position_embeddings=position_embeddings, past_key_values=cache)
            if copy is not None:
                vision_out = copy(h, attention_mask=mask, position_embeddings=position_embeddings,
                                  past_key_values=cache)
                out = torch.where(vision[..., None], vision_out, out)
            h = out
        return self.norm(h)

    @staticmethod
    def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Boolean [b, q, kv] -> additive [b, 1, q, kv], the form both eager and SDPA attention accept."""
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min)[:, None]


class UniXForCausalLM(PreTrainedModel, GenerationMixin):
    """Uni-X LM head model shared by both layer styles (the subclasses only pick the config class)."""

    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules = ["Qwen3DecoderLayer", "Qwen2DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    def __init__(self, config: UniQwen3Config | UniQwen2Config):
        super().__init__(config)
        config.check_supported()
        self.model = UniXModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits for `input_ids` (routing needs the ids, so there is no `inputs_embeds`)."""
        if input_ids is None:
            raise ValueError("Uni-X routes tokens by id: pass input_ids")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        hidden = self.model(input_ids, attention_mask, position_ids, past_key_values if use_cache else None)
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)


class UniQwen3ForCausalLM(UniXForCausalLM):
    """Uni-X with Qwen3-style layers (the reference's checkpoints)."""

    config_class = UniQwen3Config


class UniQwen2ForCausalLM(UniXForCausalLM):
    """Uni-X with Qwen2-style layers (q/k/v bias, no QK norm)."""

    config_class = UniQwen2Config
