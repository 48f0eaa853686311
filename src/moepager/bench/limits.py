"""The physical side of a benchmark: disk read bandwidth as measured, and what machine this is.

Bandwidth is read the way a good pager would read: O_DIRECT (no page cache), large requests, a few threads
in parallel, over the model's own files. Where O_DIRECT is refused, buffered reads after evicting the
files from the page cache are used instead and the result says so.
"""

from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import torch

from ..system.direct_reader import aligned_buffer

ALIGN = 4096


def _open(path: Path) -> tuple[int, bool]:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT), True
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return fd, False


def disk_bandwidth(
    files: list[Path], total_bytes: int = 2 << 30, request: int = 32 << 20, threads: int = 3
) -> dict:
    """Read `total_bytes` of `files` in `request`-sized pieces spread over them; returns bytes/s and how."""
    sizes = [(f, f.stat().st_size) for f in files if f.stat().st_size >= request]
    if not sizes:  # small models: read whole files in smaller pieces
        request = max(ALIGN, min(f.stat().st_size for f in files) // ALIGN * ALIGN)
        sizes = [(f, f.stat().st_size) for f in files if f.stat().st_size >= request]
    jobs = []  # (file, offset) spread evenly over every file, interleaved
    per_file = max(1, total_bytes // request // len(sizes))
    for f, size in sizes:
        slots = max(1, (size - request) // request)
        step = max(1, slots // per_file)
        jobs += [(f, (i * step % slots) * request // ALIGN * ALIGN) for i in range(min(per_file, slots))]
    jobs = sorted(jobs, key=lambda j: (j[1], str(j[0])))
    fds = {f: _open(f) for f, _ in sizes}
    lock, done = threading.Lock(), [0]

    def worker():
        buf = aligned_buffer(request)
        while True:
            with lock:
                if not jobs:
                    return
                f, off = jobs.pop()
            n = os.preadv(fds[f][0], [buf], off)
            with lock:
                done[0] += n

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - t0
    direct = all(d for _, d in fds.values())
    for fd, _ in fds.values():
        if not direct:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return {"bytes_per_s": done[0] / seconds, "bytes": done[0], "seconds": seconds, "request_bytes": request,
            "threads": threads, "method": "O_DIRECT" if direct else "buffered after fadvise(DONTNEED)"}  # fmt: skip


def _cmd(*args: str) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine(model_path: Path) -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    mem = next(int(ln.split()[1]) * 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
               if ln.startswith("MemTotal"))  # fmt: skip
    df = _cmd("df", "--output=source,fstype,size", str(model_path)).splitlines()
    device = df[-1].split()[0] if df else ""
    disk = _cmd("lsblk", "-dno", "NAME,SIZE,ROTA,MODEL", device) if device.startswith("/dev/") else ""
    commit = _cmd("git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD")
    return {
        "cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "ram_bytes": mem,
        "disk": f"{' '.join(df[-1].split()) if df else '?'} ({disk or 'no lsblk info'})",
        "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
        "moepager_commit": commit,
    }  # fmt: skip
