"""A KV cache in fixed-size blocks under a RAM budget: full blocks beyond it spill to a file on disk.

Owns the block storage, the spill file (O_DIRECT, 4096-aligned, or buffered + posix_fadvise DONTNEED where
the filesystem refuses O_DIRECT), reading spilled blocks back one block ahead of use in a thread, and
blockwise attention with an online softmax, so the full K/V never need to be in RAM at once.
Does not own the session file format (generation/sessions.py) or when attention runs (model/layers.py calls `attend`).

Letters: B batch, H query heads, Hk kv heads, R = H/Hk, T new tokens, P positions per block, Dk/Dv head dims.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import tempfile
import time
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..errors import MoepagerError

ALIGN = 4096  # O_DIRECT needs aligned offsets, lengths and buffer addresses; 4096 covers every disk here


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class SpillFile:
    """An append-only scratch file of block slots, unlinked at once so it disappears with the process."""

    def __init__(self, directory: str | os.PathLike | None = None):
        fd, path = tempfile.mkstemp(prefix="moepager-kv-", suffix=".spill", dir=directory)
        os.close(fd)
        try:
            self.fd, self.direct = (
                os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0)),
                hasattr(os, "O_DIRECT"),
            )
        except OSError:  # tmpfs and some network filesystems refuse O_DIRECT
            self.fd, self.direct = os.open(path, os.O_RDWR), False
        os.unlink(path)
        self.end = 0  # bytes allocated so far; slots are never reused (truncation only leaks file space)

    def _buffered(self) -> None:
        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        fcntl.fcntl(self.fd, fcntl.F_SETFL, flags & ~getattr(os, "O_DIRECT", 0))
        self.direct = False

    def append(self, buf: memoryview) -> int:
        """Write an aligned buffer at the end of the file; return its offset."""
        offset = self.end
        try:
            self._write(buf, offset)
        except OSError as e:
            if e.errno != errno.EINVAL or not self.direct:
                raise
            self._buffered()  # the open succeeded but this filesystem rejects direct writes
            self._write(buf, offset)
        if not self.direct:  # keep spilled blocks out of the page cache, or spilling saves no memory
            os.fdatasync(self.fd)
            os.posix_fadvise(self.fd, offset, len(buf), os.POSIX_FADV_DONTNEED)
        self.end += len(buf)
        return offset

    def _write(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            done += os.pwrite(self.fd, buf[done:], offset + done)

    def read(self, buf: memoryview, offset: int) -> None:
        """Fill an aligned buffer from `offset` (safe to call from another thread)."""
        done = 0
        while done < len(buf):
            got = os.preadv(self.fd, [buf[done:]], offset + done)
            if got == 0:
                raise OSError(f"KV spill file ended early at byte {offset + done}")
            done += got
        if not self.direct:
            os.posix_fadvise(self.fd, offset, len(buf), os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class KVOptions:
    """Runtime choices for the KV cache (arguments of load/Engine, never ModelConfig fields)."""

    memory_bytes: int | None = None  # RAM for KV blocks, beyond which blocks spill; None = the in-RAM KVCache
    block_size: int = 256  # positions per block
    spill_dir: str | None = None  # folder for the spill file (default: the system temp folder)
    prefill_chunk: int = 512  # prompt tokens per forward pass: bounds activation memory

    def __post_init__(self):
        for name in ("block_size", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise MoepagerError(f"{name} must be a positive number of tokens, got {getattr(self, name)}")
        if self.memory_bytes is not None and self.memory_bytes < 0:
            raise MoepagerError(f"kv_memory must not be negative, got {self.memory_bytes}")


@dataclass
class _Block:
    k: torch.Tensor | None  # [B, Hk, P, Dk] while resident, None once spilled
    v: torch.Tensor | None  # [B, Hk, P, Dv]
    offset: int | None = None  # where the block lives in the spill file


class BlockKVCache:
    """Keys and values in blocks of `block_size` positions; at most `memory_bytes` of blocks stay in RAM.

    The last (partly filled) block of each layer always stays in RAM, so the effective floor is one block
    per layer. Older full blocks spill first: with sliding windows they are the ones never read again.
    memory_bytes=None keeps everything in RAM (still blocked, so sessions can be loaded into it).
    """

    def __init__(self, num_layers: int, block_size: int = 256, memory_bytes: int | None = None,
                 spill_dir: str | os.PathLike | None = None):  # fmt: skip
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size, self.memory_bytes, self.spill_dir = block_size, memory_bytes, spill_dir
        self.blocks: list[list[_Block]] = [[] for _ in range(num_layers)]
        self.length = [0] * num_layers
        self._windows: list[int | None] = [None] * num_layers  # as last seen, to read ahead the next layer
        self._shapes: list[tuple | None] = [None] * num_layers  # (block k shape, block v shape, dtype)
        self._full: OrderedDict[tuple[int, int], None] = OrderedDict()  # resident full blocks, oldest first
        self._pool: list[tuple[torch.Tensor, torch.Tensor]] = []  # tensors of spilled blocks, reused
        self.resident_bytes = 0
        self._file: SpillFile | None = None
        self._pager: ThreadPoolExecutor | None = None
        self._bufs: list[tuple[mmap.mmap, torch.Tensor]] = []  # [0] write, [1], [2] read (double-buffered)
        self._turn = 0
        self._ahead: tuple[tuple[int, int], Future] | None = None  # (layer, block) read ahead of use
        self.counters = {"blocks_spilled": 0, "bytes_written": 0, "bytes_read": 0, "read_wait_s": 0.0}

    # ------------------------------------------------------------------------------------- the contract

    @property
    def seq_len(self) -> int:
        return self.length[0]

    def nbytes(self) -> int:
        return self.resident_bytes

    def stats(self) -> dict:
        spilled = sum(b.k is None for layer in self.blocks for b in layer)
        return {"block_size": self.block_size, "memory_bytes": self.memory_bytes,
                "resident_bytes": self.resident_bytes, "spilled_blocks_now": spilled,
                "direct_io": self._file.direct if self._file else None, **self.counters}  # fmt: skip

    def attend(self, layer, q, k_new, v_new, mask, window, scale, sinks=None) -> torch.Tensor:
        """q [B, H, T, Dk], new k/v [B, Hk, T, D], mask [T, S] or None -> [B, T, H*Dv], streaming over the
        blocks in reach of the window."""
        start = self.length[layer]  # the queries' first position
        self.append(layer, k_new, v_new)
        self._windows[layer] = window
        b, h, t, _ = q.shape
        hk, p = k_new.shape[1], self.block_size
        r, end = h // hk, start + t
        lo = 0 if window is None else max(0, start - window + 1)  # the oldest key any of these queries sees
        qf = q.float().reshape(b, hk, r * t, -1)  # [B, Hk, R*T, Dk]: query heads grouped by kv head
        m = qf.new_full((b, hk, r * t, 1), float("-inf"))  # running max per query row
        l = qf.new_zeros((b, hk, r * t, 1))  # running softmax denominator
        acc = qf.new_zeros((b, hk, r * t, v_new.shape[-1]))  # running numerator [B, Hk, R*T, Dv]
        for i, k, v in self._stream(layer, range(lo // p, (end - 1) // p + 1), q.device):
            n = min(p, end - i * p)
            k, v = k[:, :, :n].float(), v[:, :, :n].float()  # [B, Hk, n, D]
            logits = torch.matmul(qf, k.transpose(2, 3)) * scale  # [B, Hk, R*T, n]
            if mask is not None:  # the same [T, n] slice for each of the R heads of a group
                logits.view(b, hk, r, t, n).add_(mask[:, i * p : i * p + n])
            m_new = torch.maximum(m, logits.amax(dim=-1, keepdim=True))
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows that see nothing yet stay at zero
            probs = torch.exp(logits - m_safe)
            fade = torch.exp(m - m_safe)
            l = l * fade + probs.sum(dim=-1, keepdim=True)
            acc = acc * fade + torch.matmul(probs, v)
            m = m_new
        if sinks is not None:  # one extra logit per head that joins the denominator only
            s = sinks.float().view(hk, r, 1, 1).expand(hk, r, t, 1).reshape(1, hk, -1, 1)
            m_all = torch.maximum(m, s)
            fade = torch.exp(m - m_all)
            l = l * fade + torch.exp(s - m_all)
            acc = acc * fade
        out = (acc / l).view(b, hk, r, t, -1).reshape(b, h, t, -1)  # [B, H, T, Dv]
        self.enforce_budget()
        self._read_ahead((layer + 1) % len(self.blocks))
        return out.transpose(1, 2).flatten(2).to(q.dtype)

    # ------------------------------------------------------------------------------------------ storage

    @torch.inference_mode()  # the blocks are inference tensors: write them only in that mode
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k [B, Hk, T, Dk], v [B, Hk, T, Dv] to a layer (no spilling until attention is done)."""
        blocks, p = self.blocks[layer], self.block_size
        n, t, i = self.length[layer], k.shape[2], 0
        if self._shapes[layer] is None:
            self._shapes[layer] = ((*k.shape[:2], p, k.shape[3]), (*v.shape[:2], p, v.shape[3]), k.dtype)
        while i < t:
            bi, off = divmod(n, p)
            if bi == len(blocks):
                blocks.append(self._new_block(k, v))
            take = min(p - off, t - i)
            blocks[bi].k[:, :, off : off + take] = k[:, :, i : i + take]
            blocks[bi].v[:, :, off : off + take] = v[:, :, i : i + take]
            n, i = n + take, i + take
            if off + take == p:
                self._full[(layer, bi)] = None
        self.length[layer] = n

    def _new_block(self, k: torch.Tensor, v: torch.Tensor) -> _Block:
        shape_k = (*k.shape[:2], self.block_size, k.shape[3])
        shape_v = (*v.shape[:2], self.block_size, v.shape[3])
        for j, (pk, pv) in enumerate(self._pool):
            if pk.shape == shape_k and pv.shape == shape_v and pk.dtype == k.dtype and pk.device == k.device:
                bk, bv = self._pool.pop(j)
                break
        else:  # freshly allocated memory is slow to first-touch here, hence the pool
            bk, bv = k.new_empty(shape_k), v.new_empty(shape_v)
        self.resident_bytes += _nbytes(bk) + _nbytes(bv)
        return _Block(bk, bv)

    def enforce_budget(self) -> None:
        """Spill the oldest full blocks until the resident ones fit the budget."""
        while self.memory_bytes is not None and self.resident_bytes > self.memory_bytes and self._full:
            (layer, bi), _ = self._full.popitem(last=False)
            self._spill(self.blocks[layer][bi])

    def _spill(self, block: _Block) -> None:
        kb, vb = _nbytes(block.k), _nbytes(block.v)
        size = _aligned(kb + vb)
        if self._file is None:
            self._file = SpillFile(self.spill_dir)
            self._pager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moepager-kv")
            weakref.finalize(self, _shutdown, self._pager, self._file)
        self._ensure_buffers(size)
        mm, wt = self._bufs[0]
        wt[:kb].copy_(block.k.reshape(-1).view(torch.uint8))
        wt[kb : kb + vb].copy_(block.v.reshape(-1).view(torch.uint8))
        block.offset = self._file.append(memoryview(mm)[:size])
        self._pool.append((block.k, block.v))
        block.k = block.v = None
        self.resident_bytes -= kb + vb
        self.counters["blocks_spilled"] += 1
        self.counters["bytes_written"] += size

    def _ensure_buffers(self, size: int) -> None:
        if self._bufs and len(self._bufs[0][0]) >= size:
            return
        self._drain_ahead()
        self._bufs = []
        for _ in range(3):
            # page-aligned, as O_DIRECT requires; private, as shared anonymous memory is unreclaimable page cache
            mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self._bufs.append((mm, torch.frombuffer(mm, dtype=torch.uint8)))

    # ------------------------------------------------------------------------------------------ reading

    def _submit(self, layer: int, bi: int) -> Future:
        """Read a spilled block into the next read buffer in a thread; the future gives (k, v) views."""
        block, file = self.blocks[layer][bi], self._file
        shape_k, shape_v, dtype = self._shapes[layer]
        kb = _numel(shape_k) * dtype.itemsize
        vb = _numel(shape_v) * dtype.itemsize
        size = _aligned(kb + vb)
        mm, t = self._bufs[1 + self._turn]
        self._turn ^= 1

        def read():
            file.read(memoryview(mm)[:size], block.offset)
            return t[:kb].view(dtype).view(shape_k), t[kb : kb + vb].view(dtype).view(shape_v)

        self.counters["bytes_read"] += size
        return self._pager.submit(read)

    def _wait(self, fut: Future) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        out = fut.result()
        self.counters["read_wait_s"] += time.perf_counter() - t0
        return out

    def _drain_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead[1].result()  # its buffer must not be written by a later read while this one runs
            self._ahead = None

    def _stream(self, layer: int, idxs: range, device: torch.device):
        """Yield (block index, k, v) in order; the next spilled block is read while this one is used."""
        spilled = [i for i in idxs if self.blocks[layer][i].k is None]
        pending = None
        if spilled:
            if self._ahead is not None and self._ahead[0] == (layer, spilled[0]):
                pending, self._ahead = self._ahead[1], None
            else:
                self._drain_ahead()
                pending = self._submit(layer, spilled[0])
        j = 0
        try:
            for i in idxs:
                block = self.blocks[layer][i]
                if block.k is not None:
                    yield i, block.k, block.v
                    continue
                k, v = self._wait(pending)
                j += 1
                pending = self._submit(layer, spilled[j]) if j < len(spilled) else None
                yield i, k.to(device), v.to(device)
        finally:  # a consumer that stops early must not leave a read running into a buffer in rotation
            if pending is not None:
                pending.result()

    def _read_ahead(self, layer: int) -> None:
        """Start reading the first spilled block the next layer will need, while the MLP/experts run."""
        if self._file is None or self._ahead is not None:
            return
        start, window, p = self.length[layer], self._windows[layer], self.block_size
        lo = 0 if window is None else max(0, start - window + 1)
        for i in range(lo // p, len(self.blocks[layer])):
            if self.blocks[layer][i].k is None:
                self._ahead = ((layer, i), self._submit(layer, i))
                return
            return  # the first block in reach is resident: nothing to hide

    def layer_shapes(self, layer: int) -> tuple[tuple, tuple, torch.dtype] | None:
        """(block k shape [B, Hk, P, Dk], block v shape [B, Hk, P, Dv], dtype), once the layer holds data."""
        return self._shapes[layer]

    def layer_blocks(self, layer: int):
        """Yield (k, v) per block of a layer, trimmed to the stored length; views valid until the next one."""
        n, p = self.length[layer], self.block_size
        for i, k, v in self._stream(layer, range((n + p - 1) // p), torch.device("cpu")):
            take = min(p, n - i * p)
            yield k[:, :, :take], v[:, :, :take]

    @torch.inference_mode()
    def truncate(self, n: int) -> None:
        """Keep only the first n positions of every layer (to reuse a shared prefix)."""
        if not 0 <= n <= self.seq_len:
            raise ValueError(f"cannot truncate a cache of {self.seq_len} positions to {n}")
        self._drain_ahead()
        p = self.block_size
        for layer, blocks in enumerate(self.blocks):
            keep = (n + p - 1) // p
            for bi in range(keep, len(blocks)):
                self._drop(layer, bi)
            del blocks[keep:]
            if n % p:  # the last kept block becomes the writable tail: it must be resident and not spillable
                self._full.pop((layer, keep - 1), None)
                tail = blocks[keep - 1]
                if tail.k is None:
                    k, v = self._wait(self._submit(layer, keep - 1))
                    fresh = self._new_block(k, v)
                    fresh.k.copy_(k)
                    fresh.v.copy_(v)
                    blocks[keep - 1] = fresh
            self.length[layer] = n

    def _drop(self, layer: int, bi: int) -> None:
        block = self.blocks[layer][bi]
        self._full.pop((layer, bi), None)
        if block.k is not None:
            self.resident_bytes -= _nbytes(block.k) + _nbytes(block.v)
            self._pool.append((block.k, block.v))

    def close(self) -> None:
        """Stop the reader thread and close the spill file (also done when the cache is collected)."""
        self._drain_ahead()
        if self._file is not None:
            _shutdown(self._pager, self._file)


def _shutdown(pager: ThreadPoolExecutor, file: SpillFile) -> None:
    pager.shutdown(wait=True)
    file.close()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
