"""CPU kernels on llama.cpp GGUF block-quantized weights, computed on the bytes as they lie in the file.

Owns, for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K: each type's block layout and decode formula (as in llama.cpp's
ggml-common.h and gguf-py's gguf/quants.py), exact dequantization, the gathered matrix-vector product of a
MoE layer's decode step over a bank of expert matrices, a dense `linear`, and Q4_0's codes for repacking.
It does not own where the bytes come from (the store) or which matrices a layer picks (the experts primitive).

Weights stay compact: a bank is uint8 [S, R, row bytes], never repacked or dequantized as a whole. The
matvec kernels decode a block's codes and multiply them into float32 activations in one pass (activations
are never quantized), so the result is `x @ dequantize(w).T` up to float32 summation order.

Letters: S matrices in a bank, R rows (outputs), C columns (inputs), N tokens, K matrices per token,
B blocks per row (C / QK), QK weights per block, BB bytes per block.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from . import sync_threads

Q = GGMLQuantizationType
SUPPORTED: frozenset[int] = frozenset({Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K})
# where each type keeps its fp16 block scales (d, and m or dmin), in bytes from the block's start
FP16_FIELDS = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}

# every fp16 bit pattern -> its float32 value, exact (subnormals, inf, nan included); indexed by lo | hi << 8
_F16 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
_BITS = np.left_shift(1, np.arange(32, dtype=np.uint32)).view(
    np.int32
)  # 1 << j; Q5_0 / Q5_1 read bit j of qh
_TILE_BYTES = 4 << 20  # linear(), many tokens: float32 weights dequantized per F.linear call
_ROWS = 16  # rows per parallel task: enough work to amortize a task, and tasks enough to share among threads
_LANES = 32  # float32 accumulators per row, four AVX2 registers: wide enough to hide the FMA latency
# linear(): from this many tokens per thread on (up to 2 threads, as measured), dequantizing (4 MiB of floats
# at a time) and F.linear beat a matvec per token. The paths crossed on a 1536x2048 matrix (gguf_kernels.md)
# at Q4_0 8, Q4_1 7, Q5_0 5, Q5_1 4-5, Q8_0 8-12, Q4_K 6, Q5_K 2-3, Q6_K 3 tokens with 1 thread, and at about
# twice that with 2 (Q4_1/Q5_0/Q5_1: 1 thread only, the factor assumed): the matvec splits across threads,
# F.linear on the floats is bound by memory. The slower the matvec, the sooner.
LINEAR_DEQUANT_MIN_TOKENS: dict[int, int] = {
    Q.Q4_0: 8,
    Q.Q4_1: 7,
    Q.Q5_0: 5,
    Q.Q5_1: 5,
    Q.Q8_0: 9,
    Q.Q4_K: 6,
    Q.Q5_K: 3,
    Q.Q6_K: 4,
}

f32, i32, i8 = np.float32, np.int32, np.int8


@intrinsic
def _stack_f32(typingctx, n):
    """A float32 [n] array on the stack (n a literal). Unlike np.empty, LLVM sees that nothing else points
    at it, so a loop's accumulators stay in registers instead of round-tripping through memory per block."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    arr = types.Array(types.float32, 1, "C")

    def codegen(context, builder, sig, args):
        elem = context.get_data_type(types.float32)
        size = context.get_constant(types.intp, context.get_abi_sizeof(elem))
        out = context.make_array(arr)(context, builder)
        data = cgutils.alloca_once(builder, elem, size=n.literal_value)
        shape = [context.get_constant(types.intp, n.literal_value)]
        context.populate_array(out, data=data, shape=shape, strides=[size], itemsize=size, meminfo=None)
        return out._getvalue()

    return arr(n), codegen


# ---- block formats -----------------------------------------------------------------------------------------
# Per type: `_dq_*(blk, lut, out)` writes a block's QK weights, exact (same float32 operations, in the same
# order, as gguf.quants); `_dot_*(blk, lut, x, acc)` adds the block's weights times x (the block's QK inputs)
# into acc[32], decoding and multiplying in one pass. What makes LLVM vectorize them (numba runs its loop
# vectorizer but not the SLP one, which would vectorize fully unrolled loops):
# - codes are widened to int32 before the float conversion: AVX2 converts int32 (vcvtdq2ps), not int64;
# - `_dq_*` loops run to a bound read from `out` at run time: a constant 16 or 32 would be unrolled, leaving
#   nothing to vectorize; `_dot_*` loops keep constant bounds: vectorized, then unrolled, their accumulators
#   become registers (acc is on the stack, see _stack_f32) instead of a round trip through memory per block.


@numba.njit(inline="always")
def _f16(lut, blk, o):
    return lut[blk[o] | (np.int64(blk[o + 1]) << 8)]


@numba.njit(inline="always")
def _k_scale(blk, d, dmin, s):
    """Q4_K/Q5_K sub-block s's scale d * sc and min dmin * m, from the 6-bit sc and m packed in the 12
    bytes at blk[4:16] (llama.cpp's get_scale_min_k4)."""
    if s < 4:
        sc, m = blk[4 + s] & 63, blk[8 + s] & 63
    else:
        sc, m = (blk[8 + s] & 15) | ((blk[s] >> 6) << 4), (blk[8 + s] >> 4) | ((blk[4 + s] >> 6) << 4)
    return d * f32(i32(sc)), dmin * f32(i32(m))


@numba.njit(inline="always")
def _k_scales(blk, lut):
    """Q4_K/Q5_K: every sub-block's scale and min (float32 [8] each, on the stack)."""
    d, dmin = _f16(lut, blk, 0), _f16(lut, blk, 2)
    ds, dm = _stack_f32(8), _stack_f32(8)
    for s in range(8):
        ds[s], dm[s] = _k_scale(blk, d, dmin, s)
    return ds, dm


# Q4_0, 18 bytes: d fp16, qs[16]; weight j = d * (nibble j - 8), nibbles j and 16 + j: qs[j] & 15, qs[j] >> 4
@numba.njit(inline="always")
def _dq_q4_0(blk, lut, out):
    d = _f16(lut, blk, 0)
    half = out.shape[0] // 2  # 16
    for j in range(half):
        c = blk[2 + j]
        out[j] = d * f32(i32(i32(c & 15) - i32(8)))
        out[half + j] = d * f32(i32(i32(c >> 4) - i32(8)))


@numba.njit(inline="always")
def _dot_q4_0(blk, lut, x, acc):
    d = _f16(lut, blk, 0)
    for j in range(16):
        c = blk[2 + j]
        acc[j] += d * (f32(i32(i32(c & 15) - i32(8))) * x[j] + f32(i32(i32(c >> 4) - i32(8))) * x[16 + j])


# Q4_1, 20 bytes: d fp16, m fp16, qs[16]; weight j = d * nibble j + m, nibbles as Q4_0's
@numba.njit(inline="always")
def _dq_q4_1(blk, lut, out):
    d, m = _f16(lut, blk, 0), _f16(lut, blk, 2)
    half = out.shape[0] // 2  # 16
    for j in range(half):
        c = blk[4 + j]
        out[j] = d * f32(i32(c & 15)) + m
        out[half + j] = d * f32(i32(c >> 4)) + m


@numba.njit(inline="always")
def _dot_q4_1(blk, lut, x, acc):
    d, m = _f16(lut, blk, 0), _f16(lut, blk, 2)
    for j in range(16):  # sum (d q + m) x = d sum q x + m sum x
        c = blk[4 + j]
        acc[j] += d * (f32(i32(c & 15)) * x[j] + f32(i32(c >> 4)) * x[16 + j]) + m * (x[j] + x[16 + j])


# Q5_0, 22 bytes: d fp16, qh[4], qs[16]; Q5_1, 24 bytes: d fp16, m fp16, qh[4], qs[16]. Bit j of qh (a
# little-endian uint32) is the fifth bit (value 16) of weight j, whose low 4 bits are Q4_0's nibble j;
# Q5_0 weight = d * (q - 16), Q5_1 weight = d * q + m
@numba.njit(inline="always")
def _qh(blk, o):
    """The 32 fifth bits at blk[o:o + 4], as an int32 (bit 31 in the sign)."""
    return i32(
        blk[o] | (np.int64(blk[o + 1]) << 8) | (np.int64(blk[o + 2]) << 16) | (np.int64(blk[o + 3]) << 24)
    )


@numba.njit(inline="always")
def _q5(low, h, j):
    """Weight j's 5-bit code: its low 4 bits, and bit j of h as 16. The bit is tested against a mask from a
    table, not shifted out: numba widens `h >> j` to int64, which AVX2 shifts 4 lanes at a time, not 8."""
    return i32(i32(low) | (i32((h & _BITS[j]) != 0) << 4))


@numba.njit(inline="always")
def _dq_q5_0(blk, lut, out):
    d, h = _f16(lut, blk, 0), _qh(blk, 2)
    half = out.shape[0] // 2  # 16
    for j in range(half):
        c = blk[6 + j]
        out[j] = d * f32(i32(_q5(c & 15, h, j) - i32(16)))
        out[half + j] = d * f32(i32(_q5(c >> 4, h, half + j) - i32(16)))


@numba.njit(inline="always")
def _dot_q5_0(blk, lut, x, acc):
    d, h = _f16(lut, blk, 0), _qh(blk, 2)
    for j in range(16):
        c = blk[6 + j]
        lo, hi = f32(i32(_q5(c & 15, h, j) - i32(16))), f32(i32(_q5(c >> 4, h, 16 + j) - i32(16)))
        acc[j] += d * (lo * x[j] + hi * x[16 + j])


@numba.njit(inline="always")
def _dq_q5_1(blk, lut, out):
    d, m, h = _f16(lut, blk, 0), _f16(lut, blk, 2), _qh(blk, 4)
    half = out.shape[0] // 2  # 16
    for j in range(half):
        c = blk[8 + j]
        out[j] = d * f32(_q5(c & 15, h, j)) + m
        out[half + j] = d * f32(_q5(c >> 4, h, half + j)) + m


@numba.njit(inline="always")
def _dot_q5_1(blk, lut, x, acc):
    d, m, h = _f16(lut, blk, 0), _f16(lut, blk, 2), _qh(blk, 4)
    for j in range(16):
        c = blk[8 + j]
        lo, hi = f32(_q5(c & 15, h, j)), f32(_q5(c >> 4, h, 16 + j))
        acc[j] += d * (lo * x[j] + hi * x[16 + j]) + m * (x[j] + x[16 + j])


# Q8_0, 34 bytes: d fp16, qs[32] int8; weight j = qs[j] * d
@numba.njit(inline="always")
def _dq_q8_0(blk, lut, out):
    d = _f16(lut, blk, 0)
    for j in range(out.shape[0]):
        out[j] = f32(i8(blk[2 + j])) * d


@numba.njit(inline="always")
def _dot_q8_0(blk, lut, x, acc):
    d = _f16(lut, blk, 0)
    for j in range(32):
        acc[j] += f32(i32(i8(blk[2 + j]))) * d * x[j]


# Q4_K, 144 bytes: d fp16, dmin fp16, scales[12], qs[128]; 8 sub-blocks of 32 with 6-bit scale sc and min m;
# bytes qs[32i:32i+32] hold sub-block 2i in their low nibbles and 2i+1 in their high nibbles;
# weight = (d * sc) * q - dmin * m
@numba.njit(inline="always")
def _dq_q4_k(blk, lut, out):
    d, dmin = _f16(lut, blk, 0), _f16(lut, blk, 2)
    for i in range(4):
        (d0, dm0), (d1, dm1) = _k_scale(blk, d, dmin, 2 * i), _k_scale(blk, d, dmin, 2 * i + 1)
        for j in range(out.shape[0] // 8):
            c = blk[16 + 32 * i + j]
            out[64 * i + j] = d0 * f32(i32(c & 15)) - dm0
            out[64 * i + 32 + j] = d1 * f32(i32(c >> 4)) - dm1


@numba.njit(inline="always")
def _dot_q4_k(blk, lut, x, acc):
    d, dmin = _f16(lut, blk, 0), _f16(lut, blk, 2)
    for i in range(4):  # scales from the packed bytes, not _k_scales' stack arrays: 20% faster here
        (d0, dm0), (d1, dm1) = _k_scale(blk, d, dmin, 2 * i), _k_scale(blk, d, dmin, 2 * i + 1)
        for j in range(32):
            c = blk[16 + 32 * i + j]
            acc[j] += (d0 * f32(i32(c & 15)) - dm0) * x[64 * i + j]
            acc[j] += (d1 * f32(i32(c >> 4)) - dm1) * x[64 * i + 32 + j]


# Q5_K, 176 bytes: d fp16, dmin fp16, scales[12], qh[32], qs[128]; as Q4_K, and bit s of qh[j] is the fifth
# bit (value 16) of weight j of sub-block s
@numba.njit(inline="always")
def _q5_k(low, h, s):
    """Sub-block s's 5-bit code: its low 4 bits, and bit s of qh byte h as 16."""
    return i32(i32(low) | (((h >> s) & 1) << 4))


@numba.njit(inline="always")
def _dq_q5_k(blk, lut, out):
    ds, dm = _k_scales(blk, lut)
    for j in range(out.shape[0] // 8):  # lanes outside, sub-blocks inside: unrolled, qh shifts are constants
        h = blk[16 + j]
        for i in range(4):
            c = blk[48 + 32 * i + j]
            out[64 * i + j] = ds[2 * i] * f32(_q5_k(c & 15, h, 2 * i)) - dm[2 * i]
            out[64 * i + 32 + j] = ds[2 * i + 1] * f32(_q5_k(c >> 4, h, 2 * i + 1)) - dm[2 * i + 1]


@numba.njit(inline="always")
def _dot_q5_k(blk, lut, x, acc):
    ds, dm = _k_scales(blk, lut)
    for j in range(32):
        h = blk[16 + j]
        for i in range(4):
            c = blk[48 + 32 * i + j]
            acc[j] += (ds[2 * i] * f32(_q5_k(c & 15, h, 2 * i)) - dm[2 * i]) * x[64 * i + j]
            acc[j] += (ds[2 * i + 1] * f32(_q5_k(c >> 4, h, 2 * i + 1)) - dm[2 * i + 1]) * x[64 * i + 32 + j]


# Q6_K, 210 bytes: ql[128], qh[64], scales[16] int8, d fp16; two halves h of 128 weights, each 4 quarters t of
# 32: weight j of quarter t has its low 4 bits in byte ql[64h + 32 (t & 1) + j] (low nibble for t < 2, high
# for t >= 2) and its top 2 bits at bit 2t of qh[32h + j]; weight = (d * scales[8h + 2t + j // 16]) * (q - 32)
@numba.njit(inline="always")
def _q6_k(ql, qh, t):
    """Weight j of quarter t, minus 32, from its bytes ql = ql[64h + 32 (t & 1) + j] and qh = qh[32h + j]."""
    return i32(i32((i32(ql) >> (4 * (t >> 1))) & 15) | (((i32(qh) >> (2 * t)) & 3) << 4)) - i32(32)


@numba.njit(inline="always")
def _dq_q6_k(blk, lut, out):
    d = _f16(lut, blk, 208)
    n = out.shape[0] // 16  # 16
    for h in range(2):
        for g in range(2):  # weights 16g..16g+15 of each quarter t share the scale scales[8h + 2t + g]
            s0, s1 = d * f32(i8(blk[192 + 8 * h + g])), d * f32(i8(blk[194 + 8 * h + g]))
            s2, s3 = d * f32(i8(blk[196 + 8 * h + g])), d * f32(i8(blk[198 + 8 * h + g]))
            for j in range(n * g, n * g + n):
                a, b, c = blk[64 * h + j], blk[64 * h + 32 + j], blk[128 + 32 * h + j]
                out[128 * h + j] = s0 * f32(_q6_k(a, c, 0))
                out[128 * h + 32 + j] = s1 * f32(_q6_k(b, c, 1))
                out[128 * h + 64 + j] = s2 * f32(_q6_k(a, c, 2))
                out[128 * h + 96 + j] = s3 * f32(_q6_k(b, c, 3))


@numba.njit(inline="always")
def _dot_q6_k(blk, lut, x, acc):
    d = _f16(lut, blk, 208)
    for h in range(2):
        for g in range(2):
            s0, s1 = d * f32(i8(blk[192 + 8 * h + g])), d * f32(i8(blk[194 + 8 * h + g]))
            s2, s3 = d * f32(i8(blk[196 + 8 * h + g])), d * f32(i8(blk[198 + 8 * h + g]))
            for j in range(16 * g, 16 * g + 16):
                a, b, c = blk[64 * h + j], blk[64 * h + 32 + j], blk[128 + 32 * h + j]
                xh = 128 * h + j
                acc[j] += s0 * f32(_q6_k(a, c, 0)) * x[xh] + s1 * f32(_q6_k(b, c, 1)) * x[xh + 32]
                acc[j] += s2 * f32(_q6_k(a, c, 2)) * x[xh + 64] + s3 * f32(_q6_k(b, c, 3)) * x[xh + 96]


# ---- kernels, one set per type -----------------------------------------------------------------------------


_BLOCKS = {  # each type's block functions: (dequantize, dot)
    Q.Q4_0: (_dq_q4_0, _dot_q4_0),
    Q.Q4_1: (_dq_q4_1, _dot_q4_1),
    Q.Q5_0: (_dq_q5_0, _dot_q5_0),
    Q.Q5_1: (_dq_q5_1, _dot_q5_1),
    Q.Q8_0: (_dq_q8_0, _dot_q8_0),
    Q.Q4_K: (_dq_q4_k, _dot_q4_k),
    Q.Q5_K: (_dq_q5_k, _dot_q5_k),
    Q.Q6_K: (_dq_q6_k, _dot_q6_k),
}


def _dq_block(qtype, blk, lut, out):
    """qtype's _dq_*, picked while compiling (qtype is a constant there): only that one is compiled."""


def _dot_block(qtype, blk, lut, x, acc):
    """qtype's _dot_*, picked as _dq_block's."""


@overload(_dq_block, inline="always")
def _dq_block_impl(qtype, blk, lut, out):
    if not isinstance(qtype, types.IntegerLiteral):
        return None  # numba asks again with the literal value
    dq = _BLOCKS[qtype.literal_value][0]
    return lambda qtype, blk, lut, out: dq(blk, lut, out)


@overload(_dot_block, inline="always")
def _dot_block_impl(qtype, blk, lut, x, acc):
    if not isinstance(qtype, types.IntegerLiteral):
        return None
    dot = _BLOCKS[qtype.literal_value][1]
    return lambda qtype, blk, lut, x, acc: dot(blk, lut, x, acc)


def _kernels(qtype: int):
    """The compiled kernels of one block type. `qtype`, a plain int in their closure, is a compile-time
    constant; numba's disk cache keys them by it (a closure over the block functions themselves would miss
    the cache in every new process)."""
    qtype = int(qtype)

    @numba.njit(parallel=True, cache=True)  # no fastmath: the result must equal gguf.quants bit for bit
    def dequantize_rows(w, out, lut):  # pragma: no cover - compiled
        # w [R, B, BB] -> out [R, B, QK]
        for r in numba.prange(w.shape[0]):
            for b in range(w.shape[1]):
                _dq_block(qtype, w[r, b], lut, out[r, b])

    @numba.njit(parallel=True, fastmath=True, cache=True)
    def matvec(w, x, mat, vec, out, lut):  # pragma: no cover - compiled
        # w [S, R, B, BB], x [V, B, QK], mat/vec [P] -> out [P, R]: out[p] = dequant(w[mat[p]]) @ x[vec[p]]
        n_mat, rows = w.shape[0], w.shape[1]
        for p in range(mat.shape[0]):  # a bad index would read outside the bank
            if mat[p] < 0 or mat[p] >= n_mat:
                raise IndexError("gather_matvec: a slot is outside the bank")
        tasks = (rows + _ROWS - 1) // _ROWS
        for t in numba.prange(mat.shape[0] * tasks):
            p, r0 = t // tasks, (t % tasks) * _ROWS
            wm, xv = w[mat[p]], x[vec[p]]
            acc = _stack_f32(_LANES)
            for r in range(r0, min(r0 + _ROWS, rows)):
                for j in range(_LANES):
                    acc[j] = 0.0
                for b in range(w.shape[2]):
                    _dot_block(qtype, wm[r, b], lut, xv[b], acc)
                s = f32(0.0)
                for j in range(_LANES):
                    s += acc[j]
                out[p, r] = s

    return dequantize_rows, matvec


_KERNELS = {qtype: _kernels(qtype) for qtype in SUPPORTED}


# ---- public API --------------------------------------------------------------------------------------------


def _check_qtype(qtype: int) -> None:
    if qtype not in SUPPORTED:
        name = Q(qtype).name if qtype in Q._value2member_map_ else qtype
        names = ", ".join(Q(t).name for t in sorted(SUPPORTED))
        raise ValueError(f"GGUF quantization type {name} has no moepager kernel (supported: {names})")


def block_shape(qtype: int) -> tuple[int, int]:
    """(weights per block, bytes per block)."""
    _check_qtype(qtype)
    return GGML_QUANT_SIZES[Q(qtype)]


def row_bytes(qtype: int, cols: int) -> int:
    """Bytes of one row of `cols` weights."""
    qk, bb = block_shape(qtype)
    if cols % qk:
        raise ValueError(f"a {Q(qtype).name} row holds a multiple of {qk} weights, not {cols}")
    return cols // qk * bb


def _blocks(qtype: int, raw: torch.Tensor) -> np.ndarray:
    """uint8 [..., row bytes] -> numpy [..., B, BB], a view of the same memory."""
    bb = block_shape(qtype)[1]
    if raw.dtype != torch.uint8 or raw.device.type != "cpu":
        raise ValueError(f"GGUF weights must be uint8 bytes on the CPU, not {raw.dtype} on {raw.device}")
    if raw.dim() < 2 or raw.shape[-1] % bb:
        raise ValueError(f"{Q(qtype).name} rows must be [..., R, k * {bb} bytes], not {list(raw.shape)}")
    return raw.view(*raw.shape[:-1], raw.shape[-1] // bb, bb).numpy()  # torch's view raises rather than copy


def _inputs(x: torch.Tensor, cols: int) -> torch.Tensor:
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[-1] != cols:
        raise ValueError(f"inputs must be float32 [..., {cols}] on the CPU, not {x.dtype} {list(x.shape)}")
    return x.detach().contiguous()


def dequantize(qtype: int, raw: torch.Tensor) -> torch.Tensor:
    """raw uint8 [..., R, row bytes] -> float32 [..., R, C], equal to gguf.quants.dequantize bit for bit."""
    blocks = _blocks(qtype, raw)  # [..., R, B, BB]
    qk = block_shape(qtype)[0]
    out = torch.empty(*raw.shape[:-1], blocks.shape[-2] * qk, dtype=torch.float32)  # [..., R, C]
    rows = blocks.reshape(-1, *blocks.shape[-2:])  # [rows, B, BB]
    sync_threads()
    _KERNELS[qtype][0](rows, out.numpy().reshape(*rows.shape[:2], qk), _F16)
    return out


def _matvec(qtype: int, w: np.ndarray, x: torch.Tensor, mat: np.ndarray, vec: np.ndarray) -> torch.Tensor:
    """w [S, R, B, BB], x float32 [V, C], pairs p of (matrix mat[p], input vec[p]) -> [P, R]."""
    qk = block_shape(qtype)[0]
    xb = x.numpy().reshape(-1, w.shape[2], qk)  # [V, B, QK]
    out = torch.empty(len(mat), w.shape[1], dtype=torch.float32)  # [P, R]
    sync_threads()
    _KERNELS[qtype][1](w, xb, mat, vec, out.numpy(), _F16)
    return out


def gather_matvec(qtype: int, w: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """w uint8 [S, R, row bytes], x float32 [N, C] or [N, K, C], slots int64 [N, K] -> float32 [N, K, R]:
    out[n, k] = dequantize(w[slots[n, k]]) @ x[n] (or x[n, k]), each matrix read straight from the bank."""
    blocks = _blocks(qtype, w)  # [S, R, B, BB]
    n, k = slots.shape
    x = _inputs(x, blocks.shape[2] * block_shape(qtype)[0])
    if x.shape[:-1] not in ((n,), (n, k)):
        raise ValueError(f"inputs {list(x.shape)}: not [N, C] or [N, K, C] for slots {list(slots.shape)}")
    mat = slots.reshape(-1).to(torch.int64).numpy()  # [N*K]: pair n*K + k uses matrix slots[n, k] ...
    vec = np.arange(n * k) // (k if x.dim() == 2 else 1)  # ... and input row n (or n*K + k) of x
    return _matvec(qtype, blocks, x.view(-1, x.shape[-1]), mat, vec).view(n, k, -1)


def linear(qtype: int, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w uint8 [R, row bytes], x float32 [N, C] -> float32 [N, R] = x @ dequantize(w).T."""
    blocks = _blocks(qtype, w)  # [R, B, BB]
    x = _inputs(x, blocks.shape[1] * block_shape(qtype)[0])
    if x.shape[0] < LINEAR_DEQUANT_MIN_TOKENS[qtype] * min(torch.get_num_threads(), 2):
        return _linear_matvec(qtype, blocks, x)
    return _linear_dequant(qtype, w, x)


class Prepared:
    """One GGUF matrix held for repeated products (a dense layer's weight): its block view and the kernel's
    arguments for one token are made once, so a decode step pays the kernel, not the checks around it."""

    def __init__(self, qtype: int, raw: torch.Tensor):
        self.qtype, self.raw = qtype, raw
        self.blocks = _blocks(qtype, raw)[None]  # [1, R, B, BB]
        self.qk = block_shape(qtype)[0]
        self.kernel = _KERNELS[qtype][1]
        self.pair = np.zeros(1, dtype=np.int64)  # token 0 times matrix 0

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x float32 [N, C] -> [N, R], as linear()."""
        if x.shape[0] != 1 or x.dtype != torch.float32 or not x.is_contiguous():
            return linear(self.qtype, self.raw, x)
        out = torch.empty(1, self.blocks.shape[1], dtype=torch.float32)
        sync_threads()
        self.kernel(self.blocks, x.numpy().reshape(1, -1, self.qk), self.pair, self.pair, out.numpy(), _F16)
        return out


def _linear_matvec(qtype: int, blocks: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """linear() for a few tokens: one matvec per token on the blocks."""
    n = x.shape[0]
    return _matvec(qtype, blocks[None], x, np.zeros(n, dtype=np.int64), np.arange(n))


def _linear_dequant(qtype: int, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """linear() for many tokens: F.linear's matmul reuses each weight for every token. Dequantized a tile of
    rows at a time, the floats stay in cache, and a large matrix (an output head) never exists in float32."""
    rows, cols = w.shape[0], x.shape[1]
    tile = max(1, _TILE_BYTES // (4 * cols))
    if tile >= rows:
        return F.linear(x, dequantize(qtype, w))
    out = torch.empty(x.shape[0], rows, dtype=torch.float32)
    for r in range(0, rows, tile):
        out[:, r : r + tile] = F.linear(x, dequantize(qtype, w[r : r + tile]))
    return out


def q4_0_codes(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 rows uint8 [R, row bytes] -> (codes uint8 [R, C] in 0..15, d float32 [R, C / 32]), with
    weight = d * (code - 8) exactly: for repacking Q4_0 into another kernel's layout."""
    blocks = _blocks(Q.Q4_0, raw)  # [R, B, 18]
    d = _F16[blocks[..., 0] | blocks[..., 1].astype(np.int64) << 8]  # [R, B]
    qs = blocks[..., 2:]  # [R, B, 16]
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1)  # [R, B, 32]: low nibbles, then high ones
    return torch.from_numpy(codes.reshape(raw.shape[0], -1)), torch.from_numpy(d)
