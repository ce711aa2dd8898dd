"""tools/convert_checkpoint.py: HF -> Megatron -> HF on tiny Qwen2/Qwen3 and Uni-X checkpoints.

Sources are written here with transformers (sharded safetensors, the tiny tokenizer of conftest),
with weights representable in bf16 so that the bf16 export can be compared bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import TINY_HF

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "tools" / "convert_checkpoint.py"
WORKER = Path(__file__).parent / "dist" / "convert_worker.py"
LAYERS, CODES = TINY_HF["num_hidden_layers"], 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_source(
    root: Path,
    tokenizer_dir: Path,
    style: str = "qwen2",
    tie: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    vocab: int = 192,
    seed: int = 0,
) -> Path:
    """A tiny Qwen2/Qwen3 text model with the test tokenizer, saved in several safetensors shards."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if style == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    config = config_cls(vocab_size=vocab, tie_word_embeddings=tie, initializer_range=0.1, **TINY_HF)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # not the default ones and zeros, so a skipped tensor shows
                param.copy_(0.5 + torch.rand(param.shape))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape))
            param.copy_(param.to(torch.bfloat16).float())
    model.to(dtype).save_pretrained(root, max_shard_size="40KB")
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, root / file.name)
    return root


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def options(**kw):
    from megatron_unix.conversion.convert import ImportOptions

    return ImportOptions(**{"vision_encode_layers": 1, "vision_decode_layers": 1, "vq_codebook_size": CODES, **kw})


def convert(tmp: Path, source: Path, **kw) -> tuple[Path, Path]:
    """Import ``source`` and export it again: (Megatron save dir, HF export dir)."""
    from megatron_unix.conversion.convert import export_hf, import_hf

    import_hf(source, tmp / "megatron", options(**kw))
    export_hf(tmp / "megatron", tmp / "exported", max_shard_size="40KB")
    return tmp / "megatron", tmp / "exported"


def tokenizer_length(directory: Path) -> int:
    from megatron_unix.data.tokenizer import load_text_tokenizer

    return len(load_text_tokenizer(directory))


# -------------------------------------------------------------------------------- (a) bit-exact


@pytest.mark.parametrize("style", ["qwen2", "qwen3"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_round_trip_is_bit_exact(megatron_single, hf_tokenizer_dir, tmp_path, style, tie):
    source = make_source(tmp_path / "source", hf_tokenizer_dir, style, tie)
    _, exported = convert(tmp_path, source)
    src, out = read_tensors(source), read_tensors(exported)
    vocab = 192
    vision = {
        "model.vision_encode_layers.0.": "model.layers.0.",
        "model.vision_decode_layers.0.": f"model.layers.{LAYERS - 1}.",
    }
    expected = set(src) | {v + n[len(t) :] for v, t in vision.items() for n in src if n.startswith(t)}
    assert set(out) == expected and ("lm_head.weight" in out) == (not tie)
    for name, tensor in out.items():
        assert tensor.dtype == torch.bfloat16, name
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # spec §2: mean-initialised new rows
            assert tensor.shape[0] == vocab + CODES
            assert torch.equal(tensor[:vocab], src[name])
            mean = src[name].float().mean(0).to(torch.bfloat16)
            assert torch.equal(tensor[vocab:], mean.expand(CODES, -1)), name
        else:
            twin = next((t + name[len(v) :] for v, t in vision.items() if name.startswith(v)), name)
            assert torch.equal(tensor, src[twin]), name  # vision copies are exact copies of text layer i
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == style and config["architectures"] == [f"Uni{style.title()}ForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_unix.Uni{style.title()}ForCausalLM"
    assert (config["vocab_size"], config["vision_vocab_size"]) == (vocab + CODES, CODES)
    assert config["real_text_vocab_size"] == tokenizer_length(hf_tokenizer_dir)
    assert (config["num_vision_encode_layers"], config["num_vision_decode_layers"]) == (1, 1)
    assert config["tie_word_embeddings"] == tie and config["skip_connection_loc"] == -1
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(out) and len(set(index["weight_map"].values())) > 1
    for name in ["modeling_unix.py", "configuration_unix.py", *(p.name for p in hf_tokenizer_dir.iterdir())]:
        assert (exported / name).is_file(), name


def test_layer_style_qwen2_to_qwen3_and_random_vision(megatron_single, hf_tokenizer_dir, tmp_path):
    """The reference's conversion: q/k/v bias dropped, QK norm of ones; fresh vision copies at the
    source's initializer_range."""
    source = make_source(tmp_path / "source", hf_tokenizer_dir, "qwen2", tie=True)
    _, exported = convert(tmp_path, source, layer_style="qwen3", vision_init="random")
    src, out = read_tensors(source), read_tensors(exported)
    assert json.loads((exported / "config.json").read_text())["model_type"] == "qwen3"
    assert not any(name.endswith("_proj.bias") for name in out)
    for i in range(LAYERS):
        for norm in ("q_norm", "k_norm"):
            assert torch.equal(out[f"model.layers.{i}.self_attn.{norm}.weight"], torch.ones(16, dtype=torch.bfloat16))
    for name, tensor in src.items():
        if not name.endswith("_proj.bias") and name != "model.embed_tokens.weight":
            assert torch.equal(out[name], tensor), name
    vision = {n: t for n, t in out.items() if "vision_" in n}
    assert len(vision) == 2 * 11
    for name, tensor in vision.items():
        if name.endswith("norm.weight"):
            assert torch.equal(tensor, torch.ones_like(tensor)), name
        else:
            std = json.loads((source / "config.json").read_text())["initializer_range"]  # as HF inits them
            assert tensor.float().std().item() == pytest.approx(std, rel=0.25), name
    assert not torch.equal(
        out["model.vision_encode_layers.0.mlp.up_proj.weight"], out["model.layers.0.mlp.up_proj.weight"]
    )


# -------------------------------------------------------------------- (b) text logits = Qwen's


@pytest.mark.parametrize("style,tie", [("qwen2", True), ("qwen3", False)])
def test_text_logits_match_transformers(megatron_single, hf_tokenizer_dir, tmp_path, style, tie):
    from transformers import AutoModelForCausalLM

    from megatron_unix.conversion.convert import load_megatron
    from megatron_unix.conversion.hf_io import model_class
    from megatron_unix.conversion.verify import megatron_logits

    source = make_source(tmp_path / "source", hf_tokenizer_dir, style, tie, dtype=torch.float32)
    megatron_dir, exported = convert(tmp_path, source)
    # ids 1 (BOI) and 3 (separator) are routed to the vision copies: text-only input avoids them
    tokens = torch.randint(4, tokenizer_length(hf_tokenizer_dir), (2, 40), generator=torch.Generator().manual_seed(3))
    original = model_class(style).from_pretrained(source, dtype=torch.float32).eval()
    unix = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True, dtype=torch.float32).eval()
    model, _, _ = load_megatron(megatron_dir)
    with torch.no_grad():
        want = original(input_ids=tokens).logits
        from_hf = unix(input_ids=tokens).logits[..., :192]
    for row in range(2):
        got = megatron_logits(model, tokens[row], 192 + CODES)[:, :192]
        torch.testing.assert_close(got, want[row], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_hf, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ (c) reference-format Uni-X

REFERENCE_FIELDS = dict(  # the reference's own fields, several off their defaults so that a reset shows
    add_sep_for_vis=1,
    vis_sep_tokens="<|vision_pad|>",
    vis_sep_lens="16",
    use_share_attn=1,
    use_share_ffn=1,
    attn_v_q_heads=2,
    decoder_sparse_step=4,
    ffn_share_size=1024,
    ffn_vision_size=4096,
    initializer_range=0.1,
    max_position_embeddings=4096,
    transformers_version="4.53.3",
    torch_dtype="bfloat16",
    rope_theta=1e6,
)
NEW_KEYS = {"auto_map", "rope_parameters", "dtype", "vis_sep_token_ids"}
"""What an export adds to a reference config.json: remote code, transformers 5 names, resolved separators."""
UNIX_SOURCE = dict(vision_encode_layers=None, vision_decode_layers=None, vq_codebook_size=None)
"""Import options for a Uni-X source: everything from its config.json."""


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, hf_tokenizer_dir, megatron_single) -> Path:
    """A Uni-X checkpoint as the reference writes it (transformers 4.53.3): spec §5 keys, separators by token
    text, rope_theta and torch_dtype at the top level, no rope_parameters, auto_map or code."""
    tmp = tmp_path_factory.mktemp("reference")
    source = make_source(tmp / "source", hf_tokenizer_dir, "qwen3", tie=True, seed=5)
    _, exported = convert(tmp, source, vision_decode_layers=2, vision_init="random")
    config_file = exported / "config.json"
    config = {k: v for k, v in json.loads(config_file.read_text()).items() if k not in NEW_KEYS}
    config_file.write_text(json.dumps({**config, **REFERENCE_FIELDS}, indent=2))
    generation = {
        "_from_model_config": True,
        "eos_token_id": config["eos_token_id"],
        "max_new_tokens": 77,
        "transformers_version": "4.53.3",
    }
    (exported / "generation_config.json").write_text(json.dumps(generation))
    for name in ("modeling_unix.py", "configuration_unix.py"):
        (exported / name).unlink()
    return exported


def test_reference_checkpoint_round_trip(megatron_single, reference_dir, hf_tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    from megatron_unix.conversion.convert import load_megatron
    from megatron_unix.conversion.verify import megatron_logits, sample_inputs, sample_text_ids

    megatron_dir, exported = convert(tmp_path, reference_dir, **UNIX_SOURCE)
    src, out = read_tensors(reference_dir), read_tensors(exported)
    assert set(out) == set(src) and all(torch.equal(out[n], src[n]) for n in src)
    for name in ("config.json", "generation_config.json"):  # every field of the reference's files, unchanged
        before, after = (json.loads((d / name).read_text()) for d in (reference_dir, exported))
        assert {k: after.get(k) for k in before} == before
        assert set(after) - set(before) <= NEW_KEYS
    separator = json.loads((hf_tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]["<|vision_pad|>"]
    config_json = json.loads((exported / "config.json").read_text())
    assert config_json["vis_sep_token_ids"] == [separator]

    model, config, _ = load_megatron(megatron_dir)
    vocab = config_json["vocab_size"]
    samples = sample_inputs(config, sample_text_ids(config))
    t2i = samples["t2i"].tolist()
    t2i.insert(t2i.index(config.boi_id) + 4, config.separator_ids[0])  # a separator inside the image
    unix = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True, dtype=torch.float32).eval()
    plain = Qwen3ForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        for tokens in (torch.tensor(t2i), samples["i2t"], samples["text"]):
            torch.testing.assert_close(
                unix(input_ids=tokens[None]).logits[0], megatron_logits(model, tokens, vocab), rtol=1e-5, atol=1e-5
            )
        text = samples["text"][None]
        torch.testing.assert_close(plain(input_ids=text).logits, unix(input_ids=text).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- (d) --verify


@pytest.fixture(scope="module")
def untied_source(tmp_path_factory, hf_tokenizer_dir) -> Path:
    """Vocabulary 252 + 48 = 300: padded to 384 at TP=1 but 512 at TP=2."""
    return make_source(tmp_path_factory.mktemp("untied") / "source", hf_tokenizer_dir, "qwen2", tie=False, vocab=252)


def run_cli(*args: str) -> int:
    from megatron_unix.cli.convert_checkpoint import main

    return main(list(args))


def _roll_embedding(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """An off-by-one vocabulary bug."""
    embedding = name in ("embedding.word_embeddings.weight", "model.embed_tokens.weight")
    return tensor.roll(1, dims=0) if embedding else tensor


def test_verify_passes_then_catches_a_corrupted_conversion(
    megatron_single, untied_source, tmp_path, capsys, monkeypatch
):
    from megatron_unix.conversion import convert

    flags = ["--vision-encode-layers", "1", "--vision-decode-layers", "1", "--vq-codebook-size", str(CODES)]
    assert run_cli("import-hf", "--hf-dir", str(untied_source), "--save", str(tmp_path / "m"), *flags, "--verify") == 0
    assert run_cli("export-hf", "--load", str(tmp_path / "m"), "--save", str(tmp_path / "h"), "--verify") == 0
    printed = capsys.readouterr().out
    for sample in (
        "text vs Qwen2ForCausalLM (source)",
        "t2i vs UniQwen2ForCausalLM",
        "i2t vs UniQwen2ForCausalLM (bf16",
    ):
        assert sample in printed
    assert "FAIL" not in printed

    iterate = convert.iter_hf_to_megatron
    monkeypatch.setattr(convert, "iter_hf_to_megatron", lambda *a: ((n, _roll_embedding(n, t)) for n, t in iterate(*a)))
    assert run_cli("import-hf", "--hf-dir", str(untied_source), "--save", str(tmp_path / "m2"), *flags, "--verify") == 1
    monkeypatch.undo()
    to_hf = convert.megatron_to_hf
    monkeypatch.setattr(convert, "megatron_to_hf", lambda *a: {n: _roll_embedding(n, t) for n, t in to_hf(*a).items()})
    assert run_cli("export-hf", "--load", str(tmp_path / "m"), "--save", str(tmp_path / "h2"), "--verify") == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "verification failed" in captured.err


# ------------------------------------------------------------------------------ (e) refusals


def _edit_tensors(directory: Path, edit) -> None:
    """Rewrite the shards of ``directory`` with ``edit(tensors)`` applied, and the index to match."""
    tensors = {}
    for file in directory.glob("*.safetensors"):
        tensors.update(load_file(file))
        file.unlink()
    (directory / "model.safetensors.index.json").unlink()
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _edit_config(directory: Path, **fields) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **fields}))


BAD = {
    "wrong shape": (
        lambda d: _edit_tensors(d, lambda t: t.update({"model.layers.1.mlp.down_proj.weight": torch.zeros(64, 95)})),
        "model.layers.1.mlp.down_proj.weight has shape [64, 95]",
    ),
    "missing tensor": (
        lambda d: _edit_tensors(d, lambda t: t.pop("model.layers.2.self_attn.k_proj.weight")),
        "model.layers.2.self_attn.k_proj.weight is missing",
    ),
    "extra tensor": (
        lambda d: _edit_tensors(d, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(1)})),
        "model.layers.9.mlp.up_proj.weight is not part of",
    ),
    "activation": (lambda d: _edit_config(d, hidden_act="gelu"), "hidden_act='gelu'"),
    "edited layer count": (
        lambda d: _edit_config(d, num_hidden_layers=6),
        "config.json: transformers refuses this config (Class validation error",
    ),
    "truncated config": (lambda d: _truncate(d / "config.json"), "config.json: not valid JSON"),
    "truncated index": (
        lambda d: _truncate(d / "model.safetensors.index.json"),
        "model.safetensors.index.json: not valid JSON",
    ),
    "damaged generation config": (
        lambda d: (d / "generation_config.json").write_text("[1]"),
        "generation_config.json: a JSON list, not an object",
    ),
    "truncated shard": (
        lambda d: _truncate(sorted(d.glob("model-*.safetensors"))[1]),
        "model-00002-of-00009.safetensors: not a readable safetensors file",
    ),
    "uni-x variant": (
        lambda d: _edit_config(
            d,
            num_vision_encode_layers=1,
            num_vision_decode_layers=1,
            vision_vocab_size=CODES,
            real_text_vocab_size=166,
            vision_start_id=1,
            skip_connection_loc=2,
        ),
        "skip_connection_loc=2",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sources_are_refused_by_name(megatron_single, untied_source, tmp_path, case):
    from megatron_unix.conversion.convert import import_hf
    from megatron_unix.conversion.hf_io import ConversionError

    broken = tmp_path / "broken"
    shutil.copytree(untied_source, broken)
    damage, message = BAD[case]
    damage(broken)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")) as error:
        import_hf(broken, tmp_path / "m", options())
    assert error.type is ConversionError
    assert not (tmp_path / "m").exists()


def test_refused_layer_style_and_flags(megatron_single, hf_tokenizer_dir, reference_dir, tmp_path):
    from megatron_unix.conversion.convert import import_hf
    from megatron_unix.conversion.hf_io import ConversionError

    with pytest.raises(ConversionError, match="--layer-style qwen2 from a qwen3 source"):
        import_hf(
            reference_dir,
            tmp_path / "a",
            options(vision_encode_layers=None, vision_decode_layers=None, vq_codebook_size=None, layer_style="qwen2"),
        )
    with pytest.raises(ConversionError, match="--vision-decode-layers 1 contradicts"):
        import_hf(reference_dir, tmp_path / "b", options(vision_encode_layers=None, vq_codebook_size=None))


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda d: _edit_config(d, vis_sep_tokens="<|vision_pad|>,<|no such token|>"),
            r"vis_sep_tokens item '<\|no such token\|>' is not a token of the tokenizer in .*broken",
        ),
        (
            lambda d: [(d / name).unlink() for name in ("tokenizer.json", "tokenizer_config.json")],
            r"broken/config.json: add_sep_for_vis=1 names vis_sep_tokens=\['<\|vision_pad\|>'\] by text, and .*broken has "
            "no tokenizer",
        ),
    ],
)
def test_separators_by_text_need_the_tokenizer(megatron_single, reference_dir, tmp_path, damage, message):
    from megatron_unix.conversion.convert import import_hf
    from megatron_unix.conversion.hf_io import ConversionError

    broken = tmp_path / "broken"
    shutil.copytree(reference_dir, broken)
    damage(broken)
    with pytest.raises(ConversionError, match=message):
        import_hf(broken, tmp_path / "m", options(**UNIX_SOURCE))
    assert not (tmp_path / "m").exists()


def test_export_removes_the_staging_of_killed_exports_only(megatron_single, hf_tokenizer_dir, tmp_path, capsys):
    from megatron_unix.conversion.convert import export_hf, import_hf

    import_hf(make_source(tmp_path / "source", hf_tokenizer_dir, "qwen3", tie=True), tmp_path / "m", options())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed, live = tmp_path / f".out.partial-{dead.pid}", tmp_path / f".out.partial-{os.getppid()}"
    for staging in (killed, live):
        staging.mkdir()
        (staging / "model.safetensors").write_bytes(b"x" * 100)
    export_hf(tmp_path / "m", tmp_path / "out")
    assert not killed.exists() and f"removed {killed}, left by a killed export" in capsys.readouterr().out
    assert live.exists()  # a running process's export is left alone


def test_export_without_the_recorded_tokenizer_writes_nothing(megatron_single, hf_tokenizer_dir, tmp_path):
    """Separators are written as token text, so an export needs the tokenizer; failing, it leaves no directory."""
    from megatron_unix.conversion.convert import export_hf, import_hf
    from megatron_unix.conversion.hf_io import ConversionError

    source = make_source(tmp_path / "source", hf_tokenizer_dir, "qwen3", tie=True)
    import_hf(source, tmp_path / "m", options(separator="<|vision_pad|>"))
    shutil.rmtree(source)
    with pytest.raises(ConversionError, match=r"separators \[3\] .*needs the tokenizer .*source"):
        export_hf(tmp_path / "m", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.slow
def test_cli_error_is_one_line(untied_source, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(untied_source, broken)
    _edit_config(broken, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0})
    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, str(CLI), "import-hf", "--hf-dir", str(broken), "--save", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("convert_checkpoint: error: config.json rope_parameters=") and "yarn" in last


# ------------------------------------------------------------------- (f) load at TP=2 and PP=2


@pytest.mark.dist
def test_converted_checkpoint_loads_at_tp2_and_pp2(megatron_single, untied_source, tmp_path):
    from dist.convert_worker import sample_batch

    from megatron_unix.conversion.convert import import_hf, load_megatron
    from megatron_unix.model.forward import stream_forward

    checkpoint = import_hf(untied_source, tmp_path / "m", options())
    model, config, common = load_megatron(checkpoint)
    with torch.no_grad():
        want = stream_forward(model.eval(), {"tokens": sample_batch(config)})[..., : common["model_args"]["vocab_size"]]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node=2",
            f"--master-port={free_port()}",
            str(WORKER),
            "--load",
            str(checkpoint),
            "--out",
            str(tmp_path / "logits"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for layout in ("tp2", "pp2"):
        torch.testing.assert_close(torch.load(tmp_path / f"logits.{layout}.pt"), want, rtol=1e-5, atol=1e-5)
