"""Routing in llama.cpp's float order (kernels/ggml_routing.py) against ggml itself: the loaded libggml's own
ggml_soft_max and ggml_argsort (std::sort) on the same rows, then a GGUF model routing through it."""

import ctypes
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from moepager.kernels import ggml, ggml_library, ggml_routing

F32, I32 = 0, 26  # ggml_type
DESC = 1  # GGML_SORT_ORDER_DESC
FIXTURES = Path(__file__).parent / "fixtures" / "gguf"


def ggml_op(op: str, rows: np.ndarray) -> np.ndarray:
    """rows float32 [N, E] through one ggml op of the wheel: soft_max -> float32, argsort (descending) -> int32."""
    g = ggml_library.library()
    fn = getattr(g.base, f"ggml_{op}")
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + ([ctypes.c_int] if op == "argsort" else [])
    n, e = rows.shape

    def build(base, ctx):
        x = base.ggml_new_tensor_2d(ctx, F32, e, n)
        return (x,), fn(ctx, x, DESC) if op == "argsort" else fn(ctx, x)

    out = torch.empty(n, e, dtype=torch.int32 if op == "argsort" else torch.float32)
    graph = ggml._Graph(build, 0)
    graph.run_on(1)
    graph(out, torch.from_numpy(np.ascontiguousarray(rows)))
    return out.numpy()


def rows_with_ties(seed: int) -> np.ndarray:
    """Router-like rows: near-tied logits (the default model's spread), exact ties, wide ones; E of 8 to 128."""
    rng = np.random.default_rng(seed)
    out = []
    for e in (8, 16, 32, 60, 64, 128):
        for scale in (2.0**-16, 1.0, 40.0):
            x = (rng.standard_normal((4, e)) * scale).astype(np.float32)
            x[1, ::3] = x[1, 0]  # exact ties
            x[2, : e // 2] = x[2, e // 2 :]  # every value twice
            out.append(x)
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_std_sort_orders_ties_as_ggml_argsort(seed):
    for x in rows_with_ties(seed):
        probs = x.round(1)  # many equal values, the case where std::sort's own order shows
        want = ggml_op("argsort", probs)
        for row in range(x.shape[0]):
            got = ggml_routing.std_sort_desc(probs[row])
            assert np.array_equal(got, want[row]), (probs[row], got, want[row])


def test_softmax_is_ggml_soft_max_bit_for_bit():
    """Against the libggml moepager loaded: the wheel's is built for AVX2, llama-cpp-python's (preferred when it
    is installed) for this machine, so each form is checked where its library runs."""
    avx512 = bool(ggml_library.library().cpu.ggml_cpu_has_avx512())
    for x in rows_with_ties(2):
        got = ggml_routing.soft_max(x, avx512=avx512)
        assert np.array_equal(got, ggml_op("soft_max", x)), np.abs(got - ggml_op("soft_max", x)).max()


def test_gguf_sources_route_in_llama_cpps_order():
    from moepager.model.moe import route
    from moepager.sources.gguf import GgufSource

    config = GgufSource(str(FIXTURES / "qwen3_moe.q4_0.gguf")).config
    assert config.routing_order == "llama.cpp" and config.routing == "softmax_topk"
    config = dataclasses.replace(config, num_experts=32, top_k=4)  # the fixture's 4 experts tie too few
    logits = torch.zeros(3, config.num_experts)  # every expert tied but one
    logits[:, 5] = 1.0
    w, ids = route(logits, config)
    assert (ids[:, 0] == 5).all()
    probs = ggml_op("argsort", logits.softmax(-1).numpy())  # ties: the order of the real std::sort
    assert np.array_equal(ids.numpy(), probs[:, : config.top_k]), (ids, probs[:, : config.top_k])
    assert not np.array_equal(
        ids.numpy()[0, 1:], np.arange(config.top_k - 1)
    )  # not the index order torch keeps
    if config.norm_topk_prob:
        assert torch.allclose(w.sum(-1), torch.ones(3))
