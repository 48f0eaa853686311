"""A decoder layer's ggml ops on either side of its KV cache update as two graphs, the way llama.cpp's graph
runs them, so that a decoded token costs three ggml calls a layer (these two and the experts) instead of a
dozen: each call wakes ggml's threads and crosses ctypes, which at 48 layers was a real share of a token.
- `attention_inputs`: the attention norm, the q, k, v products (and biases), q/k norms and the rotary embedding;
- `attention_output`: attention over the cache, the output product, the residual, the FFN norm and the router's
  logits.
Each node is the op kernels/ggml_float.py and kernels/ggml.py run alone, on the same operands: one graph or
several, the bits are the same (a node's result does not depend on its neighbours or on the thread count).
Weights are bound when a graph is built (its key holds their data pointers); activations are patched per call.

Letters: T tokens, D hidden, H query heads, Hk key/value heads, Dh head dim, E experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .ggml import activations, cached_graph, weight_tensor
from .ggml_float import (
    attention_nodes,
    cache_nodes,
    cached_positions,
    causal_mask,
    check_cache,
    rms_norm_node,
    rope_node,
)
from .ggml_library import F32, I32, set_data


class Matrix(NamedTuple):
    """A product's weight: GGUF blocks uint8 [R, row bytes] of `qtype` in `layout`, and its float32 bias."""

    qtype: int
    blocks: torch.Tensor
    layout: int
    bias: torch.Tensor | None


class Norm(NamedTuple):
    weight: torch.Tensor  # float32 [C]
    eps: float


def bound(base, ctx, t: torch.Tensor) -> int:
    """A ggml float32 vector over a contiguous float32 torch one [C] (a norm's weight, a bias), bound at build."""
    a = base.ggml_new_tensor_1d(ctx, F32, t.numel())
    set_data(a, t.data_ptr())
    return a


class Owner:
    """Gives intermediate nodes buffers of their own (a graph's context allocates none)."""

    def __init__(self):
        self.scratch: list[torch.Tensor] = []
        self.reused: dict[tuple, list[torch.Tensor]] = {}  # buffers the graph's nodes take turns with

    def buffer(self, *shape: int) -> torch.Tensor:
        self.scratch.append(torch.empty(*shape, dtype=torch.float32))
        return self.scratch[-1]

    def __call__(self, node: int, *shape: int) -> int:
        set_data(node, self.buffer(*shape).data_ptr())
        return node


def product(base, ctx, own, m: Matrix, x: int, t: int, is_out: bool = False) -> int:
    """m @ x as ggml_mul_mat (+ its bias by ggml_add, as BlockLinear adds it): [R, T]"""
    rows = m.blocks.shape[0]
    y = base.ggml_mul_mat(ctx, weight_tensor(base, ctx, m.qtype, m.blocks[None], m.layout), x)
    if m.bias is None:
        return y if is_out else own(y, t, rows)
    own(y, t, rows)
    y = base.ggml_add(ctx, y, bound(base, ctx, m.bias))
    return y if is_out else own(y, t, rows)


def norm_node(base, ctx, own, n: Norm, x: int, shape: tuple, is_out: bool = False) -> int:
    """ggml_float.rms_norm's nodes over x of `shape`"""
    y = rms_norm_node(base, ctx, x, bound(base, ctx, n.weight), n.eps, own.buffer(*shape))
    return y if is_out else own(y, *shape)


def _key(*parts) -> tuple:
    """What a graph binds: each weight by its pointer and shape (the rest are plain values)."""
    return tuple((p.data_ptr(), p.shape) if isinstance(p, torch.Tensor) else p for p in parts)


def attention_in_nodes(base, ctx, own, a: int, pos: int, t: int, norm: Norm, q: Matrix, k: Matrix, v: Matrix,
                       qk_norm: str, q_norm: Norm | None, k_norm: Norm | None, heads: tuple[int, int, int],
                       rope: tuple[int, float], owned: bool = False) -> tuple[int, int, int]:  # fmt: skip
    """attention_inputs' nodes over x a [D, T] at int32 positions pos [T] -> q [Dh, H, T], k [Dh, Hk, T] rotated
    and v [Hk * Dh, T]: outputs without buffers, or (owned) each in a buffer of its own."""
    h, hk, dh = heads
    normed = norm_node(base, ctx, own, norm, a, (t, norm.weight.numel()))
    qy, ky = (product(base, ctx, own, m, normed, t) for m in (q, k))
    vy = product(base, ctx, own, v, normed, t, is_out=not owned)
    if qk_norm == "full":
        qy, ky = (
            norm_node(base, ctx, own, q_norm, qy, (t, h * dh)),
            norm_node(base, ctx, own, k_norm, ky, (t, hk * dh)),
        )
    q3, k3 = base.ggml_reshape_3d(ctx, qy, dh, h, t), base.ggml_reshape_3d(ctx, ky, dh, hk, t)
    if qk_norm == "head":
        q3, k3 = (
            norm_node(base, ctx, own, q_norm, q3, (t, h, dh)),
            norm_node(base, ctx, own, k_norm, k3, (t, hk, dh)),
        )
    qr, kr = rope_node(base, ctx, q3, pos, *rope), rope_node(base, ctx, k3, pos, *rope)
    return (own(qr, t, h, dh), own(kr, t, hk, dh), vy) if owned else (qr, kr, vy)


def attention_inputs(x: torch.Tensor, norm: Norm, q: Matrix, k: Matrix, v: Matrix, qk_norm: str,
                     q_norm: Norm | None, k_norm: Norm | None, heads: tuple[int, int, int], start: int,
                     rope: tuple[int, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """x float32 [T, D] at positions start.. -> q [T, H, Dh] and k [T, Hk, Dh] rotated, v [T, Hk, Dh]:
    rms_norm, the three products, q/k norms ("head": per head, "full": over the projection, "none"), then
    ggml_rope_ext (halves rotated, the first rope[0] dims of each head, frequency base rope[1])."""
    x = activations(x)
    t, d = x.shape
    h, hk, dh = heads
    positions = torch.arange(start, start + t, dtype=torch.int32)

    def build(base, ctx):
        own = Owner()
        a, pos = base.ggml_new_tensor_2d(ctx, F32, d, t), base.ggml_new_tensor_1d(ctx, I32, t)
        outs = attention_in_nodes(
            base, ctx, own, a, pos, t, norm, q, k, v, qk_norm, q_norm, k_norm, heads, rope
        )
        return (a, pos), outs, own.scratch

    norms = (q_norm.weight, k_norm.weight) if qk_norm != "none" else ()
    key = ("attn_in", x.shape, heads, qk_norm, rope, norm.eps, _key(norm.weight, *norms, *q, *k, *v))
    work = sum(m.blocks.numel() for m in (q, k, v))
    out = (torch.empty(t, h, dh), torch.empty(t, hk, dh), torch.empty(t, hk, dh))
    return cached_graph(key, build, work, t, lambda: None, nodes=48)(out, x, positions)


def attention_out_nodes(base, ctx, own, qa: int, ka: int, va: int, m: int, shape: tuple, n_kv: int, scale: float,
                        o: Matrix, res: int, norm: Norm, router: torch.Tensor | None, owned: bool = False,
                        room: int = 0) -> tuple[int, int, int, int | None, tuple]:  # fmt: skip
    """attention_output's nodes: q qa [Dh, H, T] of `shape` (T, H, Dh) over the cache's ka, va (ggml_float's
    cache_nodes) with mask m, the residual res [D, T] -> (q's view, which an input qa patches too; hidden [D, T],
    normed [D, T] and the router's logits [E, T] (or None): outputs without buffers, or (owned) each in a buffer
    of its own; the scores and their softmax [n_kv, T, H], each with its buffer). room: the positions the scores'
    buffers hold (at least n_kv), so that the graph may attend over more later (kernels/ggml_step.py's Window)."""
    t, h, dh = shape
    d = norm.weight.numel()
    room = max(room, n_kv)
    # one set of attention buffers per graph: ggml runs a graph's nodes one after another, so the layers of a
    # decode step (kernels/ggml_step.py) take turns with them (at 4096 positions, 48 layers' own were ~50 MiB)
    key = ("attention", t, h, dh, room)
    if key not in own.reused:
        own.reused[key] = [torch.empty(h, t, room), torch.empty(h, t, room), torch.empty(h, t, dh)]
        own.scratch += own.reused[key]
    qp, attn, _, scores = attention_nodes(base, ctx, qa, ka, va, m, shape, n_kv, scale, own.reused[key])
    scores = tuple(zip(scores, own.reused[key]))
    flat = base.ggml_reshape_2d(ctx, own(attn, t, h, dh), h * dh, t)
    hidden = base.ggml_add(ctx, res, product(base, ctx, own, o, flat, t))
    if owned:
        own(hidden, t, d)
    normed = norm_node(base, ctx, own, norm, hidden, (t, d), is_out=not owned)
    logits = None
    if router is not None:
        w = weight_tensor(base, ctx, F32, router.view(torch.uint8)[None], 0)
        logits = base.ggml_mul_mat(ctx, w, normed)
        if owned:
            own(logits, t, router.shape[0])
    return qp, hidden, normed, logits, scores


def attention_output(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float,
                     o: Matrix, residual: torch.Tensor, norm: Norm, router: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """q float32 [T, H, Dh] over the cache's keys [Hk, capacity, Dh] and values by position [Hk, Dh, capacity]
    (ggml_float.attention), then residual [T, D] + o(attention) -> h, rms_norm(h) -> normed, and with a
    float32 router matrix [E, D] its logits [T, E] (else None)."""
    q, residual = activations(q), activations(residual)
    t, h, dh = q.shape
    d = residual.shape[1]
    n_kv = cached_positions(start + t)
    check_cache(keys, values, n_kv)
    mask = causal_mask(t, n_kv, start)

    def build(base, ctx):
        own = Owner()
        qa = base.ggml_new_tensor_3d(ctx, F32, dh, h, t)
        ka, va = cache_nodes(base, ctx, keys, values, n_kv)
        m = base.ggml_new_tensor_2d(ctx, F32, n_kv, t)
        res = base.ggml_new_tensor_2d(ctx, F32, d, t)
        qp, *outs, _ = attention_out_nodes(
            base, ctx, own, qa, ka, va, m, q.shape, n_kv, scale, o, res, norm, router
        )
        return (qa, qp, ka, va, m, res), tuple(x for x in outs if x is not None), own.scratch

    strides = (keys.stride(0), values.stride(0), values.stride(1))
    key = ("attn_out", q.shape, keys.shape[0], n_kv, strides, scale, norm.eps, _key(norm.weight, router, *o))
    work = o.blocks.numel() + (router.numel() * 4 if router is not None else 0) + 2 * n_kv * h * dh * 4
    out = (torch.empty(t, d), torch.empty(t, d)) + (
        (torch.empty(t, router.shape[0]),) if router is not None else ()
    )
    outs = cached_graph(key, build, work, t, lambda: None, nodes=64)(out, q, q, keys, values, mask, residual)
    return outs if router is not None else (*outs, None)
