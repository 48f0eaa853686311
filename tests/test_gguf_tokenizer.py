"""Tokenizers built from GGUF metadata encode exactly as SentencePiece itself and as transformers' own GGUF
tokenizer loading do, on a varied text set."""

import importlib.util
from pathlib import Path

import pytest
from gguf_vocab import TEXTS, smollm2_gguf, smollm2_vocab, spm_vocab, train_sentencepiece, write_vocab_gguf

from moepager.errors import MoepagerError
from moepager.generation.gguf_tokenizer import gguf_tokenizer, read_metadata
from moepager.sources.gguf_file import read_header


def ours(path: Path):
    return gguf_tokenizer(read_metadata(read_header(path)[0]))


def transformers_ids(path: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return [hf(t)["input_ids"] for t in texts]


def check_sentencepiece(model_file: Path, path: Path) -> None:
    import sentencepiece as spm

    sp, tok = spm.SentencePieceProcessor(model_file=str(model_file)), ours(path)
    for text, hf in zip(TEXTS, transformers_ids(path, TEXTS)):
        ids = tok.encode(text)
        assert ids == [sp.bos_id(), *sp.encode(text)], text
        assert tok.decode(ids) == sp.decode(ids) == text
        # transformers' Metaspace adds no "▁" to text that starts with a space; SentencePiece and llama.cpp do
        assert ids == hf or text[:1].isspace(), text


def test_sentencepiece_vocabulary(tmp_path):
    model = train_sentencepiece(tmp_path)
    check_sentencepiece(model, write_vocab_gguf(tmp_path / "gguf" / "v.gguf", spm_vocab(model)))


@pytest.mark.skipif(
    importlib.util.find_spec("mistral_common") is None, reason="mistral-common is not installed"
)
def test_mixtral_sentencepiece_vocabulary(tmp_path):
    """Mixtral's own 32000-token SentencePiece vocabulary (it ships inside mistral-common)."""
    spec = importlib.util.find_spec("mistral_common")
    model = Path(spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1"
    check_sentencepiece(model, write_vocab_gguf(tmp_path / "gguf" / "v.gguf", spm_vocab(model)))


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["smollm", "qwen2", "llama-bpe"])
def test_byte_level_vocabulary(tmp_path, pre):
    """SmolLM2's byte-level BPE under its own pre-tokenizer and others' (each splits text differently)."""
    if pre == "smollm":
        path = smollm2_gguf()
    else:
        path = write_vocab_gguf(tmp_path / "v.gguf", {**smollm2_vocab(), "pre": pre})
    tok = ours(path)
    chat = tok.apply_chat_template([{"role": "user", "content": TEXTS[3]}])
    texts = [*TEXTS, chat]
    for text, hf in zip(texts, transformers_ids(path, texts)):
        ids = tok.encode(text)
        assert ids == hf, text
        if text != chat:
            assert tok.decode(ids) == text
    assert tok.encode(chat, add_special_tokens=False)[0] == tok.tok.token_to_id("<|im_start|>")
    assert tok.eos_ids == [tok.tok.token_to_id("<|im_end|>")]


def test_unknown_pre_tokenizer_is_refused(tmp_path):
    path = write_vocab_gguf(tmp_path / "v.gguf", {**smollm2_vocab(), "pre": "not-a-pre-tokenizer"})
    with pytest.raises(MoepagerError, match="pre-tokenizer 'not-a-pre-tokenizer' is not known"):
        ours(path)
