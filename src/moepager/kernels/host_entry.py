"""A host node's native entry, so that only ggml's first thread enters Python.

ggml calls a custom op's function on every thread of its graph (ggml-cpu.c computes each node on each thread;
the op picks its part by `ith`). A host node (kernels/ggml_step.py `_Holds`) has work on the first thread only,
yet through a plain ctypes callback the others enter Python just to return. Entering takes the GIL, which the
first thread holds while it runs the node, so they sleep on it and are woken once it lets go: on the small Q4_0
file under a 400 MiB limit (8 nodes a token, 2 threads) that cost ~0.5 ms of a 4.3-4.7 ms token
(benchmarks/real_scale.md).

The entry is 21 bytes of x86-64 code in a page of its own (written, then made read-only and executable): it
marks itself a branch target (endbr64, a no-op where the CPU does not track indirect branches), tests `ith`, the
fourth argument (ecx in the System V calling convention), returns where it is not 0, and else jumps to the ctypes
callback, which returns to ggml itself. Elsewhere (another architecture or operating system, or a system that
refuses executable memory) the callback is used as it is: every thread enters it.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import struct
import sys


def first_thread_only(fn):
    """fn, a ctypes callback of a host node's type, behind an entry that returns at once on ggml's threads other
    than the first; fn itself where this platform has no such entry. Keep the result as long as fn."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return fn
    code = (
        b"\xf3\x0f\x1e\xfa"  # endbr64                 a landing pad where indirect branches are tracked
        b"\x85\xc9"  # test ecx, ecx                    ith
        b"\x75\x0c"  # jne  +12 (the ret)
        b"\x48\xb8" + struct.pack("<Q", ctypes.cast(fn, ctypes.c_void_p).value)  # movabs rax, fn
        + b"\xff\xe0"  # jmp  rax                       fn returns to ggml
        b"\xc3"  # ret
    )  # fmt: skip
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        page.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(address, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            return fn  # executable memory refused (a hardened kernel)
    except (OSError, AttributeError):
        return fn
    entry = type(fn)(address)
    entry.keep = (page, fn)  # the page and the callback it jumps to live as long as the entry
    return entry
