"""Softmax top-k routing in llama.cpp's float order: the reference for a GGUF file is llama.cpp on it, and a
router whose K-th and K+1-th experts are nearly tied picks by rounding.

llama.cpp routes a softmax-gated MoE layer (build_moe_ffn) as ggml_soft_max then ggml_argsort_top_k. Its
softmax takes exp through ggml_v_expf, a polynomial whose last rounding differs from libm's and torch's, sums
16 (AVX-512) or 8 (AVX2) values per vector in a fixed tree, and scales by 1/sum; its argsort is std::sort,
which orders equal probabilities by its own partitioning, not by index. On the default model (router logits
within 2^-16 of each other) torch's softmax and topk picked another expert set than llama.cpp at 6% of
positions of the f32 file, with router logits equal to 7e-12; computed here as ggml computes them, the f32
file agrees at every position (benchmarks/quant_kernels.md).

Written from ggml-cpu's vec.h (ggml_v_expf, ggml_vec_soft_max_f32), ops.cpp (soft_max, argsort) and
libstdc++'s introsort. Each fused multiply-add is a float64 product and sum rounded once to float32 (exact
but for double rounding, one case in ~2^29).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from numba import njit

_F = np.float32
_L2E, _ROUND = _F(float.fromhex("0x1.715476p+0")), _F(float.fromhex("0x1.8p23"))
_LN2_HI, _LN2_LO = _F(float.fromhex("0x1.62e4p-1")), _F(float.fromhex("0x1.7f7d1cp-20"))
_C1, _C2 = _F(float.fromhex("0x1.ffffecp-1")), _F(float.fromhex("0x1.fffdb6p-2"))
_C3, _C4, _C5 = _F(float.fromhex("0x1.555e66p-3")), _F(float.fromhex("0x1.573e2ep-5")), _F(float.fromhex("0x1.0e4020p-7"))  # fmt: skip
_SORT_THRESHOLD = 16  # libstdc++'s _S_threshold


@njit(cache=True)
def _fma(a, b, c):  # pragma: no cover - compiled
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


@njit(cache=True)
def _expf(x, avx512):  # pragma: no cover - compiled
    """ggml_v_expf of one lane, in its AVX-512 or AVX2 form."""
    z = _fma(x, _L2E, _ROUND)
    n = np.float32(z - _ROUND)
    b = _fma(-n, _LN2_LO, _fma(-n, _LN2_HI, x))
    u = np.float32(b * b)
    inner = _fma(_fma(_C5, b, _C4), u, _fma(_C3, b, _C2))
    if avx512:
        if abs(n) > 192:
            return np.float32(0.0) if n <= 0 else np.float32(np.inf)
        j = _fma(inner, u, _fma(_C1, b, np.float32(1.0)))
        return np.float32(np.float64(j) * 2.0 ** np.float64(n))  # _mm512_scalef_ps
    j = _fma(inner, u, np.float32(_C1 * b))
    if abs(n) <= 126:
        k = np.float32(2.0 ** np.float64(n))
        return _fma(j, k, k)
    if abs(n) > 192:
        return np.float32(0.0) if n <= 0 else np.float32(np.inf)
    # past the float exponent's range 2^n is split in two factors, 2^n = s2 * s1, as the AVX2 form does
    shift = -125.0 if n <= 0 else 127.0
    s1, s2 = np.float32(2.0**shift), np.float32(2.0 ** (np.float64(n) - shift))
    return np.float32(np.float64(_fma(s2, j, s2)) * np.float64(s1))


@njit(cache=True)
def _soft_max(x, avx512, out):  # pragma: no cover - compiled
    """ggml_soft_max of one row x [E] (no mask, scale 1) into out [E]."""
    peak = x[0]
    for v in x:
        peak = max(peak, v)
    width = 16 if avx512 else 8
    total = 0.0  # float64, as ggml_float
    i = 0
    while i + width - 1 < x.shape[0]:
        lane = np.empty(width, np.float32)
        for j in range(width):
            lane[j] = _expf(np.float32(x[i + j] - peak), avx512)
            out[i + j] = lane[j]
        # the vector's horizontal sum, in the order of _mm512_reduce_add_ps / ggml's AVX2 reduction
        while lane.shape[0] > 4:
            half = lane.shape[0] // 2
            lane = (lane[half:] + lane[:half]).astype(np.float32)
        total += np.float64(np.float32(np.float32(lane[0] + lane[2]) + np.float32(lane[1] + lane[3])))
        i += width
    for j in range(i, x.shape[0]):  # the tail: libm's expf
        v = np.float32(np.exp(np.float64(np.float32(x[j] - peak))))
        out[j] = v
        total += np.float64(v)
    scale = np.float32(1.0 / total)
    for j in range(x.shape[0]):
        out[j] = np.float32(out[j] * scale)


@njit(cache=True)
def _before(p, a, b):  # pragma: no cover - compiled
    return p[a] > p[b]  # descending, as ggml_argsort's GGML_SORT_ORDER_DESC comparator


@njit(cache=True)
def _median_to_first(p, idx, result, a, b, c):  # pragma: no cover - compiled
    if _before(p, idx[a], idx[b]):
        if _before(p, idx[b], idx[c]):
            pick = b
        elif _before(p, idx[a], idx[c]):
            pick = c
        else:
            pick = a
    elif _before(p, idx[a], idx[c]):
        pick = a
    elif _before(p, idx[b], idx[c]):
        pick = c
    else:
        pick = b
    idx[result], idx[pick] = idx[pick], idx[result]


@njit(cache=True)
def _partition(p, idx, first, last, pivot):  # pragma: no cover - compiled
    while True:
        while _before(p, idx[first], idx[pivot]):
            first += 1
        last -= 1
        while _before(p, idx[pivot], idx[last]):
            last -= 1
        if not first < last:
            return first
        idx[first], idx[last] = idx[last], idx[first]
        first += 1


@njit(cache=True)
def _insertion_sort(p, idx, first, last, guarded):  # pragma: no cover - compiled
    start = first + 1 if guarded else first
    for i in range(start, last):
        val = idx[i]
        if guarded and _before(p, val, idx[first]):
            for j in range(i, first, -1):
                idx[j] = idx[j - 1]
            idx[first] = val
            continue
        j = i
        while _before(p, val, idx[j - 1]):
            idx[j] = idx[j - 1]
            j -= 1
        idx[j] = val


@njit(cache=True)
def _heap_sort(p, idx, first, last):  # pragma: no cover - compiled
    """libstdc++'s fallback past the depth limit (never reached by router rows of up to a few hundred)."""
    seg = idx[first:last].copy()
    keys = np.empty(seg.shape[0], np.float32)
    for i in range(seg.shape[0]):
        keys[i] = -p[seg[i]]
    order = np.argsort(keys, kind="mergesort")
    for i in range(seg.shape[0]):
        idx[first + i] = seg[order[i]]


@njit(cache=True)
def std_sort_desc(p, idx):  # pragma: no cover - compiled
    """idx (int32 [E]) sorted so that p[idx] descends, by libstdc++'s std::sort: introsort with a
    median-of-three pivot, then insertion sort; equal values land where that algorithm puts them."""
    n = idx.shape[0]
    if n <= 1:
        return
    depth = 2 * (np.int64(np.log2(n)))
    stack_first = np.empty(64, np.int64)
    stack_last = np.empty(64, np.int64)
    stack_depth = np.empty(64, np.int64)
    top = 0
    stack_first[0], stack_last[0], stack_depth[0] = 0, n, depth
    top = 1
    while top:
        top -= 1
        first, last, depth = stack_first[top], stack_last[top], stack_depth[top]
        while last - first > _SORT_THRESHOLD:
            if depth == 0:
                _heap_sort(p, idx, first, last)
                break
            depth -= 1
            mid = first + (last - first) // 2
            _median_to_first(p, idx, first, first + 1, mid, last - 1)
            cut = _partition(p, idx, first + 1, last, first)
            stack_first[top], stack_last[top], stack_depth[top] = cut, last, depth  # the right part, later
            top += 1
            last = cut
    if n > _SORT_THRESHOLD:
        _insertion_sort(p, idx, 0, _SORT_THRESHOLD, True)
        _insertion_sort(p, idx, _SORT_THRESHOLD, n, False)
    else:
        _insertion_sort(p, idx, 0, n, True)


@njit(cache=True)
def _route(logits, k, normalize, avx512, weights, ids):  # pragma: no cover - compiled
    probs = np.empty(logits.shape[1], np.float32)
    idx = np.empty(logits.shape[1], np.int32)
    for row in range(logits.shape[0]):
        _soft_max(logits[row], avx512, probs)
        for j in range(idx.shape[0]):
            idx[j] = j
        std_sort_desc(probs, idx)
        total = 0.0
        for j in range(k):
            ids[row, j] = idx[j]
            weights[row, j] = probs[idx[j]]
            total += np.float64(probs[idx[j]])  # ggml_sum_rows: a float64 sum
        if normalize:
            for j in range(k):
                weights[row, j] = np.float32(weights[row, j] / np.float32(total))


@functools.cache
def avx512() -> bool:
    """Whether llama.cpp built for this CPU takes its AVX-512 softmax (AVX512F and AVX512DQ)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512f" in flags and "avx512dq" in flags


def softmax_topk(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (weights [N, K] float32, ids [N, K] int64) as llama.cpp computes them: softmax,
    the first K of a descending std::sort, and (normalize) the K weights divided by their sum."""
    x = logits.detach().float().contiguous().cpu().numpy()
    weights, ids = np.empty((x.shape[0], k), np.float32), np.empty((x.shape[0], k), np.int64)
    _route(x, k, normalize, avx512(), weights, ids)
    return torch.from_numpy(weights).to(logits.device), torch.from_numpy(ids).to(logits.device)
