"""Generation (megatron_unix/inference, tools/generate.py) on tiny random Uni-X models with the conftest
tokenizer: the spec §6 guidance step, padding- and batch-independence of seeded samples, the image
layout (codes, forced separators, EOI), text mode's mask, cache vs recompute, --load vs its HF export,
and the program end to end through a tiny VQGAN."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import TINY_HF

from megatron_unix.inference.generate import (
    generate_images,
    generate_text,
    i2t_prompt,
    t2i_prompt,
    unconditional_prompt,
)
from megatron_unix.inference.sampling import (
    SamplingParams,
    VocabLayout,
    derived_seed,
    draw,
    generators,
    guided,
    image_logits,
    restrict,
    shape,
)

CODES = 48
"""Model codebook = the tiny VQGAN's n_embed."""
CODES_PER_IMAGE = 16
SEPARATOR_EVERY = 4
T2I = SamplingParams(temperature=0.99, top_k=4096, top_p=0.96)
GREEDY = SamplingParams(greedy=True)
CAPTIONS = ["a red bicycle", "a quick brown fox jumps over the lazy dog near the river bank at dawn"]


def make_unix_dir(root: Path, tokenizer_dir: Path, separators: bool, seed: int = 0) -> Path:
    """A tiny Uni-X HF directory as the reference writes one (separators by token text), with the test
    tokenizer; weights representable in bf16, so a bf16 export of it holds the same values."""
    from megatron_unix.conversion.hf_remote.configuration_unix import UniQwen3Config
    from megatron_unix.conversion.hf_remote.modeling_unix import UniQwen3ForCausalLM
    from megatron_unix.data.tokenizer import load_text_tokenizer

    text = load_text_tokenizer(tokenizer_dir)
    separator = text.token_id("<|vision_pad|>")
    extra = dict(add_sep_for_vis=1, vis_sep_tokens="<|vision_pad|>", vis_sep_lens=str(SEPARATOR_EVERY))
    config = UniQwen3Config(
        vocab_size=len(text) + CODES,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        initializer_range=0.1,
        num_vision_encode_layers=1,
        num_vision_decode_layers=1,
        real_text_vocab_size=len(text),
        vision_vocab_size=CODES,
        vision_start_id=text.token_id("<|vision_start|>"),
        **TINY_HF,
        **(dict(extra, vis_sep_token_ids=[separator]) if separators else {}),
    )
    torch.manual_seed(seed)
    model = UniQwen3ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(0.5 + torch.rand(param.shape))
            param.copy_(param.to(torch.bfloat16).float())
    model.save_pretrained(root)
    config_file = root / "config.json"  # the reference's config.json names separators by text only
    config_file.write_text(
        json.dumps({k: v for k, v in json.loads(config_file.read_text()).items() if k != "vis_sep_token_ids"})
    )
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, root / file.name)
    return root


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory, hf_tokenizer_dir) -> Path:
    return make_unix_dir(tmp_path_factory.mktemp("plain"), hf_tokenizer_dir, separators=False)


@pytest.fixture(scope="module")
def sep_dir(tmp_path_factory, hf_tokenizer_dir) -> Path:
    return make_unix_dir(tmp_path_factory.mktemp("sep"), hf_tokenizer_dir, separators=True, seed=1)


def load(directory: Path):
    from megatron_unix.inference.loading import load_hf

    return load_hf(directory, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def plain(plain_dir):
    return load(plain_dir)


@pytest.fixture(scope="module")
def sep(sep_dir):
    return load(sep_dir)


def images(loaded, captions, seeds, params=T2I, **kw) -> list[list[int]]:
    tok, layout = loaded.tokenizer, loaded.layout
    return generate_images(
        loaded.model,
        layout,
        [t2i_prompt(tok, layout, c) for c in captions],
        unconditional_prompt(tok, layout),
        params,
        seeds,
        cfg_scale=kw.pop("cfg_scale", 4.0),
        codes_per_image=CODES_PER_IMAGE,
        **kw,
    )


def texts(loaded, prompts, seeds, params, max_new_tokens=12, **kw) -> list[list[int]]:
    contexts = [loaded.tokenizer.encode(p) for p in prompts]
    return generate_text(loaded.model, loaded.layout, contexts, params, seeds, max_new_tokens, **kw)


# ---------------------------------------------------------------------------------------- pure


LAYOUT = VocabLayout(vq_offset=3, codebook_size=3, boi_id=1, eoi_id=2, eos_id=0)
"""Ids 0..2 text (EOS, BOI, EOI), 3..5 codes, 6 an unused padding row."""


def test_guidance_mixes_raw_logits_then_masks():
    cond = torch.tensor([[9.0, 0.0, 0.0, 3.0, 2.5, 0.0, 7.0]])
    uncond = torch.tensor([[0.0, 0.0, 0.0, 2.0, 0.5, 3.0, 7.0]])
    # uncond + 4 (cond - uncond) on the codes (ids 3..5) = 6, 8.5, -9; text ids and the padding row dropped
    assert torch.equal(image_logits(cond, uncond, 4.0, LAYOUT), torch.tensor([[6.0, 8.5, -9.0]]))
    assert draw(image_logits(cond, uncond, 4.0, LAYOUT), GREEDY, []).item() == 1  # code 1: the guided choice
    assert draw(image_logits(cond, uncond, 1.0, LAYOUT), GREEDY, []).item() == 0  # cond alone prefers code 0
    # masking the branches before mixing is another computation: -inf - -inf poisons every masked id
    codes = torch.tensor([False, False, False, True, True, True, False])
    wrong = guided(restrict(cond, codes), restrict(uncond, codes), 4.0)
    assert torch.isnan(wrong[0, ~codes]).all()
    with pytest.raises(RuntimeError):  # ... and sampling from it fails
        draw(wrong, T2I, [torch.Generator().manual_seed(0)])


def test_temperature_then_top_k_then_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(shape(logits, SamplingParams(**kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.45) == [True, False, False, False]  # the top id alone reaches 0.45
    assert kept(top_p=0.7) == [True, True, False, False]  # the id that crosses p is kept
    assert kept(top_p=0.7, temperature=3.0) == [True, True, True, False]  # flatter after temperature
    assert kept(top_k=1, top_p=1.0) == [True, False, False, False]
    torch.testing.assert_close(shape(logits, SamplingParams(temperature=2.0)), logits / 2)
    for bad in (dict(temperature=0.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError, match="--t"):
            SamplingParams(**bad)


def test_separator_schedule_and_seeds():
    layout = VocabLayout(vq_offset=10, codebook_size=8, boi_id=1, eoi_id=2, eos_id=0, separator_id=3, separator_every=4)
    assert layout.image_schedule(9) == [False] * 4 + [True] + [False] * 4 + [True, False]  # none after the last code
    tokens = layout.image_tokens(list(range(8)) + [7])
    assert tokens == [10, 11, 12, 13, 3, 14, 15, 16, 17, 3, 17]
    assert layout.codes(tokens + [2]) == list(range(8)) + [7]
    text = layout.text_ids(20)
    assert text.tolist() == [i < 10 and i not in (1, 3) for i in range(20)]
    seeds = {derived_seed(s, p, i) for s in (0, 1) for p in range(3) for i in range(3)}
    assert len(seeds) == 18 and derived_seed(1234, 2, 1) == derived_seed(1234, 2, 1)


# ------------------------------------------------------------------------------- tiny models


def test_separators_resolved_from_the_reference_config(sep, plain):
    tok = sep.tokenizer
    assert sep.layout.separator_id == tok.token_id("<|vision_pad|>") and sep.layout.separator_every == SEPARATOR_EVERY
    assert sep.layout.eoi_id == tok.token_id("<|vision_end|>") and sep.layout.boi_id == tok.token_id("<|vision_start|>")
    assert (sep.layout.vq_offset, sep.layout.codebook_size) == (len(tok), CODES)
    assert plain.layout.separator_id is None
    assert sep.model.model.vision_ids == [sep.layout.boi_id, sep.layout.separator_id]  # routed as vision too


def test_images_follow_guidance_step_by_step(sep):
    """Greedy T2I equals an independent recompute: cond and uncond rows forwarded alone without cache,
    mixed, VQ ids kept, argmax; separators forced on schedule; EOI last."""
    model, layout, tok = sep.model, sep.layout, sep.tokenizer
    cond, uncond = t2i_prompt(tok, layout, CAPTIONS[0]), unconditional_prompt(tok, layout)
    expected = []
    with torch.no_grad():
        for forced in layout.image_schedule(CODES_PER_IMAGE):
            if forced:
                token = layout.separator_id
            else:
                c, u = (model(torch.tensor([seq]), use_cache=False).logits[0, -1] for seq in (cond, uncond))
                mixed = u + 4.0 * (c - u)
                mixed[: layout.vq_offset] = float("-inf")
                token = int(mixed.argmax())
            expected.append(token)
            cond, uncond = cond + [token], uncond + [token]
    got = images(sep, [CAPTIONS[0], CAPTIONS[1]], [0, 0], GREEDY)  # padded: the longer caption shares the batch
    assert got[0] == expected + [layout.eoi_id]
    assert images(sep, [CAPTIONS[0]], [0], GREEDY, cfg_scale=1.0)[0] != got[0]  # the guidance is used


@pytest.mark.parametrize("fixture", ["plain", "sep"])
def test_every_image_is_its_codes_then_eoi(request, fixture):
    loaded = request.getfixturevalue(fixture)
    layout = loaded.layout
    for tokens in images(loaded, CAPTIONS + CAPTIONS, [1, 2, 3, 4]):
        codes = [t for t in tokens if layout.vq_offset <= t < layout.vq_offset + CODES]
        assert len(codes) == CODES_PER_IMAGE and tokens[-1] == layout.eoi_id
        assert tokens[:-1] == layout.image_tokens([c - layout.vq_offset for c in codes])  # separators in place
        assert tokens.count(layout.separator_id) == (3 if fixture == "sep" else 0)
        assert len(set(codes)) > 1


@pytest.mark.parametrize("params", [GREEDY, T2I], ids=["greedy", "sampled"])
def test_guidance_scale_one_runs_no_unconditional_rows(sep, params):
    """At s = 1 only the prompts' rows are forwarded, and the codes are those of guidance computed with
    the unconditional rows (u + 1 * (c - u), each row alone, no cache), drawn from the same generators."""
    model, layout, tok = sep.model, sep.layout, sep.tokenizer
    rows: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda _, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        got = images(sep, CAPTIONS, [3, 4], params, cfg_scale=1.0)
    finally:
        hook.remove()
    assert rows and set(rows) == {len(CAPTIONS)}  # never the 2n rows of guidance
    for caption, seed, codes in zip(CAPTIONS, [3, 4], got):
        cond, uncond = t2i_prompt(tok, layout, caption), unconditional_prompt(tok, layout)
        rngs, expected = generators([seed], "cpu"), []
        with torch.no_grad():
            for forced in layout.image_schedule(CODES_PER_IMAGE):
                if forced:
                    token = layout.separator_id
                else:
                    c, u = (model(torch.tensor([seq]), use_cache=False).logits[:, -1].float() for seq in (cond, uncond))
                    token = layout.vq_offset + int(draw(image_logits(c, u, 1.0, layout), params, rngs).item())
                expected.append(token)
                cond, uncond = cond + [token], uncond + [token]
        assert codes == expected + [layout.eoi_id]


def test_batch_and_padding_change_no_sample(sep):
    alone = images(sep, [CAPTIONS[0]], [derived_seed(7, 0, 0)])[0]
    batched = images(sep, [CAPTIONS[1], CAPTIONS[0]], [derived_seed(7, 1, 0), derived_seed(7, 0, 0)])
    assert batched[1] == alone and batched[0] != alone
    text_alone = texts(sep, ["The caption"], [5], SamplingParams())[0]
    text_batched = texts(sep, [CAPTIONS[1], "The caption"], [6, 5], SamplingParams())
    assert text_batched[1] == text_alone and len(text_alone) > 3


def test_same_seed_same_codes_other_seed_other_codes(plain):
    first, again, other = (images(plain, [CAPTIONS[0]], [seed])[0] for seed in (11, 11, 12))
    assert first == again and first != other


def test_text_mode_emits_no_image_id_and_stops_at_eos(plain):
    model, layout = copy.deepcopy(plain.model), plain.layout
    vocab = model.config.vocab_size
    image = ~layout.text_ids(vocab)
    boost = torch.zeros(vocab)
    boost[image] = 100.0  # without the mask every token would be an image id
    handle = model.lm_head.register_forward_hook(lambda module, inputs, out: out + boost)
    loaded = type(plain)(model, plain.tokenizer, layout)
    with torch.no_grad():
        raw = model(torch.tensor([plain.tokenizer.encode("The caption")])).logits[0, -1]
    assert image[raw.argmax()]
    boost[layout.eos_id] = -100.0
    out = texts(loaded, CAPTIONS, [1, 2], SamplingParams(), max_new_tokens=20)
    assert [len(t) for t in out] == [20, 20] and not any(image[t].any() for t in map(torch.tensor, out))
    boost[layout.eos_id] = 200.0  # EOS first: nothing generated
    assert texts(loaded, CAPTIONS, [1, 2], SamplingParams()) == [[], []]
    handle.remove()


def test_kv_cache_generation_equals_recompute(sep):
    prompts = [CAPTIONS[1], CAPTIONS[0]]
    cached = images(sep, prompts, [0, 0], GREEDY)
    assert cached == images(sep, prompts, [0, 0], GREEDY, use_cache=False)
    text = texts(sep, prompts, [0, 0], GREEDY)
    assert text == texts(sep, prompts, [0, 0], GREEDY, use_cache=False) and all(len(t) > 3 for t in text)


def test_megatron_checkpoint_generates_as_its_hf_export(megatron_single, sep_dir, tmp_path):
    from megatron_unix.cli.generate import main
    from megatron_unix.conversion.convert import ImportOptions, export_hf, import_hf
    from megatron_unix.inference.loading import load_checkpoint

    import_hf(sep_dir, tmp_path / "megatron", ImportOptions())
    export_hf(tmp_path / "megatron", tmp_path / "hf")
    from_megatron = load_checkpoint(tmp_path / "megatron", device=torch.device("cpu"))
    from_hf = load(tmp_path / "hf")
    assert from_megatron.layout == from_hf.layout
    assert images(from_megatron, CAPTIONS, [3, 4]) == images(from_hf, CAPTIONS, [3, 4])
    sampled = SamplingParams()
    assert texts(from_megatron, CAPTIONS, [3, 4], sampled) == texts(from_hf, CAPTIONS, [3, 4], sampled)
    for source, checkpoint in (("--load", "megatron"), ("--hf", "hf")):  # the program, codes only (no VQGAN)
        flags = ["--mode", "t2i", "--prompt", CAPTIONS[0], "--codes-per-image", str(CODES_PER_IMAGE)]
        assert main([source, str(tmp_path / checkpoint), *flags, "--output-dir", str(tmp_path / source)]) == 0
    load_out, hf_out = ((tmp_path / flag / "samples.jsonl").read_text() for flag in ("--load", "--hf"))
    assert load_out == hf_out and len(json.loads(load_out)["codes"]) == CODES_PER_IMAGE


def test_i2t_prompt_layout(sep):
    layout, tok = sep.layout, sep.tokenizer
    prompt = i2t_prompt(tok, layout, list(range(CODES_PER_IMAGE)), "Q:")
    image = prompt[1 : 1 + CODES_PER_IMAGE + 3]
    assert prompt[0] == layout.boi_id and prompt[len(image) + 1] == layout.eoi_id
    assert image.count(layout.separator_id) == 3 and layout.codes(image) == list(range(CODES_PER_IMAGE))
    assert prompt[len(image) + 2 :] == tok.encode("Q:")


# ----------------------------------------------------------------------------------- program


def save_tiny_vqgan(root: Path, codebook: int) -> Path:
    """A random VQGAN of ``codebook`` entries at ``root``: a 16x16 image is 4x4 = 16 codes."""
    from megatron_unix.image.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    config = VQGANConfig(
        n_embed=codebook, embed_dim=8, z_channels=8, ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, resolution=16
    )
    VQGAN(config).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def vqgan_dir(tmp_path_factory) -> Path:
    return save_tiny_vqgan(tmp_path_factory.mktemp("vqgan"), CODES)


def test_cli_t2i_then_i2t(sep_dir, vqgan_dir, tmp_path, capsys):
    from PIL import Image

    from megatron_unix.cli.generate import main

    common = ["--hf", str(sep_dir), "--vqgan", str(vqgan_dir), "--seed", "5"]
    prompts = ["--prompt", CAPTIONS[0], "--prompt", CAPTIONS[1]]
    out = tmp_path / "t2i"
    assert main([*common, "--mode", "t2i", *prompts, "--samples-per-prompt", "2", "--output-dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample"]) for r in records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["seed"] for r in records] == [derived_seed(5, p, i) for p in range(2) for i in range(2)]
    for record in records:
        assert len(record["codes"]) == CODES_PER_IMAGE and all(0 <= c < CODES for c in record["codes"])
        assert Image.open(out / record["image"]).size == (16, 16)
    assert Image.open(out / "grid.png").size == (32, 32)
    again = tmp_path / "batched"  # one sample per batch: the same images
    assert (
        main(
            [
                *common,
                "--mode",
                "t2i",
                *prompts,
                "--samples-per-prompt",
                "2",
                "--batch-size",
                "1",
                "--output-dir",
                str(again),
            ]
        )
        == 0
    )
    assert (again / "samples.jsonl").read_text() == (out / "samples.jsonl").read_text()

    capsys.readouterr()
    image = out / records[0]["image"]
    answer_dir = tmp_path / "i2t"
    assert (
        main(
            [*common, "--mode", "i2t", "--image", str(image), "--max-new-tokens", "5", "--output-dir", str(answer_dir)]
        )
        == 0
    )
    answer = json.loads((answer_dir / "samples.jsonl").read_text())
    assert str(image) in answer["prompt"] and 0 < len(answer["tokens"]) <= 5
    assert answer["text"] in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hf", "missing-dir", "--prompt", "x"], "--hf missing-dir"),
        (["--mode", "t2i", "--prompt", "x"], "--output-dir"),
        (["--mode", "i2t"], "--image"),
        (["--mode", "text"], "--prompt"),
        (["--prompt", "x", "--top-p", "2"], "--top-p"),
        (["--prompt", "x", "--vqgan-config", "v.yaml"], "--vqgan-c"),
        (["--prompt", "x", "--samples-per-prompt", "0"], "--samples-per-prompt"),
        (["--prompt", "x", "--tokenizer", "nowhere"], "--tokenizer nowhere"),
    ],
)
def test_cli_refuses_by_flag(sep_dir, tmp_path, capsys, args, message):
    from megatron_unix.cli.generate import main

    source = [] if "--hf" in args else ["--hf", str(sep_dir)]
    assert main([*source, *args]) == 2
    error = capsys.readouterr().err
    assert error.startswith("generate: error:") and message in error
