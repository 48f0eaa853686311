"""Throughput of moepager's range reader (system/direct_reader.py) against plain buffered reads.

Reads a whole ~1 GiB file in shuffled requests of each size with 1/2/4 threads, the page cache dropped
before every run, and prints GB/s and CPU seconds per GB for:
  direct    DirectReader: O_DIRECT preadv into each thread's aligned staging buffer
  fallback  DirectReader(direct=False): buffered preadv + POSIX_FADV_DONTNEED (used where O_DIRECT is refused)
  buffered  plain buffered preadv into a reused buffer (the page cache keeps what was read)

    python benchmarks/reader_bandwidth.py [--file PATH] [--size-gib 1] [--requests-mib 1,4,16] [--threads 1,2,4]

Dropping caches needs root (`echo 3 > /proc/sys/vm/drop_caches`); without it the file is evicted with
POSIX_FADV_DONTNEED instead, which is equivalent for this one file.
"""

from __future__ import annotations

import argparse
import os
import random
import threading
import time
from pathlib import Path

from moepager.system.direct_reader import DirectReader, aligned_buffer

MiB = 1 << 20


def make_file(path: Path, nbytes: int) -> None:
    if path.exists() and path.stat().st_size == nbytes:
        return
    chunk = os.urandom(16 * MiB)  # incompressible; repeated chunks are fine for a read benchmark
    with open(path, "wb") as f:
        for _ in range(nbytes // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def drop_caches(path: Path) -> str:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return "fadvise"


def run(mode: str, path: Path, request: int, threads: int) -> tuple[float, float]:
    """-> (seconds, CPU seconds) to read the whole file once."""
    size = path.stat().st_size
    offsets = list(range(0, size - request + 1, request))
    random.Random(0).shuffle(offsets)
    lock = threading.Lock()
    reader = DirectReader(direct=mode == "direct", buffer_bytes=request) if mode != "buffered" else None
    fd = os.open(path, os.O_RDONLY) if mode == "buffered" else -1

    def worker():
        buf = memoryview(aligned_buffer(request)) if reader is None else None
        while True:
            with lock:
                if not offsets:
                    return
                off = offsets.pop()
            if reader is not None:
                reader.read(path, off, request)
            else:
                os.preadv(fd, [buf], off)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    t0, c0 = time.perf_counter(), time.process_time()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    if reader is not None:
        reader.close()
    if fd >= 0:
        os.close(fd)
    return seconds, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--file", default="/tmp/moepager-reader-bench.bin")
    p.add_argument("--size-gib", type=float, default=1.0)
    p.add_argument("--requests-mib", default="1,4,16")
    p.add_argument("--threads", default="1,2,4")
    p.add_argument("--modes", default="direct,fallback,buffered")
    p.add_argument("--keep", action="store_true", help="keep the test file")
    args = p.parse_args()
    path = Path(args.file)
    make_file(path, int(args.size_gib * 1024) * MiB)
    print(
        f"file {path}: {path.stat().st_size / 2**30:.2f} GiB; GB/s = 1e9 bytes/s; cpu = CPU seconds per GB read"
    )
    print(f"{'mode':<9} {'request':>8} {'threads':>7} {'GB/s':>6} {'cpu s/GB':>8}  cache drop")
    try:
        for mode in args.modes.split(","):
            for req in (int(x) * MiB for x in args.requests_mib.split(",")):
                for n in (int(x) for x in args.threads.split(",")):
                    how = drop_caches(path)
                    seconds, cpu = run(mode, path, req, n)
                    gb = path.stat().st_size // req * req / 1e9
                    print(
                        f"{mode:<9} {req // MiB:>6}Mi {n:>7} {gb / seconds:>6.2f} {cpu / gb:>8.3f}  {how}",
                        flush=True,
                    )
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
