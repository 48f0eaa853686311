"""How well `moepager plan` predicts a run: plan, then the run it suggests, side by side, at each memory limit.

    python benchmarks/plan_accuracy.py --limits 1050MiB,1100MiB            # the default model
    python benchmarks/plan_accuracy.py --real-scale                        # the 17 GB Qwen3-30B-A3B-shaped GGUF

Each row: `moepager plan MODEL --memory LIMIT ... --json` (predicted decode tokens/s over the run, its steady
state, time to first token), then the exact `moepager run` command the plan prints, with `--json`: measured
decode tokens/s and time to first token (the prefill, as `run` reports it). Both are fresh processes; the page
cache is dropped before each (root: drop_caches; else the model's files are evicted), and with --cap each runs
in a cgroup v1 memory group capped at LIMIT that counts the page cache (as benchmarks/real_scale.sh does).
Decoding is sampled at --temperature with seed = the round, so routing varies. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from moepager.bench.isolate import cgroup_unavailable_reason, run_command_json
from moepager.system.sizes import parse_bytes

REAL_SCALE = "/work/benchdata/qwen3-30b-a3b.q4_k_m.gguf"
PROMPT = "Tell me about the history of Paris."


def one_round(model: list[str], limit: str, a, seed: int, files: list[Path]) -> dict:
    cap = parse_bytes(limit) if a.cap else None
    plan_args = ["plan", *model, "--memory", limit, "--max-context", str(a.max_context), "--max-tokens",
                 str(a.tokens), "--temperature", str(a.temperature), "--seed", str(seed), "--prompt", a.prompt,
                 "--trace-tokens", str(a.trace_tokens), "--json"]  # fmt: skip
    p, plan_wall = run_command_json(plan_args, cap, files)
    run_args = [*shlex.split(p["run_command"])[1:], "--json"]
    r, run_wall = run_command_json(run_args, cap, files)
    s = r["stats"]
    return {
        "plan": p, "plan_wall_s": plan_wall, "run_wall_s": run_wall, "run_command": p["run_command"],
        "slots": (p["cache_experts"], s["experts"]["capacity"]),
        "pred_tok_s": p["decode_tokens_per_s"], "steady_tok_s": p["steady_tokens_per_s"],
        "tok_s": s["decode_tokens_per_s"], "pred_ttft": p["ttft_s"], "ttft": s["prefill_s"],
        "hit_rate": s["experts"]["hit_rate"], "decode_tokens": s["decode_tokens"],
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="a model path, or 'default' for the embedded model")
    p.add_argument("--limits", help="memory limits, comma-separated (default: 1050MiB,1100MiB; 8GiB,4GiB "
                   "with --real-scale)")  # fmt: skip
    p.add_argument("--real-scale", action="store_true", help=f"the model {REAL_SCALE}, limits 8GiB,4GiB, "
                   "--max-context 256, --cap, one round")  # fmt: skip
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=64, help="--max-tokens of plan and run (run's default)")
    p.add_argument("--trace-tokens", type=int, default=16, help="plan's --trace-tokens")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--rounds", type=int, default=2, help="plan/run pairs per limit; medians are compared")
    p.add_argument("--cap", action="store_true", help="run plan and run in a cgroup capped at the limit")
    p.add_argument("--json", help="also write every round's numbers to this file")
    a = p.parse_args()
    if a.real_scale:
        a.model, a.max_context, a.cap = REAL_SCALE, 256, True
        a.limits = a.limits or "8GiB,4GiB"
        a.rounds = 1 if a.rounds == p.get_default("rounds") else a.rounds
    a.limits = a.limits or "1050MiB,1100MiB"
    if a.cap and (why := cgroup_unavailable_reason()):
        raise SystemExit(f"--cap: {why}")
    model = [] if a.model == "default" else [a.model]
    files = [Path(a.model)] if model else []
    name = "default" if not model else Path(a.model).name
    print("| model | limit | slots (plan / run) | predicted tok/s (steady) | measured tok/s | measured / "
          "predicted | predicted TTFT s | measured TTFT s | measured / predicted | plan s / run s |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    rows = []
    for limit in a.limits.split(","):
        rounds = [one_round(model, limit, a, seed, files) for seed in range(a.rounds)]
        rows += [{"limit": limit, **r} for r in rounds]
        med = lambda k: statistics.median(r[k] for r in rounds)  # noqa: E731
        print(f"| {name} | {limit} | {rounds[0]['slots'][0]} / {rounds[0]['slots'][1]} | {med('pred_tok_s'):.2f} "
              f"({med('steady_tok_s'):.2f}) | {med('tok_s'):.2f} | {med('tok_s') / med('pred_tok_s'):.2f} | "
              f"{med('pred_ttft'):.2f} | {med('ttft'):.2f} | {med('ttft') / med('pred_ttft'):.2f} | "
              f"{med('plan_wall_s'):.0f} / {med('run_wall_s'):.0f} |", flush=True)  # fmt: skip
        print(f"  run: {rounds[0]['run_command']}", file=sys.stderr, flush=True)
        if a.json:  # after every limit: a long run interrupted keeps what it measured
            Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
