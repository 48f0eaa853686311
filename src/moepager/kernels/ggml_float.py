"""The float ops around a GGUF model's block products, as llama.cpp's graph runs them, in its own ggml.

A quantized product rounds its activations to 8-bit blocks, so an ulp of difference in what comes before it
(a norm, a rotary embedding, attention) can move a value a whole step, and the step grows through the layers:
a GGUF run that is to give llama.cpp's logits computes these ops as llama.cpp does, op for op, in the library
llama.cpp computes with (kernels/ggml_library.py prefers llama-cpp-python's own). Each is a cached ggml graph over
torch tensors, like the products:
- `rms_norm`: ggml_rms_norm (squares summed in float64, in order; 1.0f / sqrtf) times the weight;
- `softmax_topk`: a router's softmax, top K and renormalization, as build_moe_ffn picks experts;
- `sigmoid_gate`: a shared expert's gate as qwen2moe's graph takes it, silu(z) / z;
- `rope`: ggml_rope_ext, whose angles are products accumulated in float32;
- `attention`: build_attn_mha without flash attention: K q, softmax with the causal mask and the scale, then
  V^T over the softmax, over the cached positions padded with masked zeros, as llama.cpp's window (KV_PAD).
"""

from __future__ import annotations

import functools

import torch

from .ggml import activations, cached_graph
from .ggml_library import F32, I32, set_data, set_strides

# llama.cpp attends over a multiple of 256 cached positions (llama_kv_cache::get_n_kv), masked past the filled
# ones. A multiple of 64 gives the same bits: masked positions add exact zeros to every sum, and ggml's float
# loops group by at most 64 (vec_dot_f32's AVX-512 step; softmax's vectors of 16, whose tail would take libm's
# expf; tinyBLAS's k in steps of 16), so only how the filled positions fall into groups counts. At a short
# context that is a quarter of the work.
KV_PAD = 64
NEOX = 2  # GGML_ROPE_TYPE_NEOX: rotate halves, as moepager's apply_rope


def rms_norm_node(base, ctx, a: int, w: int, eps: float, buffer: torch.Tensor) -> int:
    """ggml_rms_norm of a (into `buffer`, float32 of a's size), then ggml_mul by w: llama.cpp's build_norm."""
    normed = base.ggml_rms_norm(ctx, a, eps)
    set_data(normed, buffer.data_ptr())
    return base.ggml_mul(ctx, normed, w)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x float32 [N, C], weight float32 [C] -> x / rms(x) * weight, as llama.cpp's build_norm: ggml_rms_norm
    (squares summed in double, in order; 1.0f / sqrtf) then ggml_mul. torch's own rsqrt and sqrt are not
    correctly rounded, so an ulp in a norm reached llama.cpp's 8-bit rounding of the next product."""
    x, weight = activations(x), activations(weight)
    n, c = x.shape

    def check():
        if weight.shape != (c,) or x.dim() != 2:
            raise ValueError(f"a norm of weight {list(weight.shape)} does not take inputs {list(x.shape)}")

    def build(base, ctx):
        a, w = base.ggml_new_tensor_2d(ctx, F32, c, n), base.ggml_new_tensor_1d(ctx, F32, c)
        scratch = [torch.empty(n, c, dtype=torch.float32)]
        return (a, w), rms_norm_node(base, ctx, a, w, eps, scratch[0]), scratch

    return cached_graph(("rms", x.shape, eps), build, 0, n, check)(
        torch.empty(n, c, dtype=torch.float32), x, weight
    )


def softmax_topk_nodes(base, ctx, a: int, n: int, e: int, k: int, normalize: bool):
    """softmax_topk's nodes over logits a [E, N] -> (the weights [1, K, N] or [K, N], without a buffer of their
    own; the ids, an int32 view [K, N]; the intermediate nodes' buffers, the order [N, E] second)."""
    probs = base.ggml_soft_max(ctx, a)
    scratch = [torch.empty(n, e), torch.empty(n, e, dtype=torch.int32)]  # probabilities, their order
    set_data(probs, scratch[0].data_ptr())  # intermediate nodes get buffers before views are made of them
    order = base.ggml_argsort(ctx, probs, 1)  # GGML_SORT_ORDER_DESC
    set_data(order, scratch[1].data_ptr())
    top = base.ggml_view_2d(ctx, order, k, n, e * 4, 0)
    picked = base.ggml_get_rows(ctx, base.ggml_reshape_3d(ctx, probs, 1, e, n), top)  # [1, K, N]
    if not normalize:
        return picked, top, scratch
    scratch += [torch.empty(n, k), torch.empty(n), torch.empty(n)]
    set_data(picked, scratch[2].data_ptr())
    weights = base.ggml_reshape_2d(ctx, picked, k, n)
    sums = base.ggml_sum_rows(ctx, weights)  # [1, N]
    set_data(sums, scratch[3].data_ptr())
    total = base.ggml_clamp(ctx, sums, 2.0**-14, float("inf"))
    set_data(total, scratch[4].data_ptr())
    return base.ggml_div(ctx, weights, total), top, scratch


def softmax_topk(logits: torch.Tensor, k: int, normalize: bool, ranked: bool = False):
    """Router logits float32 [N, E] -> (weights [N, K] float32, ids [N, K] int64) in one graph, as llama.cpp's
    build_moe_ffn picks them: ggml_soft_max, the first K of ggml_argsort (std::sort, descending), their
    probabilities by ggml_get_rows, and (normalize) divided by ggml_sum_rows (float64, in order) clamped to
    2^-14. ranked: also every probability [N, E] and their descending order [N, E] (int64)."""
    x = activations(logits)
    n, e = x.shape

    def build(base, ctx):
        a = base.ggml_new_tensor_2d(ctx, F32, e, n)
        weights, _, scratch = softmax_topk_nodes(base, ctx, a, n, e, k, normalize)
        return (a,), weights, scratch

    graph = cached_graph(("topk", x.shape, k, normalize), build, 0, n, lambda: None, nodes=24)
    weights = graph(torch.empty(n, k), x)
    if ranked:
        return weights, graph.scratch[1][:, :k].long(), graph.scratch[0].clone(), graph.scratch[1].long()
    return weights, graph.scratch[1][:, :k].long()


def sigmoid_gate_nodes(base, ctx, w: int, a: int, n: int):
    """sigmoid_gate's nodes over the gate w [C, 1] and x a [C, N] -> (its output [1, N] without a buffer, the
    intermediate nodes' buffers)."""
    z = base.ggml_mul_mat(ctx, w, a)  # [1, N]
    silu = base.ggml_silu(ctx, z)
    scratch = [torch.empty(n, 1, dtype=torch.float32) for _ in range(2)]
    for node, buf in zip((z, silu), scratch):
        set_data(node, buf.data_ptr())
    return base.ggml_div(ctx, silu, z), scratch


def sigmoid_gate(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A shared expert's gate, as llama.cpp's qwen2moe graph computes it: weight float32 [1, C], x float32
    [N, C] -> sigmoid(x @ weight.T) [N, 1], the sigmoid taken as silu(z) / z."""
    x, weight = activations(x), activations(weight)
    n, c = x.shape

    def check():
        if weight.shape != (1, c):
            raise ValueError(f"a gate of weight {list(weight.shape)} does not take inputs {list(x.shape)}")

    def build(base, ctx):
        a, w = base.ggml_new_tensor_2d(ctx, F32, c, n), base.ggml_new_tensor_2d(ctx, F32, c, 1)
        return (a, w), *sigmoid_gate_nodes(base, ctx, w, a, n)

    return cached_graph(("gate", x.shape), build, 0, n, check)(
        torch.empty(n, 1, dtype=torch.float32), x, weight
    )


def rope_node(base_lib, ctx, a: int, positions: int, dims: int, base: float) -> int:
    """ggml_rope_ext over a [Dh, H, T] at int32 positions [T], halves rotated, unscaled (llama.cpp's ext_factor
    0, freq_scale 1)."""
    return base_lib.ggml_rope_ext(ctx, a, positions, None, dims, NEOX, 0, base, 1.0, 0.0, 1.0, 32.0, 1.0)


def rope(x: torch.Tensor, start: int, dims: int, base: float) -> torch.Tensor:
    """x float32 [T, H, Dh] at positions start..start+T-1 -> rotated (halves, the first `dims` of each head) by
    ggml_rope_ext with frequency base `base`."""
    x = activations(x)
    t, h, dh = x.shape
    positions = torch.arange(start, start + t, dtype=torch.int32)

    def build(base_lib, ctx):
        a = base_lib.ggml_new_tensor_3d(ctx, F32, dh, h, t)
        pos = base_lib.ggml_new_tensor_1d(ctx, I32, t)
        return (a, pos), rope_node(base_lib, ctx, a, pos, dims, base)

    return cached_graph(("rope", x.shape, dims, base), build, 0, t, lambda: None)(
        torch.empty_like(x), x, positions
    )


def cached_positions(end: int) -> int:
    """How many cached positions attention runs over when `end` are filled: a multiple of KV_PAD."""
    return -(-end // KV_PAD) * KV_PAD


@functools.lru_cache(maxsize=4)
def causal_mask(t: int, n_kv: int, start: int) -> torch.Tensor:
    """[T, n_kv]: 0 where a key's position is at most the query's (start + row), -inf elsewhere. The same for
    every layer of a step: made once (callers only read it)."""
    return torch.full((t, n_kv), float("-inf")).triu_(start + 1)


def check_cache(k: torch.Tensor, vt: torch.Tensor, n_kv: int) -> None:
    """Keys k [Hk, capacity, Dh] and values by position vt [Hk, Dh, capacity] hold n_kv positions, rows dense."""
    hk, _, dh = k.shape
    if (
        min(k.shape[1], vt.shape[2]) < n_kv
        or vt.shape[:2] != (hk, dh)
        or k.stride()[1:] != (dh, 1)
        or vt.stride(2) != 1
    ):
        raise ValueError(
            f"cache buffers {list(k.shape)}, {list(vt.shape)} do not hold {n_kv} positions of {dh}"
        )


def cache_nodes(base, ctx, k: torch.Tensor, vt: torch.Tensor, n_kv: int) -> tuple[int, int]:
    """Inputs over the first n_kv positions of buffers check_cache passed: keys [Dh, n_kv, Hk] and values with
    positions in rows [n_kv, Dh, Hk], as llama.cpp's V cache (their data is patched per call)."""
    hk, _, dh = k.shape
    ka = base.ggml_new_tensor_3d(ctx, F32, dh, n_kv, hk)
    va = base.ggml_new_tensor_3d(ctx, F32, n_kv, dh, hk)
    cache_strides(ka, va, k, vt)
    return ka, va


def cache_strides(ka: int, va: int, k: torch.Tensor, vt: torch.Tensor) -> None:
    """cache_nodes' strides over k and vt (they follow the buffers' capacity)."""
    set_strides(ka, k.stride(1) * 4, k.stride(0) * 4)
    set_strides(va, vt.stride(1) * 4, vt.stride(0) * 4)


def attention_nodes(base, ctx, qa: int, ka: int, va: int, m: int, shape: tuple, n_kv: int, scale: float,
                    buffers: list[torch.Tensor] | None = None):  # fmt: skip
    """The nodes of `attention` of q qa [Dh, H, T] (of `shape` (T, H, Dh)) over cache_nodes ka, va with the mask
    m [n_kv, T] -> (q's permuted view, the output [Dh, H, T] (no buffer yet), the intermediate nodes' buffers:
    `buffers` if given, [H, T, n_kv] twice and [H, T, Dh]; the scores and their softmax, [n_kv, T, H])."""
    t, h, dh = shape
    # a view of an input takes its data when made: it is patched per call with the input it views
    qp = base.ggml_permute(ctx, qa, 0, 2, 1, 3)
    kq = base.ggml_mul_mat(ctx, ka, qp)  # [n_kv, T, H]
    probs = base.ggml_soft_max_ext(ctx, kq, m, scale, 0.0)
    kqv = base.ggml_mul_mat(ctx, va, probs)  # [Dh, T, H]
    scratch = buffers or [torch.empty(h, t, n_kv), torch.empty(h, t, n_kv), torch.empty(h, t, dh)]
    for node, buf in zip((kq, probs, kqv), scratch):
        set_data(node, buf.data_ptr())
    out = base.ggml_cont(ctx, base.ggml_permute(ctx, kqv, 0, 2, 1, 3))  # [Dh, H, T]
    return qp, out, scratch, (kq, probs)


def attention(q: torch.Tensor, k: torch.Tensor, vt: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """Causal attention of q float32 [T, H, Dh] at positions start..start+T-1 over a cache's keys k [Hk,
    capacity, Dh] and values with positions in rows vt [Hk, Dh, capacity] (float32, positions 0..start+T-1
    filled, the rest finite) -> [T, H * Dh]. Attends over the first n_kv = KV_PAD-multiple positions, as
    llama.cpp does: the sums then group alike."""
    q = activations(q)
    t, h, dh = q.shape
    n_kv = cached_positions(start + t)
    check_cache(k, vt, n_kv)

    def build(base, ctx):
        qa = base.ggml_new_tensor_3d(ctx, F32, dh, h, t)
        ka, va = cache_nodes(base, ctx, k, vt, n_kv)
        m = base.ggml_new_tensor_2d(ctx, F32, n_kv, t)
        qp, out, scratch, _ = attention_nodes(base, ctx, qa, ka, va, m, q.shape, n_kv, scale)
        return (qa, qp, ka, va, m), out, scratch

    key = ("attn", q.shape, k.shape[0], n_kv, k.stride(0), vt.stride(0), vt.stride(1), scale)
    read = 2 * n_kv * h * dh * 4  # K and V bytes the products read: ggml's threads share them past SMALL_WORK
    out = cached_graph(key, build, read, t, lambda: None, nodes=24)
    return out(torch.empty(t, h * dh), q, q, k, vt, causal_mask(t, n_kv, start))
