"""moepager.kernels.gguf against gguf-py's own dequantization, on random valid blocks of every type."""

import gguf
import numpy as np
import pytest
import torch

from moepager.kernels import gguf as gk

Q = gguf.GGMLQuantizationType
TYPES = sorted(gk.SUPPORTED)
R, C = 64, 512  # two 256-weight blocks a row for the K types, 16 for the 32-weight ones


def random_raw(qtype: int, *shape: int, seed: int = 0) -> np.ndarray:
    """uint8 [*shape[:-1], row bytes]: random codes and sub-scales, small finite fp16 block scales."""
    rng = np.random.default_rng(seed)
    qk, bb = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (*shape[:-1], shape[-1] // qk, bb), dtype=np.uint8)
    for o in gk.FP16_FIELDS[qtype]:
        raw[..., o : o + 2] = rng.normal(0, 0.01, raw.shape[:-1]).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(*shape[:-1], -1)


def assert_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float32 summation order."""
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: Q(t).name)
def test_dequantize_is_bit_exact(qtype):
    raw = random_raw(qtype, 2, R, C)  # leading dimensions are kept
    got = gk.dequantize(qtype, torch.from_numpy(raw)).numpy()
    ref = gguf.quants.dequantize(raw, qtype)
    assert got.shape == (2, R, C) and got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))
    assert gk.row_bytes(qtype, C) == raw.shape[-1]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: Q(t).name)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("per_pair", [False, True], ids=["x[n]", "x[n,k]"])
def test_gather_matvec(qtype, n, per_pair):
    bank = random_raw(qtype, 5, R, C)  # [S, R, row bytes]
    w = torch.from_numpy(gguf.quants.dequantize(bank, qtype))  # [S, R, C]
    slots = torch.tensor([[4, 0, 4], [1, 1, 2], [3, 0, 0]])[:n]  # repeated slots too
    x = torch.randn(n, 3, C) if per_pair else torch.randn(n, C)
    got = gk.gather_matvec(qtype, torch.from_numpy(bank), x, slots)
    xs = x if per_pair else x[:, None].expand(n, 3, C)  # [N, K, C]
    ref = torch.einsum("nkrc,nkc->nkr", w[slots], xs)
    assert_close(got, ref)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: Q(t).name)
@pytest.mark.parametrize("n", [1, 40])  # the matvec path, the dequantize + F.linear path
def test_linear(qtype, n, monkeypatch):
    raw = random_raw(qtype, R, C)
    x = torch.randn(n, C)
    ref = x @ torch.from_numpy(gguf.quants.dequantize(raw, qtype)).T
    assert_close(gk.linear(qtype, torch.from_numpy(raw), x), ref)
    monkeypatch.setattr(gk, "_TILE_BYTES", 16 * 4 * C)  # tiles of 16 rows
    assert_close(gk.linear(qtype, torch.from_numpy(raw), x), ref)


def test_q4_0_codes():
    raw = random_raw(Q.Q4_0, R, C)
    codes, d = gk.q4_0_codes(torch.from_numpy(raw))
    assert codes.dtype == torch.uint8 and codes.shape == (R, C) and int(codes.max()) <= 15
    w = d.repeat_interleave(32, dim=1) * (codes.float() - 8)
    assert torch.equal(w, torch.from_numpy(gguf.quants.dequantize(raw, Q.Q4_0)))


def test_bad_input():
    raw = torch.from_numpy(random_raw(Q.Q4_0, 2, R, C))
    with pytest.raises(ValueError, match="Q2_K"):
        gk.block_shape(Q.Q2_K)
    with pytest.raises(IndexError, match="slot"):
        gk.gather_matvec(Q.Q4_0, raw, torch.randn(1, C), torch.tensor([[0, 2]]))
    with pytest.raises(ValueError, match="float32"):
        gk.linear(Q.Q4_0, raw[0], torch.randn(1, C, dtype=torch.float64))
    with pytest.raises(ValueError, match="rows"):
        gk.dequantize(Q.Q8_0, raw)  # 288-byte rows are not whole 34-byte blocks
