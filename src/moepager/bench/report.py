"""Benchmark results -> summary rows (median and range per engine and budget), the limit, ratios,
a markdown table and a PNG plot. Pure functions of the run records; nothing here measures anything.

The limit is moepager's: its own resident decode (compute) and the expert bytes its cache had to fetch at
a budget, over the best disk bandwidth seen. It says how close the pager comes to what its kernels and the
disk allow; a peer with faster kernels (llama.cpp's) can beat it, and the table says so when one does.
"""

from __future__ import annotations

import statistics
from pathlib import Path

# columns of the ratio table, in this order; llamacpp-* are llama.cpp's other settings (bench/worker.py)
PEERS = ("accelerate", "naive", "llamacpp", "llamacpp-norepack", "llamacpp-lazy")
LLAMACPP = ("llamacpp", "llamacpp-norepack", "llamacpp-lazy")
METRICS = {  # name -> how to read it from a run record
    "decode_tokens_per_s": lambda r: r.get("decode_tokens_per_s"),
    "prefill_tokens_per_s": lambda r: r.get("prefill_tokens_per_s"),
    "ttft_s": lambda r: r.get("ttft_s"),
    "load_s": lambda r: r.get("load_s"),
    "hit_rate": lambda r: (r.get("expert") or {}).get("hit_rate"),
    "bytes_read_per_token": lambda r: (r.get("expert") or {}).get("bytes_read_per_token"),  # engine's count
    "disk_bytes_per_token": lambda r: r.get("decode_disk_bytes_per_token"),  # /proc/self/io: from storage
    "needed_bytes_per_token": lambda r: _needed(r),
    "wait_fraction": lambda r: (r.get("expert") or {}).get("wait_fraction"),
    "peak_memory_bytes": lambda r: (r.get("memory") or {}).get("peak_bytes"),
    "failcnt": lambda r: (r.get("memory") or {}).get("failcnt"),
}  # fmt: skip


def _needed(r: dict) -> float | None:
    """Bytes of the experts the decode needed that were not resident when first asked for (demand misses
    plus prefetched ones): what any reader had to fetch given this cache's contents. Wasted prefetches
    are left out: they are the pager's overhead, not part of the limit."""
    # per: the mean expert size (a GGUF may mix types across layers, e.g. Q4_K_M: then an estimate)
    e, per = r.get("expert") or {}, r.get("expert_nbytes")
    if not per or "misses" not in e or not r.get("decode_tokens"):
        return None
    needed = (e["misses"] + e.get("prefetch_hits", 0)) * per / r["decode_tokens"]
    # a prefetch hit may have been read before the decode began (during the prefill): never above what was read
    return min(needed, e["bytes_read_per_token"]) if "bytes_read_per_token" in e else needed


def spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(runs: list[dict], bandwidth: list[float], expert_nbytes: float | None = None) -> dict:
    """Per (budget, engine): medians and ranges; per budget: the limit and the ratios."""
    if expert_nbytes:
        runs = [{**r, "expert_nbytes": expert_nbytes} for r in runs]
    rows = {}
    for r in runs:
        key = (r["budget"], r["engine"])
        row = rows.setdefault(key, {"budget": r["budget"], "engine": r["engine"], "cap_bytes": r.get("cap_bytes"),
                                    "runs": 0, "ok": 0, "messages": []})  # fmt: skip
        row["runs"] += 1
        if r.get("status") == "ok":
            row["ok"] += 1
        elif r.get("message") and f"{r['status']}: {r['message']}" not in row["messages"]:
            row["messages"].append(f"{r['status']}: {r['message']}")
    for (budget, engine), row in rows.items():
        ok = [r for r in runs if r["budget"] == budget and r["engine"] == engine and r.get("status") == "ok"]
        for name, get in METRICS.items():
            row[name] = spread([get(r) for r in ok])
    # The limit takes the best the machine showed: the fastest resident decode and the fastest disk sample.
    # On a shared machine that is a floor no engine can beat; the medians are reported beside it.
    bw = spread(bandwidth)
    # "All experts resident" = the resident engine, or a paged run whose decode found every expert in memory
    resident = [r for r in runs if r.get("status") == "ok" and (r["engine"] == "resident" or (
        r["engine"] == "moepager" and (r.get("expert") or {}).get("hit_rate") == 1.0
        and not (r.get("expert") or {}).get("bytes_read")))]  # fmt: skip
    compute = spread([1 / r["decode_tokens_per_s"] for r in resident if r.get("decode_tokens_per_s")])
    limits, ratios = {}, {}
    for budget in dict.fromkeys(r["budget"] for r in runs if r["engine"] != "resident"):
        mp = rows.get((budget, "moepager"))
        if not (mp and mp["decode_tokens_per_s"] and compute and bw):
            continue
        missed = mp["needed_bytes_per_token"] or mp["bytes_read_per_token"]
        missed = missed["median"] if missed else 0.0
        io_s = missed / bw["max"]
        floor = max(compute["min"], io_s)
        measured = 1 / mp["decode_tokens_per_s"]["median"]
        limits[budget] = {"compute_s_per_token": compute["min"], "missed_bytes_per_token": missed,
                          "io_s_per_token": io_s, "floor_s_per_token": floor, "limit_tokens_per_s": 1 / floor,
                          "bound": "compute" if compute["min"] >= io_s else "disk",
                          "efficiency": floor / measured}  # fmt: skip
        ratios[budget] = {"moepager_over_limit": floor / measured}
        for peer in PEERS:
            p = rows.get((budget, peer))
            if p and p["decode_tokens_per_s"]:
                ratios[budget][f"moepager_over_{peer}"] = (
                    mp["decode_tokens_per_s"]["median"] / p["decode_tokens_per_s"]["median"]
                )
                if p["decode_tokens_per_s"]["median"] > 1 / floor:
                    limits[budget].setdefault("beaten_by", []).append(peer)
        # llama.cpp at its best setting for this budget (repacked, plain mmap or lazy expert loading)
        tried = [(rows[(budget, p)]["decode_tokens_per_s"]["median"], p) for p in LLAMACPP
                 if (budget, p) in rows and rows[(budget, p)]["decode_tokens_per_s"]]  # fmt: skip
        if len(tried) > 1:
            best, which = max(tried)
            ratios[budget]["moepager_over_llamacpp-best"] = mp["decode_tokens_per_s"]["median"] / best
            ratios[budget]["llamacpp_best_setting"] = which
    return {"rows": list(rows.values()), "bandwidth": bw, "compute_s_per_token": compute, "limits": limits,
            "ratios": ratios}  # fmt: skip


def _fmt(s: dict | None, scale: float = 1.0, digits: int = 2, pct: bool = False) -> str:
    if not s:
        return "-"
    f = (lambda v: f"{100 * v:.0f}%") if pct else (lambda v: f"{v * scale:.{digits}f}")
    if s["n"] == 1 or abs(s["max"] - s["min"]) <= 1e-3 * abs(s["median"]):
        return f(s["median"])
    return f"{f(s['median'])} ({f(s['min'])}-{f(s['max'])})"


def markdown(record: dict) -> str:
    s, mi = record["summary"], 1 / 2**20
    gib = 1 / 2**30
    opts = record["options"]
    sampling = record.get("sampling") or "greedy"  # records from before sampling was added decoded greedily
    llamacpp = f" llama.cpp ran {record['llamacpp_gguf']}." if record.get("llamacpp_gguf") else ""
    rounds = 1 + max((r.get("round", 0) for r in record.get("runs", [])), default=0)
    samples = s["bandwidth"]["n"] if s["bandwidth"] else 0
    source = f" ({record['prompt_source']})" if record.get("prompt_source") else ""
    decoding = (
        "greedy in every engine"
        if sampling == "greedy"
        else f"sampled by each engine's own sampler ({sampling})"
    )
    about = (
        f"Disk ({record.get('bandwidth_method', 'O_DIRECT')}, {samples} sample{'s' if samples != 1 else ''}): "
        f"{_fmt(s['bandwidth'], 1e-9)} GB/s. All experts resident (moepager's compute; resident "
        f"engine and paged runs whose decode read nothing): {_fmt(s['compute_s_per_token'], 1e3, 1)} ms/token. "
        "The limit is moepager's: the best of each (fastest resident token, fastest disk sample) and the expert "
        f"bytes its decode needed at that budget. Median (min-max) over {rounds} alternating rounds; "
        f"{opts['prompt_tokens']}-token prompt{source}, {opts['tokens']} tokens "
        f"generated, {decoding}.{llamacpp}"
    )
    header = (
        "| budget | cap | engine | decode tok/s | prefill tok/s | TTFT s | hit rate | disk MiB/token | I/O wait "
        "| peak mem GiB | failcnt |"
    )
    lines = [f"### {record['workload']}", "", f"`{record['command']}`", "",
             f"Model: {record['model']['description']}. Machine: {record['machine_line']}.", "",
             about, "", header, "|" + " --- |" * 11]  # fmt: skip
    for row in s["rows"]:
        if not row["ok"] and all(m.startswith("skipped") for m in row["messages"]):
            continue  # listed once below the table
        cap = f"{row['cap_bytes'] * gib:.2f} GiB" if row.get("cap_bytes") else "none"
        if not row["ok"]:
            lines.append(f"| {row['budget']} | {cap} | {row['engine']} | {'; '.join(row['messages'])[:160]} |"
                         + " |" * 7)  # fmt: skip
            continue
        lines.append(
            f"| {row['budget']} | {cap} | {row['engine']} | {_fmt(row['decode_tokens_per_s'])} | "
            f"{_fmt(row['prefill_tokens_per_s'], digits=1)} | {_fmt(row['ttft_s'])} | {_fmt(row['hit_rate'], pct=True)} | "
            f"{_fmt(row['disk_bytes_per_token'], mi, 0)} | {_fmt(row['wait_fraction'], pct=True)} | "
            f"{_fmt(row['peak_memory_bytes'], gib)} | {_fmt(row['failcnt'], digits=0)} |")  # fmt: skip
    if s["limits"]:
        peers = [
            p
            for p in (*PEERS, "llamacpp-best")
            if any(f"moepager_over_{p}" in r for r in s["ratios"].values())
        ]
        lines += ["", "| budget | bound | floor ms/token | limit tok/s | moepager / limit |"
                  + "".join(f" moepager / {p} |" for p in peers), "|" + " --- |" * (5 + len(peers))]  # fmt: skip
        for budget, lim in s["limits"].items():
            r = s["ratios"][budget]
            vs = "".join(
                f" {r[k]:.2f}x{' (' + r['llamacpp_best_setting'] + ')' if k.endswith('-best') else ''} |"
                if k in r else " - |" for k in (f"moepager_over_{p}" for p in peers)
            )  # fmt: skip
            lines.append(f"| {budget} | {lim['bound']} | {lim['floor_s_per_token'] * 1e3:.0f} | "
                         f"{lim['limit_tokens_per_s']:.2f} | {lim['efficiency']:.2f} |{vs}")  # fmt: skip
        beaten = {b: lim["beaten_by"] for b, lim in s["limits"].items() if lim.get("beaten_by")}
        if beaten:
            lines += ["", "- faster than moepager's limit (its kernels compute faster than moepager's resident "
                      "decode): " + "; ".join(f"{', '.join(p)} at {b}" for b, p in beaten.items())]  # fmt: skip
    skipped = sorted({m for row in s["rows"] if not row["ok"] for m in row["messages"]})
    if skipped:
        lines += [""] + [f"- {m}" for m in skipped]
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = record["summary"]
    budgets = list(dict.fromkeys(r["budget"] for r in s["rows"] if r["engine"] != "resident"))
    x = range(len(budgets))
    fig, ax = plt.subplots(figsize=(10, 4.6), dpi=120)
    styles = {"moepager": ("C0", "o", 2.4), "accelerate": ("C3", "s", 1.6), "naive": ("C2", "^", 1.6),
              "llamacpp": ("C4", "D", 1.6), "llamacpp-norepack": ("C5", "v", 1.2),
              "llamacpp-lazy": ("C6", "P", 1.2)}  # fmt: skip
    for engine, (color, marker, lw) in styles.items():
        pts = [(i, next((r for r in s["rows"] if r["budget"] == b and r["engine"] == engine), None))
               for i, b in enumerate(budgets)]  # fmt: skip
        pts = [(i, r["decode_tokens_per_s"]) for i, r in pts if r and r["decode_tokens_per_s"]]
        if not pts:
            continue
        xs, med = [p[0] for p in pts], [p[1]["median"] for p in pts]
        err = [[m - p[1]["min"] for m, p in zip(med, pts)], [p[1]["max"] - m for m, p in zip(med, pts)]]
        ax.errorbar(xs, med, yerr=err, color=color, marker=marker, lw=lw, capsize=3, label=engine)
    lim = [(i, s["limits"][b]["limit_tokens_per_s"]) for i, b in enumerate(budgets) if b in s["limits"]]
    if lim:
        ax.plot(
            [p[0] for p in lim],
            [p[1] for p in lim],
            "k--",
            marker="_",  # visible where there is a single budget
            ms=18,
            lw=1.4,
            label="moepager's limit: max(its compute,\nneeded bytes / disk bandwidth)",
        )
    if s["compute_s_per_token"]:
        ax.axhline(1 / s["compute_s_per_token"]["median"], color="0.5", ls=":", lw=1.2,
                   label="moepager, all experts resident\n(median run; the limit uses the fastest)")  # fmt: skip
    ax.set_xticks(list(x), budgets)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "25" else ""))
    ax.set_xlabel("expert memory budget (share of all routed experts)")
    ax.set_ylabel("decode tokens/s (log)")
    sampling = record.get("sampling") or "greedy"
    ax.set_title(f"{record['workload']}: decode speed at equal total memory caps ({sampling})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a line
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def rerender(json_path: str | Path) -> None:
    """Rewrite the markdown and the plot beside a results JSON (after a change to this module)."""
    import json

    path = Path(json_path)
    record = json.loads(path.read_text())
    m = record["model"]
    record["summary"] = summarize(
        record["runs"], record["bandwidth"], m["expert_bytes"] / max(1, m["experts"])
    )
    path.write_text(json.dumps(record, indent=1, default=str))
    path.with_suffix(".md").write_text(markdown(record))
    plot(record, path.with_suffix(".png"))


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:]:
        rerender(arg)
