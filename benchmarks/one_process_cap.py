"""One moepager process alone in a cgroup v1 memory cap, `--memory-limit` set to the cap: decode speed, major
page faults while decoding, and what the cgroup holds (anonymous memory, page cache, mapped files).

`moepager bench` runs each engine in a worker whose parent maps torch too, and a cgroup charges a shared page to
the process that touched it first; here nothing shares the cap, as when a user runs `moepager run` in a container
of that size. Needs root (it makes the cgroup) and drops the page cache before each round.

    python benchmarks/one_process_cap.py MODEL --cap 400MiB [--tokens 129] [--streams 2] [--rounds 3] [--max-context 160]

Each round is a new process decoding `--streams` prompts one after the other (a server's later requests find the
page cache as the earlier ones left it); a line per stream.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

CG = Path("/sys/fs/cgroup/memory")

CHILD = """
import json, os, resource, sys, time, torch, moepager
model, cap, tokens, context, group, streams = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
engine = moepager.load(model, memory_limit=cap, max_context=context)
prompt = torch.randint(3, engine.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
for stream in range(streams):
    steps = engine.stream(prompt, tokens, stop_ids=[], temperature=1.0, seed=stream)
    next(steps)  # prefill and the first token
    faults, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt, time.perf_counter()
    n = sum(1 for _ in steps)
    seconds = time.perf_counter() - t0
    stat = dict(line.split() for line in open(os.path.join(group, "memory.stat")))
    print(json.dumps({"stream": stream, "tok_s": round(n / seconds, 1),
                      "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults,
                      "hit_rate": round(engine.experts.stats()["hit_rate"], 3), "experts": engine.experts.cache.capacity,
                      **{k + "_mib": int(stat[k]) >> 20 for k in ("rss", "cache", "mapped_file")}}), flush=True)
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--cap", default="400MiB")
    p.add_argument("--tokens", type=int, default=129)
    p.add_argument("--streams", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-context", type=int, default=160)
    args = p.parse_args()
    from moepager.system.sizes import format_bytes, parse_bytes

    cap = parse_bytes(args.cap, what="--cap")
    group = CG / f"moepager-one-process-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(cap))
        print(
            f"one process in a {format_bytes(cap)} cgroup, --memory-limit {args.cap}, {args.tokens} sampled tokens"
        )
        for r in range(args.rounds):
            subprocess.run(["sync"], check=True)
            Path("/proc/sys/vm/drop_caches").write_text("3")
            run = subprocess.run(
                [sys.executable, "-c", CHILD, args.model, args.cap, str(args.tokens), str(args.max_context), str(group),
                 str(args.streams)],
                preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            for line in run.stdout.strip().splitlines()[-args.streams :]:
                print(f"round {r}: {line}")
    finally:
        group.rmdir()


if __name__ == "__main__":
    main()
