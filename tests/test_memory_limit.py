"""--memory-limit's accounting holds in a fresh process: what the first decode steps add (the kernels' runtime,
~60 MiB, and the library pages they map back after the footprint dropped the cold ones) must already be in it.
A fresh process, because in this one earlier tests have loaded those already."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

import moepager
from moepager.errors import MoepagerError

# the peak is VmHWM, this process's own: ru_maxrss would carry the RSS of the (large) pytest process it was
# forked from across the exec
SCRIPT = """
import json, sys
import psutil
import moepager
from moepager.system.process_memory import unique_bytes
e = moepager.load(sys.argv[1], memory_limit=sys.argv[2], max_context=256, prefetch=False)
# the peak from here on: while loading, the process held library pages that the footprint then dropped
# (page_out_libraries), which a cap would have reclaimed the same way (clean pages of files)
open("/proc/self/clear_refs", "w").write("5")
for _ in e.stream([1, 2, 3, 4], 6, temperature=1.0, seed=0):
    pass
c = e.experts.cache
status = open("/proc/self/status").read().split("VmHWM:")[1]
hwm = int(status.split()[0]) * 1024
# pages pytest maps too are its own (the footprint counts only this process's: unique_bytes)
shared = psutil.Process().memory_info().rss - unique_bytes()
print(json.dumps({"planned": c.footprint["total"], "experts": c.stats()["allocated_bytes"],
                  "peak": hwm - shared}))
"""


def test_peak_stays_within_what_the_limit_planned(tiny):
    path, _ = tiny("mixtral")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path), "1GiB"], capture_output=True, text=True,
                         timeout=300, check=True)  # fmt: skip
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["peak"] <= r["planned"] + r["experts"], r


# a prompt that fills the planned context, prefilled under the limit: its chunks' activations and ggml's graphs
# for them are what the limit's buffers hold
LONG_PROMPT = """
import json, sys
import psutil
import moepager
from moepager.system.process_memory import unique_bytes
e = moepager.load(sys.argv[1], memory_limit=sys.argv[2], max_context=512, prefetch=False)
open("/proc/self/clear_refs", "w").write("5")
for _ in e.stream(list(range(100, 590)), 8, temperature=1.0, seed=0, stop_ids=[]):
    pass
c = e.experts.cache
hwm = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
shared = psutil.Process().memory_info().rss - unique_bytes()
print(json.dumps({"planned": c.footprint["total"], "experts": c.stats()["allocated_bytes"], "peak": hwm - shared,
                  "chunk": e.kv.prefill_chunk}))
"""


@pytest.fixture(scope="module")
def two_layer_gguf(tmp_path_factory):
    """The small Q4_0 file's shape (16 heads, D=512, 64 experts), two layers."""
    from moepager.synth import gguf as synth_gguf

    shape = dataclasses.replace(synth_gguf.SHAPES["qwen3-64x4"], layers=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(synth_gguf.SHAPES, "two-layer", shape)
        return synth_gguf.synth_gguf(
            tmp_path_factory.mktemp("gguf") / "m.gguf", "two-layer", "Q4_0", progress_bar=False
        )


def test_a_prompt_as_long_as_the_planned_context_stays_within_the_limit(two_layer_gguf):
    """A 490-token prompt at 512 positions of context: unbounded, its prefill chunk's attention graph alone held
    ~40 MiB, and ggml kept each chunk's graphs."""
    out = subprocess.run([sys.executable, "-c", LONG_PROMPT, str(two_layer_gguf), "1GiB"], capture_output=True, text=True,
                         timeout=300, check=True)  # fmt: skip
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["chunk"] < 490, r  # the limit chose the chunk
    assert r["peak"] <= r["planned"] + r["experts"], r


def test_a_prefill_chunk_the_limit_cannot_hold_is_refused_naming_one_it_can(two_layer_gguf):
    def load(
        limit, chunk=None
    ):  # the engine, or the error's message (its traceback, which holds a model, let go)
        try:
            return moepager.load(two_layer_gguf, memory_limit=limit, max_context=512, prefill_chunk=chunk)
        except MoepagerError as e:
            return str(e)

    limit = 64 * 2**20 + load("1GiB").experts.cache.footprint["total"]
    message = load(limit, 512)
    fits = re.fullmatch(
        r"--prefill-chunk 512: .* give --prefill-chunk (\d+) or less, or leave it out", message
    )
    assert fits and 64 <= int(fits.group(1)) < 512, message
    chunk = (
        int(fits.group(1)) // 2
    )  # the process is measured again: room for what the refused load left behind
    engine = load(limit, chunk)
    assert engine.kv.prefill_chunk == chunk == engine.experts.cache.footprint["prefill_chunk"]


# a library and a weights file of the same bytes, each mapped read-only and read through by the child alone (the
# parent, pytest, maps torch's libraries too: pages two processes map are never dropped)
LIBRARIES = """
import ctypes, json, mmap, os, sys, torch
from moepager.system.process_memory import page_out_libraries

libc = ctypes.CDLL("libc.so.6")
libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                                          ctypes.c_int, ctypes.c_long]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]

def cached(path):  # the file's bytes in the page cache, mapped or not (mincore over a new mapping)
    size, fd = os.path.getsize(path), os.open(path, os.O_RDONLY)
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    os.close(fd)
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    libc.mincore(ctypes.c_void_p(addr), size, vec)
    libc.munmap(ctypes.c_void_p(addr), size)
    return sum(v & 1 for v in vec) * mmap.PAGESIZE

def resident(path):  # the mapping's bytes in memory
    rss, name = 0, ""
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and " " in line and "-" in line.split()[0]:
            name = line.split()[-1]
        elif line.startswith("Rss:") and name == path:
            rss += int(line.split()[1]) * 1024
    return rss

maps = []
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        f.read()  # the whole file in the page cache, as readahead around a library's faults brings more than it maps
        m = mmap.mmap(f.fileno(), os.path.getsize(path) // 2, prot=mmap.PROT_READ)
    sum(m[i] for i in range(0, len(m), mmap.PAGESIZE))  # every page of the first half read: resident
    maps.append(m)
a = torch.randn(64, 64)
before = [resident(p) for p in sys.argv[1:]]
page_out_libraries()
print(json.dumps({"before": before, "after": [resident(p) for p in sys.argv[1:]],
                  "cached": [cached(p) for p in sys.argv[1:]], "same": bool(torch.equal(a @ a, a @ a))}))
"""


def test_library_pages_are_dropped_weights_stay_and_what_runs_comes_back(tmp_path):
    data = bytes(range(256)) * (8 * 2**20 // 256)
    paths = [tmp_path / "libcold.so", tmp_path / "weights.bin"]
    for p in paths:
        p.write_bytes(data)
        with open(p, "rb") as f:  # on disk, as a library is: clean pages are the ones a kernel may drop
            os.fsync(f.fileno())
    out = subprocess.run([sys.executable, "-c", LIBRARIES, *map(str, paths)], capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    r = json.loads(out.stdout.strip().splitlines()[-1])
    half = len(data) // 2
    assert r["before"] == [half, half], r
    assert r["after"] == [0, half], r
    # nor does the library stay in the page cache, mapped or not: a memory cgroup charges it there, and its
    # reclaim took the pages a run maps instead
    assert r["cached"] == [0, len(data)], r
    assert r["same"]  # torch still computes: its code faults back in from disk
