"""A decoded token through the whole model as one ggml graph, the way llama.cpp computes a step: each layer's
attention (its KV cache written inside the graph), the router's softmax and top K, the routed experts picked by
those ids, then the output norm and head. One call a token instead of three a layer: on a small model the
Python around a layer's calls cost as much as their arithmetic (benchmarks/quant_kernels.md, "Dispatch").

Each node is the one kernels/ggml_block.py, ggml_float.py and ggml.py build for a layer's own graphs, on the same
operands, so the bits are those of the layer-by-layer path. Only for one token of one sequence with every
expert of a layer resident in a bank where slot = expert id: the graph's own routing picks the slots. With
experts in a cache (decode_step_paged), still one graph, a node of the host's at each router choosing slots.

Letters: D hidden, H query heads, Hk key/value heads, Dh head dim, E experts, K picked, V vocabulary.
"""

from __future__ import annotations

import ctypes
import itertools
from typing import NamedTuple

import torch

from . import ggml_routing
from .ggml import activations, cached_graph, swiglu_experts_nodes, swiglu_mlp_nodes, weight_tensor
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
    cache_strides,
    cached_positions,
    check_cache,
    sigmoid_gate_nodes,
    softmax_topk_nodes,
)
from .ggml_library import F32, I32, set_data, set_extent, set_strides
from .host_nodes import Holds


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


class Table(NamedTuple):
    """An embedding table whose rows the graph looks up by token id (ggml_get_rows, as llama.cpp embeds a token):
    uint8 [V, row bytes] of a GGUF type, float32 included."""

    qtype: int
    rows: torch.Tensor


class Step(NamedTuple):
    """A model's weights as decode_step takes them; `serial` names them (a graph binds weights when built)."""

    serial: int
    layers: list[Layer]
    norm: Norm
    head: Matrix
    work: int  # weight bytes a step reads: what ggml's thread count is measured on
    embed: Table | None  # None: the caller embeds the token (its rows are read from the file, say)


_serials = itertools.count()


def _work(lay: Layer) -> int:
    """Weight bytes a layer's decode step reads."""
    work = sum(m.blocks.numel() for m in (lay.q, lay.k, lay.v, lay.o))
    if isinstance(lay.ffn, Experts):
        work += lay.ffn.router.numel() * 4 + lay.ffn.top_k * sum(b[0].numel() for b in lay.ffn.banks)
        return work + (sum(m.numel() for m in lay.ffn.shared.mats) if lay.ffn.shared is not None else 0)
    return work + sum(m.numel() for m in lay.ffn.mats)


def step(layers: list[Layer], norm: Norm, head: Matrix, embed: Table | None = None) -> Step:
    """The layers, the output norm and head (and the embedding table, if the graph looks the token up) as a Step
    of a new serial."""
    work = head.blocks.numel() + sum(_work(lay) for lay in layers)
    return Step(next(_serials), layers, norm, head, work, embed)


class Caches:
    """A step's KV cache buffers, per layer: keys and values [Hk, capacity, Dh] and values by position [Hk, Dh,
    capacity] (KVCache's), checked once. A caller that keeps this object while its buffers stay spares each token
    the checks (after a graph call Python's working set is out of the CPU's caches, and every line costs)."""

    def __init__(self, buffers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        for k, v, vt in buffers:
            check_cache(k, vt, 0)
            if not (k.is_contiguous() and v.is_contiguous() and vt.is_contiguous()):
                raise ValueError("a decode step writes into contiguous cache buffers [Hk, capacity, Dh] only")
        self.buffers = buffers
        self.capacity = min((min(k.shape[1], vt.shape[2]) for k, _, vt in buffers), default=0)
        self.strides = tuple((k.stride(0), v.stride(0), vt.stride(0), vt.stride(1)) for k, v, vt in buffers)
        # per layer: the addresses of keys, values and values by position, and the bytes a position takes in keys
        # and in values (in values by position, 4: positions are its rows' elements)
        self.bases = [(k.data_ptr(), v.data_ptr(), vt.data_ptr(), k.stride(1) * 4, v.stride(1) * 4)
                      for k, v, vt in buffers]  # fmt: skip
        # a step's position and mask, made without a torch op (each cost tens of us after a graph call): the
        # position written into a buffer of these buffers' sequence, the mask a window of zeros then -inf
        self.position = torch.zeros(1, dtype=torch.int32)
        self._position = ctypes.c_int32.from_address(self.position.data_ptr())
        self.masks = torch.cat([torch.zeros(self.capacity), torch.full((self.capacity,), float("-inf"))])

    def positions(self, pos: int) -> int:
        """The cached positions a step at `pos` attends over (a multiple of KV_PAD), which the buffers hold."""
        n_kv = cached_positions(pos + 1)
        if n_kv > self.capacity:
            raise ValueError(f"cache buffers of {self.capacity} positions do not hold {n_kv}")
        return n_kv

    def at(self, pos: int) -> tuple[torch.Tensor, int]:
        """The step at pos's position input, int32 [1], and the address of its mask [n_kv]: 0 over positions up
        to pos, -inf past it (positions past the capacity never read)."""
        self._position.value = pos
        return self.position, self.masks.data_ptr() + 4 * (self.capacity - pos - 1)

    def addresses(self, pos: int) -> list[int]:
        """Per layer: its keys and values-by-position buffers, and the places this position's writes go."""
        out = []
        for k, v, vt, k_step, v_step in self.bases:
            out += (k, vt, k + pos * k_step, v + pos * v_step, vt + pos * 4)
        return out


class Window:
    """A step graph's nodes that follow its KV cache buffers: the mask [n_kv, 1], and per layer the keys [Dh, n_kv,
    Hk] and values by position [n_kv, Dh, Hk] over the buffers, the views this position's writes go to (strided
    by the buffers' capacity), the scores and their softmax [n_kv, 1, H] (in buffers of `room` positions). One
    graph serves every n_kv and capacity of the caches it is called with, these reshaped and strided again where
    they differ: it was built again at each 64 positions and whenever the buffers grew (~5 ms a build on the
    small Q4_0 file: 3 of them in a run of 129 tokens)."""

    def __init__(self, n_kv: int, caches: Caches):
        self.n_kv, self.strides, self.room, self.mask = n_kv, caches.strides, caches.capacity, 0
        self.layers: list[tuple[int, ...]] = []  # per layer: its three cache writes, keys, values
        self.scores: list[tuple[int, torch.Tensor]] = []  # (node, its buffer)
        # per router: its probabilities [E] and their descending order [E] as Python reads them (views of the
        # nodes' buffers), its K+1
        self.routes: list[tuple[ctypes.Array, ctypes.Array, int]] = []

    def close(self, closeness: float) -> bool:
        """After a call: whether a router's first K+1 probabilities hold two within `closeness` of each other
        (ggml_routing.any_close), which another float form could order otherwise than the library did."""
        return ggml_routing.any_close(self.routes, closeness)

    def fit(self, graph, caches: Caches, n_kv: int) -> None:
        """Before a call of `graph`: this window, if its build made it, becomes the graph's; the graph's is laid
        over these caches and reshaped to n_kv (then planned again: a softmax's work grows with it)."""
        if self.mask:
            graph.window = self
        window = graph.window
        if window.strides != caches.strides:
            for (*writes, keys, values), (k, v, vt) in zip(window.layers, caches.buffers):
                _write_strides(*writes, k, v, vt)
                cache_strides(keys, values, k, vt)
            window.strides = caches.strides
            if caches.capacity > window.room:
                window._widen(caches.capacity)
        if window.n_kv == n_kv:
            return
        set_extent(window.mask, 0, n_kv, contiguous=True)
        for *_, keys, values in window.layers:
            set_extent(keys, 1, n_kv)
            set_extent(values, 0, n_kv)
        for node, _ in window.scores:
            set_extent(node, 0, n_kv, contiguous=True)
        window.n_kv = n_kv
        graph.replan()

    def _widen(self, room: int) -> None:
        """Score buffers of `room` positions in place of the smaller ones the nodes had (H x room floats twice,
        not counted in the graph's bytes: a decode step's are a few KiB to a few MiB)."""
        wider: dict[int, torch.Tensor] = {}
        for i, (node, buffer) in enumerate(self.scores):
            if buffer.data_ptr() not in wider:
                wider[buffer.data_ptr()] = buffer.new_empty(*buffer.shape[:-1], room)
            self.scores[i] = node, wider[buffer.data_ptr()]
            set_data(node, self.scores[i][1].data_ptr())
        self.room = room


def _write_strides(k_at: int, v_at: int, vt_at: int, k, v, vt) -> None:
    """The strides of a layer's writes at one position into its buffers k, v [Hk, capacity, Dh] and vt [Hk, Dh,
    capacity]: keys and values [Dh, Hk, 1], values by position [1, Hk * Dh] (a copy node is a view of its
    destination, made with the strides the destination had then)."""
    hk = k.shape[0]
    set_strides(k_at, k.stride(0) * 4, k.stride(0) * hk * 4)
    set_strides(v_at, v.stride(0) * 4, v.stride(0) * hk * 4)
    set_strides(vt_at, vt.stride(1) * 4)


def _inputs(
    weights: Step, x: torch.Tensor, caches: Caches | list, pos: int
) -> tuple[torch.Tensor, Caches, int]:
    """What both steps take -> (the graph's first input: the token id, int32 [1], where the graph embeds it, else
    its row, float32 [1, D]; the cache buffers as Caches; the cached positions the step attends over)."""
    caches = caches if isinstance(caches, Caches) else Caches(caches)
    if weights.embed is None:
        return activations(x), caches, caches.positions(pos)
    if x.dtype != torch.int32 or x.shape != (1,):
        raise ValueError(
            f"a step that embeds its token takes its id as int32 [1], not {x.dtype} {list(x.shape)}"
        )
    return x, caches, caches.positions(pos)


def _attention(base, ctx, own, lay: Layer, bufs, h: int, at: int, m: int, window: Window):
    """A layer's attention over its cache (this position's key and value written into it), then its FFN norm
    and, for a MoE layer, the router's logits -> (inputs, cache writes, hidden, normed, logits or None). Its nodes
    that follow the cache buffers go to the window."""
    n_kv = window.n_kv
    k, v, vt = bufs
    n_heads, hk, dh = lay.heads
    qr, kr, vy = attention_in_nodes(base, ctx, own, h, at, 1, lay.attn_norm, lay.q, lay.k, lay.v, lay.qk_norm,
                                    lay.q_norm, lay.k_norm, lay.heads, lay.rope, owned=True)  # fmt: skip
    # the cache writes: views at this step's position, whose addresses each call patches
    k_at, v_at = (base.ggml_new_tensor_3d(ctx, F32, dh, hk, 1) for _ in range(2))
    vt_at = base.ggml_new_tensor_2d(ctx, F32, 1, hk * dh)  # one position of each (head, dim) row
    _write_strides(k_at, v_at, vt_at, k, v, vt)
    cpys = (
        base.ggml_cpy(ctx, kr, k_at),
        base.ggml_cpy(ctx, base.ggml_reshape_3d(ctx, vy, dh, hk, 1), v_at),
        base.ggml_cpy(ctx, base.ggml_transpose(ctx, vy), vt_at),
    )
    ka, va = cache_nodes(base, ctx, k, vt, n_kv)
    router = lay.ffn.router if isinstance(lay.ffn, Experts) else None
    _, hidden, normed, logits, scores = attention_out_nodes(base, ctx, own, qr, ka, va, m, (1, n_heads, dh), n_kv,
                                                            lay.scale, lay.o, h, lay.ffn_norm, router, owned=True,
                                                            room=window.room)  # fmt: skip
    window.layers.append((*cpys, ka, va))
    window.scores += scores
    return [ka, va, *cpys], list(cpys), hidden, normed, logits


def _route(base, ctx, own, ffn: Experts, logits: int, window: Window) -> tuple[int, int, torch.Tensor]:
    """The router's softmax and top K -> (weights node [1, K, 1], ids node [K, 1], the buffer whose first K int32
    values are the ids)."""
    e, kk = ffn.router.shape[0], ffn.top_k
    picked, ids, scratch = softmax_topk_nodes(base, ctx, logits, 1, e, kk, ffn.normalize)
    own.scratch += scratch
    probs = (ctypes.c_float * e).from_address(scratch[0].data_ptr())
    order = (ctypes.c_int32 * e).from_address(scratch[1].data_ptr())
    window.routes.append((probs, order, min(kk + 1, e)))
    return base.ggml_reshape_3d(ctx, own(picked, kk), 1, kk, 1), ids, scratch[1]


def _ffn(
    base, ctx, own, ffn: Experts | Dense, normed: int, d: int, ids: int | None = None, w: int | None = None
):
    """The feed-forward of normed [D, 1]: a dense SwiGLU, or the routed experts `ids` weighted by `w` plus a shared
    expert (MoE.combine's sum, as llama.cpp's qwen2moe graph adds it) -> y [D, 1], owned."""
    if isinstance(ffn, Dense):
        y, scratch = swiglu_mlp_nodes(base, ctx, ffn.types, ffn.mats, ffn.layouts, normed, 1)
        own.scratch += scratch
        return own(y, 1, d)
    b = base.ggml_reshape_3d(ctx, normed, d, 1, 1)
    y, scratch = swiglu_experts_nodes(base, ctx, ffn.types, ffn.banks, ffn.layouts, b, ids, 1, ffn.top_k, w)
    own.scratch += scratch
    y = own(y, 1, d)
    if ffn.shared is not None:
        sh = ffn.shared
        s, scratch = swiglu_mlp_nodes(base, ctx, sh.types, sh.mats, sh.layouts, normed, 1)
        own.scratch += scratch
        s = own(s, 1, d)
        if ffn.shared_gate is not None:
            gate, scratch = sigmoid_gate_nodes(base, ctx, bound(base, ctx, ffn.shared_gate), normed, 1)
            own.scratch += scratch
            s = own(base.ggml_mul(ctx, s, own(gate, 1, 1)), 1, d)
        y = own(base.ggml_add(ctx, y, s), 1, d)
    return y


def _nodes(layers: list[Layer]) -> int:
    return sum(200 + 2 * (lay.ffn.top_k if isinstance(lay.ffn, Experts) else 0) for lay in layers) + 32


def _step_nodes(base, ctx, weights: Step, caches: Caches, window: Window, experts):
    """A decode step's graph (cached_graph's build): the token's row (looked up by its id where the step has the
    table), each layer's attention over its cache (the window's n_kv positions), then its FFN; for a MoE layer
    experts(i, own, logits, normed) -> (weights node, slots node) gives what its products take."""
    layers, norm, head = weights.layers, weights.norm, weights.head
    d = norm.weight.shape[0]
    own = Owner()
    at, m = base.ggml_new_tensor_1d(ctx, I32, 1), base.ggml_new_tensor_2d(ctx, F32, window.n_kv, 1)
    window.mask = m
    if weights.embed is None:
        a = h = base.ggml_new_tensor_2d(ctx, F32, d, 1)
    else:
        a = base.ggml_new_tensor_1d(ctx, I32, 1)
        table = weight_tensor(base, ctx, weights.embed.qtype, weights.embed.rows[None])
        h = own(base.ggml_get_rows(ctx, table, a), 1, d)
    inputs, writes = [a, at, m], []
    for i, (lay, bufs) in enumerate(zip(layers, caches.buffers)):
        ins, cpys, hidden, normed, logits = _attention(base, ctx, own, lay, bufs, h, at, m, window)
        w, slots = experts(i, own, logits, normed) if isinstance(lay.ffn, Experts) else (None, None)
        y = _ffn(base, ctx, own, lay.ffn, normed, d, slots, w)
        h = own(base.ggml_add(ctx, hidden, y), 1, d)
        inputs += ins
        writes += cpys
    out = product(base, ctx, own, head, norm_node(base, ctx, own, norm, h, (1, d)), 1, is_out=True)
    return tuple(inputs), out, own.scratch, writes


def decode_step(weights: Step, x: torch.Tensor, caches: Caches | list, pos: int,
                check: float = 0.0) -> torch.Tensor | None:  # fmt: skip
    """x, the token at position pos: its id int32 [1] where weights.embed is given, else its row float32 [1, D]
    -> logits [1, V], appending each layer's key and value at pos to its cache buffers (a Caches, or its list of
    buffers), which hold at least cached_positions(pos + 1) positions. check: None where a router's probabilities
    are within this relative closeness (Window.close; 0: never): the caller routes that token as its reference
    does (ggml_routing.softmax_topk for llama.cpp's form on this CPU), writing over what this step wrote at pos."""
    layers = weights.layers
    x, caches, n_kv = _inputs(weights, x, caches, pos)
    window = Window(n_kv, caches)

    def build(base, ctx):
        def experts(i, own, logits, normed):  # slot = expert id: the router's ids pick the slots
            return _route(base, ctx, own, layers[i].ffn, logits, window)[:2]

        return _step_nodes(base, ctx, weights, caches, window, experts)

    key = ("step", weights.serial)
    graph = cached_graph(key, build, weights.work, 1, lambda: None, nodes=_nodes(layers))
    with graph.g.lock:  # another thread may call this graph at another n_kv
        window.fit(graph, caches, n_kv)
        logits = _call(graph, weights, x, caches, pos)
        return None if check and graph.window.close(check) else logits


def _call(graph, weights: Step, x: torch.Tensor, caches: Caches, pos: int) -> torch.Tensor:
    positions, mask = caches.at(pos)
    out = torch.empty(1, weights.head.blocks.shape[0])
    return graph(out, x, positions, mask, *caches.addresses(pos))


def decode_step_paged(weights: Step, x: torch.Tensor, caches: Caches | list, pos: int, host,
                      check: float = 0.0) -> torch.Tensor | None:  # fmt: skip
    """decode_step where each MoE layer's experts are slots of a bank holding some of them (an expert cache), still
    one graph a token: at each router a host node (host_nodes.Holds) turns the router's ids into slots.

    host, the cache's step side (paging/paged.py PagedExperts): hold_step(i, ids, guess, done) -> the slots of
    layer i's experts `ids` (a list) once they are in the bank, after letting go of done, the previous entered MoE
    layer's (i, ids), whose products are done (None at the first); release_step(i, ids) lets go of the last one's
    after the graph; step_table(i) -> the slot of each of layer i's experts (int32 [E], -1 where a step must ask
    hold_step) or None (always ask); step_found(i, ids): layer i's experts were all found in its table;
    step_guesses(): each MoE layer's graph also applies the next MoE layer's router to its experts' input, and
    `guess` is that router's top K (what paging/prefetch.py guesses, made here without a call of its own), else
    None; `stepping`: a lock the graph holds, under which nothing else evicts. The other nodes are decode_step's
    on the same operands (a slot's rows are its expert's), so the logits are decode_step's bit for bit; check: as
    there."""
    layers = weights.layers
    x, caches, n_kv = _inputs(weights, x, caches, pos)
    routers = [i for i, lay in enumerate(layers) if isinstance(lay.ffn, Experts)]
    guesses = host.step_guesses()
    ahead = dict(itertools.pairwise(routers)) if guesses else {}
    made, window = [], Window(n_kv, caches)

    def build(base, ctx):
        holds = Holds()
        made.append(holds)

        def experts(i, own, logits, normed):
            w, ids, ids_buffer = _route(base, ctx, own, layers[i].ffn, logits, window)
            guess = None
            if i in ahead:  # the next router on this layer's experts' input, its experts in order of logits
                nxt = layers[ahead[i]].ffn
                router = weight_tensor(base, ctx, F32, nxt.router.view(torch.uint8)[None], 0)
                logits = own(base.ggml_mul_mat(ctx, router, normed), 1, nxt.router.shape[0])
                order = base.ggml_argsort(ctx, logits, 1)
                buffer = torch.empty(nxt.router.shape[0], dtype=torch.int32)
                own.scratch.append(buffer)
                set_data(order, buffer.data_ptr())
                guess = (order, buffer, nxt.top_k)
            slots = holds.node(
                base, ctx, own, i, ids, ids_buffer, layers[i].ffn.top_k, guess, host.step_table(i)
            )
            return w, slots

        return _step_nodes(base, ctx, weights, caches, window, experts)

    key = ("paged step", weights.serial, guesses)
    graph = cached_graph(key, build, weights.work, 1, lambda: None, nodes=_nodes(layers) + 8 * len(routers))
    if made:
        graph.host = made[0]
    with graph.g.lock, host.stepping:  # another thread may call this graph at another n_kv, with other holds
        holds = graph.host
        holds.hold, holds.release, holds.found = host.hold_step, host.release_step, host.step_found
        window.fit(graph, caches, n_kv)
        try:
            logits = _call(graph, weights, x, caches, pos)
        finally:
            holds.end()
        return None if check and graph.window.close(check) else logits
