"""Reading byte ranges of weight files without the page cache: O_DIRECT `preadv` into reused aligned buffers.

Owns the file descriptors, one aligned staging buffer per calling thread (reused, grown only when a request
is larger than any before), and the read counters. It does not own decoding: callers get a memoryview of the
staging buffer, valid until that thread's next read, and copy what they keep.

Batches (`read_pieces`): many ranges at once, neighbours in a file merged into one span, spans packed into the
staging buffer up to `chunk_bytes` per fill (one preadv per span), and spans larger than that streamed in
chunks, so a layer's worth of experts costs a few large requests instead of one small request per tensor.

Where O_DIRECT is refused (tmpfs, some network filesystems) reads fall back to buffered `preadv` followed
by `posix_fadvise(DONTNEED)` over the same aligned range, so the page cache never quietly holds the model.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CorruptFile, MoepagerError
from .native_aio import open_context

ALIGN = 4096  # O_DIRECT needs 512 here; 4096 also matches the page size, so DONTNEED evicts whole ranges
COALESCE_GAP = 64 << 10  # ranges of one file closer than this are fetched by one read
CHUNK = 16 << 20  # streamed reads: as fast as larger requests here, and bounds each thread's staging


def align_down(x: int) -> int:
    return x & ~(ALIGN - 1)


def align_up(x: int) -> int:
    return (x + ALIGN - 1) & ~(ALIGN - 1)


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A zero-filled, page-aligned buffer (anonymous mmap), usable as an O_DIRECT target. Private: a shared
    anonymous map (mmap's default) is shared memory, which a memory cgroup charges as page cache that cannot be
    reclaimed."""
    return mmap.mmap(-1, max(align_up(nbytes), ALIGN), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


@dataclass
class ReadStats:
    reads: int = 0  # preadv calls
    bytes_read: int = 0  # bytes transferred from the file, alignment padding included
    bytes_requested: int = 0  # bytes the callers asked for
    read_seconds: float = 0.0  # summed over threads, so it can exceed wall time

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class DirectReader:
    """Thread-safe range reader. `direct=False` forces the buffered + DONTNEED path (for tests and tmpfs)."""

    def __init__(self, direct: bool = True, buffer_bytes: int = 0, chunk_bytes: int = CHUNK):
        self.direct = direct
        self.chunk_bytes = chunk_bytes  # piece size of read_chunks
        self.buffer_bytes = buffer_bytes  # initial size of each thread's staging buffer
        self._fds: dict[Path, tuple[int, bool]] = {}  # path -> (fd, opened with O_DIRECT)
        self._retired: list[int] = []
        self._aio_contexts: list = []  # every thread's, closed with the files
        self._lock = threading.Lock()
        self._local = threading.local()
        self._stats = ReadStats()

    # ---------------------------------------------------------------------------------------- files

    def _fd(self, path: Path) -> tuple[int, bool]:
        got = self._fds.get(path)
        if got is not None:
            return got
        with self._lock:
            if path not in self._fds:
                self._fds[path] = self._open(path)
            return self._fds[path]

    def _open(self, path: Path) -> tuple[int, bool]:
        try:
            if self.direct and hasattr(os, "O_DIRECT"):
                try:
                    return os.open(path, os.O_RDONLY | os.O_DIRECT), True
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
            return _open_buffered(path), False
        except FileNotFoundError:
            raise MoepagerError(f"{path}: file is missing") from None
        except OSError as e:
            raise MoepagerError(f"cannot open {path}: {e.strerror}") from None

    def _reopen_buffered(self, path: Path, fd: int) -> tuple[int, bool]:
        """The filesystem accepted O_DIRECT at open but refuses it on read: use the fallback for this file."""
        with self._lock:
            if self._fds.get(path, (None,))[0] == fd:
                self._fds[path] = (_open_buffered(path), False)
                self._retired.append(fd)  # another thread may be mid-read on it: close it in close()
            return self._fds[path]

    def is_direct(self, path: str | Path) -> bool:
        return self._fd(Path(path))[1]

    def close(self) -> None:
        with self._lock:
            for fd in [fd for fd, _ in self._fds.values()] + self._retired:
                os.close(fd)
            self._fds.clear()
            self._retired.clear()
            for ctx in self._aio_contexts:
                ctx.close()
            self._aio_contexts.clear()

    def __del__(self):
        with contextlib.suppress(OSError, AttributeError):  # at interpreter exit, half torn down
            self.close()

    # ---------------------------------------------------------------------------------------- reads

    def _staging(self, nbytes: int) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < nbytes:
            # never close the old buffer: views handed out earlier may still point into it
            buf = aligned_buffer(max(nbytes, self.buffer_bytes))
            self._local.buf = buf
            self._local.view = memoryview(buf)
        return self._local.view

    def release_buffer(self) -> None:
        """Drop this thread's staging buffer (after one-off reads larger than the ones that follow, so their
        size is not held for the reader's life); views handed out keep it alive until they go."""
        self._local.__dict__.pop("buf", None)
        self._local.__dict__.pop("view", None)

    def read(self, path: str | Path, offset: int, nbytes: int) -> memoryview:
        """Bytes [offset, offset + nbytes) of a file, as a view valid until this thread's next read."""
        return self.read_ranges([(path, offset, nbytes)])[0]

    def read_ranges(self, ranges: list[tuple[str | Path, int, int]]) -> list[memoryview]:
        """Several ranges at once (e.g. the tensors of one expert); neighbours in one file share a read.

        Returns one view per range, in order, all valid until this thread's next read.
        """
        spans = _coalesce([(_path(p), off, n, i) for i, (p, off, n) in enumerate(ranges)])
        total = sum(end - start for _, start, end, _ in spans)
        staging = self._staging(total)
        views: list[memoryview | None] = [None] * len(ranges)
        gots, calls, seconds = self._read_packed(spans, staging)
        pos, moved = 0, 0
        for (path, start, end, members), got in zip(spans, gots):
            for i, off, n in members:
                if off + n > start + got:
                    raise CorruptFile(f"{path}: truncated: bytes {off}..{off + n} are wanted but the file "
                                      f"ends at byte {start + got}")  # fmt: skip
                views[i] = staging[pos + off - start : pos + off - start + n]
            pos += end - start
            moved += got
        with self._lock:
            s = self._stats
            s.reads += calls
            s.bytes_read += moved
            s.bytes_requested += sum(n for _, _, n in ranges)
            s.read_seconds += seconds
        return views  # type: ignore[return-value]

    def read_chunks(self, path: str | Path, offset: int, nbytes: int) -> Iterator[tuple[int, memoryview]]:
        """Yield (position in the range, view) pieces covering [offset, offset + nbytes) in order.

        Each view is valid until the next piece (or this thread's next read), so staging stays at
        self.chunk_bytes however large the range: the way to copy a big expert into buffers the caller owns.
        """
        for _, pos, view in self.read_pieces([(path, offset, nbytes)]):
            yield pos, view

    def read_pieces(self, ranges: list[tuple[str | Path, int, int]]) -> Iterator[tuple[int, int, memoryview]]:
        """Many ranges in few large reads: yield (range index, position in the range, view) pieces.

        Neighbouring ranges of a file share one span; spans are packed into this thread's staging buffer up
        to chunk_bytes per fill (one preadv per span) and larger ones are streamed chunk by chunk, so staging
        stays bounded. Pieces come in file order, a range's pieces in order (a checksum can be folded over
        them); each view is valid until the generator resumes. Copy it, do not keep it.
        """
        chunk = max(ALIGN, align_down(self.chunk_bytes))
        spans = _coalesce([(_path(p), off, n, i) for i, (p, off, n) in enumerate(ranges)])
        reads = [(path, lo, min(lo + chunk, end), members)  # every read is at most one chunk
                 for path, start, end, members in spans for lo in range(start, end, chunk)]  # fmt: skip
        if not reads:
            return
        staging = self._staging(min(chunk, sum(hi - lo for _, lo, hi, _ in reads)))
        for fill in bounded_groups(reads, [hi - lo for _, lo, hi, _ in reads], len(staging)):
            yield from self._read_fill(fill, staging)

    def _read_fill(self, fill: list, staging: memoryview) -> Iterator[tuple[int, int, memoryview]]:
        """One staging buffer's worth of reads, back to back, then its pieces."""
        got, calls, seconds = self._read_packed(fill, staging)
        pieces = []
        pos = 0
        for (path, lo, hi, members), n in zip(fill, got):
            for i, off, size in members:
                a, b = max(off, lo), min(off + size, hi)
                if a >= b:
                    continue  # the range lies in another chunk of this span
                if lo + n < b:
                    raise CorruptFile(f"{path}: truncated: bytes {off}..{off + size} are wanted but the file "
                                      f"ends at byte {lo + n}")  # fmt: skip
                pieces.append((i, a - off, staging[pos + a - lo : pos + b - lo]))
            pos += hi - lo
        with self._lock:
            s = self._stats
            s.reads += calls
            s.bytes_read += sum(got)
            s.bytes_requested += sum(len(v) for _, _, v in pieces)
            s.read_seconds += seconds
        yield from pieces

    def _read_packed(self, spans: list, staging: memoryview) -> tuple[list[int], int, float]:
        """Spans (path, aligned start, aligned end, members) read back to back into staging -> (bytes got per
        span, requests made, seconds)."""
        dests, pos = [], 0
        for path, lo, hi, _ in spans:
            dests.append((path, lo, staging[pos : pos + hi - lo]))
            pos += hi - lo
        t0 = time.perf_counter()
        calls, got = self._read_spans(dests)
        return got, calls, time.perf_counter() - t0

    def _read_spans(self, spans: list[tuple[Path, int, memoryview]]) -> tuple[int, list[int]]:
        """Fill each (path, aligned start, dest) -> (requests made, bytes got per span). O_DIRECT spans go to the
        disk together through this thread's AIO context (native_aio.py), up to its depth at a time; whatever
        that cannot take (a buffered file, a short read, an error) is finished by _read_span's plain loop."""
        got = [0] * len(spans)
        calls = 0
        aio = self._aio() if len(spans) > 1 else None
        if aio is not None:
            fds = [self._fd(path) for path, _, _ in spans]
            if all(direct for _, direct in fds):
                for lo in range(0, len(spans), aio.depth):
                    part = range(lo, min(lo + aio.depth, len(spans)))
                    requests = [
                        (fds[i][0], _address(spans[i][2]), len(spans[i][2]), spans[i][1]) for i in part
                    ]
                    results = aio.read(requests)
                    if results is None:
                        break
                    calls += len(requests)
                    for i, n in zip(part, results):
                        got[i] = max(n, 0)
        for i, (path, start, dest) in enumerate(spans):
            n = got[i]
            if n < len(dest) and (n == 0 or n % ALIGN == 0):  # not read, failed, or stopped short of the end
                more_calls, more = self._read_span(path, start + n, dest[n:])
                calls += more_calls
                got[i] = n + more
        return calls, got

    def _aio(self):
        """This thread's AIO context (opened on its first batch), or None where there is none."""
        ctx = getattr(self._local, "aio", False)
        if ctx is False:
            ctx = self._local.aio = open_context()
            if ctx is not None:
                with self._lock:
                    self._aio_contexts.append(ctx)
        return None if ctx is None or ctx.closed else ctx

    def _read_span(self, path: Path, start: int, dest: memoryview) -> tuple[int, int]:
        """Fill dest from byte `start` (aligned) -> (preadv calls, bytes got); short only at end of file."""
        fd, direct = self._fd(path)
        done, calls = 0, 0
        while done < len(dest):
            try:
                n = os.preadv(fd, [dest[done:]], start + done)
            except OSError as e:
                if e.errno == errno.EINVAL and direct:
                    fd, direct = self._reopen_buffered(path, fd)
                    continue
                raise MoepagerError(f"cannot read {path}: {e.strerror}") from None
            calls += 1
            if n == 0:
                break
            done += n
            if direct and n % ALIGN:
                break  # an unaligned O_DIRECT read means end of file; the next offset would be refused
        if not direct:
            os.posix_fadvise(fd, start, len(dest), os.POSIX_FADV_DONTNEED)
        return calls, done

    def stats(self) -> dict:
        with self._lock:
            return self._stats.as_dict()

    def reset_stats(self) -> None:
        with self._lock:
            self._stats = ReadStats()


class Scratch:
    """A byte tensor per thread, reused by every call and grown (never shrunk) when one needs more: where a
    batch of experts is assembled from its pieces before it is decoded."""

    def __init__(self):
        self._local = threading.local()

    def get(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._local.buf = torch.empty(nbytes, dtype=torch.uint8)
        return buf


def bounded_groups(items: list, sizes: list[int], max_bytes: int) -> list[list]:
    """Consecutive items in groups of at most max_bytes (an item larger than that is a group alone)."""
    groups: list[list] = []
    used = max_bytes
    for item, n in zip(items, sizes):
        if used + n > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(item)
        used += n
    return groups


def copy_piece(dst: torch.Tensor, pos: int, view: memoryview) -> None:
    """Bytes of a staging view into dst (a flat uint8 CPU tensor) from byte `pos`.

    numpy, not Tensor.copy_: torch splits a copy this size over its intra-op threads, and called from
    reading threads on a busy 2-core machine each copy then waits ~ms for a thread to be scheduled."""
    np.copyto(dst.numpy()[pos : pos + len(view)], np.frombuffer(view, dtype=np.uint8))


def offer_or_copy(
    land, i: int, name: str, dst: torch.Tensor, pos: int, view: memoryview, nbytes: int
) -> None:
    """A piece of expert i's tensor `name` (nbytes long) into dst from byte `pos` (copy_piece), unless the view holds
    the whole tensor and `land` (a BatchedSource.read_experts caller's, or None) takes it from there."""
    if land is not None and pos == 0 and len(view) == nbytes:
        if land(i, name, torch.frombuffer(view, dtype=torch.uint8)):
            return
    copy_piece(dst, pos, view)


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 view of the same memory."""
    return t.view(-1).view(torch.uint8)


def takes_bytes(t, dtype, shape: tuple[int, ...]) -> bool:
    """A destination tensor that can take stored bytes as they are: same dtype and shape, contiguous, CPU."""
    return (t is not None and t.device.type == "cpu" and t.dtype == dtype and tuple(t.shape) == tuple(shape)
            and t.is_contiguous())  # fmt: skip


def _path(p: str | Path) -> Path:
    # parsing a Path again would cost more than the rest of a piece's bookkeeping
    return p if isinstance(p, Path) else Path(p)


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def _open_buffered(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    # no readahead: it would cache pages past the range that DONTNEED then leaves behind
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    return fd


def _coalesce(ranges: list[tuple[Path, int, int, int]]):
    """(path, offset, nbytes, index) -> [(path, aligned start, aligned end, [(index, offset, nbytes)])]."""
    spans: list = []
    for path, off, n, i in sorted(ranges, key=lambda r: (str(r[0]), r[1])):
        if off < 0 or n < 0:
            raise ValueError(f"bad range {off}+{n} of {path}")
        start, end = align_down(off), align_up(off + n)
        if spans and spans[-1][0] == path and start <= spans[-1][2] + COALESCE_GAP:
            last = spans[-1]
            last[2] = max(last[2], end)
            last[3].append((i, off, n))
        else:
            spans.append([path, start, end, [(i, off, n)]])
    return spans
