"""The multimodal tokenizer over real SentencePiece and HF tokenizers trained here on small text."""

from __future__ import annotations

import pytest
from conftest import SPECIALS


@pytest.mark.parametrize("source", ["sentencepiece_model", "hf_tokenizer_dir"])
def test_layout_of_the_vocabulary(request, source):
    from megatron_unix.data.tokenizer import MultimodalTokenizer, load_text_tokenizer

    path = request.getfixturevalue(source)
    text = load_text_tokenizer(path)
    tok = MultimodalTokenizer.from_pretrained(path, codebook_size=64)
    assert tok.vq_offset == len(text)
    assert tok.vocab_size == len(text) + 64
    assert tok.image_tokens([0, 63]) == [len(text), len(text) + 63]
    assert [tok.eos_id, tok.boi_id, tok.eoi_id] == [text.token_id(s) for s in SPECIALS[:3]]
    assert tok.separator_id is None and tok.model_config_fields()["separator_ids"] == ()  # only when asked
    with_separator = MultimodalTokenizer(text, 64, separator=SPECIALS[3])
    assert with_separator.model_config_fields()["separator_ids"] == (text.token_id(SPECIALS[3]),)
    assert [text.token_text(text.token_id(s)) for s in SPECIALS] == SPECIALS
    assert tok.eod == tok.pad == tok.eos_id
    ids = tok.tokenize("a red bicycle")
    assert max(ids) < tok.vq_offset
    assert tok.detokenize(ids + tok.image_tokens([5])).strip() == "a red bicycle"
    assert tok.unique_identifiers["vq_offset"] == tok.vq_offset


def test_bad_inputs_are_named(sentencepiece_model, tmp_path):
    from megatron_unix.data.tokenizer import MultimodalTokenizer

    tok = MultimodalTokenizer.from_pretrained(sentencepiece_model, codebook_size=64)
    with pytest.raises(ValueError, match="VQ code 64 is outside the codebook 0..63"):
        tok.image_tokens([1, 64])
    with pytest.raises(ValueError, match="no BOI token '<image>'"):
        MultimodalTokenizer.from_pretrained(sentencepiece_model, boi="<image>")
    with pytest.raises(ValueError, match="no separator token '<sep>'"):
        MultimodalTokenizer.from_pretrained(sentencepiece_model, separator="<sep>")
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        MultimodalTokenizer.from_pretrained(tmp_path / "missing.model")
