"""GGUF block kernels (moepager.kernels.gguf) against their alternatives, on a MoE layer's decode products.

Tables, in GB/s of GGUF weight bytes (the bytes of the matrices a product uses, divided by its time, so every
column of a row compares times on the same work):
1. gathered matvec over a bank of S=128 expert matrices, K=8 per token, N=1 and 4 tokens:
   - `gguf`: gather_matvec, one call computing on the blocks;
   - `dequant+linear`: per (token, expert), dequantize that matrix, then F.linear;
   - `int4pack` (Q4_0 only): the bank repacked once into torch's int4 layout, per (token, expert)
     `aten._weight_int4pack_mm_for_cpu` with bf16 activations (scales rounded to bf16: approximate);
2. `linear` on one dense matrix for N tokens: the matvec kernel against dequantize + F.linear, the numbers
   behind gguf.LINEAR_DEQUANT_MIN_TOKENS;
3. the gathered matvec alone and right after a torch op (numba's parallel loops run on torch's OpenMP pool).

Slots are drawn at random per repetition, so the chosen matrices come from memory, not from the cache, as in
decoding. The machine is shared: run with OMP_WAIT_POLICY=ACTIVE, and compare within a row.

Usage: OMP_WAIT_POLICY=ACTIVE python benchmarks/gguf_kernels.py [--avx2] [--threads 2] [--reps 20]
[--types Q4_0,Q8_0] [--out benchmarks/gguf_kernels.md]
(--avx2: on a CPU with AVX-512, measure what the project's AVX2-only machines would run: numba compiles for
Zen 3 without AVX-512, torch dispatches its AVX2 kernels.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numba
import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from moepager.kernels import gguf as gk

SHAPES = [(1536, 2048), (2048, 768)]  # [R, C]: a gate/up and a down projection
BANK, TOP_K = 128, 8


def random_blocks(qtype: int, shape: tuple[int, ...], rng: np.random.Generator) -> torch.Tensor:
    """uint8 [*shape[:-1], row bytes]: random codes, small finite fp16 block scales (like a model's)."""
    qk, bb = gk.block_shape(qtype)
    raw = rng.integers(0, 256, (*shape[:-1], shape[-1] // qk, bb), dtype=np.uint8)
    for o in gk.FP16_FIELDS[qtype]:
        scale = (rng.standard_normal(raw.shape[:-1], dtype=np.float32) * 1e-3).astype(np.float16)
        raw[..., o : o + 2] = scale[..., None].view(np.uint8)
    return torch.from_numpy(raw.reshape(*shape[:-1], -1))


@dataclass
class Timer:
    """Seconds of the fastest of `reps` calls (as timeit: other processes on the shared machine only ever add
    time), after 0.3 s of warm-up (numba compiles or loads its cache on the first call; pools settle)."""

    reps: int

    def __call__(self, fn: Callable[[], object], reps: int | None = None) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.3:
            fn()
        times = []
        for _ in range(reps or self.reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)


def int4pack(bank: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A Q4_0 bank repacked for torch's int4 kernel: per matrix (packed codes, bf16 scales-and-zeros)."""
    out = []
    for s in range(bank.shape[0]):
        codes, d = gk.q4_0_codes(bank[s])  # [R, C], [R, C/32]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        # the kernel computes w = (code - 8) * scale + zero: scale d, zero 0, as [C/32, R, 2]
        out.append((packed, torch.stack([d.T, torch.zeros_like(d.T)], -1).to(torch.bfloat16).contiguous()))
    return out


class Gathered:
    """The ways of computing out[n, k] = dequantize(bank[slots[n, k]]) @ x[n], each taking fresh slots."""

    def __init__(self, qtype: int, bank: torch.Tensor, pack: list | None, x: torch.Tensor, draws: list):
        self.qtype, self.bank, self.pack, self.x, self.draws = qtype, bank, pack, x, draws
        self.i = 0

    def slots(self) -> torch.Tensor:
        self.i += 1
        return self.draws[self.i % len(self.draws)]

    def gguf(self) -> None:
        gk.gather_matvec(self.qtype, self.bank, self.x, self.slots())

    def dequant_linear(self) -> None:
        for n, row in enumerate(self.slots().tolist()):
            for s in row:
                F.linear(self.x[n], gk.dequantize(self.qtype, self.bank[s]))

    def int4pack(self) -> None:
        xb = self.x.to(torch.bfloat16)
        for n, row in enumerate(self.slots().tolist()):
            for s in row:
                packed, scales = self.pack[s]
                torch.ops.aten._weight_int4pack_mm_for_cpu(xb[n : n + 1], packed, 32, scales).float()


def gather_rows(qtype: int, timer: Timer, rng: np.random.Generator) -> list[dict]:
    rows = []
    for r, c in SHAPES:
        bank = random_blocks(qtype, (BANK, r, c), rng)  # [S, R, row bytes]
        pack = int4pack(bank) if qtype == Q.Q4_0 else None
        for n in (1, 4):
            draws = [torch.stack([torch.randperm(BANK)[:TOP_K] for _ in range(n)]) for _ in range(64)]
            g = Gathered(qtype, bank, pack, torch.randn(n, c), draws)
            nbytes = n * TOP_K * bank[0].numel()
            row = {"type": Q(qtype).name, "shape": f"{r}x{c}", "N": n}
            for name in ("gguf", "dequant_linear", "int4pack") if g.pack else ("gguf", "dequant_linear"):
                row[name.replace("_", "+")] = nbytes / timer(getattr(g, name)) / 1e9
            rows.append(row)
            print(row, file=sys.stderr)
    return rows


def linear_rows(qtype: int, timer: Timer, rng: np.random.Generator) -> list[dict]:
    """ms of one dense [1536, 2048] product for N tokens by each of linear()'s paths: matvec per token, and
    dequantize (in tiles) + F.linear."""
    r, c = SHAPES[0]
    w = random_blocks(qtype, (r, c), rng)
    rows = []
    for n in (1, 2, 3, 4, 6, 8, 12, 16, 64, 512):
        x = torch.randn(n, c)
        k = max(3, timer.reps // (1 + n // 8))  # fewer calls of the long ones
        matvec = timer(partial(gk._linear_matvec, qtype, gk._blocks(qtype, w), x), k)
        dequant = timer(partial(gk._linear_dequant, qtype, w, x), k)
        rows.append({"type": Q(qtype).name, "N": n, "matvec ms": matvec * 1e3, "dequant ms": dequant * 1e3})
        print(rows[-1], file=sys.stderr)
    return rows


def interplay_rows(timer: Timer, rng: np.random.Generator) -> list[dict]:
    """gather_matvec alone, and each call right after a torch op (as in a decode step)."""
    r, c = SHAPES[0]
    draws = [torch.randperm(BANK)[:TOP_K].view(1, -1) for _ in range(64)]
    g = Gathered(Q.Q4_0, random_blocks(Q.Q4_0, (BANK, r, c), rng), None, torch.randn(1, c), draws)
    a = torch.randn(c, c)

    def after_torch():
        F.linear(g.x, a)  # leaves torch's pool running (spinning, under OMP_WAIT_POLICY=ACTIVE)
        t = time.perf_counter()
        g.gguf()
        return time.perf_counter() - t

    alone = timer(g.gguf)
    after = min(after_torch() for _ in range(timer.reps))
    nbytes = TOP_K * g.bank[0].numel()
    return [{"case": "gather_matvec alone", "GB/s": nbytes / alone / 1e9},
            {"case": "right after a torch F.linear", "GB/s": nbytes / after / 1e9}]  # fmt: skip


def table(rows: list[dict], fmt: str = "{:.2f}") -> str:
    cols = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for row in rows:
        cells = [fmt.format(row[k]) if isinstance(row.get(k), float) else str(row.get(k, "")) for k in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def avx2_env() -> dict[str, str]:
    """Environment that makes numba and torch generate / pick AVX2 code on a CPU that has AVX-512 too."""
    import llvmlite.binding as llvm

    wider = ("avx512", "avx10", "amx", "avxvnni", "avxifma", "avxneconvert", "evex512")
    feats = llvm.get_host_cpu_features()
    flags = [("-" if k.startswith(wider) or not on else "+") + k for k, on in sorted(feats.items())]
    return {"NUMBA_CPU_NAME": "znver3", "NUMBA_CPU_FEATURES": ",".join(flags), "ATEN_CPU_CAPABILITY": "avx2"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--avx2", action="store_true", help="compile and dispatch for AVX2 only (see above)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--reps", type=int, default=20, help="timed calls per measurement (the fastest is shown)")
    p.add_argument(
        "--types", default=",".join(Q(t).name for t in sorted(gk.SUPPORTED)), help="comma-separated"
    )
    p.add_argument("--out", help="append the tables, as markdown, to this file")
    args = p.parse_args()
    if args.avx2 and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":  # both read it when they load: restart
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **avx2_env()})
    torch.set_num_threads(args.threads)  # the kernels follow torch's thread count
    timer = Timer(args.reps)
    rng = np.random.default_rng(0)
    types = [Q[name] for name in args.types.split(",")]
    load = os.getloadavg()[0]

    parts = [f"### Gathered matvec, S={BANK} banks, K={TOP_K} per token (GB/s, higher is better)"]
    parts.append(table([row for t in types for row in gather_rows(t, timer, rng)]))
    parts.append("### linear() on one dense 1536x2048 matrix, by each path (ms, lower is better)")
    parts.append(table([row for t in types for row in linear_rows(t, timer, rng)]))
    if args.threads > 1:
        parts.append("### gather_matvec right after a torch op (Q4_0, 1536x2048, N=1)")
        parts.append(table(interplay_rows(timer, rng)))
    env = [f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}"] if "OMP_WAIT_POLICY" in os.environ else []
    head = (
        f"## `{' '.join([*env, 'python', *sys.argv])}`\n\ntorch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}), numba {numba.__version__}, threads: {args.threads}, "
        f"best of {args.reps} calls; load average {load:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after"
    )
    text = "\n\n".join([head, *parts]) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
