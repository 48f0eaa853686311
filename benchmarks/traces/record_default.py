"""Record the default model's routing over the evaluation text and report per-layer expert usage skew.

    python benchmarks/traces/record_default.py [--max-tokens 2048]

Writes benchmarks/traces/default_gpl3.json in moepager's trace format (moepager/trace.py: a JSON object
{"format": "moepager-trace", "version": 1, "num_layers", "num_experts", "top_k", "steps": [[layer, ids]]},
one step per layer per forward, ids = the K expert ids chosen by each token of that forward, in token order).
The text is scored in consecutive 512-token windows, as `moepager eval` does. Replay it with
`moepager replay benchmarks/traces/default_gpl3.json`.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

HERE = Path(__file__).parent


def skew(trace) -> list[dict]:
    """Per layer: share of selections taken by the top 25% experts, and normalized entropy of usage."""
    counts = {}
    for layer, ids in trace.steps:
        counts.setdefault(layer, Counter()).update(e for token in ids for e in token)
    rows = []
    for layer in sorted(counts):
        c = [counts[layer].get(e, 0) for e in range(trace.num_experts)]
        total = sum(c)
        top = sorted(c, reverse=True)[: max(1, trace.num_experts // 4)]
        p = [x / total for x in c if x]
        entropy = -sum(x * math.log(x) for x in p) / math.log(trace.num_experts)
        rows.append({"layer": layer, "top25_share": sum(top) / total, "entropy": entropy,
                     "min_share": min(c) / total, "max_share": max(c) / total})  # fmt: skip
    return rows


def main() -> None:
    import moepager
    from moepager.bench.evaluate import evaluate
    from moepager.data import EVAL_TEXT
    from moepager.moefy.default_model import default_model_path

    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--out", default=str(HERE / "default_gpl3.json"))
    args = ap.parse_args()
    engine = moepager.load(default_model_path(), record_trace=True)
    result = evaluate(engine, EVAL_TEXT.read_text(), max_tokens=args.max_tokens)
    engine.trace.save(args.out)
    rows = skew(engine.trace)
    summary = {"perplexity": result.perplexity, "tokens": result.tokens, "layers": rows,
               "mean_top25_share": sum(r["top25_share"] for r in rows) / len(rows),
               "mean_entropy": sum(r["entropy"] for r in rows) / len(rows)}  # fmt: skip
    Path(args.out).with_suffix(".skew.json").write_text(json.dumps(summary, indent=1))
    print(f"{'layer':>5} {'top25%':>7} {'entropy':>7} {'min':>6} {'max':>6}")
    for r in rows:
        print(
            f"{r['layer']:>5} {r['top25_share']:7.3f} {r['entropy']:7.3f} {r['min_share']:6.3f} {r['max_share']:6.3f}"
        )
    print(f"mean top-25% share {summary['mean_top25_share']:.3f} (uniform 0.25), "
          f"mean normalized entropy {summary['mean_entropy']:.3f} (uniform 1.0)")  # fmt: skip


if __name__ == "__main__":
    main()
