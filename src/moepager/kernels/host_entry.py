"""A host node's native entry, so that only ggml's first thread enters Python, and only when it has work there.

ggml calls a custom op's function on every thread of its graph (ggml-cpu.c computes each node on each thread;
the op picks its part by `ith`). A host node (kernels/host_nodes.py `Holds`) has work on the first thread only,
yet through a plain ctypes callback the others enter Python just to return. Entering takes the GIL, which the
first thread holds while it runs the node, so they sleep on it and are woken once it lets go: on the small Q4_0
file under a 400 MiB limit (8 nodes a token, 2 threads) that cost ~0.5 ms of a 4.3-4.7 ms token
(benchmarks/real_scale.md).

The entry is a few bytes of x86-64 code in a page of its own (written, then made read-only and executable): it
marks itself a branch target (endbr64, a no-op where the CPU does not track indirect branches), tests `ith`, the
fourth argument (ecx in the System V calling convention), returns where it is not 0, and else jumps to the ctypes
callback, which returns to ggml itself. `enter_on_missing` adds a test before the jump: where the node's slots,
which the graph looked up in the expert cache's table just before (ggml_get_rows), were all found (none
negative), the node returns without Python, whose bookkeeping for the layer is done later (`Holds`). The code
uses only rax and r10, which the calling convention leaves free and passes no argument in. Elsewhere (another
architecture or operating system, or a system that refuses executable memory) the callback is used as it is:
every thread enters it, every time.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
import struct
import sys

_ENDBR64 = b"\xf3\x0f\x1e\xfa"  # a landing pad where indirect branches are tracked


def _address(fn) -> bytes:
    return struct.pack("<Q", ctypes.cast(fn, ctypes.c_void_p).value)


def first_thread_only(fn):
    """fn, a ctypes callback of a host node's type, behind an entry that returns at once on ggml's threads other
    than the first; fn itself where this platform has no such entry. Keep the result as long as fn."""
    code = (
        _ENDBR64
        + b"\x85\xc9"  # test ecx, ecx                    ith
        b"\x75\x0c"  # jne  +12 (the ret)
        b"\x48\xb8" + _address(fn)  # movabs rax, fn
        + b"\xff\xe0"  # jmp  rax                       fn returns to ggml
        b"\xc3"  # ret
    )  # fmt: skip
    return _entry(fn, code)


def enter_on_missing(fn, slots: int, k: int):
    """fn behind an entry that, on ggml's first thread, enters it only where one of the k int32 values at address
    `slots` is negative (an expert the table did not hold); fn itself where this platform has no such entry."""
    if not 1 <= k < 2**31:
        raise ValueError(f"k must be a positive int32, got {k}")
    code = (
        _ENDBR64
        + b"\x85\xc9"  # test ecx, ecx                    ith
        b"\x75\x1e"  # jne  +30 (the ret)
        b"\x48\xb8" + struct.pack("<Q", slots)  # movabs rax, slots
        + b"\x41\xba" + struct.pack("<I", k)  # mov  r10d, k
        + b"\x83\x38\x00"  # loop: cmp dword [rax], 0
        b"\x7c\x0a"  # jl   +10 (the jump to fn)          a slot not found
        b"\x48\x83\xc0\x04"  # add  rax, 4
        b"\x41\xff\xca"  # dec  r10d
        b"\x75\xf2"  # jne  -14 (the loop)
        b"\xc3"  # ret                                  every slot found: nothing for Python
        b"\x48\xb8" + _address(fn)  # movabs rax, fn
        + b"\xff\xe0"  # jmp  rax                       fn returns to ggml
    )  # fmt: skip
    return _entry(fn, code)


def _entry(fn, code: bytes):
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return fn
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
