"""Speculative decoding at 25% paging on the default model: decode tok/s and expert bytes read per decoded
token, without drafts and with each draft kind, side by side in one run (cases alternate every round, so a
busy machine slows them alike).

The text is real: the opening of the GPL (src/moepager/data/eval_gpl3.txt), then its first lines again, so
the continuation repeats what the context holds (the case prompt lookup is for). Sampling is seeded.

    python benchmarks/speculative.py [--rounds 3] [--tokens 48] [--drafts ngram,self] [--memory 25%]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import moepager
from moepager.runtime.summary import DecodeReads

TEXT = Path(__file__).resolve().parents[1] / "src" / "moepager" / "data" / "eval_gpl3.txt"


def prompt_ids(engine, chars: int, repeat: int) -> list[int]:
    text = TEXT.read_text()[:chars]
    return engine.tokenizer.encode(text + "\n\n" + text[:repeat])


def run_once(engine, ids, tokens: int, seed: int, temperature: float) -> dict:
    t0, n0 = engine.timings.decode_s, engine.timings.decode_tokens
    spec0 = dict(engine.speculation.stats.as_dict()) if engine.speculation else None
    reads = DecodeReads(engine)
    out = list(reads.count(engine.stream(ids, tokens, temperature=temperature, seed=seed, stop_ids=[])))
    dt, n = engine.timings.decode_s - t0, engine.timings.decode_tokens - n0
    record = {
        "tokens": len(out),
        "decode_tok_s": n / dt,
        "expert_bytes_per_token": reads.bytes / reads.tokens,
    }
    if spec0 is not None:
        s = engine.speculation.stats.as_dict()
        drafted, accepted = s["drafted"] - spec0["drafted"], s["accepted"] - spec0["accepted"]
        record.update(drafted=drafted, accepted=accepted, acceptance=accepted / drafted if drafted else 0.0,
                      tokens_per_forward=(s["produced"] - spec0["produced"]) / (s["rounds"] - spec0["rounds"]))  # fmt: skip
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--drafts", default="ngram,self")
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--memory", default="25%")
    ap.add_argument("--temperature", type=float, default=0.3)
    ap.add_argument("--chars", type=int, default=1200, help="characters of the passage")
    ap.add_argument("--repeat", type=int, default=200, help="characters of it given again")
    ap.add_argument("--out", default="benchmarks/results/speculative.json")
    args = ap.parse_args()
    cases = ["none"] + args.drafts.split(",")
    engines = {}
    for case in cases:
        spec = {} if case == "none" else {"speculate": case, "draft_tokens": args.draft_tokens}
        engines[case] = moepager.load(expert_memory=args.memory, **spec)
    ids = prompt_ids(engines["none"], args.chars, args.repeat)
    results = {c: [] for c in cases}
    for r in range(args.rounds):
        for case in cases if r % 2 == 0 else cases[::-1]:
            t = time.perf_counter()
            rec = run_once(engines[case], ids, args.tokens, seed=r, temperature=args.temperature)
            results[case].append(rec)
            print(f"round {r} {case:6s} {rec['decode_tok_s']:.2f} tok/s, "
                  f"{rec['expert_bytes_per_token'] / 2**20:.1f} MiB/token, acceptance {rec.get('acceptance', '-')}"
                  f" ({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
    base = results["none"]
    summary = {}
    for case in cases:
        speed = [x["decode_tok_s"] / b["decode_tok_s"] for x, b in zip(results[case], base)]
        reads = [
            x["expert_bytes_per_token"] / b["expert_bytes_per_token"] for x, b in zip(results[case], base)
        ]
        summary[case] = {"speedup_median": statistics.median(speed), "bytes_ratio_median": statistics.median(reads),
                         "tok_s_median": statistics.median(x["decode_tok_s"] for x in results[case]),
                         "mib_per_token_median": statistics.median(x["expert_bytes_per_token"] for x in results[case]) / 2**20,
                         "acceptance_median": statistics.median(x.get("acceptance", 0.0) for x in results[case])}  # fmt: skip
        print(f"{case:6s} {summary[case]}")
    Path(args.out).write_text(json.dumps({"args": vars(args), "prompt_tokens": len(ids), "runs": results,
                                          "summary": summary}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
