"""moefy: dense llama GGUF -> HF folder, and dense llama -> Qwen2-MoE, checked against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moepager
from moepager.moefy.gguf_dense import convert_gguf

H, I, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 2, 4, 2, 300


def _byte_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary: the 256 GPT-2 byte symbols, a few merges, then filler tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, "Ġt", "he", "Ġthe"]
    tokens += [f"<extra_{i}>" for i in range(VOCAB - len(tokens))]
    return tokens, merges


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert-time q/k permutation (rotate-half order -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path, seed: int = 0) -> None:
    import gguf

    rng = np.random.default_rng(seed)
    rand = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)  # noqa: E731
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    tokens, merges = _byte_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    # Q8_0 for the matrices (as real files are quantized), F32 for norms
    q8 = lambda name, a: w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),  # noqa: E731
                                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
    q8("token_embd.weight", rand(VOCAB, H))
    w.add_tensor("output_norm.weight", 1 + rand(H))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + rand(H))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + rand(H))
        q8(f"blk.{i}.attn_q.weight", _permute(rand(H, H), HEADS))
        q8(f"blk.{i}.attn_k.weight", _permute(rand(H // HEADS * KV_HEADS, H), KV_HEADS))
        q8(f"blk.{i}.attn_v.weight", rand(H // HEADS * KV_HEADS, H))
        q8(f"blk.{i}.attn_output.weight", rand(H, H))
        q8(f"blk.{i}.ffn_gate.weight", rand(I, H))
        q8(f"blk.{i}.ffn_up.weight", rand(I, H))
        q8(f"blk.{i}.ffn_down.weight", rand(H, I))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_llama_gguf(path)
    return path


def test_gguf_to_hf_matches_transformers(tiny_gguf, tmp_path):
    import transformers as tf

    out = convert_gguf(tiny_gguf, tmp_path / "dense")
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    ref = tf.AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    )
    with torch.no_grad():
        expected = ref.eval()(ids).logits
    engine = moepager.load(out)
    torch.testing.assert_close(engine.logits(ids), expected, atol=1e-4, rtol=0)
    assert engine.tokenizer.chat_template.startswith("{% for m in messages %}")
    ref_tok = tf.AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    for text in ["the theme 12", " the\n\nthe <|im_end|>"]:
        assert engine.tokenizer.encode(text) == ref_tok.encode(text)
    assert engine.tokenizer.encode("<|im_end|>") == [2]


# ------------------------------------------------------------------------------------- moefy


def _calibration_text(n: int = 1024, seed: int = 1) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(0, 128, (n,), generator=g).tolist())


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random dense llama (hidden 32, 64 neurons per layer) with the word tokenizer."""
    import transformers as tf
    from tiny_models import COMMON, write_word_tokenizer

    torch.manual_seed(0)
    config = tf.LlamaConfig(**{**COMMON, "initializer_range": 0.2})
    model = tf.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    write_word_tokenizer(path)
    return path, model


def _moefy(src, out, top_k, seed=0):
    from moepager.moefy.build import moefy

    return moefy(src, out, experts=4, top_k=top_k, seed=seed, shared=16, calibration_text=_calibration_text(),
                 tokens=1024)  # fmt: skip


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))


def test_moefy_all_experts_reproduce_dense(tiny_llama, tmp_path):
    src, dense = tiny_llama
    out = _moefy(src, tmp_path / "moe", top_k=4)
    with torch.no_grad():
        expected = dense(IDS).logits
    torch.testing.assert_close(moepager.load(out).logits(IDS), expected, atol=1e-4, rtol=0)


def test_moefy_output_loads_in_transformers(tiny_llama, tmp_path):
    import transformers as tf

    src, dense = tiny_llama
    out = _moefy(src, tmp_path / "moe", top_k=2)
    ref = tf.Qwen2MoeForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(IDS).logits
        full = dense(IDS).logits
    got = moepager.load(out).logits(IDS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(got, full, atol=1e-3)  # top-2 of 4 is a real approximation


def test_shared_gate_halves_exactly_without_a_zero_logit():
    """The shared expert's gate must give sigmoid = 0.5 for every token (the dense sum), through a logit that is
    never 0: llama.cpp computes that sigmoid as silu(z) / z, NaN at z = 0 (tests/test_gguf_fixtures.py runs
    moefy's output in llama.cpp)."""
    import torch.nn.functional as F

    from moepager.moefy.build import shared_gate

    g = torch.Generator().manual_seed(0)
    norm = torch.randn(64, generator=g) * 3  # an FFN norm's weights, of either sign
    gate = shared_gate(norm)
    assert gate.shape == (1, 64) and int((gate != 0).sum()) == 1
    scale = torch.logspace(-4, 4, 4096)[:, None]
    spikes = (
        torch.eye(64) * 1e3 + torch.randn(64, 64, generator=g) * 1e-3
    )  # each coordinate at its largest |x_j|
    h = torch.cat([torch.randn(4096, 64, generator=g) * scale, spikes])
    x = F.rms_norm(h, (64,), norm, eps=1e-5)  # the FFN input, [N, D]
    z = x @ gate.T
    assert (z != 0).all() and torch.equal(torch.sigmoid(z), torch.full_like(z, 0.5))
    assert torch.equal(F.silu(z) / z, torch.full_like(z, 0.5))


def test_moefy_is_deterministic_given_seed(tiny_llama, tmp_path):
    from moepager.moefy.build import PLAN_FILE, Plan

    src, _ = tiny_llama
    a = Plan.load(_moefy(src, tmp_path / "a", top_k=2, seed=5) / PLAN_FILE)
    b = Plan.load(_moefy(src, tmp_path / "b", top_k=2, seed=5) / PLAN_FILE)
    c = Plan.load(_moefy(src, tmp_path / "c", top_k=2, seed=6) / PLAN_FILE)
    assert torch.equal(a.order, b.order) and torch.equal(a.router, b.router)
    assert not torch.equal(a.order, c.order)
    # every neuron is used exactly once per layer
    assert torch.equal(a.order.sort(dim=1).values, torch.arange(64).expand(2, 64))


def test_moefy_reads_gguf_directly(tiny_gguf, tmp_path):
    from moepager.moefy.build import moefy

    text = "the theme then " * 200
    out = moefy(tiny_gguf, tmp_path / "moe", experts=4, top_k=4, shared=16, calibration_text=text, tokens=512)
    dense = convert_gguf(tiny_gguf, tmp_path / "dense")
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        moepager.load(out).logits(ids), moepager.load(dense).logits(ids), atol=1e-4, rtol=0
    )


def test_cli_moefy_and_eval(tiny_llama, tmp_path, capsys):
    import json

    from moepager.cli import main

    src, _ = tiny_llama
    calib, text = tmp_path / "calib.txt", tmp_path / "eval.txt"
    calib.write_text(_calibration_text(seed=1))
    text.write_text(_calibration_text(n=200, seed=2))
    out = tmp_path / "moe"
    argv = ["moefy", str(src), str(out), "--experts", "4", "--top-k", "4", "--shared", "16", "--calibration",
            str(calib), "--tokens", "1024"]  # fmt: skip
    assert main(argv) == 0
    assert main(["moefy", str(src), str(out), "--experts", "4", "--top-k", "2"]) == 2  # exists already
    capsys.readouterr()
    assert (
        main(["eval", str(out), "--text", str(text), "--reference", str(src), "--window", "32", "--json"])
        == 0
    )
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["tokens"] == 6 * 31 and record["agreement"] == 1.0 and record["perplexity"] > 1


def test_eval_takes_a_dense_gguf_as_reference(tiny_gguf, tmp_path, capsys):
    """The default model's source is a dense llama GGUF: eval --reference takes it as moefy does. With K = E
    the MoE is the dense model, so every greedy prediction agrees."""
    import json

    from moepager.cli import main
    from moepager.moefy.build import moefy

    text = tmp_path / "eval.txt"
    text.write_text("the theme then " * 40)
    out = moefy(tiny_gguf, tmp_path / "moe", experts=4, top_k=4, shared=16, calibration_text="the then " * 200,
                tokens=256)  # fmt: skip
    capsys.readouterr()
    argv = ["eval", str(out), "--text", str(text), "--reference", str(tiny_gguf), "--window", "32", "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["agreement"] == 1.0 and record["tokens"] > 0
    assert (
        main(["eval", str(tiny_gguf), "--text", str(text), "--window", "32", "--json"]) == 0
    )  # as MODEL too
    dense = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert dense["perplexity"] == pytest.approx(record["perplexity"], rel=1e-4)
