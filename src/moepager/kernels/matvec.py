"""The float32 gathered matrix-vector kernel: a MoE layer's decode step reads each chosen expert matrix straight
from its bank, no gather copy, in one call for every (token, expert) pair.

torch has no gather-matmul on the CPU: `bank[slots] @ x` first copies the K chosen matrices (3x the memory
traffic), and a loop of F.linear over views costs a host sync plus ~6 dispatches per expert. This numba kernel
ran 2x faster than that loop on Mixtral- and Qwen-MoE-shaped banks here (decode, 2 threads), and 15x faster
than the gather. It is exact up to float32 summation order.

Letters: S slots in the bank, R rows (outputs), C columns (inputs), N tokens, K experts per token.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

_ROWS = 16  # rows per parallel task: enough work per task, and R of every supported shape divides into it
# torch's thread count when numba was last set to match it, per calling thread: numba's and OpenMP's thread
# counts are per thread, so a new thread (a server's worker) starts again at all cores
_synced = threading.local()
_compiled = (
    None  # the kernel, built on first use: numba (and its JIT, ~130 MiB) is loaded only by fp32 models
)


def _kernel():
    global _compiled
    if _compiled is None:
        import numba

        @numba.njit(parallel=True, fastmath=True, cache=True)
        def gather_mv(w, x, slots, out):  # pragma: no cover - compiled
            # w [S, R, C], x [N, Kx, C] with Kx 1 (shared input) or K, slots [N, K] -> out [N, K, R]
            n_tok, k_per = slots.shape
            rows, cols = w.shape[1], w.shape[2]
            blocks = (rows + _ROWS - 1) // _ROWS
            shared = x.shape[1] == 1
            for task in numba.prange(n_tok * k_per * blocks):
                b = task % blocks
                nk = task // blocks
                n, k = nk // k_per, nk % k_per
                s = slots[n, k]
                xi = x[n, 0] if shared else x[n, k]
                for r in range(b * _ROWS, min(rows, (b + 1) * _ROWS)):
                    acc = np.float32(0.0)
                    for c in range(cols):
                        acc += w[s, r, c] * xi[c]
                    out[n, k, r] = acc

        _compiled = gather_mv
    return _compiled


def sync_threads() -> None:
    """Run numba's parallel loops on as many threads as torch. They use torch's OpenMP runtime when torch is
    loaded first, and starting numba's pool sets that runtime's thread count to all cores: put torch's back.
    Checked on every kernel call, so it costs one torch call unless torch's count changed."""
    import numba

    n = torch.get_num_threads()
    if n == getattr(_synced, "n", -1):
        return
    if numba.get_num_threads() != min(n, numba.config.NUMBA_NUM_THREADS):  # the first call starts the pool
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _synced.n = n


def gather_matvec(w: torch.Tensor, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """w float32 [S, R, C] (CPU), x float32 [N, C] or [N, K, C], slots int64 [N, K] -> [N, K, R]:
    out[n, k] = w[slots[n, k]] @ x[n] (or x[n, k])."""
    n, k = slots.shape
    x3 = x[:, None] if x.dim() == 2 else x  # [N, 1 or K, C]
    out = torch.empty(n, k, w.shape[1], dtype=torch.float32)
    sync_threads()
    _kernel()(w.detach().numpy(), x3.detach().contiguous().numpy(), slots.numpy(), out.numpy())
    return out


def warm_up() -> None:
    """Load numba's runtime, this kernel's compiled code and the thread pool (about 60 MiB of RSS), as the first
    decode step would: a memory budget measured after this counts them."""
    gather_matvec(torch.zeros(1, _ROWS, 1), torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.int64))


def can_use(w: torch.Tensor, x: torch.Tensor) -> bool:
    return (
        w.device.type == "cpu" and w.dtype == torch.float32 and x.dtype == torch.float32 and w.is_contiguous()
    )
