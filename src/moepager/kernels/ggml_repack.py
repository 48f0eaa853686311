"""llama.cpp's interleaved weight layout, which it computes with by default (its CPU_REPACK buffer type): on x86
with AVX2, Q4_0, Q4_K, IQ4_NL and MXFP4 matrices (Q2_K with AVX-512) of a multiple of 8 rows are stored 8 rows
interleaved block by block, and their products run ggml's gemv and gemm kernels for that layout. Those sum in
another order than the plain rows' kernels, so a GGUF gives llama.cpp's logits only when it is computed on the
layout llama.cpp uses; on a Q4_0 file they are also faster.

- `layout(qtype, rows, cols)`: the layout (ggml's tensor traits for it) llama.cpp picks for such a matrix on
  this CPU, or 0 where it keeps the rows as they are, or when MOEPAGER_REPACK=0 (llama.cpp's --no-repack).
- `repack(qtype, layout, rows)`: a matrix's bytes rearranged in place, by ggml's own repack.
- `mark(tensor, layout)`: a graph's weight tensor computed in that layout.
A repacked matrix keeps its size, so a cache slot holds either form; each matrix is repacked once, when its
bytes land in memory (ExpertBank.repack_slot, model/compact.py repack_block_weights).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading

import torch
from gguf import GGML_QUANT_SIZES

from .ggml_library import BUFFER_OFFSET, EXTRA_OFFSET, InitParams, Q, library, set_data

REPACK_ENV = "MOEPAGER_REPACK"


def enabled() -> bool:
    return os.environ.get(REPACK_ENV, "1") != "0"


@functools.cache
def _buffer() -> int:
    """A small buffer of ggml's CPU_REPACK type (0 if the library has none). ggml picks a weight's kernels by its
    buffer's type, not by where its data lies, so this one buffer marks every repacked tensor."""
    g = library()
    reg = g.cpu.ggml_backend_cpu_reg()
    address = g.base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not address:
        return 0
    extra_types = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)
    types = extra_types(g.base.ggml_backend_reg_dev_get(reg, 0))
    i = 0
    while types[i]:
        if g.base.ggml_backend_buft_name(types[i]) == b"CPU_REPACK":
            return g.base.ggml_backend_buft_alloc_buffer(types[i], 4096)  # kept for the process's life
        i += 1
    return 0


@functools.cache
def _traits(qtype: int, rows: int, cols: int) -> int:
    """What ggml's repack buffer gives a tensor of this type and shape when it is placed there (0: none)."""
    buffer = _buffer()
    if not buffer:
        return 0
    g = library()
    ctx = g.base.ggml_init(InitParams(g.base.ggml_tensor_overhead(), None, True))
    try:
        t = g.base.ggml_new_tensor_2d(ctx, qtype, cols, rows)
        g.base.ggml_backend_buffer_init_tensor(buffer, t)
        return ctypes.c_void_p.from_address(t + EXTRA_OFFSET).value or 0
    finally:
        g.base.ggml_free(ctx)


def layout(qtype: int, rows: int, cols: int) -> int:
    """The interleaved layout llama.cpp computes a [rows, cols] matrix of `qtype` in, or 0 for plain rows."""
    return _traits(qtype, rows, cols) if enabled() and qtype in Q._value2member_map_ else 0


def mark(tensor: int, layout: int) -> None:
    """Have ggml compute products of this weight tensor in `layout` (its data must already be in it)."""
    ctypes.c_void_p.from_address(tensor + BUFFER_OFFSET).value = _buffer()
    ctypes.c_void_p.from_address(tensor + EXTRA_OFFSET).value = layout


# a matrix up to this size is copied into a buffer its thread reuses (an expert's, as it lands in a cache slot):
# a fresh copy each time faulted in new pages, 37 us of a 92 KiB Q4_0 matrix's ~50 on an idle machine, and more
# under a memory cap, where each new page may first reclaim another
REUSED_COPY_BYTES = 4 << 20
_copies = threading.local()


def _copy(rows: torch.Tensor) -> torch.Tensor:
    """A copy of rows: in this thread's reused buffer where small enough."""
    n = rows.numel()
    if n > REUSED_COPY_BYTES:
        return rows.clone()
    buffer = getattr(_copies, "buffer", None)
    if buffer is None or buffer.numel() < n:
        buffer = _copies.buffer = torch.empty(REUSED_COPY_BYTES, dtype=torch.uint8)
    return buffer[:n].view(rows.shape).copy_(rows)


def repack(qtype: int, layout: int, rows: torch.Tensor, source: torch.Tensor | None = None) -> None:
    """rows uint8 [R, row bytes] of `qtype`, contiguous on the CPU, rearranged in place into `layout` (from a
    copy: ggml's repack reads every block of 8 rows before it writes them). source: the same bytes elsewhere
    (contiguous, e.g. a read's staging), rearranged from there into rows, whatever rows holds: no copy."""
    r, row_bytes = rows.shape
    qk, block_bytes = GGML_QUANT_SIZES[Q(qtype)]
    if rows.dtype != torch.uint8 or not rows.is_contiguous() or row_bytes % block_bytes:
        raise ValueError(
            f"{Q(qtype).name} rows to repack must be contiguous uint8 blocks, not {list(rows.shape)}"
        )
    if layout != _traits(qtype, r, row_bytes // block_bytes * qk):
        raise ValueError(
            f"{Q(qtype).name} [{r}, {row_bytes} bytes] has another layout than the one asked for"
        )
    if source is None:
        source = _copy(rows)
    elif source.numel() != rows.numel() or not source.is_contiguous():
        raise ValueError(
            f"{Q(qtype).name} rows to repack come from {source.numel()} bytes, not {rows.numel()}"
        )
    g = library()
    ctx = g.base.ggml_init(InitParams(g.base.ggml_tensor_overhead(), None, True))
    try:
        t = g.base.ggml_new_tensor_2d(ctx, qtype, row_bytes // block_bytes * qk, r)
        mark(t, layout)
        set_data(t, rows.data_ptr())
        g.base.ggml_backend_tensor_set(t, source.data_ptr(), 0, r * row_bytes)
    finally:
        g.base.ggml_free(ctx)
