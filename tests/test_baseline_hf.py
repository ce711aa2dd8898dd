"""The Table-4 baselines (spec §9) exported like Uni-X: a trained HardMoE and MoT checkpoint each go to an
HF directory whose remote code loads in a fresh process under the pinned transformers and the reference's
4.53.3 with the Megatron logits (fp32, 1e-5) and cached generation equal to recomputation; generate.py runs
text-to-image with guidance and image-to-text on the export, token for token as the Megatron model
decides them; evaluate.py loss gives the validation loss the training run logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_evaluate_loss import check_against_log, evaluate
from test_generate import save_tiny_vqgan
from test_interchange import check_loaded, legacy_site, load_in_subprocess, write_samples  # noqa: F401
from test_pretrain import CODEBOOK, IMAGE_CODES, common_args, data, run  # noqa: F401

pytestmark = pytest.mark.slow

VARIANTS = {
    "hardmoe": ["--layer-variant", "hardmoe", "--decoder-sparse-step", "2"],
    "mot": ["--layer-variant", "mot", "--ffn-vision-size", "48"],
}
CLASS_NAMES = {"hardmoe": "HardMoeQwen3CausalLM", "mot": "MoTQwen3ForCausalLM"}
CFG_SCALE = 3.0


@pytest.fixture(scope="module", params=list(VARIANTS))
def baseline(request, data, tmp_path_factory, megatron_single):  # noqa: F811
    """A baseline trained 2 iterations (then validated on 2 global batches), its export (``--verify`` passed),
    the samples file and the Megatron model's logits of each sample; the model holds the export's
    bf16-rounded weights."""
    from megatron_unix.conversion.convert import export_hf, load_megatron

    root = tmp_path_factory.mktemp(request.param)
    flags = ["--eval-interval", "2", "--eval-iters", "2", "--save", str(root / "megatron"), *VARIANTS[request.param]]
    run(common_args(data, iters=2) + flags)
    export_hf(root / "megatron", root / "hf", verify=True)  # raises VerificationFailed beyond the bf16 gate
    model, config, common = load_megatron(root / "megatron")
    assert config.layer_variant == request.param
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.bfloat16().float())
    samples, expected = write_samples(model, config, common, Path(data["tokenizer"]), root / "samples.pt")
    return dict(variant=request.param, root=root, model=model, config=config, samples=samples, expected=expected)


@pytest.mark.parametrize("env", ["pinned", "reference"])
def test_export_reads_the_same_under_each_transformers(baseline, legacy_site, tmp_path, env):  # noqa: F811
    export = baseline["root"] / "hf"
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == [CLASS_NAMES[baseline["variant"]]]
    result = load_in_subprocess(
        export, baseline["samples"], tmp_path / "out.pt", legacy_site if env == "reference" else None
    )
    assert result["class_name"] == CLASS_NAMES[baseline["variant"]]
    check_loaded(result, baseline["expected"])


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory) -> Path:
    return save_tiny_vqgan(tmp_path_factory.mktemp("vqgan"), CODEBOOK)  # IMAGE_CODES codes an image


def megatron_next(model, config, rows: list[list[int]]) -> torch.Tensor:
    """The Megatron model's logits [rows, vocab] after each whole row (recomputed, no cache)."""
    from megatron_unix.conversion.verify import megatron_logits

    return torch.stack([megatron_logits(model, torch.tensor(row), config.vq_offset + CODEBOOK)[-1] for row in rows])


def test_t2i_with_guidance_then_i2t_through_generate(baseline, vqgan_dir, tmp_path):
    """Greedy, so that every token is the Megatron model's own choice: t2i mixes the conditional and the
    unconditional logits as ``u + s (c - u)`` over the codes; i2t answers with text ids."""
    from megatron_unix.cli.generate import main
    from megatron_unix.data.tokenizer import load_text_tokenizer
    from megatron_unix.image.vqgan import VQGAN
    from megatron_unix.inference import generate
    from megatron_unix.inference.images import encode_files

    model, config, export = baseline["model"], baseline["config"], baseline["root"] / "hf"
    common = ["--hf", str(export), "--vqgan", str(vqgan_dir), "--greedy"]
    caption = "a red bicycle"
    t2i = ["--mode", "t2i", "--prompt", caption, "--cfg-scale", str(CFG_SCALE), "--output-dir", str(tmp_path / "t2i")]
    assert main([*common, *t2i]) == 0
    record = json.loads((tmp_path / "t2i" / "samples.jsonl").read_text())
    assert len(record["codes"]) == IMAGE_CODES and all(0 <= c < CODEBOOK for c in record["codes"])

    tokenizer = load_text_tokenizer(export)
    cond = [*tokenizer.encode(caption + generate.T2I_INSTRUCTION), config.boi_id]
    uncond = [*tokenizer.encode(generate.UNCONDITIONAL), config.boi_id]
    for code in record["codes"]:
        c, u = megatron_next(model, config, [cond, uncond])[:, config.vq_offset :]
        assert int((u + CFG_SCALE * (c - u)).argmax()) == code
        cond, uncond = cond + [config.vq_offset + code], uncond + [config.vq_offset + code]

    image = tmp_path / "t2i" / record["image"]
    i2t = ["--mode", "i2t", "--image", str(image), "--max-new-tokens", "4", "--output-dir", str(tmp_path / "i2t")]
    assert main([*common, *i2t]) == 0
    answer = json.loads((tmp_path / "i2t" / "samples.jsonl").read_text())["tokens"]
    assert 1 <= len(answer) <= 4 and all(t < config.vq_offset for t in answer)
    (codes,) = encode_files(VQGAN.from_pretrained(vqgan_dir), [image])
    assert codes == record["codes"] or len(codes) == IMAGE_CODES  # a random VQGAN need not reproduce its codes
    row = [
        config.boi_id,
        *[config.vq_offset + c for c in codes],
        config.eoi_id,
        *tokenizer.encode(generate.I2T_QUESTION),
    ]
    for token in answer:
        assert int(megatron_next(model, config, [row])[0, : config.vq_offset].argmax()) == token
        row.append(token)


def test_evaluate_loss_is_the_logged_validation(baseline, tmp_path):
    save = baseline["root"] / "megatron"
    proc = evaluate(["--load", str(save), "--output-dir", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_against_log(save, tmp_path, rel=1e-9)


def test_as_qwen3_leaves_exactly_the_vision_tensors_unused(baseline):
    """evaluate.py text --as-qwen3: transformers' own Qwen3ForCausalLM takes every tensor but the vision
    parts (``is_vision_tensor``), and on text gives the baseline's logits."""
    from test_convert import read_tensors

    from megatron_unix.cli.evaluate_text import as_text_lm
    from megatron_unix.conversion.hf_io import HFCheckpoint
    from megatron_unix.conversion.mappings import is_vision_tensor

    export = baseline["root"] / "hf"
    vision = {name for name in read_tensors(export) if is_vision_tensor(name)}
    model = as_text_lm(HFCheckpoint(export), torch.float32)
    assert vision and not vision & set(model.state_dict())
    with torch.no_grad():
        logits = model(input_ids=torch.load(baseline["samples"])["rows"]["text"][None]).logits[0]
    torch.testing.assert_close(logits, baseline["expected"]["text"], rtol=1e-5, atol=1e-5)
