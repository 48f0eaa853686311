"""Compute kernels for expert banks: float, int8/int4 and GGUF block formats."""

import threading

import numba
import torch

# torch's thread count when numba was last set to match it, per calling thread: numba's and OpenMP's thread
# counts are per thread, so a new thread (a server's worker) starts again at all cores
_synced = threading.local()


def sync_threads() -> None:
    """Run numba's parallel loops on as many threads as torch. They use torch's OpenMP runtime when torch is
    loaded first, and starting numba's pool sets that runtime's thread count to all cores: put torch's back.
    Checked on every kernel call, so it costs one torch call unless torch's count changed."""
    n = torch.get_num_threads()
    if n == getattr(_synced, "n", -1):
        return
    if numba.get_num_threads() != min(n, numba.config.NUMBA_NUM_THREADS):  # the first call starts the pool
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _synced.n = n
