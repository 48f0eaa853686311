"""Linux native AIO (io_setup / io_submit / io_getevents) for O_DIRECT reads: several ranges in flight at once
from one thread, so an expert whose tensors lie in three places of a file costs about one disk round trip, not
three in a row, and no reading thread is woken to overlap them.

Owns one kernel AIO context and its request structs; not the files, buffers or counters (direct_reader.py). The
syscalls are made through ctypes: the standard library has no AIO, io_uring's PyPI wrappers crash or fail to
build here (../shared/MACHINE.md), and caio reads into buffers of its own, which O_DIRECT's alignment refuses.
Where the kernel or the architecture refuses AIO, `open_context` gives None and the caller reads one range after
another. Native AIO is asynchronous only on O_DIRECT files; the caller uses it there only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

_SYSCALLS = {  # io_setup, io_destroy, io_submit, io_getevents
    "x86_64": (206, 207, 209, 208),
    "aarch64": (0, 1, 2, 4),
}
_PREAD = 0  # IOCB_CMD_PREAD


_long = ctypes.c_long  # every syscall argument a full register wide (a bare int would go as a C int)


class _Iocb(ctypes.Structure):  # struct iocb, <linux/aio_abi.h>, little-endian 64-bit
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]  # fmt: skip


class _Event(ctypes.Structure):  # struct io_event
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64),
                ("res2", ctypes.c_int64)]  # fmt: skip


class AioContext:
    """One thread's context: `read` submits up to `depth` ranges at once and waits for them all."""

    def __init__(self, ctx: int, depth: int, numbers: tuple[int, int, int, int]):
        self._ctx, self.depth, self._nr = ctypes.c_ulong(ctx), depth, numbers
        self._iocbs = (_Iocb * depth)()
        self._ptrs = (ctypes.POINTER(_Iocb) * depth)(*(ctypes.pointer(c) for c in self._iocbs))
        self._events = (_Event * depth)()
        self.closed = False

    def read(self, requests: list[tuple[int, int, int, int]]) -> list[int] | None:
        """requests: (fd, buffer address, nbytes, offset), at most depth. Bytes read per request, or -errno
        where one failed; None if the batch could not be submitted (the caller reads it the plain way)."""
        n = len(requests)
        if self.closed or not 0 < n <= self.depth:
            return None
        for i, (fd, addr, nbytes, offset) in enumerate(requests):
            c = self._iocbs[i]
            c.data, c.opcode, c.fildes, c.buf, c.nbytes, c.offset = i, _PREAD, fd, addr, nbytes, offset
        submitted = _libc.syscall(_long(self._nr[2]), self._ctx, _long(n), self._ptrs)
        if submitted != n:
            if submitted > 0:  # a partial submit: the rest were refused; wait for what went, then give up
                self._wait(submitted, [0] * n)
            return None
        return self._wait(n, [0] * n)

    def _wait(self, n: int, results: list[int]) -> list[int]:
        got = 0
        while got < n:
            k = _libc.syscall(_long(self._nr[3]), self._ctx, _long(1), _long(n - got), self._events, None)
            if k < 0:
                if ctypes.get_errno() == errno.EINTR:
                    continue
                raise OSError(ctypes.get_errno(), "io_getevents failed")
            for e in self._events[:k]:
                results[e.data] = e.res
            got += k
        return results

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            _libc.syscall(_long(self._nr[1]), self._ctx)


def open_context(depth: int = 64) -> AioContext | None:
    """A new context, or None where this kernel, architecture or sandbox has no native AIO."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None or _libc is None or os.environ.get("MOEPAGER_NO_AIO"):
        return None
    ctx = ctypes.c_ulong(0)
    if _libc.syscall(_long(numbers[0]), _long(depth), ctypes.byref(ctx)) != 0:
        return None
    return AioContext(ctx.value, depth, numbers)


def _load_libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        return libc
    except (OSError, AttributeError):
        return None


_libc = _load_libc()
