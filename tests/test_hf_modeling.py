"""HF remote code for Uni-X (megatron_unix/conversion/hf_remote): an exported directory loaded with
AutoModelForCausalLM(trust_remote_code=True) matches the reference forward, generates with a
per-modality KV cache exactly as without cache, and still loads as a plain Qwen text LM."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import BOI, EOI, EOS, SEP, TEXT_VOCAB, TINY_HF, TINY_VOCAB
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from unix_reference import unix_reference_forward

from megatron_unix.conversion.hf_remote import REMOTE_CODE_DIR, REMOTE_CODE_FILES, auto_map
from megatron_unix.conversion.hf_remote.configuration_unix import UniQwen2Config, UniQwen3Config
from megatron_unix.conversion.hf_remote.modeling_unix import UniQwen2ForCausalLM, UniQwen3ForCausalLM, separator_ids

STYLES = {
    "qwen3": (UniQwen3Config, UniQwen3ForCausalLM, Qwen3ForCausalLM),
    "qwen2": (UniQwen2Config, UniQwen2ForCausalLM, Qwen2ForCausalLM),
}
LAYERS = TINY_HF["num_hidden_layers"]


def export(
    root: Path,
    style: str = "qwen3",
    tie: bool = True,
    n: int = 1,
    m: int = 1,
    separators: tuple[int, ...] = (),
    seed: int = 0,
) -> Path:
    """What the converter does: save_pretrained, copy the remote-code files, add `auto_map`."""
    config_cls, model_cls, _ = STYLES[style]
    extra = dict(add_sep_for_vis=1, vis_sep_token_ids=list(separators)) if separators else {}
    config = config_cls(
        vocab_size=TINY_VOCAB,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        **TINY_HF,
        initializer_range=0.1,
        num_vision_encode_layers=n,
        num_vision_decode_layers=m,
        real_text_vocab_size=TEXT_VOCAB,
        vision_start_id=BOI,
        **extra,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # non-default norms and biases, so a skipped one shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(0.5 + torch.rand(param.shape))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape))
    model.save_pretrained(root)
    for name in REMOTE_CODE_FILES:
        shutil.copy(REMOTE_CODE_DIR / name, root / name)
    config_path = root / "config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "auto_map": auto_map(style)}, indent=2))
    return root


def load_remote(root: Path, **kwargs):
    model = AutoModelForCausalLM.from_pretrained(root, trust_remote_code=True, **kwargs)
    assert type(model).__module__.startswith("transformers_modules.")  # the copied files, not our package
    return model.eval()


def reference_cfg(config, separators: tuple[int, ...]) -> dict:
    return dict(
        num_layers=LAYERS,
        hidden_size=64,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_eps=1e-6,
        rope_theta=1e6,
        n_encode=config.num_vision_encode_layers,
        n_decode=config.num_vision_decode_layers,
        vq_offset=TEXT_VOCAB,
        boi_id=BOI,
        separator_ids=list(separators),
        document_isolation=True,
    )


def text(k: int, g: torch.Generator) -> list[int]:
    return torch.randint(0, BOI, (k,), generator=g).tolist()


def codes(k: int, g: torch.Generator) -> list[int]:
    return torch.randint(TEXT_VOCAB, TINY_VOCAB, (k,), generator=g).tolist()


def mixed_rows(separator: int | None = None) -> torch.Tensor:
    """Text, T2I [text, BOI, codes, EOI, EOS] and I2T [BOI, codes, EOI, text, EOS] rows of 24 tokens."""
    g = torch.Generator().manual_seed(1)
    image = codes(12, g) if separator is None else codes(5, g) + [separator] + codes(6, g)
    rows = [text(24, g), text(9, g) + [BOI, *image, EOI, EOS], [BOI, *image, EOI, *text(9, g), EOS]]
    return torch.tensor(rows)


def spec_keys(n: int, m: int, style: str, tie: bool) -> set[str]:
    """The spec §5 tensor names."""
    keys = {"model.embed_tokens.weight", "model.norm.weight"} | (set() if tie else {"lm_head.weight"})
    blocks = [f"model.layers.{i}" for i in range(LAYERS)] + [f"model.vision_encode_layers.{i}" for i in range(n)]
    blocks += [f"model.vision_decode_layers.{j}" for j in range(m)]
    per_block = [f"self_attn.{p}_proj.weight" for p in "qkvo"]
    per_block += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    per_block += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    if style == "qwen2":
        per_block += [f"self_attn.{p}_proj.bias" for p in "qkv"]
    else:
        per_block += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    return keys | {f"{b}.{p}" for b in blocks for p in per_block}


def assert_tight(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize(
    "style, tie, n, m, separators, attn",
    [
        ("qwen3", True, 1, 1, (), "sdpa"),
        ("qwen2", False, 1, 2, (), "sdpa"),
        ("qwen3", True, 0, 0, (), "sdpa"),
        ("qwen3", False, 2, 1, (SEP,), "eager"),
    ],
)
def test_logits_match_reference(tmp_path, style, tie, n, m, separators, attn):
    root = export(tmp_path / "unix", style, tie, n, m, separators)
    with safe_open(root / "model.safetensors", "pt") as f:
        assert set(f.keys()) == spec_keys(n, m, style, tie)
    model = load_remote(root, attn_implementation=attn)
    tokens = mixed_rows(separators[0] if separators else None)
    with torch.no_grad():
        logits = model(tokens, use_cache=False).logits
    weights = dict(model.state_dict())
    cfg = reference_cfg(model.config, separators)
    assert_tight(logits, unix_reference_forward(weights, cfg, tokens, None))
    if n or m:  # the test has teeth: getting the routing wrong moves the logits far beyond the tolerance
        wrong = dict(cfg, separator_ids=[]) if separators else dict(cfg, n_encode=0, n_decode=0)
        assert (logits - unix_reference_forward(weights, wrong, tokens, None)).abs().max() > 1e-2 * logits.abs().max()


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """A text prompt (left-padded by 4) and a prompt ending inside an image, so both modalities are cached."""
    g = torch.Generator().manual_seed(2)
    rows = [[0] * 4 + text(6, g), text(4, g) + [BOI, *codes(5, g)]]
    mask = [[0] * 4 + [1] * 6, [1] * 10]
    return torch.tensor(rows), torch.tensor(mask)


@pytest.mark.parametrize("style", ["qwen3", "qwen2"])
def test_cached_greedy_generation_matches_recompute(tmp_path, style):
    model = load_remote(export(tmp_path / "unix", style, tie=style == "qwen3", seed=3))
    prompts, mask = left_padded_prompts()
    steps = 12
    with torch.no_grad():
        out = model.generate(
            prompts,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        seq, seq_mask, step_logits = prompts, mask, []
        for _ in range(steps):  # no cache: the full forward at every step
            last = model(seq, attention_mask=seq_mask, use_cache=False).logits[:, -1]
            step_logits.append(last)
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=1)
    assert torch.equal(out.sequences, seq)
    for cached, full in zip(out.logits, step_logits):
        assert_tight(cached, full)
    generated = seq[:, prompts.shape[1] :]
    assert (generated >= TEXT_VOCAB).any() and (generated < TEXT_VOCAB).any()  # both copies were cached
    with torch.no_grad():  # left padding changes nothing: the padded row continues like its prompt alone
        alone = model.generate(
            prompts[:1, 4:],
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(alone.sequences[0, 6:], generated[0])
    assert_tight(torch.stack(alone.logits)[:, 0], torch.stack(out.logits)[:, 0])


def test_cached_sampling_matches_teacher_forcing(tmp_path):
    model = load_remote(export(tmp_path / "unix", seed=3))
    prompts, mask = left_padded_prompts()
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(
            prompts,
            attention_mask=mask,
            max_new_tokens=10,
            do_sample=True,
            top_k=0,
            temperature=1.0,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        full_mask = torch.cat([mask, torch.ones(2, 10, dtype=mask.dtype)], dim=1)
        full = model(out.sequences, attention_mask=full_mask, use_cache=False).logits
    p = prompts.shape[1]
    assert_tight(torch.stack(out.logits, dim=1), full[:, p - 1 : -1])
    generated = out.sequences[:, p:]
    assert (generated >= TEXT_VOCAB).any() and (generated < TEXT_VOCAB).any()


def test_beam_search_and_prompt_lookup_match_decoding_without_cache(tmp_path):
    """Beam search reorders the cache and prompt-lookup decoding crops it: both must give what the same
    search gives recomputing every step without a cache."""
    model = load_remote(export(tmp_path / "unix", seed=3))
    prompts, mask = left_padded_prompts()
    common = dict(attention_mask=mask, max_new_tokens=8, pad_token_id=0, do_sample=False)
    with torch.no_grad():
        beams = model.generate(prompts, num_beams=3, **common)
        assert torch.equal(beams, model.generate(prompts, num_beams=3, use_cache=False, **common))
        row = prompts[1:]  # prompt lookup needs repeated n-grams: a prompt that repeats itself
        repeated = torch.cat([row, row], dim=1)
        kwargs = dict(common, attention_mask=torch.ones_like(repeated))
        looked_up = model.generate(repeated, prompt_lookup_num_tokens=3, **kwargs)
        assert torch.equal(looked_up, model.generate(repeated, use_cache=False, **kwargs))


def test_cache_crop_follows_both_transformers_conventions():
    from megatron_unix.conversion.hf_remote.modeling_unix import UniXCache

    def filled() -> UniXCache:
        cache = UniXCache()
        cache.append_modality(torch.tensor([[True, False, True, False, True]]))
        cache.update(0, torch.arange(5.0).view(1, 1, 5, 1), torch.arange(5.0).view(1, 1, 5, 1))
        return cache

    for length, kept in ((0, 5), (-2, 3), (3, 3), (9, 5)):  # 5.x: 0 / negative; 4.x: an absolute length
        cache = filled()
        cache.crop(length)
        assert cache.get_seq_length() == kept and cache.keys[0].shape[2] == kept, length
        assert torch.equal(cache.vision, torch.tensor([[True, False, True, False, True]])[:, :kept])


@pytest.mark.parametrize("style", ["qwen3", "qwen2"])
def test_directory_loads_as_plain_text_lm(tmp_path, style):
    root = export(tmp_path / "unix", style, tie=style == "qwen3")
    text_cls = STYLES[style][2]
    plain = text_cls.from_pretrained(root).eval()
    assert type(AutoModelForCausalLM.from_pretrained(root)) is text_cls  # without trust_remote_code
    unix = load_remote(root)
    g = torch.Generator().manual_seed(4)
    tokens = torch.tensor([text(16, g), text(8, g) + [EOI, EOS] + text(6, g)])
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, unix(tokens).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("field, value", [("skip_connection_loc", 2), ("add_share_ffn", 1), ("all_modal_visible", 1)])
def test_unsupported_reference_variants_are_refused(field, value):
    config = UniQwen3Config(vocab_size=TINY_VOCAB, **TINY_HF, **{field: value})
    with pytest.raises(ValueError, match=field):
        UniQwen3ForCausalLM(config)


def test_separators_route_by_resolved_ids_only():
    assert separator_ids(UniQwen2Config(add_sep_for_vis=1, vis_sep_tokens="<|vision_pad|>", vis_sep_token_ids=[7])) == [
        7
    ]
    assert separator_ids(UniQwen2Config(add_sep_for_vis=0, vis_sep_tokens="<|vision_pad|>")) == []  # the default
    with pytest.raises(ValueError, match="vis_sep_token_ids"):  # token texts alone: only a tokenizer resolves them
        separator_ids(UniQwen2Config(add_sep_for_vis=1, vis_sep_tokens="<|vision_pad|>"))
