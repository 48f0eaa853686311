"""One picture of benchmarks/real_scale.sh: decode tok/s of each engine (moepager's resident or --memory-limit row,
llama.cpp at each setting) at each memory cap, from the result files it wrote. Usage:

    python benchmarks/real_scale_plot.py [--results benchmarks/results] [--out benchmarks/results/real-scale.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CASES = [("real-scale-resident", "resident (cap: file + 2 GiB)"), ("real-scale-8gib", "8 GiB cap"),
         ("real-scale-4gib", "4 GiB cap")]  # fmt: skip
ENGINES = [("resident", "moepager (resident)"), ("moepager", "moepager --memory-limit CAP"),
           ("llamacpp", "llama.cpp, repacked"), ("llamacpp-norepack", "llama.cpp, mmap"),
           ("llamacpp-lazy", "llama.cpp, lazy experts")]  # fmt: skip


def rates(record: dict) -> dict[str, float]:
    out = {}
    for row in record["summary"]["rows"]:
        if row["decode_tokens_per_s"] and not (row["engine"] == "moepager" and row["budget"] == "100%"):
            out[row["engine"]] = row["decode_tokens_per_s"]["median"]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--out", default="benchmarks/results/real-scale.png")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.6), dpi=120)
    width = 0.16
    for j, (engine, label) in enumerate(ENGINES):
        xs, ys = [], []
        for i, (stem, _) in enumerate(CASES):
            r = rates(json.loads((Path(args.results) / f"{stem}.json").read_text())).get(engine)
            if r:
                xs.append(i + (j - 2) * width)
                ys.append(r)
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(CASES)), [c[1] for c in CASES])
    ax.set_ylabel("decode tokens/s (log)")
    ax.set_title("17 GB Q4_K_M GGUF at Qwen3-30B-A3B's shape, 2 cores, seeded sampling")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
