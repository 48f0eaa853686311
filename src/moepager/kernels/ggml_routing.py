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
but for double rounding, one case in ~2^29). numpy, not numba: a GGUF run loads no JIT (the runtime floor).
Only rows where the two orders could differ are computed this way (softmax_topk).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

_F = np.float32
_L2E, _ROUND = _F(float.fromhex("0x1.715476p+0")), _F(float.fromhex("0x1.8p23"))
_LN2_HI, _LN2_LO = _F(float.fromhex("0x1.62e4p-1")), _F(float.fromhex("0x1.7f7d1cp-20"))
_C1, _C2 = _F(float.fromhex("0x1.ffffecp-1")), _F(float.fromhex("0x1.fffdb6p-2"))
_C3, _C4, _C5 = _F(float.fromhex("0x1.555e66p-3")), _F(float.fromhex("0x1.573e2ep-5")), _F(float.fromhex("0x1.0e4020p-7"))  # fmt: skip
_SORT_THRESHOLD = 16  # libstdc++'s _S_threshold


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _fma(a, b, c) -> np.ndarray:
    return (_f64(a) * _f64(b) + _f64(c)).astype(_F)


def expf(x: np.ndarray, avx512: bool) -> np.ndarray:
    """ggml_v_expf of float32 x, in its AVX-512 or AVX2 form."""
    with np.errstate(
        invalid="ignore", over="ignore", under="ignore"
    ):  # -inf and huge inputs take the far paths
        z = _fma(x, _L2E, _ROUND)
        n = (z - _ROUND).astype(_F)
        b = _fma(-n, _LN2_LO, _fma(-n, _LN2_HI, x))
        u = (b * b).astype(_F)
        inner = _fma(_fma(_C5, b, _C4), u, _fma(_C3, b, _C2))
        far = np.where(n <= 0, _F(0.0), _F(np.inf))  # |n| > 192: underflow or overflow
        if avx512:
            j = _fma(inner, u, _fma(_C1, b, _F(1.0)))
            near = np.ldexp(_f64(j), np.clip(n, -300, 300).astype(np.int64)).astype(_F)  # _mm512_scalef_ps
            return np.where(np.abs(n) > 192, far, near)
        j = _fma(inner, u, (_C1 * b).astype(_F))
        k = np.ldexp(1.0, np.clip(n, -126, 126).astype(np.int64)).astype(_F)  # 2^n built in the exponent bits
        # past the exponent's range 2^n is split in two factors, 2^n = s2 * s1, as the AVX2 form does
        shift = np.where(n <= 0, -125.0, 127.0)
        s1, s2 = np.exp2(shift).astype(_F), np.exp2(_f64(n) - shift).astype(_F)
        wide = (_f64(_fma(s2, j, s2)) * _f64(s1)).astype(_F)
        return np.where(np.abs(n) > 192, far, np.where(np.abs(n) > 126, wide, _fma(j, k, k)))


def soft_max(x: np.ndarray, avx512: bool) -> np.ndarray:
    """ggml_soft_max of float32 rows x [N, E] (no mask, scale 1)."""
    x = x.astype(_F)
    shifted = (x - x.max(axis=-1, keepdims=True)).astype(_F)
    width = 16 if avx512 else 8
    body = x.shape[-1] // width * width
    e = np.empty_like(x)
    e[:, :body] = expf(shifted[:, :body], avx512)
    e[:, body:] = np.exp(_f64(shifted[:, body:])).astype(_F)  # the tail: libm's expf
    # each vector's horizontal sum in the order of _mm512_reduce_add_ps / ggml's AVX2 reduction, then float64
    lanes = e[:, :body].reshape(x.shape[0], -1, width)
    while lanes.shape[-1] > 4:
        half = lanes.shape[-1] // 2
        lanes = (lanes[..., half:] + lanes[..., :half]).astype(_F)
    vectors = (
        (lanes[..., 0] + lanes[..., 2]).astype(_F) + (lanes[..., 1] + lanes[..., 3]).astype(_F)
    ).astype(_F)
    total = np.zeros(x.shape[0])
    for v in range(vectors.shape[1]):  # ggml adds the vectors one after another, in float64
        total += _f64(vectors[:, v])
    for t in range(body, x.shape[-1]):
        total += _f64(e[:, t])
    scale = (1.0 / total).astype(_F)[:, None]
    return (e * scale).astype(_F)


def std_sort_desc(p: np.ndarray) -> list[int]:
    """The indices of p [E] in the order libstdc++'s std::sort leaves them with ggml_argsort's descending
    comparator: introsort (median-of-three pivot, depth limit 2 log2 E), then insertion sort."""
    p = p.tolist()
    a = list(range(len(p)))

    def before(i, j):
        return p[i] > p[j]

    def median_to_first(result, x, y, z):
        if before(a[x], a[y]):
            pick = y if before(a[y], a[z]) else z if before(a[x], a[z]) else x
        else:
            pick = x if before(a[x], a[z]) else z if before(a[y], a[z]) else y
        a[result], a[pick] = a[pick], a[result]

    def partition(first, last, pivot):
        while True:
            while before(a[first], a[pivot]):
                first += 1
            last -= 1
            while before(a[pivot], a[last]):
                last -= 1
            if not first < last:
                return first
            a[first], a[last] = a[last], a[first]
            first += 1

    def introsort(first, last, depth):
        while last - first > _SORT_THRESHOLD:
            if depth == 0:  # libstdc++'s heap sort fallback; router rows of a few hundred never get here
                a[first:last] = sorted(a[first:last], key=lambda i: -p[i])
                return
            depth -= 1
            median_to_first(first, first + 1, first + (last - first) // 2, last - 1)
            cut = partition(first + 1, last, first)
            introsort(cut, last, depth)
            last = cut

    def insertion_sort(first, last, guarded):
        for i in range(first + (1 if guarded else 0), last):
            val = a[i]
            if guarded and before(val, a[first]):
                a[first + 1 : i + 1] = a[first:i]
                a[first] = val
                continue
            j = i
            while before(val, a[j - 1]):
                a[j] = a[j - 1]
                j -= 1
            a[j] = val

    n = len(a)
    if n > 1:
        introsort(0, n, 2 * (n.bit_length() - 1))
        if n > _SORT_THRESHOLD:
            insertion_sort(0, _SORT_THRESHOLD, True)
            insertion_sort(_SORT_THRESHOLD, n, False)
        else:
            insertion_sort(0, n, True)
    return a


@functools.cache
def avx512() -> bool:
    """Whether llama.cpp built for this CPU takes its AVX-512 softmax (AVX512F and AVX512DQ)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512f" in flags and "avx512dq" in flags


# Two probabilities closer than this (relative) may order differently in ggml's AVX2 and AVX-512 softmax (each is
# within a few float32 ulps, 2^-24 each, of the exact value): only rows with such a pair in their first K+1 are
# recomputed in the other form's order
CLOSE = 1e-6
# a float32 checkpoint's decode step (kernels/ggml_step.py) takes its router's product in ggml's order of sums,
# not torch's: probabilities this close are routed by the model's layers, in torch's order, as the reference does
TORCH_CLOSE = 1e-4


def emulated() -> bool:
    """Whether the loaded libggml computes a softmax in another float form than llama.cpp built for this CPU (the
    wheel's AVX2 build on an AVX-512 CPU): then the rows whose order could differ are routed here (softmax_topk)."""
    from . import ggml_library

    return ggml_library.simd_form() != ("AVX-512" if avx512() else "AVX2")


def close(top: torch.Tensor) -> torch.Tensor:
    """Descending probabilities [N, K+1] -> whether each row holds two so close that the two float forms could
    order them otherwise [N]. In float64, as `any_close` tests a step graph's routers in Python floats."""
    top = top.double()
    return (top[:, :-1] * (1 - CLOSE) <= top[:, 1:]).any(-1)


def any_close(rows, closeness: float = CLOSE) -> bool:
    """Whether any of rows, each (probabilities [E], their descending order [E], K+1) read as Python floats and
    ints (ctypes arrays), holds a pair within `closeness` (relative; CLOSE is `close`'s) among its first K+1.
    Python right after a graph runs on caches the weights went through: numpy's and torch's calls for this took
    100-250 us a decoded token on a small Q4_0 file, this loop ~20."""
    scale = 1 - closeness
    for probs, order, top in rows:
        before = probs[order[0]]
        for i in range(1, top):
            p = probs[order[i]]
            if before * scale <= p:
                return True
            before = p
    return False


def softmax_topk(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [N, E] -> (weights [N, K] float32, ids [N, K] int64) as llama.cpp picks them: softmax,
    the first K of a descending std::sort, and (normalize) the K weights divided by their sum (ggml_sum_rows:
    in float64, in order; clamped to 2^-14).

    All of it runs in ggml as llama.cpp's graph runs it, in one call (ggml_float.softmax_topk; kernels/ggml_library.py
    prefers llama.cpp's own library). Where that library's float form is not the one llama.cpp built for this CPU
    takes (`emulated`), the rows whose first K+1 probabilities are close (on a trained router nearly none; the
    default model's: ~20% of rows) are computed again here as llama.cpp's form computes them. The others are
    ggml's, as a decode step's graph computes them (kernels/ggml_step.py, which hands a token with a close row to
    this path). Emulating every row cost a third of a small Q4_0 model's decode speed."""
    from . import ggml_float

    x = logits.detach().float().cpu()
    if not emulated():
        weights, ids = ggml_float.softmax_topk(x, k, normalize)
        return weights.to(logits.device), ids.to(logits.device)
    weights, ids, probs, order = ggml_float.softmax_topk(x, k, normalize, ranked=True)
    kk = min(k + 1, x.shape[-1])
    rows = close(probs.gather(1, order[:, :kk])).nonzero().flatten()
    if len(rows):
        exact = torch.from_numpy(soft_max(x[rows].numpy(), avx512()))
        top, picked = torch.topk(exact, kk, dim=-1)
        tied = (top[:, 1:] == top[:, :-1]).any(dim=-1)
        for i, row in enumerate(rows.tolist()):
            ids[row] = torch.tensor(std_sort_desc(exact[i].numpy())[:k]) if tied[i] else picked[i, :k]
            weights[row] = exact[i, ids[row]]
            if normalize:
                total = weights[row].double().cumsum(-1)[-1:].float().clamp(min=2.0**-14)
                weights[row] = weights[row] / total
    return weights.to(logits.device), ids.to(logits.device)
