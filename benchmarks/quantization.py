"""Quantized experts: speed, bytes per token, experts resident in one budget, and quality against the
unquantized model.

For each experts dtype a store is written with `moepager convert --experts-dtype`, then:
- decode tokens/s and expert bytes read per decoded token with paged experts in ONE byte budget (a share of
  the bf16 experts' bytes, default 25%), and how many experts that budget holds;
- decode tokens/s with every expert resident (no paging), the compute cost alone;
- perplexity on a text (the evaluation text of the default model) and the share of positions where the
  greedy next token equals the unquantized model's (moepager.bench.evaluate).

Usage: python benchmarks/quantization.py [--model PATH] [--out benchmarks/quantization.md]
(default model: moepager.moefy.default_model.default_model_path()).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import moepager
from moepager.bench.evaluate import evaluate
from moepager.store.convert import convert
from moepager.store.open_model import open_source

DTYPES = [None, "bf16", "int8", "int4"]  # None: the checkpoint's own experts, the reference


def expert_bytes(store: Path) -> tuple[int, int]:
    src = open_source(store)
    keys = src.expert_keys()
    return src.expert_nbytes(*keys[0]), sum(src.expert_nbytes(*k) for k in keys)


def decode_run(engine, prompt: list[int], new_tokens: int) -> dict:
    """One generation: decode tokens/s, and expert bytes read while decoding (after the prompt)."""

    def read() -> int:
        s = engine.stats().get("experts")
        return s["bytes_read"] if s else 0

    it = engine.stream(prompt, new_tokens, stop_ids=[])
    next(it)  # the prompt is in the cache and the first token chosen
    start_bytes, t0 = read(), time.perf_counter()
    n = sum(1 for _ in it)
    dt = time.perf_counter() - t0
    return {"tokens_per_s": n / dt, "bytes_per_token": (read() - start_bytes) / n}


def measure(model: Path, work: Path, text: str, budget_share: float, new_tokens: int, runs: int,
            eval_tokens: int, window: int) -> list[dict]:  # fmt: skip
    reference = moepager.load(model)
    prompt = reference.tokenizer.encode(text[:2000])[:64]
    stores = {dt: convert(model, work / f"store-{dt or 'ref'}", progress=False, experts_dtype=dt)
              for dt in DTYPES}  # fmt: skip
    budget = int(budget_share * expert_bytes(stores["bf16"])[1])
    rows, paged, resident = {}, {}, {}
    for dt, store in stores.items():
        per_expert, total = expert_bytes(store)
        name = dt or f"{reference.model.embed.weight.dtype} (reference)".replace("torch.", "")
        paged[dt] = moepager.load(store, expert_memory=budget, prefetch=False)
        resident[dt] = moepager.load(store)
        rows[dt] = {"experts_dtype": name, "bytes_per_expert": per_expert, "expert_bytes_total": total,
                    "budget_bytes": budget, "resident_experts": paged[dt].experts.cache.capacity,
                    "experts_total": len(open_source(store).expert_keys())}  # fmt: skip
        for engine in (paged[dt], resident[dt]):
            decode_run(engine, prompt, 8)  # warm the cache and the kernels
    # rounds alternate between dtypes, so load from other processes on the machine falls on all of them
    timings = {dt: {"paged": [], "resident": []} for dt in stores}
    for _ in range(runs):
        for dt in stores:
            timings[dt]["paged"].append(decode_run(paged[dt], prompt, new_tokens))
            timings[dt]["resident"].append(decode_run(resident[dt], prompt, new_tokens))
    for dt in stores:
        t, row = timings[dt], rows[dt]
        row["paged_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in t["paged"])
        row["bytes_read_per_token"] = statistics.median(r["bytes_per_token"] for r in t["paged"])
        row["resident_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in t["resident"])
        q = evaluate(resident[dt], text, reference, window=window, max_tokens=eval_tokens, progress=False)
        row.update(perplexity=q.perplexity, agreement=q.agreement, eval_tokens=q.tokens)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return [rows[dt] for dt in stores]


def markdown(rows: list[dict], command: str, model: Path, budget_share: float) -> str:
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    ref = rows[0]
    lines = [
        "# Quantized experts: speed, bytes, residency and quality",
        "",
        f"Model: `{model}` ({ref['experts_total']} routed experts). Machine: the project's 2-vCPU CPU box "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads), shared with other work, so speeds "
        "are noisy (medians of rounds that alternate between the rows). Each row is a store written by "
        "`moepager convert --experts-dtype`.",
        "",
        f"Budget: {budget_share:.0%} of the bf16 experts' bytes = {mib(ref['budget_bytes'])} for every row, "
        "paged with the LRU expert cache, prefetch off. Bytes read: expert bytes read from the store while "
        "decoding (after the prompt). Quality: perplexity on the default model's evaluation text "
        f"({ref['eval_tokens']} predicted tokens) and the share of positions whose greedy next token equals "
        "the unquantized model's.",
        "",
        "| experts | bytes / expert | resident experts in the budget | decode tok/s (paged) "
        "| expert bytes read / token | decode tok/s (all resident) | perplexity | vs reference "
        "| token agreement |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        dppl = (r["perplexity"] / ref["perplexity"] - 1) * 100
        lines.append(
            f"| {r['experts_dtype']} | {r['bytes_per_expert'] / 1024:.0f} KiB | {r['resident_experts']} / "
            f"{r['experts_total']} | {r['paged_tokens_per_s']:.2f} | "
            f"{r['bytes_read_per_token'] / 1024:.0f} KiB | {r['resident_tokens_per_s']:.2f} | "
            f"{r['perplexity']:.3f} | {dppl:+.2f}% | {r['agreement']:.1%} |"
        )
    lines += ["", "Made by:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def kernel_rows(shapes: list[tuple[int, int]], tokens: list[int], rounds: int) -> list[dict]:
    """Time one [N, K] linear per weight form; rounds alternate between forms (the machine is shared)."""
    import torch.nn.functional as F

    from moepager.kernels.intquant import linear, quantize

    out = []
    for n, k in shapes:
        w = torch.randn(n, k) * 0.02
        forms = {"fp32": (w, None), "bf16": (w.bfloat16(), None)}
        for kind in ("int8", "int4"):
            q = quantize(w, kind)
            forms[kind] = (q.data, q.scales)
        for t in tokens:
            x = torch.randn(t, k)
            times = {name: [] for name in forms}
            for _ in range(rounds):
                for name, (weight, scales) in forms.items():
                    if name == "fp32":
                        fn = lambda: F.linear(x, weight)  # noqa: E731
                    else:
                        fn = lambda: linear(x, weight, None, scales)  # noqa: E731
                    fn()
                    t0 = time.perf_counter()
                    for _ in range(5):
                        fn()
                    times[name].append((time.perf_counter() - t0) / 5 * 1e3)
            medians = {f"{m}_ms": statistics.median(v) for m, v in times.items()}
            out.append({"shape": f"{n}x{k}", "tokens": t, **medians})
            print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def kernel_markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# One expert matrix, one linear: fp32 vs bf16 vs int8 vs int4 (moepager.kernels.intquant.linear)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, activations fp32 in and out (the "
        "quantized forms run torch's weight-only kernels with bf16 activations inside). Medians of rounds "
        "that alternate between the forms; the machine is shared, so compare within a row.",
        "",
        "| weight [N x K] | tokens | fp32 ms | bf16 ms | int8 ms | int4 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['fp32_ms']:.2f} | {r['bf16_ms']:.2f} | "
                     f"{r['int8_ms']:.2f} | {r['int4_ms']:.2f} |")  # fmt: skip
    return "\n".join([*lines, "", "Made by:", "", "```bash", command, "```", ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint folder (default: the embedded default MoE model)")
    p.add_argument("--text", help="evaluation text (default: the default model's evaluation text)")
    p.add_argument("--budget", type=float, default=0.25, help="share of the bf16 experts' bytes, the cache's")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--out", default="benchmarks/quantization.md")
    p.add_argument("--workdir", help="where the stores are written (default: a temporary folder, removed)")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="instead: time one linear per weight form at Mixtral's expert shapes (no model)",
    )
    args = p.parse_args()
    command = "python " + " ".join(["benchmarks/quantization.py", *sys.argv[1:]])
    if args.kernels:
        rows = kernel_rows([(14336, 4096), (4096, 14336)], [1, 16, 64], args.runs)
        Path(args.out).write_text(kernel_markdown(rows, command))
        print(Path(args.out).read_text())
        return
    if args.model:
        model = Path(args.model)
    else:
        from moepager.moefy.default_model import default_model_path

        model = default_model_path()
    text_file = Path(args.text) if args.text else Path(moepager.__file__).parent / "data" / "eval_gpl3.txt"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moepager-quant-"))
    try:
        rows = measure(model, work, text_file.read_text(), args.budget, args.new_tokens, args.runs,
                       args.eval_tokens, args.window)  # fmt: skip
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(markdown(rows, command, model, args.budget))
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
