"""Where a moepager decode step spends its time at one expert budget: cProfile of the decode loop plus the
cache's own counters (reads, waits). Usage:

    python benchmarks/profile_decode.py MODEL --budget 25% --tokens 8 [--prompt-tokens 16] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import moepager


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--budget", default="25%")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--resident", action="store_true", help="all experts in memory (no paging)")
    args = p.parse_args()

    engine = (
        moepager.load(args.model) if args.resident else moepager.load(args.model, expert_memory=args.budget)
    )
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, engine.config.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
    stream = engine.stream(prompt, args.tokens, stop_ids=[])
    next(stream)  # prefill, not profiled
    before = dict(engine.stats().get("experts") or {})
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    n = sum(1 for _ in stream)
    prof.disable()
    wall = time.perf_counter() - t0
    after = engine.stats().get("experts") or {}
    print(f"decode: {n} tokens in {wall:.2f} s = {wall / n * 1e3:.0f} ms/token")
    for k in ("hits", "prefetch_hits", "misses", "bytes_read", "read_s", "wait_s"):
        if k in after:
            d = after[k] - before.get(k, 0)
            per = d / n
            print(
                f"  {k:14s} {d:>14.3f}  per token {per:,.3f}"
                if isinstance(d, float)
                else f"  {k:14s} {d:>14}  per token {per:,.1f}"
            )
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(args.top)
    print(s.getvalue())


if __name__ == "__main__":
    main()
