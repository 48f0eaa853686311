"""Time to first token and bytes fetched: `--remote` (dense weights, then experts as used) against a full
download with huggingface_hub's snapshot_download and then a run, both from a local server in the hub's URL
layout (moepager.bench.hub_server, its own process), and a second `--remote` run from the local store.

    python benchmarks/remote_first_run.py /work/benchdata/qwen3-64x4 --rounds 2 --out benchmarks/remote_first_run.md

Each measurement is a fresh process (t0 after its imports), page cache dropped before it when possible. Every run
pages experts with expert_memory=100% (read on first use, then kept), samples at temperature 1, seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = "bench/model"


def child(mode: str, store: str, prompt_tokens: int, tokens: int) -> None:
    import torch

    import moepager
    from moepager.sources.hub import RemoteSource

    t0 = time.perf_counter()
    if mode == "full":
        from huggingface_hub import snapshot_download

        model = snapshot_download(REPO, local_dir=store)
        fetched = lambda: sum(p.stat().st_size for p in Path(store).iterdir() if p.is_file())  # noqa: E731
    else:
        model = RemoteSource(REPO, store, progress=False)
        fetched = lambda: model.tier_stats()["remote"]["bytes_fetched"]  # noqa: E731
    engine = moepager.load(model, expert_memory="100%")
    t_load = time.perf_counter() - t0
    prompt = torch.randint(
        3, engine.config.vocab_size, (prompt_tokens,), generator=torch.Generator().manual_seed(0)
    )
    stream = engine.stream(prompt.tolist(), tokens, temperature=1.0, seed=0, stop_ids=[])
    first = [next(stream)]
    t_first, at_first = time.perf_counter() - t0, fetched()
    rest = list(stream)
    record = {"mode": mode, "load_s": t_load, "ttft_s": t_first, "bytes_at_first_token": at_first,
              "total_s": time.perf_counter() - t0, "bytes_total": fetched(), "tokens": first + rest}  # fmt: skip
    print(json.dumps(record))


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run(mode: str, store: Path, env: dict, args) -> dict:
    dropped = drop_caches()
    cmd = [sys.executable, __file__, "--child", mode, "--store", str(store),
           "--prompt-tokens", str(args.prompt_tokens), "--tokens", str(args.tokens)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise SystemExit(f"{mode} run failed:\n{out.stderr[-3000:]}")
    record = json.loads(out.stdout.strip().splitlines()[-1])
    record["page_cache_dropped"] = dropped
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", help="checkpoint folder to serve")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--rate", type=float, help="the server's bandwidth in MiB/s (default: unlimited loopback)")
    p.add_argument("--out", help="markdown file for the results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.store, args.prompt_tokens, args.tokens)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moepager.bench.hub_server", args.model, "--repo", REPO,
                               "--port", str(port)] + (["--rate", str(args.rate)] if args.rate else []),
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    server.stdout.readline()  # "serving ..." once it listens
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="remote-bench-"))
    rows: dict[str, list[dict]] = {
        "remote, first run": [],
        "full download, then run": [],
        "remote, second run": [],
    }
    try:
        for r in range(args.rounds):
            order = ["remote", "full"] if r % 2 == 0 else ["full", "remote"]
            for mode in order:
                store = work / f"{mode}-{r}"
                rec = run(mode, store, env, args)
                rows["remote, first run" if mode == "remote" else "full download, then run"].append(rec)
                if mode == "remote":
                    rows["remote, second run"].append(run(mode, store, env, args))
                shutil.rmtree(store, ignore_errors=True)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)

    model_bytes = sum(f.stat().st_size for f in Path(args.model).iterdir() if f.is_file())
    same = len({json.dumps(rec["tokens"]) for rs in rows.values() for rec in rs}) == 1
    med = lambda rs, k: statistics.median(rec[k] for rec in rs)  # noqa: E731
    span = lambda rs, k: f"{min(rec[k] for rec in rs):.2f}-{max(rec[k] for rec in rs):.2f}"  # noqa: E731
    link = f"a {args.rate:g} MiB/s link" if args.rate else "unlimited loopback"
    lines = [f"model {args.model} ({model_bytes / 2**30:.2f} GiB), {link}, prompt {args.prompt_tokens} tokens, "
             f"{args.tokens} tokens sampled, {args.rounds} rounds; tokens identical in every run: {same}", "",
             "| run | time to first token s (range) | MiB fetched by first token | total s | MiB fetched in all |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, rs in rows.items():
        lines.append(f"| {name} | {med(rs, 'ttft_s'):.2f} ({span(rs, 'ttft_s')}) | "
                     f"{med(rs, 'bytes_at_first_token') / 2**20:.0f} | {med(rs, 'total_s'):.2f} | "
                     f"{med(rs, 'bytes_total') / 2**20:.0f} |")  # fmt: skip
    first, full = rows["remote, first run"], rows["full download, then run"]
    lines += ["", f"first token: remote {med(full, 'ttft_s') / med(first, 'ttft_s'):.2f}x sooner than a full "
              f"download, after {med(first, 'bytes_at_first_token') / model_bytes:.0%} of the model's bytes"]  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out + ".json").write_text(
            json.dumps({"command": sys.argv, "summary": text, "runs": rows}, indent=1)
        )
        print(f"\nraw records: {args.out}.json")


if __name__ == "__main__":
    main()
