"""The float ops around a GGUF model's block products as llama.cpp's graph runs them (kernels/ggml_float.py),
the whole MoE layer in one graph, and where they run in a model (model/compact.py swap_llama_cpp_ops)."""

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from llama_numerics import random_blocks

import moepager
from moepager.kernels import ggml, ggml_float, ggml_library
from moepager.model import compact
from moepager.model.decoder import Block, Transformer
from moepager.model.layers import KVCache, apply_rope
from moepager.model.moe import sum_in_order

Q = gguf.GGMLQuantizationType
FIXTURES = Path(__file__).parent / "fixtures" / "gguf"


def ggml_rms_norm_in_numpy(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """ggml-cpu's rms_norm written out: float products summed in float64 in order, the mean rounded to float,
    1.0f / sqrtf(mean + eps) (numpy's float32 sqrt is correctly rounded, as sqrtf), then x * scale * w."""
    out = np.empty_like(x)
    for i, row in enumerate(x):
        total = 0.0
        for v in row:
            total += float(np.float32(v * v))
        mean = np.float32(total / row.shape[0])
        scale = np.float32(1.0) / np.sqrt(np.float32(mean + np.float32(eps)))
        out[i] = (row * scale) * w
    return out


def test_rms_norm_is_ggmls_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 2048, generator=g) * 3, torch.randn(2048, generator=g)
    got = ggml_float.rms_norm(x, w, 1e-6)
    want = ggml_rms_norm_in_numpy(x.numpy(), w.numpy(), 1e-6)
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))
    # torch's own norm is an ulp away on some rows (39 of 256 with this seed): what reached the 8-bit rounding
    # of the next product
    assert not torch.equal(F.rms_norm(x, (2048,), w, 1e-6), got)


@pytest.mark.parametrize("t,start", [(5, 3), (1, 300), (40, 0)], ids=["chunk", "decode", "prefill"])
def test_attention_is_causal_gqa_over_the_cache(t, start):
    g = torch.Generator().manual_seed(t)
    h, hk, dh, capacity = 8, 2, 64, 1024
    k, v = torch.zeros(hk, capacity, dh), torch.zeros(hk, capacity, dh)
    k[:, : start + t], v[:, : start + t] = torch.randn(2, hk, start + t, dh, generator=g)
    q = torch.randn(t, h, dh, generator=g)
    vt = v.transpose(1, 2).contiguous()  # positions in rows, as the cache keeps them (values_by_position)
    got = ggml_float.attention(q, k, vt, start, dh**-0.5)
    seen = torch.arange(start + t)[None, :] <= torch.arange(start, start + t)[:, None]
    mask = torch.zeros(seen.shape).masked_fill_(~seen, float("-inf"))
    want = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None, :, : start + t], v[None, :, : start + t],
                                          attn_mask=mask, scale=dh**-0.5, enable_gqa=True)  # fmt: skip
    assert (got - want[0].transpose(0, 1).reshape(t, -1)).abs().max() < 1e-5
    # llama.cpp's window: positions past the filled ones are masked, whatever they hold
    k[:, start + t :], vt[:, :, start + t :] = 7.0, -7.0
    assert torch.equal(ggml_float.attention(q, k, vt, start, dh**-0.5), got)
    with pytest.raises(ValueError, match="positions"):
        ggml_float.attention(q, k[:, :100], vt[:, :, :100], 200, dh**-0.5)


def test_cache_keeps_values_by_position_up_to_date():
    cache, g = KVCache(1), torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 1, 2, 5, 8, generator=g)
    cache.update(0, k, v)
    assert torch.equal(cache.values_by_position(0)[..., :5], v.transpose(2, 3))
    cache.truncate(3)
    k2, v2 = torch.randn(2, 1, 2, 100, 8, generator=g)  # the buffers grow
    cache.update(0, k2, v2)
    whole = torch.cat([v[:, :, :3], v2], dim=2).transpose(2, 3)
    assert torch.equal(cache.values_by_position(0)[..., :103], whole)
    assert not cache.values_by_position(0)[..., 103:].any()  # zeros past what was filled


@pytest.mark.parametrize("start,tol", [(3, 2e-6), (1000, 1e-3)])
def test_rope_is_moepagers_rotation(start, tol):
    """The same rotation as apply_rope; ggml takes each angle as a product of float32 powers, llama.cpp's own
    rounding (2e-4 apart at position 1000)."""
    g = torch.Generator().manual_seed(1)
    t, h, dh, base = 7, 6, 128, 1e6
    x = torch.randn(t, h, dh, generator=g)
    inv = 1.0 / (base ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    angles = torch.arange(start, start + t, dtype=torch.float64)[:, None] * inv
    emb = torch.cat([angles, angles], -1)
    sin = torch.cat([-emb.sin()[:, : dh // 2], emb.sin()[:, dh // 2 :]], -1)  # apply_rope's sign convention
    want = apply_rope(x.transpose(0, 1).double(), emb.cos(), sin).transpose(0, 1)
    assert (ggml_float.rope(x, start, dh, base) - want).abs().max() < tol


def test_sigmoid_gate_and_router_softmax():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(9, 64, generator=g), torch.randn(1, 64, generator=g)
    assert (ggml_float.sigmoid_gate(w, x) - torch.sigmoid(x @ w.T)).abs().max() < 1e-6
    logits = torch.randn(9, 32, generator=g)
    probs, _ = ggml_float.softmax_topk(logits, 32, normalize=False)  # every expert: the whole softmax, sorted
    assert (probs - logits.softmax(-1).sort(-1, descending=True).values).abs().max() < 1e-6
    assert probs.shape == (9, 32)


@pytest.mark.parametrize("normalize", [False, True])
def test_routing_graph_is_softmax_then_std_sort(normalize):
    """softmax_topk as one graph: the experts torch's topk picks where probabilities differ, std::sort's order
    (ggml_routing.std_sort_desc, written from libstdc++) among equal ones, weights renormalized on request."""
    from moepager.kernels.ggml_routing import soft_max as ggml_softmax
    from moepager.kernels.ggml_routing import std_sort_desc

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(16, 64, generator=g)
    logits[3, ::4] = logits[3, 0]  # exact ties
    weights, ids = ggml_float.softmax_topk(logits, 6, normalize)
    probs = torch.from_numpy(ggml_softmax(logits.numpy(), avx512=ggml_library.simd_form() == "AVX-512"))
    for row in range(16):
        assert ids[row].tolist() == list(std_sort_desc(probs[row].numpy())[:6])
    assert torch.equal(ids[0], logits[0].topk(6).indices)
    picked = probs.gather(1, ids)
    want = picked / picked.sum(-1, keepdim=True) if normalize else picked
    assert (weights - want).abs().max() < 1e-6


def test_moe_graph_weighs_and_sums_slot_by_slot():
    """With weights, the layer's graph ends as llama.cpp's build_moe_ffn: each pair's output times its weight,
    then added slot after slot; sum_in_order (the distributed driver's) gives the same bits from the pairs."""
    types = (Q.Q4_K, Q.Q4_K, Q.Q6_K)
    d, i_ff, s = 256, 512, 6
    gate, up = (torch.from_numpy(random_blocks(t, s, i_ff, d, seed=n)) for n, t in enumerate(types[:2]))
    down = torch.from_numpy(random_blocks(types[2], s, d, i_ff, seed=2))
    x, ids = torch.randn(3, d), torch.tensor([[5, 0, 3], [2, 1, 4], [1, 4, 0]])
    weights = torch.rand(3, 3)
    pairs = ggml.swiglu_experts(types, (gate, up, down), x, ids)  # [N, K, D]
    got = ggml.swiglu_experts(types, (gate, up, down), x, ids, weights)  # [N, D]
    assert torch.equal(got, sum_in_order(pairs, weights))
    assert (got - torch.bmm(weights[:, None], pairs)[:, 0]).abs().max() < 1e-5 * got.abs().max()
    one = ggml.swiglu_experts(types, (gate, up, down), x, ids[:, :1], weights[:, :1])  # K = 1
    assert torch.equal(one, pairs[:, 0] * weights[:, :1])


def test_dense_swiglu_is_one_graph_of_the_three_products():
    types = (Q.Q8_0, Q.Q8_0, Q.Q4_0)
    gate, up = (torch.from_numpy(random_blocks(t, 96, 256, seed=n)) for n, t in enumerate(types[:2]))
    down = torch.from_numpy(random_blocks(types[2], 256, 96, seed=2))
    x = torch.randn(4, 256)
    got = ggml.swiglu_mlp(types, (gate, up, down), x)
    h = F.silu(ggml.mul_mat(types[0], gate, x)) * ggml.mul_mat(types[1], up, x)
    assert (got - ggml.mul_mat(types[2], down, h)).abs().max() < 0.02 * got.abs().max()


def test_gguf_model_runs_llama_cpps_ops_with_or_without_a_cache():
    engine = moepager.load(FIXTURES / "qwen3_moe.q8_0.gguf")
    block = engine.model.layers[0]
    assert type(block.attn) is compact.GgmlAttention and type(block.attn_norm) is compact.GgmlRMSNorm
    assert type(block.ffn.router) is compact.GgmlRouter and block.ffn.experts.banks[0].fused_swiglu(
        engine.config
    )
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])
    no_cache = engine.logits(ids)
    cache = KVCache(engine.config.num_layers)
    with torch.no_grad():
        cached = engine.model(ids, cache=cache).float()
    assert torch.equal(no_cache, cached)
    assert engine.stats()["gguf_kernels"] == ggml_library.library().describe()  # the stats line names it
    # a float checkpoint keeps torch's ops
    tiny = moepager.load(FIXTURES / "qwen3_moe")
    assert type(tiny.model.layers[0].attn_norm) is not compact.GgmlRMSNorm


def test_attention_checks_the_cache_at_every_call():
    """A cached graph does not skip the check: a view of too few positions with the same strides is refused."""
    q, k, vt = torch.randn(1, 4, 16), torch.zeros(2, 128, 16), torch.zeros(2, 16, 128)
    ggml_float.attention(q, k, vt, 5, 0.25)
    with pytest.raises(ValueError, match="do not hold 64 positions"):
        ggml_float.attention(q, k[:, :32], vt, 5, 0.25)


@pytest.mark.parametrize("name", ["qwen3_moe.q4_0", "olmoe.q8_0", "qwen2_moe.q4_0", "mixtral.q8_0"])
def test_a_layer_in_three_graphs_is_its_modules_bit_for_bit(name):
    """GgmlBlock (q/k norms per head, over the projection or none; qkv biases; a shared expert) gives the
    logits of its modules called one by one, prefill and decode."""
    engine = moepager.load(FIXTURES / f"{name}.gguf")
    assert all(type(b) is compact.GgmlBlock for b in engine.model.layers)
    engine.model.__class__ = Transformer  # decode layer by layer, not as one step graph (test_ggml_step.py)
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]])

    def run():
        cache = KVCache(engine.config.num_layers)
        with torch.no_grad():
            steps = [engine.model(ids[:, :10], cache=cache)]
            steps += [engine.model(ids[:, i : i + 1], cache=cache) for i in range(10, 13)]
        return steps

    fused = run()
    for block in engine.model.layers:
        block.__class__ = Block
    assert all(torch.equal(a, b) for a, b in zip(fused, run()))


def test_the_library_is_chosen_and_named():
    run = lambda env: subprocess.run(
        [sys.executable, "-c", "from moepager.kernels import ggml_library as g; print(g.library().describe())"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=120)  # fmt: skip
    wheel = run({"MOEPAGER_LIBGGML": "wheel"})
    assert wheel.returncode == 0 and wheel.stdout.startswith("libggml-python wheel's libggml, AVX2"), (
        wheel.stderr
    )
    bad = run({"MOEPAGER_LIBGGML": "/no/such/dir"})
    assert bad.returncode != 0 and "MOEPAGER_LIBGGML=/no/such/dir: no libggml-base.so" in bad.stderr
    if ggml_library.library().origin == "llama-cpp-python":  # preferred when installed
        assert ggml_library.library().describe().startswith("llama-cpp-python's libggml")
