"""Compute kernels for expert banks: float, int8/int4 and GGUF block formats."""

import numba
import torch

_synced = -1  # torch's thread count when numba was last set to match it


def sync_threads() -> None:
    """Run numba's parallel loops on as many threads as torch. They use torch's OpenMP runtime when torch is
    loaded first, and starting numba's pool sets that runtime's thread count to all cores: put torch's back.
    Checked on every kernel call, so it costs one torch call unless torch's count changed."""
    global _synced
    n = torch.get_num_threads()
    if n == _synced:
        return
    if numba.get_num_threads() != min(n, numba.config.NUMBA_NUM_THREADS):  # the first call starts the pool
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _synced = n
