"""What this process holds: its resident bytes as a memory limit counts them, handing freed heap back, and
dropping the pages of its libraries that nothing runs any more.

Owns nothing else; any layer may import it (it imports only psutil, ctypes and os, lazily)."""

from __future__ import annotations


def current_rss() -> int:
    """Resident bytes of this process now, as paging's footprint measures them."""
    import psutil

    return psutil.Process().memory_info().rss


def unique_bytes() -> int:
    """Resident bytes only this process maps (USS): what its exit would free. Library pages that another
    process maps too (a parent that imported torch) are held by that one, and a cgroup charges them to
    whichever touched them first; a memory limit's footprint counts these."""
    import psutil

    return psutil.Process().memory_full_info().uss


def release_freed_heap() -> None:
    """Hand freed malloc memory back to the system: glibc keeps it, and a memory limit counts it.

    Called after a load step that frees many small objects (a GGUF's parsed metadata, a tokenizer's
    temporaries), never on the decode path."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


MADV_PAGEOUT = 21  # Linux 5.4 and later: reclaim these pages now


def page_out_libraries() -> int:
    """Drop this process's resident pages of shared libraries (their code and read-only data) and return
    the bytes of RSS that freed.

    A memory limit counts them, and most were touched once, by an import: after `import torch` the process
    holds ~60 MiB of libtorch_cpu.so of which a decode runs ~15 MiB. What runs again faults back in from disk
    (paged.LIBRARY_PAGES plans for it). Only clean pages mapped from *.so files: copy-on-write data and
    anything else mapped (weights, buffers) stays. A kernel without MADV_PAGEOUT drops nothing.

    MADV_PAGEOUT reaches only pages this process maps. Readahead around its faults cached more of each library,
    unmapped (after load in a 400 MiB cgroup: 100 MiB of page cache, 9 MiB of it mapped). A memory cgroup charges
    those pages, and its reclaim then took pages a decode maps instead: one process alone in a 400 MiB cgroup
    decoded 29-240 tok/s with up to 2,378 major faults in 128 tokens. So the libraries' pages that no process
    maps leave the page cache too (POSIX_FADV_DONTNEED)."""
    import ctypes
    import os
    import re

    before = current_rss()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libraries = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) < 6 or not re.search(r"\.so(\.[\d.]+)?$", parts[5]) or parts[1][1] == "w":
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            libc.madvise(start, end - start, MADV_PAGEOUT)
            libraries.add(parts[5])
    for path in libraries:  # pages still mapped (here or elsewhere) stay
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # deleted or replaced since it was mapped
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return max(0, before - current_rss())
