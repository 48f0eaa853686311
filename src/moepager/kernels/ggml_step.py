"""A decoded token through the whole model as one ggml graph, the way llama.cpp computes a step: each layer's
attention (its KV cache written inside the graph), the router's softmax and top K, the routed experts picked by
those ids, then the output norm and head. One call a token instead of three a layer: on a small model the
Python around a layer's calls cost as much as their arithmetic (benchmarks/quant_kernels.md, "Dispatch").

Each node is the one kernels/ggml_block.py, ggml_float.py and ggml.py build for a layer's own graphs, on the same
operands, so the bits are those of the layer-by-layer path. Only for one token of one sequence with every
expert of a layer resident in a bank where slot = expert id: the graph's own routing picks the slots.

Letters: D hidden, H query heads, Hk key/value heads, Dh head dim, E experts, K picked, V vocabulary.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch

from .ggml import activations, cached_graph, swiglu_experts_nodes, swiglu_mlp_nodes
from .ggml_block import (
    Matrix,
    Norm,
    Owner,
    attention_in_nodes,
    attention_out_nodes,
    bound,
    norm_node,
    product,
)
from .ggml_float import (
    cache_nodes,
    cached_positions,
    causal_mask,
    check_cache,
    sigmoid_gate_nodes,
    softmax_topk_nodes,
)
from .ggml_library import F32, I32, set_strides


class Dense(NamedTuple):
    """A dense SwiGLU feed-forward: gate, up [I, row bytes], down [D, row bytes]."""

    types: tuple[int, int, int]
    mats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    layouts: tuple[int, int, int]


class Experts(NamedTuple):
    """A MoE layer: its float32 router [E, D] (softmax, top K, optionally renormalized), SwiGLU banks, and a
    shared expert with its float32 gate [1, D] (qwen2moe's sigmoid) or without."""

    router: torch.Tensor
    top_k: int
    normalize: bool
    types: tuple[int, int, int]
    banks: tuple[
        torch.Tensor, torch.Tensor, torch.Tensor
    ]  # gate, up [E, I, row bytes]; down [E, D, row bytes]
    layouts: tuple[int, int, int]
    shared: Dense | None
    shared_gate: torch.Tensor | None


class Layer(NamedTuple):
    attn_norm: Norm
    q: Matrix
    k: Matrix
    v: Matrix
    o: Matrix
    qk_norm: str  # "head", "full" or "none" (ggml_block.attention_inputs)
    q_norm: Norm | None
    k_norm: Norm | None
    heads: tuple[int, int, int]  # H, Hk, Dh
    rope: tuple[int, float]  # rotated dims, frequency base
    scale: float
    ffn_norm: Norm
    ffn: Experts | Dense


class Step(NamedTuple):
    """A model's weights as decode_step takes them; `serial` names them (a graph binds weights when built)."""

    serial: int
    layers: list[Layer]
    norm: Norm
    head: Matrix
    work: int  # weight bytes a step reads: what ggml's thread count is measured on


_serials = itertools.count()


def step(layers: list[Layer], norm: Norm, head: Matrix) -> Step:
    """The layers, the output norm and head as a Step of a new serial."""
    work = head.blocks.numel()
    for lay in layers:
        work += sum(m.blocks.numel() for m in (lay.q, lay.k, lay.v, lay.o))
        if isinstance(lay.ffn, Experts):
            work += lay.ffn.router.numel() * 4 + lay.ffn.top_k * sum(b[0].numel() for b in lay.ffn.banks)
            work += sum(m.numel() for m in lay.ffn.shared.mats) if lay.ffn.shared is not None else 0
        else:
            work += sum(m.numel() for m in lay.ffn.mats)
    return Step(next(_serials), layers, norm, head, work)


def decode_step(weights: Step, x: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                pos: int) -> torch.Tensor:  # fmt: skip
    """x float32 [1, D], the embedded token at position pos -> logits [1, V], appending each layer's key and
    value at pos to its cache buffers: keys and values [Hk, capacity, Dh] and values by position [Hk, Dh,
    capacity] (KVCache's, holding at least cached_positions(pos + 1) positions)."""
    layers, norm, head = weights.layers, weights.norm, weights.head
    x = activations(x)
    d = x.shape[1]
    n_kv = cached_positions(pos + 1)
    for k, v, vt in caches:
        check_cache(k, vt, n_kv)
        if not (k.is_contiguous() and v.is_contiguous() and vt.is_contiguous()):
            raise ValueError("a decode step writes into contiguous cache buffers [Hk, capacity, Dh] only")

    def build(base, ctx):
        own = Owner()
        a, at = base.ggml_new_tensor_2d(ctx, F32, d, 1), base.ggml_new_tensor_1d(ctx, I32, 1)
        m = base.ggml_new_tensor_2d(ctx, F32, n_kv, 1)
        inputs, writes, h = [a, at, m], [], a
        for lay, (k, v, vt) in zip(layers, caches):
            n_heads, hk, dh = lay.heads
            qr, kr, vy = attention_in_nodes(base, ctx, own, h, at, 1, lay.attn_norm, lay.q, lay.k, lay.v,
                                            lay.qk_norm, lay.q_norm, lay.k_norm, lay.heads, lay.rope, owned=True)  # fmt: skip
            # the cache writes: views at this step's position, whose addresses each call patches
            k_at, v_at = (base.ggml_new_tensor_3d(ctx, F32, dh, hk, 1) for _ in range(2))
            set_strides(k_at, k.stride(0) * 4, k.stride(0) * hk * 4)
            set_strides(v_at, v.stride(0) * 4, v.stride(0) * hk * 4)
            vt_at = base.ggml_new_tensor_2d(ctx, F32, 1, hk * dh)  # one position of each (head, dim) row
            set_strides(vt_at, vt.stride(1) * 4)
            cpys = (
                base.ggml_cpy(ctx, kr, k_at),
                base.ggml_cpy(ctx, base.ggml_reshape_3d(ctx, vy, dh, hk, 1), v_at),
                base.ggml_cpy(ctx, base.ggml_transpose(ctx, vy), vt_at),
            )
            ka, va = cache_nodes(base, ctx, k, vt, n_kv)
            ffn = lay.ffn
            router = ffn.router if isinstance(ffn, Experts) else None
            _, hidden, normed, logits = attention_out_nodes(base, ctx, own, qr, ka, va, m, (1, n_heads, dh), n_kv,
                                                            lay.scale, lay.o, h, lay.ffn_norm, router, owned=True)  # fmt: skip
            if router is None:
                y, scratch = swiglu_mlp_nodes(base, ctx, ffn.types, ffn.mats, ffn.layouts, normed, 1)
            else:
                e, kk = router.shape[0], ffn.top_k
                picked, ids, scratch = softmax_topk_nodes(base, ctx, logits, 1, e, kk, ffn.normalize)
                own.scratch += scratch
                w = base.ggml_reshape_3d(ctx, own(picked, kk), 1, kk, 1)
                b = base.ggml_reshape_3d(ctx, normed, d, 1, 1)
                y, scratch = swiglu_experts_nodes(
                    base, ctx, ffn.types, ffn.banks, ffn.layouts, b, ids, 1, kk, w
                )
                if ffn.shared is not None:  # MoE.combine's sum, as llama.cpp's qwen2moe graph adds it
                    own.scratch += scratch
                    sh = ffn.shared
                    s, scratch = swiglu_mlp_nodes(base, ctx, sh.types, sh.mats, sh.layouts, normed, 1)
                    s = own(s, 1, d)
                    if ffn.shared_gate is not None:
                        own.scratch += scratch
                        gw = bound(base, ctx, ffn.shared_gate)
                        gate, scratch = sigmoid_gate_nodes(base, ctx, gw, normed, 1)
                        s = own(base.ggml_mul(ctx, s, own(gate, 1, 1)), 1, d)
                    y = base.ggml_add(ctx, own(y, 1, d), s)
            own.scratch += scratch
            h = own(base.ggml_add(ctx, hidden, own(y, 1, d)), 1, d)
            inputs += [ka, va, *cpys]
            writes += cpys
        out = product(base, ctx, own, head, norm_node(base, ctx, own, norm, h, (1, d)), 1, is_out=True)
        return tuple(inputs), out, own.scratch, writes

    key = (
        "step",
        weights.serial,
        n_kv,
        tuple((k.stride(0), v.stride(0), vt.stride(0), vt.stride(1)) for k, v, vt in caches),
    )
    nodes = sum(200 + 2 * (lay.ffn.top_k if isinstance(lay.ffn, Experts) else 0) for lay in layers) + 32
    graph = cached_graph(key, build, weights.work, 1, lambda: None, nodes=nodes)
    addresses = []
    for k, v, vt in caches:
        kp, vp, vtp = k.data_ptr(), v.data_ptr(), vt.data_ptr()
        addresses += (kp, vtp, kp + pos * k.stride(1) * 4, vp + pos * v.stride(1) * 4, vtp + pos * 4)
    positions = torch.tensor([pos], dtype=torch.int32)
    mask = causal_mask(1, n_kv, pos)
    return graph(torch.empty(1, head.blocks.shape[0]), x, positions, mask, *addresses)
