"""Weights in 2 MiB pages: the memory the CPU kernels stream through, allocated where Linux backs it with
transparent huge pages (THP, asked for with madvise).

Decoding reads every weight once per token, at memory speed: a matrix-vector product is a stream through
tens of MiB. With 4 KiB pages that stream takes a TLB miss every 4 KiB (a two-level page walk inside a virtual
machine) and the hardware prefetchers stop at each page boundary. Measured on the project's 2-core VM, a cold
100 MiB float32 matvec: 4 KiB pages 6.4 GB/s, 2 MiB pages 12.5 GB/s; a whole decode step, see
benchmarks/README.md section 4. llama.cpp gets the same from its mmapped file (the page cache maps large
folios), which is why it matters for a fair race, not only for speed.

Owns only the allocation; what lives there (expert banks, dense weights) is decided by their owners.
"""

from __future__ import annotations

import mmap
import sys

import torch

HUGE_PAGE = 2 << 20  # bytes; x86-64 and arm64 (4 KiB base pages) THP size
_ADVICE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only


def empty(shape, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """torch.empty(shape, dtype, device) whose memory is a private anonymous mapping advised MADV_HUGEPAGE
    and aligned to 2 MiB, so its first touch takes whole huge pages; plain torch.empty off the CPU, for
    tensors under one huge page, and where the system has no THP. Freed with the tensor (the mapping lives
    as long as its storage)."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if not _eligible(nbytes, device):
        return torch.empty(shape, dtype=dtype, device=device)
    pages = -(-nbytes // HUGE_PAGE)
    # one huge page more than needed, so an aligned start fits; the slack around it is never touched
    region = mmap.mmap(-1, (pages + 1) * HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    skip = -torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
    try:
        region.madvise(_ADVICE, skip, pages * HUGE_PAGE)
    except OSError:  # a kernel without THP: the memory is still good, in small pages
        pass
    # a storage of exactly the tensor's bytes (what memory accounting reads), holding the mapping alive
    return torch.frombuffer(region, dtype=dtype, offset=skip, count=nbytes // dtype.itemsize).view(shape)


def populate(t: torch.Tensor, label: str = "") -> None:
    """Back every page of a CPU tensor now, by writing a byte in each 4 KiB (its contents are left undefined, as
    torch.empty's). Memory that will be filled anyway (an expert cache's slots) then costs its first touch here
    and not in the middle of a decode step: on the project's VM a huge page's first touch took ~2 ms (the kernel
    zeroing and compacting for it), 4.4 ms of each expert read into a fresh slot at real scale (real_scale.md)."""
    if t.device.type != "cpu" or not t.numel():
        return
    from ..system.progress import progress_bar

    flat, step = t.view(-1).view(torch.uint8), 256 << 20
    n = flat.numel()
    bar = progress_bar(total=n, enabled=n >= 1 << 30, desc=label or "memory", unit="B", unit_scale=True,
                       unit_divisor=1024)  # fmt: skip
    for start in range(0, n, step):
        flat[start : start + step : 4096] = 0
        bar.update(min(step, n - start))
    bar.close()


def moved(t: torch.Tensor) -> torch.Tensor:
    """t copied into huge-page memory, or t itself where `empty` would not give any."""
    if not _eligible(t.numel() * t.element_size(), t.device):
        return t
    return empty(t.shape, t.dtype, t.device).copy_(t)


def _eligible(nbytes: int, device: torch.device | str) -> bool:
    return (torch.device(device).type == "cpu" and nbytes >= HUGE_PAGE and _ADVICE is not None
            and sys.platform == "linux")  # fmt: skip
