"""moepager.kernels.ggml (llama.cpp's own kernels) against gguf-py's dequantization and a numpy rounding of
the activations (llama_numerics.py), on random valid blocks of every type."""

import gguf
import numpy as np
import pytest
import torch
from llama_numerics import OFFSET_TYPES, random_blocks, round_activations

from moepager.kernels import ggml

Q = gguf.GGMLQuantizationType
TYPES = sorted(ggml.SUPPORTED)
R, C = 64, 512  # two 256-weight blocks a row for the K types, 16 for the 32-weight ones


def assert_close(qtype: int, got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float32 summation order (Q4_1 / Q5_1: up to their fp16 offset sums)."""
    assert got.shape == ref.shape
    tol = 2e-3 if qtype in OFFSET_TYPES else 1e-5
    assert (got - ref).abs().max() < tol * ref.abs().max()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: Q(t).name)
def test_dequantize_is_bit_exact(qtype):
    raw = random_blocks(qtype, 2, R, C)  # leading dimensions are kept
    got = ggml.dequantize(qtype, torch.from_numpy(raw)).numpy()
    ref = gguf.quants.dequantize(raw, qtype)
    assert got.shape == (2, R, C) and got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: Q(t).name)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("per_pair", [False, True], ids=["x[n]", "x[n,k]"])
def test_mul_mat_id(qtype, n, per_pair):
    bank = random_blocks(qtype, 5, R, C)  # [S, R, row bytes]
    w = torch.from_numpy(gguf.quants.dequantize(bank, qtype))  # [S, R, C]
    slots = torch.tensor([[4, 0, 4], [1, 1, 2], [3, 0, 0]])[:n]  # repeated slots too
    x = torch.randn(n, 3, C) if per_pair else torch.randn(n, C)
    got = ggml.mul_mat_id(qtype, torch.from_numpy(bank), x, slots)
    xs = round_activations(qtype, x if per_pair else x[:, None].expand(n, 3, C))  # [N, K, C]
    assert_close(qtype, got, torch.einsum("nkrc,nkc->nkr", w[slots], xs))
    exact = torch.einsum("nkrc,nkc->nkr", w[slots], x if per_pair else x[:, None].expand(n, 3, C))
    assert not torch.equal(got, exact)  # the activations really were rounded


def test_mul_mat_id_on_slots_further_apart():
    """A cache's slots are sized for its largest layer: a layer's bank is a strided view."""
    qtype = Q.Q4_K
    flat = torch.from_numpy(random_blocks(qtype, 4, R + 7, C)).view(4, -1)  # 7 spare rows a slot
    rb = flat.shape[1] // (R + 7)
    bank = flat.as_strided((4, R, rb), (flat.stride(0), rb, 1))
    x, slots = torch.randn(2, C), torch.tensor([[3, 1], [0, 3]])
    w = ggml.dequantize(qtype, bank.contiguous())
    assert_close(qtype, ggml.mul_mat_id(qtype, bank, x, slots), torch.einsum("nkrc,nc->nkr", w[slots],
                 round_activations(qtype, x)))  # fmt: skip


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: Q(t).name)
@pytest.mark.parametrize("n", [1, 40])  # a decode step, a prefill chunk
def test_mul_mat(qtype, n):
    raw = random_blocks(qtype, R, C)
    x = torch.randn(n, C)
    ref = round_activations(qtype, x) @ torch.from_numpy(gguf.quants.dequantize(raw, qtype)).T
    assert_close(qtype, ggml.mul_mat(qtype, torch.from_numpy(raw), x), ref)


def test_bad_input():
    raw = torch.from_numpy(random_blocks(Q.Q4_0, 2, R, C))
    with pytest.raises(ValueError, match="IQ2_XXS"):
        ggml.mul_mat(Q.IQ2_XXS, raw[0], torch.randn(1, C))
    with pytest.raises(IndexError, match="slot"):
        ggml.mul_mat_id(Q.Q4_0, raw, torch.randn(1, C), torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="inputs"):
        ggml.mul_mat(Q.Q4_0, raw[0], torch.randn(1, C + 32))
    with pytest.raises(ValueError, match="rows"):
        ggml.dequantize(Q.Q8_0, raw)  # 288-byte rows are not whole 34-byte blocks


@pytest.mark.parametrize(
    "types", [(Q.Q4_K, Q.Q4_K, Q.Q6_K), (Q.Q8_0, Q.Q8_0, Q.Q4_0)], ids=["Q4_K_M", "Q8_0"]
)
def test_swiglu_experts_is_llama_cpps_moe_graph(types):
    """gate, up, silu(gate) * up, down in one graph: each product as mul_mat_id computes it."""
    d, i_ff, s = 256, 512, 6
    gate, up = (torch.from_numpy(random_blocks(t, s, i_ff, d, seed=n)) for n, t in enumerate(types[:2]))
    down = torch.from_numpy(random_blocks(types[2], s, d, i_ff, seed=2))
    x, ids = torch.randn(3, d), torch.tensor([[5, 0], [2, 2], [1, 4]])
    got = ggml.swiglu_experts(types, (gate, up, down), x, ids)  # [N, K, D]
    g, u = ggml.mul_mat_id(types[0], gate, x, ids), ggml.mul_mat_id(types[1], up, x, ids)
    want = ggml.mul_mat_id(types[2], down, torch.nn.functional.silu(g) * u, ids)
    close = (got - want).abs() <= 1e-5 * want.abs().max()  # silu's last ulp can move an 8-bit rounding
    assert got.shape == (3, 2, d) and close.float().mean() > 0.99
    assert (got - want).abs().max() < 0.02 * want.abs().max()


def test_graph_cache_keeps_a_deep_models_decode_graphs(monkeypatch):
    """Every one-token graph of a step stays cached (a 48-layer model's step calls ~290), while the buffers
    of many-token graphs are bounded by bytes: at most one graph past the bound is kept."""
    ggml.clear_graphs()
    mats = [torch.from_numpy(random_blocks(Q.Q4_0, R, C)) for _ in range(300)]  # a matrix each: 300 graphs
    x = torch.randn(1, C)
    for w in mats:
        ggml.mul_mat(Q.Q4_0, w, x)
    built, init = [], ggml._Graph.__init__
    monkeypatch.setattr(ggml._Graph, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))
    for w in mats:  # the second step: no graph built again
        ggml.mul_mat(Q.Q4_0, w, x)
    assert not built and len(ggml._graphs) == 300

    monkeypatch.setattr(ggml, "_CACHED_GRAPH_BYTES", 1 << 20)
    wide = torch.randn(2048, C)  # a prefill chunk: each graph's intermediate buffers pass the bound
    down = torch.from_numpy(random_blocks(Q.Q4_0, C, R))
    for w in mats[:3]:
        ggml.swiglu_mlp((Q.Q4_0,) * 3, (w, w, down), wide)
    assert len(ggml._graphs) == 1 and ggml._graph_bytes == next(iter(ggml._graphs.values())).nbytes > 1 << 20
    ggml.clear_graphs()
