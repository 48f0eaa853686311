"""How well `moepager plan` predicts decode speed: plan, then run, side by side, at each memory limit.

    python benchmarks/plan_accuracy.py --model default --limits 930MiB,970MiB --max-context 1024
    python benchmarks/plan_accuracy.py --model /work/benchdata/qwen3-64x4 --limits 950MiB,1200MiB --max-context 1024

Each row: `moepager plan MODEL --memory LIMIT --max-context C` (its predicted decode tokens/s and cache slots),
then `moepager run MODEL --memory-limit LIMIT --max-context C --no-prefetch` with seeded sampled decoding
(temperature 1, as every decode benchmark here) and its measured decode tokens/s, hit rate and slots. Both are
fresh processes, run one after the other, `--rounds` times in alternation; the medians are compared.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys


def _moepager(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "moepager", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"moepager {' '.join(args)} failed:\n{proc.stderr}")
    return proc


def plan_once(model: list[str], limit: str, ctx: int) -> dict:
    out = _moepager("plan", *model, "--memory", limit, "--max-context", str(ctx)).stdout
    return {
        "tok_s": float(re.search(r"predicted decode: ([\d.]+) tokens/s", out)[1]),
        "slots": int(re.search(r"(\d+) of (\d+) experts", out)[1]),
        "compute_ms": float(re.search(r"compute: ([\d.]+) ms", out)[1]),
        "text": out,
    }


def run_once(model: list[str], limit: str, ctx: int, tokens: int, seed: int) -> dict:
    args = [*model, "--memory-limit", limit, "--max-context", str(ctx), "--no-prefetch", "--prompt",
            "Tell me about the history of Paris.", "--max-tokens", str(tokens), "--temperature", "1",
            "--seed", str(seed), "--json"]  # fmt: skip
    stats = json.loads(_moepager("run", *args).stdout)["stats"]
    x = stats["experts"]
    return {"tok_s": stats["decode_tokens_per_s"], "slots": x["capacity"], "hit_rate": x["hit_rate"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="a model path, or 'default' for the embedded model")
    p.add_argument("--limits", required=True, help="memory limits, comma-separated")
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    model = [] if a.model == "default" else [a.model]
    print("| model | --memory-limit | slots (plan / run) | run hit rate | plan compute ms/token | predicted tok/s "
          "| measured tok/s | measured / predicted |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for limit in a.limits.split(","):
        plans, runs = [], []
        for r in range(a.rounds):
            plans.append(plan_once(model, limit, a.max_context))
            runs.append(run_once(model, limit, a.max_context, a.tokens, seed=r))
        pred = statistics.median(x["tok_s"] for x in plans)
        got = statistics.median(x["tok_s"] for x in runs)
        print(f"| {a.model} | {limit} | {plans[0]['slots']} / {runs[0]['slots']} | "
              f"{statistics.median(x['hit_rate'] for x in runs):.2f} | "
              f"{statistics.median(x['compute_ms'] for x in plans):.1f} | {pred:.2f} | {got:.2f} | "
              f"{got / pred:.2f} |", flush=True)  # fmt: skip
        print(plans[0]["text"], file=sys.stderr)


if __name__ == "__main__":
    main()
