"""Torch operations and wall time per decoded token, all experts resident, sampled decoding (seeded).

Counts every torch function and tensor method the decode step calls (TorchFunctionMode), so the cost of
Python-level dispatch shows apart from the arithmetic. Usage:

    python benchmarks/count_ops.py MODEL [MODEL ...] [--tokens 16] [--prompt-tokens 16] [--budget 25%]
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

import moepager


class CountOps(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))


def measure(path: str, tokens: int, prompt_tokens: int, budget: str | None) -> dict:
    engine = moepager.load(path, expert_memory=budget) if budget else moepager.load(path)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, engine.config.vocab_size, (prompt_tokens,), generator=gen).tolist()
    sampling = dict(temperature=1.0, seed=0, stop_ids=[])
    list(engine.stream(prompt, 4, **sampling))  # warm up (kernels compiled, buffers allocated)
    stream = engine.stream(prompt, tokens + 1, **sampling)
    next(stream)  # prefill
    mode = CountOps()
    with mode:
        n = sum(1 for _ in stream)
    t0 = time.perf_counter()
    n_timed = sum(1 for _ in engine.stream(prompt, tokens + 1, **sampling)) - 1
    engine.timings.__init__()
    list(engine.stream(prompt, tokens + 1, **sampling))
    tok_s = engine.stats()["decode_tokens_per_s"]
    del t0, n_timed
    return {"model": path, "ops_per_token": sum(mode.ops.values()) / n, "decode_tok_s": tok_s,
            "top_ops": mode.ops.most_common(8)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--budget", default=None, help="expert memory (paged); default: every expert resident")
    args = p.parse_args()
    for m in args.models:
        r = measure(m, args.tokens, args.prompt_tokens, args.budget)
        top = ", ".join(f"{k} {v / args.tokens:.0f}" for k, v in r["top_ops"])
        print(f"{m}: {r['ops_per_token']:.0f} torch ops/token, decode {r['decode_tok_s']:.1f} tok/s ({top})")


if __name__ == "__main__":
    main()
