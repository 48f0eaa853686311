"""A decoded token through a decoder layer in two numba calls, the compiled form of model.Block for the plain
case: `attention_step` (RMSNorm, grouped-query attention over the KV cache), then `experts_step` (softmax
top-k routing to SwiGLU experts of a resident float32 bank) or `mlp_step` (a dense SwiGLU layer); and
`head_step` (the final norm and the output head).

Why: on a 2-core machine a decoded token of the Qwen3-MoE small shape spent 8.8 ms in kernels and 5.3 ms in
the ~1,500 torch calls around its ~50 kernel calls (benchmarks/README.md section 4); llama.cpp's whole
evaluation took 10-11. Here the parallel loops stream the same weights as the gathered kernel (matvec.py), and
the host work between products is gone. What it computes is the model's own math, step by step in float32,
on the model's own tensors; the parity tests hold it to transformers' logits like the eager path. It does not
decide when it may run (model/fused_decode.py does) and owns no weights.

Letters: D hidden, H heads, Hk kv heads, Dh head dim, S cached positions, E experts, K active, I expert
intermediate, R rows, V vocabulary.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# reassociation (vector sums) and fused multiply-add, but no finite-math assumptions: softmax meets -inf
_MATH = {"reassoc", "contract"}
# Rows a thread reads side by side, each from its own quarter of the thread's share: more reads in flight than
# one stream of rows. Measured on the 2-core VM, cold float32 matvecs: 49152x512 25 -> 28 GB/s, 3072x512 25 -> 28.
_STREAMS = 4


@njit(cache=True)
def _streams(rows, threads):  # pragma: no cover - compiled
    """Rows per stream: a parallel loop over t < threads * per reads row _row(t, per, j) for each of the
    _STREAMS streams j; rows from threads * _STREAMS * per on are left to a serial loop."""
    return rows // (threads * _STREAMS)


@njit(cache=True)
def _row(t, per, j):  # pragma: no cover - compiled
    """The row that iteration t reads in stream j: prange hands each thread a contiguous range of t, so each
    thread streams _STREAMS runs of its own contiguous share of rows."""
    return (t // per) * _STREAMS * per + j * per + t % per


@njit(fastmath=_MATH, cache=True)
def _rms_norm(x, w, eps):  # pragma: no cover - compiled
    """x [n] -> x / sqrt(mean(x^2) + eps) * w, as F.rms_norm computes it in float32."""
    acc = np.float32(0.0)
    for i in range(x.shape[0]):
        acc += x[i] * x[i]
    r = np.float32(1.0) / np.sqrt(acc / np.float32(x.shape[0]) + np.float32(eps))
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = (x[i] * r) * w[i]
    return out


@njit(fastmath=_MATH, cache=True)
def _dot(a, b):  # pragma: no cover - compiled
    acc = np.float32(0.0)
    for i in range(a.shape[0]):
        acc += a[i] * b[i]
    return acc


@njit(fastmath=_MATH, cache=True)
def _norm_rope(v, norm_w, cos, sin, eps):  # pragma: no cover - compiled
    """One head v [Dh] in place: RMSNorm (when norm_w has Dh weights), then the rotary embedding. sin carries
    rotate-half's sign in its first half (layers.RotaryEmbedding): v*cos + roll(v, Dh/2)*sin."""
    dh = v.shape[0]
    half = dh // 2
    if norm_w.shape[0] == dh:
        acc = np.float32(0.0)
        for i in range(dh):
            acc += v[i] * v[i]
        r = np.float32(1.0) / np.sqrt(acc / np.float32(dh) + np.float32(eps))
        for i in range(dh):
            v[i] = (v[i] * r) * norm_w[i]
    for i in range(half):
        a, b = v[i], v[i + half]
        v[i] = a * cos[i] + b * sin[i]
        v[i + half] = b * cos[i + half] + a * sin[i + half]


@njit(fastmath=_MATH, cache=True)
def _qkv_row(r, wq, wk, wv, h):  # pragma: no cover - compiled
    """Row r of q, k and v stacked."""
    hq, hk = wq.shape[0], wk.shape[0]
    if r < hq:
        return _dot(wq[r], h)
    if r < hq + hk:
        return _dot(wk[r - hq], h)
    return _dot(wv[r - hq - hk], h)


@njit(parallel=True, fastmath=_MATH, cache=True)
def attention_step(x, norm, wq, wk, wv, wo, q_norm, k_norm, cos, sin, k_cache, v_cache, pos, scale, eps, threads):  # fmt: skip  # pragma: no cover - compiled
    """x [D] += attention of one token at position `pos` over the cache, in place.

    norm [D]: the layer's attention norm; wq [H*Dh, D], wk / wv [Hk*Dh, D], wo [D, H*Dh]; q_norm / k_norm [Dh]
    (or empty: no qk-norm); cos / sin [Dh] of this position; k_cache / v_cache [Hk, capacity, Dh]: this
    position's keys and values are written at `pos`, then all `pos + 1` are attended to."""
    d = x.shape[0]
    dh = k_cache.shape[2]
    hq, hk = wq.shape[0], wk.shape[0]
    heads, kv_heads = hq // dh, hk // dh
    h = _rms_norm(x, norm, eps)
    rows = hq + 2 * hk
    qkv = np.empty(rows, np.float32)
    per = _streams(rows, threads)
    for t in prange(threads * per):  # q, k and v in one parallel pass over their rows
        for j in range(_STREAMS):
            r = _row(t, per, j)
            qkv[r] = _qkv_row(r, wq, wk, wv, h)
    for r in range(threads * _STREAMS * per, rows):
        qkv[r] = _qkv_row(r, wq, wk, wv, h)
    for g in range(kv_heads):
        k = qkv[hq + g * dh : hq + (g + 1) * dh]
        _norm_rope(k, k_norm, cos, sin, eps)
        k_cache[g, pos] = k
        v_cache[g, pos] = qkv[hq + hk + g * dh : hq + hk + (g + 1) * dh]
    attn = np.empty(hq, np.float32)
    group = heads // kv_heads
    for head in prange(heads):
        kv = head // group
        q = qkv[head * dh : (head + 1) * dh]
        _norm_rope(q, q_norm, cos, sin, eps)
        scores = np.empty(pos + 1, np.float32)
        peak = np.float32(-np.inf)
        for s in range(pos + 1):
            scores[s] = _dot(q, k_cache[kv, s]) * np.float32(scale)
            peak = max(peak, scores[s])
        total = np.float32(0.0)
        for s in range(pos + 1):
            scores[s] = np.exp(scores[s] - peak)
            total += scores[s]
        out = attn[head * dh : (head + 1) * dh]
        out[:] = 0
        for s in range(pos + 1):
            p = scores[s] / total
            for c in range(dh):
                out[c] += p * v_cache[kv, s, c]
    per = _streams(d, threads)
    for t in prange(threads * per):
        for j in range(_STREAMS):
            r = _row(t, per, j)
            x[r] += _dot(wo[r], attn)
    for r in range(threads * _STREAMS * per, d):
        x[r] += _dot(wo[r], attn)


@njit(parallel=True, fastmath=_MATH, cache=True)
def experts_step(
    x, norm, router, gate_up, down, top_k, norm_topk, eps, threads
):  # pragma: no cover - compiled
    """x [D] += the routed experts of one token, in place: softmax over router [E, D]'s logits, the top_k
    (renormalized when norm_topk), SwiGLU of each from gate_up [E, 2I, D] (gate rows, then up rows) and
    down [E, D, I], weighted and summed."""
    d = x.shape[0]
    h = _rms_norm(x, norm, eps)
    e = router.shape[0]
    logits = np.empty(e, np.float32)
    for j in range(e):
        logits[j] = _dot(router[j], h)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    ids = np.empty(top_k, np.int64)
    weights = np.empty(top_k, np.float32)
    for j in range(top_k):  # the largest first, the lowest index among equals
        best = np.argmax(probs)
        ids[j], weights[j] = best, probs[best]
        probs[best] = -np.float32(1.0)
    if norm_topk:
        weights /= weights.sum()
    two_i = gate_up.shape[1]
    inter = two_i // 2
    gu = np.empty(top_k * two_i, np.float32)  # [K, 2I] flat
    per = _streams(top_k * two_i, threads)
    for t in prange(threads * per):
        for j in range(_STREAMS):
            r = _row(t, per, j)
            gu[r] = _dot(gate_up[ids[r // two_i], r % two_i], h)
    for r in range(threads * _STREAMS * per, top_k * two_i):
        gu[r] = _dot(gate_up[ids[r // two_i], r % two_i], h)
    act = np.empty((top_k, inter), np.float32)
    for j in range(top_k):
        for i in range(inter):
            gate = gu[j * two_i + i]
            act[j, i] = gate / (np.float32(1.0) + np.exp(-gate)) * gu[j * two_i + inter + i]
    y = np.empty(d, np.float32)
    for row in prange(d):
        acc = np.float32(0.0)
        for m in range(top_k):
            acc += weights[m] * _dot(down[ids[m], row], act[m])
        y[row] = acc
    for r in range(d):
        x[r] += y[r]


@njit(parallel=True, fastmath=_MATH, cache=True)
def mlp_step(x, norm, gate, up, down, eps):  # pragma: no cover - compiled
    """x [D] += a dense SwiGLU MLP of one token, in place: gate / up [I, D], down [D, I]."""
    d, inter = x.shape[0], gate.shape[0]
    h = _rms_norm(x, norm, eps)
    gu = np.empty(2 * inter, np.float32)
    for r in prange(2 * inter):
        gu[r] = _dot(gate[r], h) if r < inter else _dot(up[r - inter], h)
    act = np.empty(inter, np.float32)
    for i in range(inter):
        act[i] = gu[i] / (np.float32(1.0) + np.exp(-gu[i])) * gu[inter + i]
    y = np.empty(d, np.float32)
    for row in prange(d):
        y[row] = _dot(down[row], act)
    for r in range(d):
        x[r] += y[r]


@njit(parallel=True, fastmath=_MATH, cache=True)
def head_step(x, norm, lm_head, eps, logits, threads):  # pragma: no cover - compiled
    """logits [V] = lm_head [V, D] @ rms_norm(x [D])."""
    h = _rms_norm(x, norm, eps)
    per = _streams(lm_head.shape[0], threads)
    for t in prange(threads * per):
        for j in range(_STREAMS):
            r = _row(t, per, j)
            logits[r] = _dot(lm_head[r], h)
    for r in range(threads * _STREAMS * per, lm_head.shape[0]):
        logits[r] = _dot(lm_head[r], h)


@njit(fastmath=_MATH, cache=True)
def layers_step(x, cos, sin, pos, scale, eps, top_k, norm_topk, threads, attn_norm, wq, wk, wv, wo, q_norm, k_norm,
                k_caches, v_caches, ffn_norm, is_moe, routers, gate_ups, downs, mlp_gates, mlp_ups, mlp_downs):  # fmt: skip  # pragma: no cover - compiled
    """Every layer for one token, in one call: per layer i, attention_step, then experts_step when is_moe[i]
    else mlp_step. Each tensor argument after `threads` is a typed list with one entry per layer (layers
    without such a tensor hold a placeholder); what each step takes is documented there."""
    for i in range(len(wq)):
        attention_step(x, attn_norm[i], wq[i], wk[i], wv[i], wo[i], q_norm[i], k_norm[i], cos, sin, k_caches[i],
                       v_caches[i], pos, scale, eps, threads)  # fmt: skip
        if is_moe[i]:
            experts_step(x, ffn_norm[i], routers[i], gate_ups[i], downs[i], top_k, norm_topk, eps, threads)
        else:
            mlp_step(x, ffn_norm[i], mlp_gates[i], mlp_ups[i], mlp_downs[i], eps)


def warm_up() -> None:
    """Load the compiled code of every step (from numba's cache after the first run) on a tiny layer: what the
    first token would otherwise wait for. `threads` arguments: numba's thread count, which the parallel loops
    split their rows by (numba.get_num_threads() inside them would keep them out of the cache)."""
    from numba.typed import List

    f = np.float32
    d, dh, e = 4, 2, 2
    w, x, cache = np.zeros((dh, d), f), np.zeros(d, f), np.zeros((1, 1, dh), f)
    one, eps, half = np.ones(d, f), 1e-6, np.ones(dh, f)
    two = lambda a: List([a, a])  # noqa: E731  # a MoE layer and a dense one
    layers_step(x, half, np.zeros(dh, f), 0, 1.0, eps, 1, True, 1, two(one), two(w), two(w), two(w),
                two(np.zeros((d, dh), f)), two(half), two(half), two(cache), two(cache.copy()), two(one),
                np.array([True, False]), two(np.zeros((e, d), f)), two(np.zeros((e, 2, d), f)),
                two(np.zeros((e, d, 1), f)), two(np.zeros((1, d), f)), two(np.zeros((1, d), f)),
                two(np.zeros((d, 1), f)))  # fmt: skip
    head_step(x, one, np.zeros((3, d), f), eps, np.zeros(3, f), 1)
