"""Speculative decoding on the real-shape GGUF under a memory cap: `moepager run` with and without --speculate,
alternating, each a fresh process in a cgroup v1 memory group capped at the limit (page cache counted), the
page cache dropped before each, seeded sampling. Prints decode tok/s, expert bytes read per generated token
(the whole run, prefill included: the same prompt for every case) and acceptance. Needs root.

    python benchmarks/speculative_real_scale.py [--model FILE] [--limit 8GiB] [--drafts self,ngram] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from moepager.bench.isolate import cgroup_unavailable_reason, run_command_json
from moepager.system.sizes import parse_bytes

MODEL = "/work/benchdata/qwen3-30b-a3b.q4_k_m.gguf"
PROMPT = "Tell me about the history of Paris."


def run(args: list[str], cap: int, model: Path) -> dict:
    """`moepager run ARGS --json` in a fresh, capped process; its stats."""
    return run_command_json(["run", *args, "--json"], cap, [model])[0]["stats"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--limit", default="8GiB")
    p.add_argument("--drafts", default="self,ngram")
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tokens", type=int, default=33)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--json", type=Path, help="also write every run's numbers to this file")
    a = p.parse_args()
    if why := cgroup_unavailable_reason():
        raise SystemExit(f"a memory cap is needed: {why}")
    cases = ["none", *a.drafts.split(",")]
    common = [a.model, "--memory-limit", a.limit, "--max-context", "256", "--max-tokens", str(a.tokens),
              "--temperature", str(a.temperature), "--prompt", PROMPT]  # fmt: skip
    results: dict[str, list[dict]] = {c: [] for c in cases}
    for r in range(a.rounds):
        for case in cases if r % 2 == 0 else cases[::-1]:
            extra = [] if case == "none" else ["--speculate", case, "--draft-tokens", str(a.draft_tokens)]
            s = run([*common, "--seed", str(r), *extra], parse_bytes(a.limit), Path(a.model))
            spec = s.get("speculation", {})
            row = {"tok_s": s["decode_tokens_per_s"], "tokens": s["decode_tokens"] + 1,
                   "mib_per_token": s["experts"]["bytes_read"] / 2**20 / (s["decode_tokens"] + 1),
                   "acceptance": spec.get("acceptance_rate"), "drafted": spec.get("drafted")}  # fmt: skip
            results[case].append(row)
            print(f"round {r} {case:6s} {row['tok_s']:.2f} tok/s, {row['mib_per_token']:.1f} MiB read per token, "
                  f"acceptance {row['acceptance']}", flush=True)  # fmt: skip
    print(
        f"\n{Path(a.model).name} under a {a.limit} cap (--memory-limit {a.limit}), {a.rounds} rounds, "
        f"{a.tokens} tokens, temperature {a.temperature}:\n"
    )
    print("| case | decode tok/s (median) | vs none | expert MiB read per token (median) | acceptance |")
    print("| --- | --- | --- | --- | --- |")
    base = statistics.median(x["tok_s"] for x in results["none"])
    for case, rows in results.items():
        tok_s = statistics.median(x["tok_s"] for x in rows)
        acc = ", ".join(f"{x['acceptance']:.2f}" for x in rows) if case != "none" else "-"
        print(f"| {case} | {tok_s:.2f} | {tok_s / base:.2f}x | "
              f"{statistics.median(x['mib_per_token'] for x in rows):.1f} | {acc} |")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
