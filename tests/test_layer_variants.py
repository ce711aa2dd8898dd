"""The paper's Table-4 baselines (spec §9) as layer variants: HardMoE and MoT against a plain-PyTorch
forward written from the spec, their reference checkpoint format, and the refused settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import build_tiny, check_against_reference, reference_cfg
from safetensors.torch import save_file
from test_convert import read_tensors
from tiny import TINY_VOCAB, make_batch
from unix_reference import hardmoe_forward, mot_forward

NO_SPLIT = dict(vision_encode_layers=0, vision_decode_layers=0)
VARIANTS = {
    "hardmoe-step2": dict(layer_variant="hardmoe", decoder_sparse_step=2),
    "hardmoe-step3-untied": dict(layer_variant="hardmoe", decoder_sparse_step=3, tie_word_embeddings=False),
    "mot-narrow-vision-ffn": dict(layer_variant="mot", ffn_vision_size=80),
    "mot-qwen2-style": dict(layer_variant="mot", qk_layernorm=False, add_qkv_bias=True),
    "mot-no-document-isolation": dict(layer_variant="mot", document_isolation=False),
}
ROWS = [["text", "t2i", "mid"], ["i2t", "image", "text", "t2i"], ["mid", "i2t"]]


def _reference_logits(weights, config, batch) -> torch.Tensor:
    cfg = reference_cfg(config)
    if config.layer_variant == "hardmoe":
        return hardmoe_forward(weights, cfg, batch["tokens"], batch["document_ids"], config.decoder_sparse_step)
    return mot_forward(weights, cfg, batch["tokens"], batch["document_ids"])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_and_gradients_match_reference(megatron_single, name):
    """Megatron (fp32) vs the spec's forward on the HF-keyed export: logits, loss and every gradient,
    so the key table is checked too (a vision tensor under the wrong name or layer changes the logits)."""
    model, config = build_tiny(seed=len(name), **NO_SPLIT, **VARIANTS[name])
    batch = make_batch(ROWS, seq=40, seed=len(name))
    check_against_reference(model, config, batch, lambda weights: _reference_logits(weights, config, batch))


@pytest.mark.parametrize("variant", ["hardmoe", "mot"])
def test_vision_weights_get_zero_gradients_on_text_only_batches(megatron_single, variant):
    """DDP needs a gradient for every parameter: an absent modality still runs (on padding) and gives zeros."""
    from megatron_unix.model.forward import stream_forward

    model, _ = build_tiny(seed=3, **NO_SPLIT, layer_variant=variant)
    batch = make_batch([["text", "text"], ["text"]], seq=24, seed=3)
    stream_forward(model, batch, batch["labels"]).sum().backward()
    vision = {n: p.grad for n, p in model.named_parameters() if ".vision." in n}
    assert vision and all(g is not None and not g.any() for g in vision.values())
    text_mlp = [p.grad for n, p in model.named_parameters() if n.endswith("mlp.linear_fc2.weight")]
    assert all(g.any() for g in text_mlp)


def test_parameter_counts(megatron_single):
    """HardMoE adds one MLP per ``decoder_sparse_step`` layers; MoT adds q/k/v, QK norms and an MLP of
    ``ffn_vision_size`` per layer; the count of vision parameters is what the trainer reports."""
    from megatron_unix.model.builder import parameter_counts

    h, f, q, kv, d, layers = 64, 96, 4 * 16, 2 * 16, 16, 4
    hardmoe, _ = build_tiny(**NO_SPLIT, layer_variant="hardmoe", decoder_sparse_step=2)
    assert parameter_counts(hardmoe)[1] == 2 * 3 * h * f
    mot, _ = build_tiny(**NO_SPLIT, layer_variant="mot", ffn_vision_size=80)
    assert parameter_counts(mot)[1] == layers * (h * (q + 2 * kv) + 2 * d + 3 * h * 80)
    shared, _ = build_tiny(**NO_SPLIT)
    assert parameter_counts(mot)[0] - parameter_counts(shared)[0] == parameter_counts(mot)[1]


# -------------------------------------------------------------------- reference checkpoint format

TEXT_LENGTH, CODES, VOCAB = 192, 48, 256
REFERENCE_CONFIG = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    rope_scaling=None,
    attention_bias=False,
    attention_dropout=0.0,
    tie_word_embeddings=True,
    use_sliding_window=False,
    vocab_size=VOCAB,
    model_type="qwen3",
    torch_dtype="bfloat16",
    transformers_version="4.53.3",
    # set_extra_args (modeling/shared_func_module.py): every field, whichever class is trained
    num_vision_encode_layers=9,
    num_vision_decode_layers=5,
    vision_vocab_size=CODES,
    all_modal_visible=0,
    vision_start_id=3,
    add_sep_for_vis=0,
    vis_sep_tokens="<|vision_pad|>",
    vis_sep_lens="8",
    skip_connection_loc=-1,
    add_share_ffn=0,
    ffn_share_size=1024,
    use_share_attn=1,
    use_share_ffn=1,
    attn_v_q_heads=4,
)
VARIANT_CONFIG = {
    "hardmoe": dict(architectures=["HardMoeQwen3CausalLM"], decoder_sparse_step=2, ffn_vision_size=2048),
    "mot": dict(architectures=["MoTQwen3ForCausalLM"], decoder_sparse_step=2, ffn_vision_size=80),
}


def _reference_tensors(variant: str, config: dict) -> dict[str, torch.Tensor]:
    """Every tensor the reference class holds (modeling/moe_qwen.py, modeling/mot_qwen.py), random bf16."""
    h, f, fv = config["hidden_size"], config["intermediate_size"], config["ffn_vision_size"]
    q, kv, d = 4 * 16, 2 * 16, 16
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, h), "model.norm.weight": (h,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        attention = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q)}
        shapes.update({f"{p}.self_attn.{n}_proj.weight": s for n, s in attention.items()})
        shapes.update({f"{p}.self_attn.q_norm.weight": (d,), f"{p}.self_attn.k_norm.weight": (d,)})
        shapes.update({f"{p}.input_layernorm.weight": (h,), f"{p}.post_attention_layernorm.weight": (h,)})
        shapes.update({f"{p}.mlp.gate_proj.weight": (f, h), f"{p}.mlp.up_proj.weight": (f, h)})
        shapes[f"{p}.mlp.down_proj.weight"] = (h, f)
        if variant == "hardmoe" and (i + 1) % config["decoder_sparse_step"] == 0:
            shapes.update({f"{p}.mlp.vis_gate_proj.weight": (f, h), f"{p}.mlp.vis_up_proj.weight": (f, h)})
            shapes[f"{p}.mlp.vis_down_proj.weight"] = (h, f)
        if variant == "mot":
            shapes.update({f"{p}.self_attn.vis_{n}_proj.weight": s for n, s in attention.items()})
            shapes.update({f"{p}.self_attn.vis_q_norm.weight": (d,), f"{p}.self_attn.vis_k_norm.weight": (d,)})
            shapes.update({f"{p}.mlp.vision_gate_proj.weight": (fv, h), f"{p}.mlp.vision_up_proj.weight": (fv, h)})
            shapes[f"{p}.mlp.vision_down_proj.weight"] = (h, fv)
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}


def _reference_dir(root: Path, tokenizer_dir: Path, variant: str) -> Path:
    from megatron_unix.data.tokenizer import load_text_tokenizer

    text = load_text_tokenizer(tokenizer_dir)
    config = {
        **REFERENCE_CONFIG,
        **VARIANT_CONFIG[variant],
        "real_text_vocab_size": len(text),
        "vision_start_id": text.token_id("<|vision_start|>"),
        "eos_token_id": text.token_id("<|endoftext|>"),
    }
    root.mkdir()
    save_file(_reference_tensors(variant, config), str(root / "model.safetensors"), metadata={"format": "pt"})
    (root / "config.json").write_text(json.dumps(config, indent=2))
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, root / file.name)
    return root


@pytest.mark.parametrize("variant", ["hardmoe", "mot"])
def test_reference_checkpoint_round_trip_is_bit_exact(megatron_single, hf_tokenizer_dir, tmp_path, variant):
    """Import of the reference's safetensors + config.json, export again: the same tensors bit for bit
    (MoT's unused ``vis_o_proj`` dropped), every config.json field kept, plus the ``auto_map`` of the
    variant's remote code; the reference directory and the export load into the variant's classes with
    the same logits as the Megatron checkpoint."""
    from megatron_unix.conversion.convert import ImportOptions, export_hf, import_hf, load_megatron

    source = _reference_dir(tmp_path / "reference", hf_tokenizer_dir, variant)
    import_hf(source, tmp_path / "megatron", ImportOptions())
    _, config, _ = load_megatron(tmp_path / "megatron")
    assert (config.layer_variant, config.num_vision_copy_layers) == (variant, 2 if variant == "hardmoe" else 4)
    assert (config.vision_encode_layers, config.vision_decode_layers) == (0, 0)
    export_hf(tmp_path / "megatron", tmp_path / "exported", max_shard_size="40KB")

    src, out = read_tensors(source), read_tensors(tmp_path / "exported")
    dropped = {n for n in src if ".vis_o_proj." in n}
    assert bool(dropped) == (variant == "mot")
    assert set(out) == set(src) - dropped
    assert all(torch.equal(out[n], src[n]) for n in out)
    before, after = (json.loads((d / "config.json").read_text()) for d in (source, tmp_path / "exported"))
    assert {k: after.get(k) for k in before} == before
    from megatron_unix.conversion.hf_remote import auto_map
    from megatron_unix.inference.loading import load_checkpoint, load_hf

    assert after["auto_map"] == auto_map("qwen3", variant) and (tmp_path / "exported" / "modeling_unix.py").exists()
    tokens = torch.tensor([[5, 9, 14, config.boi_id, *range(config.vq_offset, config.vq_offset + 8), 7, 11]])
    with torch.no_grad():
        expected = load_checkpoint(tmp_path / "megatron", device=torch.device("cpu")).model(tokens).logits
        for directory in (source, tmp_path / "exported"):  # the reference's vis_o_proj dropped without a word
            loaded = load_hf(directory, device=torch.device("cpu"))
            assert type(loaded.model).__name__ == VARIANT_CONFIG[variant]["architectures"][0]
            torch.testing.assert_close(loaded.model(tokens).logits, expected, rtol=1e-5, atol=1e-5)


def test_reference_checkpoint_with_a_foreign_tensor_is_refused(megatron_single, hf_tokenizer_dir, tmp_path):
    from megatron_unix.conversion.convert import ImportOptions, import_hf
    from megatron_unix.conversion.hf_io import ConversionError

    source = _reference_dir(tmp_path / "reference", hf_tokenizer_dir, "hardmoe")
    tensors = read_tensors(source)
    tensors["model.layers.0.mlp.vis_down_proj.weight"] = tensors["model.layers.1.mlp.vis_down_proj.weight"].clone()
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.vis_down_proj\.weight is not part"):
        import_hf(source, tmp_path / "megatron", ImportOptions())


# ------------------------------------------------------------------------------ refused settings


@pytest.mark.parametrize(
    "fields, flag",
    [
        (dict(layer_variant="moe"), "--layer-variant must be one of"),
        (dict(layer_variant="hardmoe", decoder_sparse_step=0, **NO_SPLIT), "--decoder-sparse-step must be positive"),
        (dict(layer_variant="hardmoe", decoder_sparse_step=5, **NO_SPLIT), "--decoder-sparse-step 5 exceeds"),
        (dict(layer_variant="mot"), "--vision-encode-layers and --vision-decode-layers must be 0"),
        (dict(layer_variant="hardmoe", vision_encode_layers=1, vision_decode_layers=0), "--vision-encode-layers"),
        (dict(layer_variant="hardmoe", ffn_vision_size=80, **NO_SPLIT), "--ffn-vision-size is for --layer-variant mot"),
        (dict(ffn_vision_size=80), "--ffn-vision-size is for --layer-variant mot"),
        (dict(layer_variant="mot", ffn_vision_size=0, **NO_SPLIT), "--ffn-vision-size must be positive"),
    ],
)
def test_bad_variant_settings_are_refused_by_flag(fields, flag):
    from tiny import TINY_MODEL

    from megatron_unix.model import make_config

    with pytest.raises(ValueError, match=flag):
        make_config(**{**TINY_MODEL, "transformer_impl": "local", **fields})


@pytest.mark.parametrize(
    "argv, flag",
    [
        (
            ["--layer-variant", "mot", "--vision-decode-layers", "1"],
            "--vision-encode-layers and --vision-decode-layers",
        ),
        (["--decoder-sparse-step", "3"], "--decoder-sparse-step is for --layer-variant hardmoe"),
        (["--layer-variant", "hardmoe", "--decoder-sparse-step", "0", "SPLIT"], "--decoder-sparse-step must be pos"),
        (["--layer-variant", "mot", "--decoder-sparse-step", "2", "SPLIT"], "--decoder-sparse-step is for"),
        (["--layer-variant", "hardmoe", "--ffn-vision-size", "64", "SPLIT"], "--ffn-vision-size is for"),
        (["--layer-variant", "mot", "--transformer-impl", "transformer_engine", "SPLIT"], "--transformer-impl local"),
        (
            ["--layer-variant", "mot", "--ffn-vision-size", "383", "--tensor-model-parallel-size", "2"],
            r"--ffn-vision-size \(383\)",
        ),
    ],
)
def test_bad_variant_flags_are_refused_before_start_up(argv, flag):
    from megatron_unix.training.arguments import parse_args, validate

    split = ["--vision-encode-layers", "0", "--vision-decode-layers", "0"]
    argv = [a for item in argv for a in (split if item == "SPLIT" else [item])]
    common = ["--model-preset", "tiny", "--seq-length", "32", "--train-iters", "2", "--data-path", "x"]
    with pytest.raises(ValueError, match=flag):
        validate(parse_args([*common, "--tokenizer-model", "t", *argv]), 1)


def test_tiny_preset_and_default_modules_of_a_baseline(monkeypatch):
    """The tiny preset's Uni-X split (1:1) is not forced on a baseline, and a baseline defaults to the local
    modules (Transformer Engine's spec fuses the shared norm into the projections it routes), also when the
    variant comes from the checkpoint being resumed, on a machine whose default is Transformer Engine."""
    from megatron_unix import platform
    from megatron_unix.training.arguments import architecture_flags, parse_args, transformer_impl

    args = parse_args(["--model-preset", "tiny", "--train-iters", "1", "--layer-variant", "hardmoe"])
    assert (args.vision_encode_layers, args.vision_decode_layers) == (0, 0)
    assert transformer_impl(args, architecture_flags(args, None)) == "local"
    unix = parse_args(["--model-preset", "tiny", "--train-iters", "1"])
    assert (unix.vision_encode_layers, unix.vision_decode_layers) == (1, 1)
    monkeypatch.setattr(platform, "default_transformer_impl", lambda: "transformer_engine")
    resumed = parse_args(["--train-iters", "1"])
    assert transformer_impl(resumed, architecture_flags(resumed, {"layer_variant": "mot"})) == "local"
    assert transformer_impl(resumed, architecture_flags(resumed, {"layer_variant": "unix"})) == "transformer_engine"


def test_flops_count_each_variants_real_compute():
    """Every token passes one copy of each weight: HardMoE and MoT cost the dense model's FLOPs with
    global attention, except MoT's vision MLP width; Uni-X's separated layers attend within modalities."""
    from tiny import BOI, TEXT_VOCAB, TINY_MODEL

    from megatron_unix.model import make_config
    from megatron_unix.training.metrics import attention_pairs, training_flops, vision_token_count

    batch = make_batch(ROWS, seq=40, seed=1)
    vision = int(((batch["tokens"] >= TEXT_VOCAB) | (batch["tokens"] == BOI)).sum())

    def flops(**fields) -> float:
        config = make_config(**{**TINY_MODEL, "transformer_impl": "local", **NO_SPLIT, **fields})
        assert vision_token_count(batch, config) == vision
        return training_flops(config, 256, batch["tokens"].numel(), *attention_pairs(batch, config), vision)

    dense = flops()
    assert flops(layer_variant="hardmoe") == dense and flops(layer_variant="mot") == dense
    layers, hidden = TINY_MODEL["num_layers"], TINY_MODEL["hidden_size"]
    narrow = 3 * vision * layers * 6 * hidden * (80 - TINY_MODEL["ffn_hidden_size"])
    assert flops(layer_variant="mot", ffn_vision_size=80) == dense + narrow
    assert flops(vision_encode_layers=1, vision_decode_layers=1) < dense


def test_vision_parts_are_stacked_over_the_layers_that_have_them(megatron_single):
    """Checkpoint keys: Uni-X's vision copies and HardMoE's vision MLPs form one tensor per weight stacked
    over their 2 of 4 layers, MoT's over all 4, so a checkpoint reshards at any TP/PP like the text weights."""
    hardmoe, _ = build_tiny(**NO_SPLIT, layer_variant="hardmoe", decoder_sparse_step=2)
    mot, _ = build_tiny(**NO_SPLIT, layer_variant="mot")
    unix, _ = build_tiny()  # 1:1, its keys as before the variants existed

    def stacked(model, key):
        shards = [t for t in model.sharded_state_dict().values() if getattr(t, "key", None) == key]
        return sorted((t.global_offset[0], t.global_shape[0]) for t in shards)

    assert stacked(unix, "decoder.layers.vision.mlp.linear_fc2.weight") == [(0, 2), (1, 2)]
    assert stacked(unix, "decoder.layers.vision.self_attention.linear_qkv.layer_norm_weight") == [(0, 2), (1, 2)]
    assert stacked(hardmoe, "decoder.layers.mlp.vision.linear_fc2.weight") == [(0, 2), (1, 2)]
    assert stacked(hardmoe, "decoder.layers.mlp.linear_fc2.weight") == [(i, 4) for i in range(4)]
    for key in (
        "decoder.layers.self_attention.vision.linear_qkv.weight",
        "decoder.layers.mlp.vision.linear_fc2.weight",
    ):
        assert stacked(mot, key) == [(i, 4) for i in range(4)]


def test_checkpoints_without_variant_fields_are_unix():
    from tiny import TINY_MODEL

    from megatron_unix.model.config import ModelArguments

    stored = {**TINY_MODEL, "add_qkv_bias": False, "tie_word_embeddings": True, "rotary_base": 1e6}
    stored.update(layernorm_epsilon=1e-6, separator_ids=[], vocab_size=TINY_VOCAB)
    arch = ModelArguments.from_dict(stored)
    assert (arch.layer_variant, arch.config(transformer_impl="local").ffn_vision_size) == ("unix", 96)


@pytest.mark.parametrize("variant", ["hardmoe", "mot"])
def test_baseline_starts_from_a_text_model(megatron_single, hf_tokenizer_dir, tmp_path, variant):
    """import-hf --layer-variant from a Qwen3 text model. By default as the reference starts its baselines:
    its HardMoE and MoT classes have no init_vision_weights (only Uni-X's has), so the vision parts keep
    HF's fresh init: norms 1, matrices N(0, initializer_range), none equal to its text twin. With
    --vision-init copy the vision parts are their text twins, and every token (BOI, id 1, is routed to
    them) is computed as the text model computes it."""
    from test_convert import CODES, make_source, options, tokenizer_length

    from megatron_unix.conversion.convert import import_hf, load_megatron
    from megatron_unix.conversion.hf_io import model_class
    from megatron_unix.conversion.mappings import megatron_to_hf, vision_twins
    from megatron_unix.conversion.verify import megatron_logits

    source = make_source(tmp_path / "source", hf_tokenizer_dir, "qwen3", tie=True, dtype=torch.float32)
    std = json.loads((source / "config.json").read_text())["initializer_range"]
    flags = dict(vision_encode_layers=0, vision_decode_layers=0, layer_variant=variant)
    import_hf(source, tmp_path / "default", options(**flags))
    fresh, config, _ = load_megatron(tmp_path / "default")
    text_vocab = tokenizer_length(hf_tokenizer_dir)
    weights = megatron_to_hf(dict(fresh.named_parameters()), config, text_vocab + CODES)
    matrices = []
    for vision, twin in vision_twins(config):
        if twin not in weights:
            continue
        if vision.endswith("norm.weight"):
            assert torch.equal(weights[vision], torch.ones_like(weights[vision])), vision
        else:
            assert not torch.equal(weights[vision], weights[twin]), vision
            matrices.append(weights[vision].flatten())
    values = torch.cat(matrices)
    assert abs(values.mean().item()) < 0.1 * std and values.std().item() == pytest.approx(std, rel=0.05)

    import_hf(source, tmp_path / "copy", options(**flags, vision_init="copy"))
    model, config, _ = load_megatron(tmp_path / "copy")
    assert config.layer_variant == variant and vision_twins(config)
    tokens = torch.randint(1, text_vocab, (2, 40), generator=torch.Generator().manual_seed(5))
    tokens[:, ::7] = 1  # BOI: through the vision parts
    original = model_class("qwen3").from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        want = original(input_ids=tokens).logits
    for row in range(2):
        got = megatron_logits(model, tokens[row], text_vocab + CODES)[:, : want.shape[-1]]
        torch.testing.assert_close(got, want[row], rtol=1e-5, atol=1e-5)
