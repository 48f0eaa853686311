"""The local tier of a model fetched from the hub: a checkpoint folder that fills progressively.

The folder mirrors the repository at one commit: config and tokenizer files, and each .safetensors file at its
full size with its header and dense tensors written and its experts' bytes as holes (a sparse file: holes take
no disk) until an expert is fetched. So a complete mirror is a plain checkpoint folder, and reading an expert
is Checkpoint's O_DIRECT read at the same offsets as on the hub.

What is there is told by an append-only journal (`.moepager/journal`), never by the bytes: an expert counts
only after its bytes are written and fsynced and then its line (with its crc32) is appended and fsynced, so
an expert cut off by a crash or a failed fetch is never used (it is fetched again). Evicting writes its line
first, then punches the expert's bytes out of the file (fallocate PUNCH_HOLE), so the disk budget is real.
One process owns a mirror at a time (an exclusive lock), since an eviction must not pull bytes from under
another process's read.

It does not fetch (hub.py does) and does not decode experts (Checkpoint does).
"""

from __future__ import annotations

import fcntl
import os
import threading
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptFile, MoepagerError
from ..system.durable import punch_hole, write_atomic

STATE_DIR = ".moepager"
JOURNAL = "journal"
MAGIC = "moepager-local-tier 1"
Key = tuple[int, int]


@dataclass(frozen=True, order=True)
class Piece:
    """One tensor's bytes in one file of the mirror (same name and offset as on the hub)."""

    file: str
    offset: int
    nbytes: int


class LocalMirror:
    """The journal and the sparse files of one mirror folder. Thread-safe. Open with LocalMirror.open: one
    instance per folder and process, shared by every source opened on it."""

    _open: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
    _open_lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, pieces: dict[Key, list[Piece]], disk_budget: int | None = None) -> LocalMirror:
        with cls._open_lock:
            mirror = cls._open.get(path.resolve())
            if mirror is None or mirror.closed:
                mirror = cls(path, pieces, disk_budget)
                cls._open[path.resolve()] = mirror
            elif disk_budget is not None:
                mirror.disk_budget = disk_budget
            return mirror

    def __init__(self, path: Path, pieces: dict[Key, list[Piece]], disk_budget: int | None = None):
        self.path = path
        self.pieces = {k: sorted(v, key=lambda p: (p.file, p.offset)) for k, v in pieces.items()}
        self.disk_budget = disk_budget
        self.lock = threading.Lock()
        self._lockfile = _lock_exclusively(path / STATE_DIR / "lock")
        self.committed: dict[Key, int] = {}  # key -> crc32, in the order they were committed
        self.uses: dict[Key, int] = {}  # reads in this process: the least used go first when space is needed
        self.held: dict[Key, int] = {}  # keys being fetched or read: never evicted
        self.dense_crc: int | None = None
        self.evictions = 0
        self._fds: dict[str, int] = {}
        self.closed = False
        self._replay()

    # -------------------------------------------------------------------------------- journal

    def _replay(self) -> None:
        path = self.path / STATE_DIR / JOURNAL
        lines = path.read_text().split("\n") if path.exists() else []
        if not lines or lines[0] != MAGIC:
            raise CorruptFile(f"{path}: not a moepager local tier journal; delete {self.path} to fetch again")
        complete = lines[1:-1]  # the last element is "" after a whole line, or a line cut by a crash: ignored
        damaged = False
        for line in complete:
            f = line.split()
            try:
                if f[0] == "dense":
                    self.dense_crc = int(f[1])
                elif f[0] == "c" and (int(f[1]), int(f[2])) in self.pieces:
                    key = (int(f[1]), int(f[2]))
                    self.committed.pop(key, None)
                    self.committed[key] = int(f[3])
                elif f[0] == "e":
                    self.committed.pop((int(f[1]), int(f[2])), None)
            except (IndexError, ValueError):
                damaged = True
        if damaged:  # a lost eviction line would leave holes counted as experts: keep only those that check
            for key in [k for k, crc in self.committed.items() if crc_of(self.path, self.pieces[k]) != crc]:
                del self.committed[key]
        if len(complete) > 2 * len(self.committed) + 1024 or lines[-1] or damaged:
            self._compact()
        self._journal = open(path, "a")

    def _compact(self) -> None:
        """Rewrite the journal as what it says now (temporary name, fsync, rename)."""
        lines = [MAGIC] + ([f"dense {self.dense_crc}"] if self.dense_crc is not None else [])
        lines += [f"c {k[0]} {k[1]} {crc}" for k, crc in self.committed.items()]
        write_atomic(self.path / STATE_DIR / JOURNAL, ("\n".join(lines) + "\n").encode())

    def _append(self, lines: list[str]) -> None:
        self._journal.write("".join(line + "\n" for line in lines))
        self._journal.flush()
        os.fsync(self._journal.fileno())

    # -------------------------------------------------------------------------------- files

    def fd(self, name: str) -> int:
        with self.lock:
            if name not in self._fds:
                self._fds[name] = os.open(self.path / name, os.O_WRONLY)
            return self._fds[name]

    def write(self, name: str, offset: int, data: memoryview) -> None:
        fd, done = self.fd(name), 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)

    def sync(self, ranges: list[Piece]) -> None:
        """Make written bytes durable, then drop them from the page cache (they are read back with O_DIRECT)."""
        for name in sorted({r.file for r in ranges}):
            os.fdatasync(self.fd(name))
        for r in ranges:
            os.posix_fadvise(self.fd(r.file), r.offset, r.nbytes, os.POSIX_FADV_DONTNEED)

    # -------------------------------------------------------------------------------- experts

    def has(self, key: Key) -> bool:
        return key in self.committed

    def nbytes(self, key: Key) -> int:
        return sum(p.nbytes for p in self.pieces[key])

    def stored_bytes(self) -> int:
        """Expert bytes committed (what the disk budget counts)."""
        with self.lock:
            return sum(self.nbytes(k) for k in self.committed)

    def commit(self, crcs: dict[Key, int]) -> None:
        """Experts whose bytes are written and synced (see sync) now count."""
        if not crcs:
            return
        with self.lock:
            self._append([f"c {k[0]} {k[1]} {crc}" for k, crc in crcs.items()])
            self.committed.update(crcs)

    def commit_dense(self, crc: int) -> None:
        with self.lock:
            self._append([f"dense {crc}"])
            self.dense_crc = crc

    def hold(self, keys: list[Key]) -> None:
        with self.lock:
            for k in keys:
                self.held[k] = self.held.get(k, 0) + 1

    def release(self, keys: list[Key], used: bool) -> None:
        with self.lock:
            for k in keys:
                n = self.held[k] - 1
                if n:
                    self.held[k] = n
                else:
                    del self.held[k]
                if used:
                    self.uses[k] = self.uses.get(k, 0) + 1

    def make_room(self, incoming: int) -> None:
        """Evict the least used experts (then the longest stored) until `incoming` more bytes fit the disk
        budget. Experts being read or fetched stay; if they alone exceed it the budget is overrun for a while."""
        if self.disk_budget is None:
            return
        with self.lock:
            over = sum(self.nbytes(k) for k in self.committed) + incoming - self.disk_budget
            if over <= 0:
                return
            order = {k: i for i, k in enumerate(self.committed)}
            victims = []
            for k in sorted(self.committed, key=lambda k: (self.uses.get(k, 0), order[k])):
                if over <= 0:
                    break
                if k not in self.held:
                    victims.append(k)
                    over -= self.nbytes(k)
            if not victims:
                return
            # forgotten before their bytes go: a crash in between leaves no damaged expert on the books
            self._append([f"e {k[0]} {k[1]}" for k in victims])
            for k in victims:
                del self.committed[k]
                self.uses.pop(k, None)
        for k in victims:
            for p in self.pieces[k]:
                punch_hole(self.fd(p.file), p.offset, p.nbytes)
        self.evictions += len(victims)

    def forget(self, keys: list[Key]) -> None:
        """Drop experts from the journal (a failed check): they are fetched again when needed."""
        with self.lock:
            self._append([f"e {k[0]} {k[1]}" for k in keys])
            for k in keys:
                self.committed.pop(k, None)

    def disk_usage(self) -> int:
        """Bytes the mirror's files really take on disk (holes excluded)."""
        return sum(p.stat().st_blocks * 512 for p in self.path.iterdir() if p.is_file())

    def __del__(self):
        if not getattr(self, "closed", True):
            self.close()

    def close(self) -> None:
        with self.lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._journal.close()
            self._lockfile.close()
            self.closed = True


def crc_of(path: Path, pieces: list[Piece]) -> int:
    """crc32 of the pieces' bytes read back from a mirror folder, in order."""
    from ..system.safetensors import read_bytes

    crc = 0
    for p in pieces:
        crc = zlib.crc32(read_bytes(path / p.file, p.offset, p.nbytes), crc)
    return crc


def _lock_exclusively(path: Path):
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise MoepagerError(
            f"{path.parent.parent} is in use by another moepager process; wait for it to end, or give "
            f"another --local-store"
        ) from None
    return f
