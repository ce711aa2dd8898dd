"""Exports read the same under every transformers their users run (issue: interchange).

A tiny Uni-X (Qwen3 or Qwen2 layers, N=M=1, a separator, rotary base 1e6) goes HF -> Megatron -> HF; the
export is then loaded in a fresh process, as a user would, by the pinned transformers and by the
reference's transformers 4.53.3 (an isolated site directory that .ci/legacy_transformers.sh builds
and caches): through the export's remote code and through plain ``Qwen3ForCausalLM`` /
``Qwen2ForCausalLM``. Every logit
must match the Megatron model's (fp32, 1e-5), and cached generation must equal recomputation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_convert import make_source

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LOADER = Path(__file__).parent / "interop" / "load_export.py"
LEGACY_SITE_ENV = "MEGATRON_UNIX_LEGACY_TRANSFORMERS"
LEGACY_VERSION = "4.53.3"


@pytest.fixture(scope="session")
def legacy_site() -> Path:
    """The transformers 4.53.3 site directory: CI's (environment variable) or built here the same way."""
    site = (
        os.environ.get(LEGACY_SITE_ENV)
        or subprocess.run(
            ["bash", str(ROOT / ".ci" / "legacy_transformers.sh"), sys.executable],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    return Path(site)


def qwen25_config(tiny: dict, eos: int) -> dict:
    """Qwen2.5-1.5B's config.json as its release writes it (transformers 4.40), with tiny dimensions: the keys
    a real import meets (max_window_layers, sliding_window, use_mrope, rope_theta and torch_dtype at the top)."""
    dims = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_hidden_layers",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
    )
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 131072,
        "max_window_layers": 21,
        "model_type": "qwen2",
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_cache": True,
        "use_mrope": False,
        "use_sliding_window": False,
        **{k: tiny[k] for k in dims},
    }


SOURCES = {"qwen3": ("qwen3", None), "qwen2": ("qwen2", None), "qwen2.5 release -> qwen3 layers": ("qwen2", "qwen3")}
"""Fixture param -> (source layer style, --layer-style): the last is the README's Qwen2.5 -> Uni-X path."""


@pytest.fixture(scope="module", params=list(SOURCES))
def exported(request, tmp_path_factory, hf_tokenizer_dir, megatron_single):
    """(export directory, samples file, Megatron fp32 logits per sample). The Megatron model compared with
    is the export imported again, so that both hold the same bf16-rounded weights (mean-initialised
    codebook rows and random vision copies are not bf16 values before the first export)."""
    from megatron_unix.conversion.convert import ImportOptions, export_hf, import_hf, load_megatron
    from megatron_unix.data.tokenizer import load_text_tokenizer

    tmp = tmp_path_factory.mktemp("interchange")
    style, target_style = SOURCES[request.param]
    source = make_source(tmp / "source", hf_tokenizer_dir, style, tie=style == "qwen3", seed=7)
    if target_style:  # the release's config.json in place of the one save_pretrained wrote
        tiny = json.loads((source / "config.json").read_text())
        eos = load_text_tokenizer(hf_tokenizer_dir).token_id("<|endoftext|>")
        (source / "config.json").write_text(json.dumps(qwen25_config(tiny, eos)))
    import_hf(
        source,
        tmp / "megatron",
        ImportOptions(
            vision_encode_layers=1,
            vision_decode_layers=1,
            vq_codebook_size=48,
            vision_init="random",
            separator="<|vision_pad|>",
            layer_style=target_style,
        ),
    )
    export_hf(tmp / "megatron", tmp / "exported")
    import_hf(tmp / "exported", tmp / "reimported")
    model, config, common = load_megatron(tmp / "reimported")
    samples, expected = write_samples(model, config, common, hf_tokenizer_dir, tmp / "samples.pt")
    return tmp / "exported", samples, expected


def write_samples(model, config, common: dict, tokenizer_dir: Path, samples: Path) -> tuple[Path, dict]:
    """The inputs ``load_export.py`` runs (the verify samples, a separator inside the image where the model
    routes one, a left-padded prompt and one ending in an image), written to ``samples``, and the
    Megatron model's fp32 logits of each."""
    from megatron_unix.conversion.verify import megatron_logits, sample_inputs, sample_text_ids
    from megatron_unix.data.tokenizer import load_text_tokenizer

    vocab = common["model_args"]["vocab_size"]
    rows = sample_inputs(config, sample_text_ids(config, load_text_tokenizer(tokenizer_dir)))
    if config.separator_ids:
        t2i = rows["t2i"].tolist()
        t2i.insert(t2i.index(config.boi_id) + 4, config.separator_ids[0])  # a separator inside the image
        rows["t2i"] = torch.tensor(t2i)
    text = rows["text"].tolist()
    prompts = torch.tensor([[0] * 4 + text[:8], text[:6] + rows["i2t"].tolist()[:6]])  # left-padded text; in an image
    mask = torch.tensor([[0] * 4 + [1] * 8, [1] * 12])
    torch.save({"rows": rows, "prompts": prompts, "prompt_mask": mask}, samples)
    expected = {name: megatron_logits(model, tokens, vocab) for name, tokens in rows.items()}
    expected["prompt_last"] = megatron_logits(model, prompts[1], vocab)[-1]
    expected["padded_prompt_last"] = megatron_logits(model, prompts[0, 4:], vocab)[-1]  # left padding changes nothing
    return samples, expected


def load_in_subprocess(export: Path, samples: Path, out: Path, pythonpath: Path | None) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, str(LOADER), str(export), str(samples), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("env", ["pinned", "reference"])
def test_export_reads_the_same_under_each_transformers(exported, legacy_site, tmp_path, env):
    import transformers

    export, samples, expected = exported
    result = load_in_subprocess(export, samples, tmp_path / "out.pt", legacy_site if env == "reference" else None)
    assert result["version"] == (LEGACY_VERSION if env == "reference" else transformers.__version__)
    check_loaded(result, expected)


def check_loaded(result: dict, expected: dict) -> None:
    """``load_export.py``'s output against the Megatron logits: every sample through the remote code, the
    text sample through the plain text LM, and a cached generation equal to its recomputation."""
    assert result["unix_class"].startswith("transformers_modules.")  # the export's own files
    for name, logits in result["unix"].items():
        close(logits, expected[name])
    close(result["plain_text"], expected["text"])  # rope_theta read right: the default 10000 misses by far
    generation = result["generation"]
    assert torch.equal(generation["cached_sequences"], generation["recomputed_sequences"])
    close(generation["cached_logits"], generation["recomputed_logits"])
    close(generation["cached_logits"][1, 0], expected["prompt_last"])
    close(generation["cached_logits"][0, 0], expected["padded_prompt_last"])


def test_export_states_its_transformers_range(exported):
    """The model card's lower bound is the release CI loads exports with."""
    card = (exported[0] / "README.md").read_text()
    assert f"`transformers>={LEGACY_VERSION},<6.0`" in card


@pytest.mark.parametrize("exported", ["qwen2.5 release -> qwen3 layers"], indirect=True)
def test_release_config_keys_are_carried_into_the_export(exported):
    """What the model did not change comes back as the release wrote it; what it changed is recomputed."""
    config = json.loads((exported[0] / "config.json").read_text())
    assert {
        k: config[k]
        for k in (
            "max_position_embeddings",
            "max_window_layers",
            "sliding_window",
            "use_mrope",
            "use_sliding_window",
            "initializer_range",
            "rope_theta",
        )
    } == {
        "max_position_embeddings": 131072,
        "max_window_layers": 21,
        "sliding_window": 131072,
        "use_mrope": False,
        "use_sliding_window": False,
        "initializer_range": 0.02,
        "rope_theta": 1e6,
    }
    assert (config["model_type"], config["architectures"], config["torch_dtype"]) == (
        "qwen3",
        ["UniQwen3ForCausalLM"],
        "bfloat16",
    )


@pytest.mark.parametrize("exported", ["qwen3"], indirect=True)
def test_config_fields_survive_training(exported, tmp_path):
    """export -> import -> pretrain_unix.py (2 iterations from --pretrained-checkpoint) -> export: the same
    config.json and generation_config.json, key for key, around trained weights."""
    import random

    from conftest import CORPUS
    from test_convert import read_tensors
    from test_pretrain import run

    from megatron_unix.conversion.convert import export_hf, import_hf
    from megatron_unix.data.indexed import DatasetWriter
    from megatron_unix.data.layouts import pair_sample, text_sample
    from megatron_unix.data.tokenizer import MultimodalTokenizer

    first = exported[0]
    import_hf(first, tmp_path / "imported")
    tok = MultimodalTokenizer.from_pretrained(first, codebook_size=48)
    rng = random.Random(0)
    with DatasetWriter(tmp_path / "data", tok.model_config_fields()) as writer:
        for i, line in enumerate(CORPUS[:40]):
            sample = text_sample(tok, line) if i % 2 else pair_sample(tok, line[:30], [rng.randrange(48)] * 8, rng)
            writer.add(sample.tokens, sample.trained, 0 if i % 2 else 9)
        writer.commit()
    run(
        [
            "--pretrained-checkpoint",
            str(tmp_path / "imported"),
            "--save",
            str(tmp_path / "trained"),
            "--tokenizer-model",
            str(first),
            "--data-path",
            str(tmp_path / "data"),
            "--split",
            "100,0,0",
            "--seq-length",
            "64",
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "2",
            "--train-iters",
            "2",
            "--lr",
            "1e-2",
            "--log-interval",
            "1",
        ]
    )
    export_hf(tmp_path / "trained", tmp_path / "second")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "second" / name).read_text()) == json.loads((first / name).read_text())
    before, after = read_tensors(first), read_tensors(tmp_path / "second")
    assert set(before) == set(after) and not all(torch.equal(before[k], after[k]) for k in before)
