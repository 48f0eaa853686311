"""Quantized expert kernels side by side, on a MoE layer's decode products at Qwen3-30B-A3B's shapes.

`out[n, k] = w[slots[n, k]] @ x[n]` over a bank of S=128 GGUF matrices (1536x2048 gate+up, 2048x768 down),
K=8 per token, N=1 and 4 tokens, fresh random slots on every call (the matrices come from memory, as in
decoding). GB/s = GGUF bytes of the N*K matrices used / time, so the columns of a row compare times on the
same work. Columns:
- `ggml`: llama.cpp's own kernels (libggml through moepager.kernels.ggml): mul_mat_id, activations rounded to
  8-bit blocks, integer dot products. What moepager runs now.
- `numba`: moepager's earlier numba kernels (fp32 activations), when `moepager.kernels.gguf` still exists
  (git history); otherwise the column is left empty.
- `dequant+linear`: per (token, expert), ggml's dequantize of that matrix, then torch's F.linear.

Usage: python benchmarks/quant_kernels.py [--threads 1,2] [--reps 20] [--types Q4_0,Q8_0,Q4_K,Q5_K,Q6_K]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from llama_numerics import random_blocks  # noqa: E402

from moepager.kernels import ggml  # noqa: E402

SHAPES = [(1536, 2048), (2048, 768)]  # [R, C]
BANK, TOP_K = 128, 8


def best_of(fn, reps: int) -> float:
    """Seconds of the fastest of `reps` calls after a warm-up (other processes only ever add time)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def rows(qtype: int, threads: int, reps: int, numba_kernels) -> list[str]:
    out = []
    rng = np.random.default_rng(0)
    for r, c in SHAPES:
        bank = torch.from_numpy(random_blocks(qtype, BANK, r, c))
        for n in (1, 4):
            x = torch.randn(n, c)
            draws = [torch.from_numpy(rng.integers(0, BANK, (n, TOP_K))) for _ in range(reps + 1)]
            it = iter(draws * 4)
            nbytes = n * TOP_K * r * bank.shape[-1]

            def dequant_linear():
                for i, row in enumerate(next(it).tolist()):
                    for s in row:
                        F.linear(x[i : i + 1], ggml.dequantize(qtype, bank[s]))

            cells = {"ggml": best_of(lambda: ggml.mul_mat_id(qtype, bank, x, next(it)), reps)}
            if numba_kernels is not None:
                cells["numba"] = best_of(lambda: numba_kernels.gather_matvec(qtype, bank, x, next(it)), reps)
            cells["dequant+linear"] = best_of(dequant_linear, max(3, reps // 4))
            gbs = {k: nbytes / t / 1e9 for k, t in cells.items()}
            numba = f"{gbs['numba']:.2f}" if "numba" in gbs else ""
            ratio = f"{gbs['ggml'] / gbs['numba']:.2f}x" if "numba" in gbs else ""
            out.append(f"| {Q(qtype).name} | {r}x{c} | {n} | {threads} | {gbs['ggml']:.2f} | {numba} | "
                       f"{gbs['dequant+linear']:.2f} | {ratio} |")  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--types", default="Q4_0,Q8_0,Q4_K,Q5_K,Q6_K")
    args = p.parse_args()
    try:
        numba_kernels = importlib.import_module("moepager.kernels.gguf")
    except ImportError:
        numba_kernels = None
    print(f"torch {torch.__version__}, best of {args.reps} calls; load average {os.getloadavg()[0]:.1f}\n")
    print("| type | shape | N | threads | ggml GB/s | numba GB/s | dequant+linear GB/s | ggml / numba |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for name in args.types.split(","):
            for line in rows(int(Q[name]), threads, args.reps, numba_kernels):
                print(line, flush=True)
    print(f"\nload average after: {os.getloadavg()[0]:.1f}; bytes per weight: "
          + ", ".join(f"{t} {GGML_QUANT_SIZES[Q[t]][1] / GGML_QUANT_SIZES[Q[t]][0]:.3f}"
                      for t in args.types.split(",")))  # fmt: skip


if __name__ == "__main__":
    main()
