"""One benchmark run in a child process under a memory cap that counts the page cache.

Owns the cgroup v1 memory group (`/sys/fs/cgroup/memory/<name>`: limit, peak usage, failcnt), dropping the
page cache before a run, and the fallback where cgroups are unavailable (peak RSS of the child plus the
model's pages left in the page cache, read with `fincore`). It does not know what the child runs.
"""

from __future__ import annotations

import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

CG_ROOT = Path("/sys/fs/cgroup/memory")


def cgroup_unavailable_reason() -> str | None:
    """None when a v1 memory cgroup can be made here, else why not."""
    if not (CG_ROOT / "memory.limit_in_bytes").exists():
        return f"no cgroup v1 memory controller at {CG_ROOT}"
    if not os.access(CG_ROOT, os.W_OK):
        return f"{CG_ROOT} is not writable (needs root)"
    return None


def drop_page_cache(files: list[Path], everything: bool = True) -> str:
    """Empty the page cache (root), else evict just `files` with fadvise; returns which was done."""
    os.sync()
    try:
        if not everything:
            raise PermissionError
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "fadvise_dontneed"


def cached_bytes(files: list[Path]) -> int | None:
    """Bytes of `files` in the page cache, by `fincore` (util-linux); None when it is missing."""
    exe = shutil.which("fincore")
    if not exe or not files:
        return None
    out = subprocess.run([exe, "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, files)],
                         capture_output=True, text=True, check=False)  # fmt: skip
    try:
        return sum(int(x) for x in out.stdout.split())
    except ValueError:
        return None


class MemoryCgroup:
    def __init__(self, name: str, limit_bytes: int):
        self.path = CG_ROOT / name
        if self.path.exists():
            self.path.rmdir()
        self.path.mkdir()
        self._write("memory.limit_in_bytes", limit_bytes)
        try:  # no swap escape either (the machine has none, but a cap should mean it)
            self._write("memory.memsw.limit_in_bytes", limit_bytes)
        except OSError:
            pass

    def _write(self, name: str, value) -> None:
        (self.path / name).write_text(f"{value}\n")

    def _read(self, name: str) -> int:
        return int((self.path / name).read_text().split()[0])

    def add_self(self) -> None:
        """Called in the child between fork and exec, so everything it touches is charged here."""
        (self.path / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def usage(self) -> dict:
        stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        oom = dict(line.split() for line in (self.path / "memory.oom_control").read_text().splitlines())
        return {
            "peak_bytes": self._read("memory.max_usage_in_bytes"),
            "failcnt": self._read("memory.failcnt"),
            "oom_kills": int(oom.get("oom_kill", 0)),
            "cache_bytes_at_end": int(stat.get("total_cache", stat.get("cache", 0))),
        }

    def close(self) -> None:
        for _ in range(50):  # the kernel may take a moment to release the exited child
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def run_command_json(args: list[str], cap_bytes: int | None, files: list[Path]) -> tuple[dict, float]:
    """`moepager ARGS` (a command that prints one JSON object) in a fresh process, the page cache of `files`
    dropped first, in a memory cgroup capped at cap_bytes when given: (that object, wall seconds)."""
    drop_page_cache(files)
    group = MemoryCgroup(f"moepager-command-{time.monotonic_ns()}", cap_bytes) if cap_bytes else None
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "moepager", *args], capture_output=True, text=True,
                              preexec_fn=group.add_self if group else None)  # fmt: skip  # noqa: PLW1509
    finally:
        if group:
            group.close()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"moepager {shlex.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("{"))), wall


def run_isolated(spec: dict, cap_bytes: int | None, use_cgroup: bool, files: list[Path], work: Path,
                 timeout_s: float = 1800, drop_all: bool = True) -> dict:  # fmt: skip
    """Run worker.py on `spec` in a child under the cap; returns its result plus memory facts."""
    work.mkdir(parents=True, exist_ok=True)
    tag = f"moepager-bench-{os.getpid()}-{time.monotonic_ns()}"
    spec_file, result_file, log_file = (
        work / f"{tag}.spec.json",
        work / f"{tag}.result.json",
        work / f"{tag}.log",
    )
    spec_file.write_text(json.dumps(spec))
    dropped = drop_page_cache(files, drop_all)
    group = MemoryCgroup(tag, cap_bytes) if use_cgroup and cap_bytes else None
    # the worker as a file: `-m moepager.bench.worker` would import torch into every run (see worker.py)
    cmd = [sys.executable, str(Path(__file__).with_name("worker.py")), str(spec_file), str(result_file)]
    t0 = time.perf_counter()
    # Spinning OpenMP barriers collapse when the cores are shared (a 2-thread matvec waits on a descheduled
    # partner): measured 300x slower decode on a busy 2-core machine. Passive waiting, for every engine alike.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    with open(log_file, "w") as log:
        # preexec_fn, not a later write of the pid: the child must be in the group before it touches anything
        # (the harness starts its runs from one thread, so the fork-with-threads hazard does not apply)
        add_self = group.add_self if group else None
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=add_self)  # noqa: PLW1509
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        except BaseException:  # interrupted: leave no child and no cgroup behind
            proc.kill()
            proc.wait()
            if group:
                group.close()
            raise
    wall = time.perf_counter() - t0
    child_maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # max over children so far
    out = json.loads(result_file.read_text()) if result_file.exists() else {}
    out.update(
        wall_s=wall, returncode=rc, page_cache_dropped_by=dropped, omp_wait_policy=env["OMP_WAIT_POLICY"]
    )
    if group:
        out["memory"] = {"method": "cgroup_v1", "cap_bytes": cap_bytes, **group.usage()}
        group.close()
    else:
        rss = out.get("maxrss_bytes", child_maxrss)
        cached = cached_bytes(files)
        out["memory"] = {"method": "rss+fincore (no cgroup: not capped, page cache estimated after the run)",
                         "cap_bytes": None, "peak_bytes": rss + (cached or 0), "rss_bytes": rss,
                         "model_cached_bytes": cached}  # fmt: skip
    if rc != 0 and out.get("status") in (None, "ok"):
        oom = out["memory"].get("oom_kills", 0) > 0 or rc in (-9, 137)
        out["status"] = "oom" if oom and group else "error"
        tail = log_file.read_text()[-1500:] if log_file.exists() else ""
        out["message"] = ("killed at the memory cap" if out["status"] == "oom" else f"exit code {rc}") + (
            f": {tail.strip().splitlines()[-1]}" if tail.strip() and out["status"] != "oom" else "")  # fmt: skip
    if out.get("status") in ("ok", "skipped"):  # keep the files of failed runs only
        for f in (spec_file, result_file, log_file):
            f.unlink(missing_ok=True)
    else:
        out["log"] = str(log_file)
    return out
