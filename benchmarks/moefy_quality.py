"""Perplexity of the dense SmolLM2 and of its moefy MoE at several K, on the evaluation text.

    python benchmarks/moefy_quality.py --ks 8,12,14 --max-tokens 1024

The MoE is the default model (the shipped plan, assembled on first use). A checkpoint assembled with
`moepager moefy GGUF OUT --experts 16 --top-k K --plan src/moepager/data/smollm2_moe_plan.safetensors`
differs only in config.json's num_experts_per_tok, so one loaded MoE is evaluated at each K by setting it.
Same measure as `moepager eval MOE --text src/moepager/data/eval_gpl3.txt --reference DENSE`.
--router-scale S multiplies every router weight by S (a what-if for the router's logit spread, 2^-16 in the
default model: benchmarks/quant_kernels.md), which keeps the experts' ranking and moves their weights off 1/E.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    import moepager
    from moepager.bench.evaluate import evaluate
    from moepager.data import EVAL_TEXT
    from moepager.moefy.default_model import default_model_path, source_gguf
    from moepager.moefy.gguf_dense import convert_gguf

    ap = argparse.ArgumentParser()
    ap.add_argument("--ks", default="8,12,14")
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--router-scale", type=float, default=1.0)
    args = ap.parse_args()
    text = EVAL_TEXT.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        dense = moepager.load(convert_gguf(source_gguf(), Path(tmp) / "dense"))
        base = evaluate(dense, text, max_tokens=args.max_tokens, progress=False)
        print(f"| dense | - | {base.perplexity:.2f} | - | - | 100% |", flush=True)
        moe = moepager.load(default_model_path())
        c = moe.config
        for block in moe.model.layers:
            block.ffn.router.weight.data.mul_(args.router_scale)
        for k in [int(x) for x in args.ks.split(",")]:
            c.top_k = k
            r = evaluate(moe, text, dense, max_tokens=args.max_tokens, progress=False)
            active = (c.shared_expert_size + k * c.moe_intermediate_size) / dense.config.intermediate_size
            print(f"| MoE E={c.num_experts} | {k} | {r.perplexity:.2f} | {r.perplexity / base.perplexity - 1:+.1%} "
                  f"| {r.agreement:.1%} | {active:.0%} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
