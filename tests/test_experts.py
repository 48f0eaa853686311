"""The experts primitive: every path (gathered, grouped, dense, waves) and every bank format computes what the
per-expert reference computes, and paging maps experts to slots without changing a number."""

import pytest
import torch

from moepager.kernels.intquant import native_int4_layout, tile_rows
from moepager.model.config import ModelConfig
from moepager.model.moe import bank_spec, dense, expert_forward, gathered, grouped
from moepager.store.encoding import convert_expert

D, I, E, K = 64, 32, 8, 3  # noqa: E741 (the legend letters)


def _config(act="swiglu"):
    return ModelConfig("t", 1, D, 1, 1, 1, D, 1, 1e-6, num_experts=E, top_k=K, expert_act=act,
                       swiglu_limit=0.5)  # fmt: skip


def _experts(bias: bool, fmt: str):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(E):
        w = {"gate": torch.randn(I, D, generator=g) * 0.2, "up": torch.randn(I, D, generator=g) * 0.2,
             "down": torch.randn(D, I, generator=g) * 0.2}  # fmt: skip
        if bias:
            w |= {
                n: torch.randn(w[n[:-5]].shape[0], generator=g) * 0.1
                for n in ("gate_bias", "up_bias", "down_bias")
            }
        out.append(w if fmt == "float" else convert_expert(w, fmt))
    return out


def _bank(experts, order):
    """A bank whose slot s holds expert order[s] (as a cache would place them)."""
    bank = bank_spec(experts[0]).allocate(len(order), "cpu")
    for s, e in enumerate(order):
        for name, t in experts[e].items():
            bank.slots[s][name].copy_(t)
    return bank


def _reference(experts, x, ids, weights, config):
    y = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(ids.shape[1]):
            y[n] += weights[n, k] * expert_forward(experts[int(ids[n, k])], x[n : n + 1], config)[0]
    return y


@pytest.mark.parametrize("fmt,tol", [("float", 1e-5), ("int8", 1e-2), ("int4", 1e-2)])
@pytest.mark.parametrize("act,bias", [("swiglu", False), ("gptoss", True)])
@pytest.mark.parametrize("tokens", [1, 2, 12])
def test_every_path_matches_the_per_expert_reference(fmt, tol, act, bias, tokens):
    config, experts = _config(act), _experts(bias, fmt)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)])  # [N, K]
    weights = torch.rand(tokens, K, generator=g)
    ref = _reference(experts, x, ids, weights, config)
    scale = ref.abs().max()
    resident = _bank(experts, list(range(E)))
    order = [5, 2, 7, 0, 3, 6, 1, 4]  # expert order[s] sits in slot s
    shuffled = _bank(experts, order)
    slots = torch.tensor([order.index(e) for e in range(E)])[ids]
    got = {
        "gathered": gathered(resident, x, ids, weights, config),
        "gathered, other slots": gathered(shuffled, x, slots, weights, config),
        "grouped": grouped(resident, x, ids, ids, weights, config),
        "grouped, other slots": grouped(shuffled, x, ids, slots, weights, config),
    }
    if fmt == "float":
        got["dense"] = dense(resident, x, ids, weights, config)
    # waves: two halves of the experts, each summing only its own
    first = torch.where(ids < E // 2, ids, -1)
    second = torch.where(ids >= E // 2, ids, -1)
    got["waves"] = grouped(resident, x, ids, first, weights, config) + grouped(
        resident, x, ids, second, weights, config
    )
    for path, y in got.items():
        assert ((y - ref).abs().max() / scale).item() < tol, path


def test_gate_and_up_fuse_unless_int4_tiles_split_them():
    float_spec = bank_spec(_experts(False, "float")[0])
    assert "gate_up" in float_spec.parts and float_spec.parts["gate_up"][0] == (2 * I, D)
    assert bank_spec(_experts(True, "int8")[0]).parts["gate_up_scales"][0] == (2 * I,)
    odd = convert_expert(
        {"gate": torch.randn(48, D), "up": torch.randn(48, D), "down": torch.randn(D, 48)}, "int4"
    )
    spec = bank_spec(odd)  # 48 rows are not whole 32- or 64-row packing tiles: kept as two matrices
    assert ("gate_up" in spec.parts) == (48 % tile_rows(native_int4_layout()) == 0) != ("gate" in spec.parts)


def test_bf16_bank_in_an_fp32_model():
    config, experts = _config(), _experts(False, "float")
    x = torch.randn(2, D)
    ids, weights = torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.rand(2, K)
    bank = bank_spec(experts[0], dtype=torch.bfloat16).allocate(E, "cpu")
    for e in range(E):
        for name, t in experts[e].items():
            bank.slots[e][name].copy_(t)
    ref = _reference(experts, x, ids, weights, config)
    y = gathered(bank, x, ids, weights, config)
    assert y.dtype == torch.float32 and ((y - ref).abs().max() / ref.abs().max()).item() < 2e-2
