"""Experts spread over two Ray actors vs one process paging from disk, at the same per-process expert cap.

One run, on a local Ray cluster (127.0.0.1) started here and stopped at the end:
- `paged`: one process whose expert cache holds CAP of the experts, the rest read from disk (O_DIRECT).
- `2 actors`: the same model with its experts split over two actors, each holding its half resident
  (half <= CAP: no disk reads per token); the driver keeps the dense part.
- `resident`: one process holding every expert, uncapped: the reference the distribution's per-token
  overhead is measured against.
Rounds alternate the three; every run decodes the same prompt with seeded sampling (temperature 1). Reported
per configuration: decode tokens/s (median and range over rounds), expert bytes read from disk per token,
and for the actors, round trips, bytes sent and received and driver wait per token.

    python benchmarks/ray_experts.py --model /work/benchdata/qwen3-64x4 --cap 60% --out benchmarks/ray_experts.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import moepager
from moepager.system.sizes import format_bytes


def counters(engine) -> dict:
    s = engine.stats()
    x = s.get("experts", {})
    out = {
        "decode_tokens": s["decode_tokens"],
        "decode_s": s["decode_s"],
        "bytes_read": x.get("bytes_read", 0),
    }
    if "distributed" in x:
        out.update(x["distributed"])
        out["actor_compute_s"] = sum(a["compute_s"] for a in x["actors"])
    return out


def run(engine, prompt: list[int], tokens: int, seed: int) -> tuple[dict, list[int]]:
    """Decode only: the counters are read after the first token (the prompt's pass) and at the end."""
    ids, before = [], None
    for tid in engine.stream(prompt, tokens, temperature=1.0, seed=seed):
        ids.append(tid)
        if before is None:
            before = counters(engine)
    after = counters(engine)
    d = {k: after[k] - before[k] for k in after}
    n = d["decode_tokens"]
    row = {"tok_s": n / d["decode_s"], "disk_bytes_per_token": d["bytes_read"] / n}
    if "calls" in d:
        row.update(calls_per_token=d["calls"] / n, bytes_sent_per_token=d["bytes_sent"] / n,
                   bytes_received_per_token=d["bytes_received"] / n, wait_ms_per_token=1000 * d["wait_s"] / n,
                   actor_compute_ms_per_token=1000 * d["actor_compute_s"] / n,
                   actor_critical_ms_per_token=1000 * d["actor_s"] / n, driver_ms_per_token=1000 * d["driver_s"] / n,
                   transport_ms_per_token=1000 * (d["wait_s"] - d["actor_s"]) / n)  # fmt: skip
    return row, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/benchdata/qwen3-64x4")
    ap.add_argument(
        "--cap", default="60%", help="expert memory per process (a share of all experts or a size)"
    )
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-resident", action="store_true", help="skip the all-resident reference (memory)")
    ap.add_argument("--out", help="markdown file for the results (a .json beside it)")
    args = ap.parse_args()

    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")  # fmt: skip
    try:
        paged = moepager.load(args.model, expert_memory=args.cap)
        cap = paged.stats()["experts"]["budget_bytes"]
        total = paged.stats()["experts"]["total_expert_bytes"]
        actors = moepager.load(args.model, ray="local", ray_actors=2, expert_memory=None)
        shard = [a["experts"] for a in actors.stats()["experts"]["actors"]]
        slot = paged.stats()["experts"]["slot_bytes"]
        if max(shard) * slot > cap:
            raise SystemExit(
                f"an actor's half ({format_bytes(max(shard) * slot)}) exceeds the cap; raise --cap"
            )
        engines = {"paged": paged, "2 actors": actors}
        if not args.no_resident:
            engines["resident"] = moepager.load(args.model)
        prompt = torch.randint(0, paged.config.vocab_size, (args.prompt_tokens,),
                               generator=torch.Generator().manual_seed(args.seed)).tolist()  # fmt: skip
        for e in engines.values():  # warm: kernels compiled, the paged cache filled as far as it goes
            e.generate(prompt, 8, temperature=1.0, seed=args.seed + 1)
        rows: dict[str, list[dict]] = {n: [] for n in engines}
        same = True
        for r in range(args.rounds):
            outs = {}
            for name, e in engines.items():
                row, outs[name] = run(e, prompt, args.tokens, args.seed + 100 + r)
                rows[name].append(row)
                print(f"round {r} {name}: {row['tok_s']:.2f} tok/s", flush=True)
            same &= len({tuple(v) for v in outs.values()}) == 1
        actors.experts.close()
    finally:
        ray.shutdown()
    report(args, rows, same, cap, total, shard, slot)


def command() -> str:
    import sys

    return "python " + " ".join(sys.argv)


def report(args, rows: dict, same: bool, cap: int, total: int, shard: list[int], slot: int) -> None:
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in rows.items()}
    lines = [
        f"`{command()}`",
        "",
        f"model `{args.model}`, experts {format_bytes(total)}; per-process expert cap {args.cap} = "
        f"{format_bytes(cap)}; actors hold {shard[0]} and {shard[1]} experts ({format_bytes(shard[0] * slot)}, "
        f"{format_bytes(shard[1] * slot)}); {args.tokens} tokens sampled at temperature 1 after a "
        f"{args.prompt_tokens}-token prompt, {args.rounds} alternating rounds; tokens identical in all: "
        f"{'yes' if same else 'NO'}",
        "",
        "| configuration | decode tok/s (median, range) | vs paged | disk bytes / token |",
        "| --- | --- | --- | --- |",
    ]
    for n, rs in rows.items():
        ts = [r["tok_s"] for r in rs]
        lines.append(f"| {n} | {med[n]['tok_s']:.2f} ({min(ts):.2f}-{max(ts):.2f}) | "
                     f"{med[n]['tok_s'] / med['paged']['tok_s']:.2f}x | {format_bytes(med[n]['disk_bytes_per_token'])} |")  # fmt: skip
    d = med["2 actors"]
    overhead = ""
    if "resident" in med:
        overhead = f"; time per token minus the resident process's: {1000 / d['tok_s'] - 1000 / med['resident']['tok_s']:+.1f} ms"
    lines += [
        "",
        f"Distribution per token (medians): {d['calls_per_token']:.1f} round trips (one per actor per MoE layer "
        f"that routes to it), {format_bytes(d['bytes_sent_per_token'])} sent, "
        f"{format_bytes(d['bytes_received_per_token'])} received; the driver waited {d['wait_ms_per_token']:.1f} ms, "
        f"of which the slowest actor of each step computed {d['actor_critical_ms_per_token']:.1f} ms (both actors "
        f"together {d['actor_compute_ms_per_token']:.1f} ms): **{d['transport_ms_per_token']:.1f} ms per token "
        f"({d['transport_ms_per_token'] / d['calls_per_token']:.2f} ms per round trip) of transport and Ray "
        f"scheduling**, plus {d['driver_ms_per_token']:.1f} ms of the driver preparing calls and combining "
        f"answers{overhead}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps({"rows": rows, "medians": med}, indent=1))


if __name__ == "__main__":
    main()
