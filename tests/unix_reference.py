"""Independent plain-PyTorch reference forward of Uni-X (the test oracle).

Written only from docs/spec.md (sections 1, 2, 4, 5); it imports nothing from
`megatron_unix` or `megatron`. Deliberately slow and explicit: every layer is evaluated
per row, per document and (in separated layers) per modality, each group run through its
own copy of the layer over just its tokens, causally, at their ORIGINAL row positions.
All math is float64; logits are returned as float32.
"""

import math

import torch
import torch.nn.functional as F


def _rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _get(weights, name):
    t = weights.get(name)
    return None if t is None else t.double()


def _layer(weights, p, cfg, x, pos):
    """One pre-norm Qwen block (prefix p) over the tokens x [n, H] at positions pos [n], causal."""
    n = x.shape[0]
    nh, nkv, d, eps = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["rms_eps"]
    h = _rmsnorm(x, _get(weights, f"{p}.input_layernorm.weight"), eps)
    proj = {}
    for name in ("q", "k", "v"):
        proj[name] = F.linear(
            h, _get(weights, f"{p}.self_attn.{name}_proj.weight"), _get(weights, f"{p}.self_attn.{name}_proj.bias")
        )
    q = proj["q"].view(n, nh, d).transpose(0, 1)  # [nh, n, d]
    k = proj["k"].view(n, nkv, d).transpose(0, 1)  # [nkv, n, d]
    v = proj["v"].view(n, nkv, d).transpose(0, 1)
    qn, kn = _get(weights, f"{p}.self_attn.q_norm.weight"), _get(weights, f"{p}.self_attn.k_norm.weight")
    if qn is not None:
        q = _rmsnorm(q, qn, eps)
    if kn is not None:
        k = _rmsnorm(k, kn, eps)
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = pos.double()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)  # [n, d]
    cos, sin = emb.cos(), emb.sin()
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    group = nh // nkv  # kv head j serves query heads j*group .. j*group+group-1
    k = k.repeat_interleave(group, dim=0)
    v = v.repeat_interleave(group, dim=0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # [nh, n, n]
    causal = pos[None, :] <= pos[:, None]  # key position <= query position
    scores = scores.masked_fill(~causal, float("-inf"))
    attn = torch.softmax(scores, dim=-1) @ v  # [nh, n, d]
    attn = attn.transpose(0, 1).reshape(n, nh * d)
    x = x + F.linear(attn, _get(weights, f"{p}.self_attn.o_proj.weight"))
    h = _rmsnorm(x, _get(weights, f"{p}.post_attention_layernorm.weight"), eps)
    mlp = F.silu(F.linear(h, _get(weights, f"{p}.mlp.gate_proj.weight"))) * F.linear(
        h, _get(weights, f"{p}.mlp.up_proj.weight")
    )
    return x + F.linear(mlp, _get(weights, f"{p}.mlp.down_proj.weight"))


def _is_vision(row, cfg):
    vis = (row >= cfg["vq_offset"]) | (row == cfg["boi_id"])
    for sep in cfg["separator_ids"]:
        vis = vis | (row == sep)
    return vis


def _documents(doc_row):
    """Maximal runs of equal id -> list of position-index tensors."""
    runs, start = [], 0
    for t in range(1, len(doc_row) + 1):
        if t == len(doc_row) or doc_row[t] != doc_row[t - 1]:
            runs.append(torch.arange(start, t))
            start = t
    return runs


def _forward64(weights, cfg, tokens, document_ids):
    L, N, M = cfg["num_layers"], cfg["n_encode"], cfg["n_decode"]
    b, s = tokens.shape
    x = _get(weights, "model.embed_tokens.weight")[tokens]  # [b, s, H]
    for i in range(L):
        separated = i < N or i >= L - M
        out = torch.zeros_like(x)
        for r in range(b):
            if document_ids is None or not cfg["document_isolation"]:
                docs = [torch.arange(s)]
            else:
                docs = _documents(document_ids[r].tolist())
            vis = _is_vision(tokens[r], cfg)
            for doc in docs:
                if not separated:
                    groups = [(doc, f"model.layers.{i}")]
                else:
                    vis_copy = (
                        f"model.vision_encode_layers.{i}" if i < N else f"model.vision_decode_layers.{i - (L - M)}"
                    )
                    groups = [(doc[~vis[doc]], f"model.layers.{i}"), (doc[vis[doc]], vis_copy)]
                for idx, prefix in groups:
                    if len(idx) > 0:
                        out[r, idx] = _layer(weights, prefix, cfg, x[r, idx], idx)
        x = out
    x = _rmsnorm(x, _get(weights, "model.norm.weight"), cfg["rms_eps"])
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    return F.linear(x, head.double())


def unix_reference_forward(
    weights: dict, cfg: dict, tokens: torch.Tensor, document_ids: torch.Tensor | None
) -> torch.Tensor:
    """Logits [b, s, vocab] in fp32 for tokens [b, s] (int64)."""
    return _forward64(weights, cfg, tokens, document_ids).float()


# --------------------------------------------------------------------------------------------------
# The paper's Table-4 baselines (spec §9), on the reference's HF names: one stack of L layers, every
# token of a document attends to all earlier tokens of the document (both modalities), and only some
# weights are chosen per token by its modality.


def _mixed_layer(weights, p, cfg, x, pos, vis, vision_attn, vision_mlp):
    """One pre-norm Qwen3 block over the tokens x [n, H] of one document at positions pos [n], causal
    over all of them. `vis` [n] marks vision tokens; for those, the q/k/v projections and QK norms are
    read from `vision_attn` names (role -> HF name) when given, and the MLP from `vision_mlp` names."""
    n = x.shape[0]
    nh, nkv, d, eps = cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["rms_eps"]
    text_attn = {
        **{r: f"{p}.self_attn.{r}_proj" for r in "qkv"},
        "q_norm": f"{p}.self_attn.q_norm",
        "k_norm": f"{p}.self_attn.k_norm",
    }
    text_mlp = {r: f"{p}.mlp.{r}_proj" for r in ("gate", "up", "down")}

    def pick(per_token):  # (text value, vision value) -> row-wise choice by modality
        text, vision = per_token
        return torch.where(vis.view(-1, *([1] * (text.dim() - 1))), vision, text)

    def project(names, h):
        q, k, v = (F.linear(h, _get(weights, names[r] + ".weight"), _get(weights, names[r] + ".bias")) for r in "qkv")
        q, k, v = q.view(n, nh, d), k.view(n, nkv, d), v.view(n, nkv, d)
        qn, kn = _get(weights, names["q_norm"] + ".weight"), _get(weights, names["k_norm"] + ".weight")
        return (q if qn is None else _rmsnorm(q, qn, eps)), (k if kn is None else _rmsnorm(k, kn, eps)), v

    def mlp(names, h):
        gate = F.silu(F.linear(h, _get(weights, names["gate"] + ".weight")))
        return F.linear(
            gate * F.linear(h, _get(weights, names["up"] + ".weight")), _get(weights, names["down"] + ".weight")
        )

    h = _rmsnorm(x, _get(weights, f"{p}.input_layernorm.weight"), eps)
    text_qkv = project(text_attn, h)
    qkv = text_qkv if vision_attn is None else [pick(pair) for pair in zip(text_qkv, project(vision_attn, h))]
    q, k, v = (t.transpose(0, 1) for t in qkv)  # [heads, n, d]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = pos.double()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    q = q * emb.cos() + _rotate_half(q) * emb.sin()
    k = k * emb.cos() + _rotate_half(k) * emb.sin()
    k, v = k.repeat_interleave(nh // nkv, dim=0), v.repeat_interleave(nh // nkv, dim=0)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(~(pos[None, :] <= pos[:, None]), float("-inf"))
    attn = (torch.softmax(scores, dim=-1) @ v).transpose(0, 1).reshape(n, nh * d)
    x = x + F.linear(attn, _get(weights, f"{p}.self_attn.o_proj.weight"))  # o_proj shared by both modalities
    h = _rmsnorm(x, _get(weights, f"{p}.post_attention_layernorm.weight"), eps)
    out = mlp(text_mlp, h) if vision_mlp is None else pick((mlp(text_mlp, h), mlp(vision_mlp, h)))
    return x + out


def _variant_forward64(weights, cfg, tokens, document_ids, vision_names):
    """`vision_names(i)` -> (vision q/k/v names or None, vision MLP names or None) of layer i."""
    b, s = tokens.shape
    x = _get(weights, "model.embed_tokens.weight")[tokens]
    for i in range(cfg["num_layers"]):
        vision_attn, vision_mlp = vision_names(i)
        out = torch.zeros_like(x)
        for r in range(b):
            isolated = document_ids is not None and cfg["document_isolation"]
            vis = _is_vision(tokens[r], cfg)
            for doc in _documents(document_ids[r].tolist()) if isolated else [torch.arange(s)]:
                out[r, doc] = _mixed_layer(
                    weights, f"model.layers.{i}", cfg, x[r, doc], doc, vis[doc], vision_attn, vision_mlp
                )
        x = out
    x = _rmsnorm(x, _get(weights, "model.norm.weight"), cfg["rms_eps"])
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    return F.linear(x, head.double())


def hardmoe_forward(weights, cfg, tokens, document_ids, sparse_step):
    """HardMoE logits [b, s, vocab] (fp32): layer i has a vision MLP (`mlp.vis_{gate,up,down}_proj`,
    used by vision tokens) iff (i + 1) % sparse_step == 0; everything else is shared."""

    def names(i):
        if (i + 1) % sparse_step:
            return None, None
        return None, {r: f"model.layers.{i}.mlp.vis_{r}_proj" for r in ("gate", "up", "down")}

    return _variant_forward64(weights, cfg, tokens, document_ids, names).float()


def mot_forward(weights, cfg, tokens, document_ids):
    """MoT logits [b, s, vocab] (fp32): in every layer vision tokens use `self_attn.vis_{q,k,v}_proj`,
    `vis_{q,k}_norm` and `mlp.vision_{gate,up,down}_proj`; one attention over all tokens of a document."""

    def names(i):
        p = f"model.layers.{i}"
        attn = {**{r: f"{p}.self_attn.vis_{r}_proj" for r in "qkv"}, "q_norm": f"{p}.self_attn.vis_q_norm"}
        attn["k_norm"] = f"{p}.self_attn.vis_k_norm"
        return attn, {r: f"{p}.mlp.vision_{r}_proj" for r in ("gate", "up", "down")}

    return _variant_forward64(weights, cfg, tokens, document_ids, names).float()
