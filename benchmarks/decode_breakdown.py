"""Where a decoded token's time goes: kernel calls by matrix shape (eager path) or the compiled decode step's
two calls (model/fused_decode.py), the sampler, and the host time between them (Python, torch's small ops, kernel
wrappers), sampled decoding (seeded), every expert resident. Timers sit around each kernel call and the
sampler only, so what they add is a few perf_counter calls per kernel.

    python benchmarks/decode_breakdown.py MODEL [--eager] [--memory-limit 400MiB] [--tokens 64] [--prompt-tokens 16] [--rounds 3]

--eager: the model's own forward (torch ops and a kernel call per product), not the compiled step.
--memory-limit: experts paged as `moepager run --memory-limit` pages them; the step graph's host nodes (holding
each layer's experts, reading the missing ones) get a row of their own. Every round decodes the same prompt and
seed, so after the first (not counted) the cache holds what a round reads: the warm cost of a token.

Prints a markdown table (median round): ms per token and share of the token for each part.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import moepager
from moepager.generation import generate
from moepager.kernels import decode_step, ggml, matvec
from moepager.model.decoder import Transformer


def instrument(spent: dict) -> None:
    """Accumulate seconds per label into `spent` around every numba matvec, ggml graph and sampler call."""
    kernel = matvec._kernel()

    def timed_matvec(w, x, slots, out):
        t = time.perf_counter()
        kernel(w, x, slots, out)
        rows, cols = w.shape[1], w.shape[2]
        label = f"matvec {rows}x{cols}" + (f" x{slots.shape[1]} experts" if w.shape[0] > 1 else "")
        spent[label] += time.perf_counter() - t

    matvec._compiled = timed_matvec
    call = ggml._Graph.__call__

    def timed_graph(self, out, *inputs):
        t = time.perf_counter()
        y = call(self, out, *inputs)
        shape = tuple(o.shape for o in out) if isinstance(out, tuple) else tuple(out.shape)  # several outputs
        spent[f"ggml {shape}"] += time.perf_counter() - t
        return y

    ggml._Graph.__call__ = timed_graph
    for name, label in (
        ("layers_step", "compiled step: every layer"),
        ("head_step", "compiled step: output head"),
    ):
        step = getattr(decode_step, name)

        def timed_step(*args, step=step, label=label):
            t = time.perf_counter()
            step(*args)
            spent[label] += time.perf_counter() - t

        setattr(decode_step, name, timed_step)
    sample = generate.sample

    def timed_sample(*args, **kwargs):
        t = time.perf_counter()
        y = sample(*args, **kwargs)
        spent["sampler (softmax, draw)"] += time.perf_counter() - t
        return y

    generate.sample = timed_sample


def instrument_holds(engine, spent: dict) -> None:
    """Time the host nodes of a paged step graph (holding a layer's experts, reading those missing) apart from
    the graph call around them: they run inside it, so the graph's row is its call less these. A layer whose
    experts the graph found in the cache's table enters no node; its bookkeeping after the graph (step_found) is
    in the same row."""
    experts = engine.experts
    for name in ("hold_step", "release_step", "step_found"):
        method = getattr(experts, name)

        def timed(*args, method=method, **kwargs):
            t = time.perf_counter()
            y = method(*args, **kwargs)
            seconds = time.perf_counter() - t
            spent["host nodes: hold, read misses, release"] += seconds
            if name == "hold_step":  # the rest runs after the graph
                spent["inside graph"] -= seconds
            return y

        setattr(experts, name, timed)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--eager", action="store_true", help="the model's own forward, not the compiled step")
    p.add_argument("--memory-limit", help="what `moepager run --memory-limit` is given (the experts paged)")
    args = p.parse_args()
    engine = moepager.load(args.model, memory_limit=args.memory_limit)
    if args.eager:
        engine.model.__class__ = Transformer
    prompt = list(range(100, 100 + args.prompt_tokens))
    spent: dict[str, float] = defaultdict(float)

    def decode() -> tuple[float, dict]:
        stream = engine.stream(prompt, args.tokens + 1, temperature=1.0, seed=0, stop_ids=[])
        next(stream)  # prefill and the first token: not counted
        spent.clear()
        t = time.perf_counter()
        n = sum(1 for _ in stream)
        return (time.perf_counter() - t) / n, {k: v / n for k, v in spent.items()}

    instrument(spent)
    if hasattr(engine.experts, "hold_step"):
        instrument_holds(engine, spent)
    decode()  # warm
    total, parts = sorted((decode() for _ in range(args.rounds)), key=lambda r: r[0])[args.rounds // 2]
    if "inside graph" in parts:  # the host nodes' seconds, taken off the graph's row
        graph = next(k for k in parts if k.startswith("ggml"))
        parts[graph] += parts.pop("inside graph")
    parts["host: Python, torch ops, kernel wrappers"] = total - sum(parts.values())
    path = "eager" if type(engine.model) is Transformer else type(engine.model).__name__
    print(
        f"{args.model} ({path}): {total * 1e3:.2f} ms/token ({1 / total:.1f} tok/s), median of {args.rounds} rounds"
    )
    print("| part | ms/token | share |\n| --- | --- | --- |")
    for k, v in sorted(parts.items(), key=lambda i: -i[1]):
        print(f"| {k} | {v * 1e3:.2f} | {v / total:.0%} |")
    kernels = sum(v for k, v in parts.items() if k.startswith(("matvec", "ggml", "compiled")))
    print(f"| all kernel calls | {kernels * 1e3:.2f} | {kernels / total:.0%} |")


if __name__ == "__main__":
    main()
