"""The streaming detokenizer: its pieces, joined, are exactly the tokenizer's decode of all the ids."""

from __future__ import annotations

import json

import pytest
from tiny_models import write_word_tokenizer

from moepager.generation.tokenizer import StreamingDetokenizer, Tokenizer
from moepager.moefy.default_model import cache_dir


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = StreamingDetokenizer(tok)
    return [detok.add(i) for i in ids]


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    """The default model's byte-level BPE tokenizer, if it was built already (never builds it here)."""
    found = next(cache_dir().glob("smollm2-*/tokenizer.json"), None)
    if found is None:
        pytest.skip("the default model has not been built (no SmolLM2 tokenizer.json in the cache)")
    return Tokenizer(found.parent)


def test_byte_level_multibyte_characters(smollm2):
    text = "héllo 世界 🙂, naïve café 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 — done 👍🏽"
    ids = smollm2.encode(text, add_special_tokens=False)
    pieces = _stream(smollm2, ids)
    assert "".join(pieces) == smollm2.decode(ids) == text
    assert "" in pieces  # some character is split across tokens and was held back
    assert all("\ufffd" not in p for p in pieces)


def test_byte_level_skips_special_tokens(smollm2):
    messages = [{"role": "user", "content": "Grüße 🙂"}, {"role": "assistant", "content": "你好 👋"}]
    ids = smollm2.encode(smollm2.apply_chat_template(messages, add_generation_prompt=False), False)
    assert smollm2.tok.token_to_id("<|im_start|>") in ids
    assert "".join(_stream(smollm2, ids)) == smollm2.decode(ids)


def test_byte_level_every_prefix(smollm2):
    """After each token, the text so far is the decode of the ids so far, less any incomplete character."""
    ids = smollm2.encode("a 🙂🙂 b 世界世界 c", add_special_tokens=False)
    detok, text = StreamingDetokenizer(smollm2), ""
    for n, i in enumerate(ids, 1):
        text += detok.add(i)
        assert text == smollm2.decode(ids[:n]).rstrip("\ufffd")


def test_word_level_spaces_and_special_tokens(tmp_path):
    """Word-level tokenizers put a space between words; skipped special tokens add nothing."""
    write_word_tokenizer(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["added_tokens"] = [{"id": 128, "content": "<s>", "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}]  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer(tmp_path)
    ids = [128, 5, 17, 128, 128, 3, 99, 128, 1]
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == "w5 w17 w3 w99 w1"
    assert pieces[:3] == ["", "w5", " w17"]


def test_decodes_a_short_window_not_the_whole_sequence(tmp_path):
    write_word_tokenizer(tmp_path)
    tok = Tokenizer(tmp_path)
    seen, decode = [], tok.decode
    tok.decode = lambda ids: seen.append(len(ids)) or decode(ids)
    ids = list(range(1, 101))
    assert "".join(_stream(tok, ids)) == decode(ids)
    assert max(seen) == 2  # the last emitted id as context, and the new one
