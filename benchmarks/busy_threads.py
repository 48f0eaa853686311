"""ggml's thread count on a quiet machine and beside busy processes: the count chosen by measured speed
(kernels/thread_choice.py) against all cores throughout, each in a fresh process, alternating, seeded sampled
decode with every expert resident. The busy processes are plain Python spin loops this script starts and
stops by process id.

    python benchmarks/busy_threads.py MODEL.gguf [--busy 2] [--rounds 2] [--generations 8] [--tokens 33]

Prints a markdown table: decode tok/s (median of the generations, then of the rounds) per machine state and
mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

DECODE = """
import json, statistics, sys, time
import moepager
from moepager.kernels import thread_choice
model, mode, generations, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "all cores":
    thread_choice.ThreadChoice.record = lambda *a: None  # the count it starts with: every core
engine = moepager.load(model)
rates = []
for seed in range(generations):
    stream = engine.stream(list(range(100, 116)), tokens + 1, temperature=1.0, seed=seed, stop_ids=[])
    next(stream)  # prefill and the first token
    start = time.perf_counter()
    rates.append(sum(1 for _ in stream) / (time.perf_counter() - start))
print(json.dumps(statistics.median(rates)))
"""
SPIN = "while True: pass"
MODES = ("all cores", "measured")


def decode(model: str, mode: str, generations: int, tokens: int) -> float:
    out = subprocess.run([sys.executable, "-c", DECODE, model, mode, str(generations), str(tokens)],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--busy", type=int, default=2, help="spinning processes beside the engine when busy")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--tokens", type=int, default=33)
    args = p.parse_args()
    results: dict[tuple[str, str], list[float]] = {}
    for state in ("quiet", f"{args.busy} busy processes"):
        spinners = [
            subprocess.Popen([sys.executable, "-c", SPIN])
            for _ in range(args.busy if state != "quiet" else 0)
        ]
        try:
            for _ in range(args.rounds):
                for mode in MODES:
                    rate = decode(args.model, mode, args.generations, args.tokens)
                    results.setdefault((state, mode), []).append(rate)
                    print(f"{state}, {mode}: {rate:.1f} tok/s", file=sys.stderr)
        finally:
            for s in spinners:
                s.kill()
                s.wait()
    print(f"`python benchmarks/busy_threads.py {args.model} --busy {args.busy} --rounds {args.rounds} "
          f"--generations {args.generations} --tokens {args.tokens}`\n")  # fmt: skip
    print(
        "| machine | ggml threads | decode tok/s per round | median | measured / all cores |\n| --- | --- | --- | --- | --- |"
    )
    for state in dict.fromkeys(s for s, _ in results):
        base = statistics.median(results[state, "all cores"])
        for mode in MODES:
            rates = results[state, mode]
            med = statistics.median(rates)
            print(
                f"| {state} | {mode} | {', '.join(f'{r:.1f}' for r in rates)} | {med:.1f} | {med / base:.2f}x |"
            )


if __name__ == "__main__":
    main()
