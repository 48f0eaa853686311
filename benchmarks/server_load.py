"""Load test of `moepager serve`: N concurrent streaming clients on loopback, bounded in time and count.

Starts the server as a child process on 127.0.0.1 (a free port), runs each concurrency level in turn with
the official openai client, and reads the server's /metrics before and after each level. Reports aggregate
tokens/s, bytes read from disk per generated token (when experts are paged), mean batch size per decode
step and time to first token. The server is stopped at the end, also on errors or Ctrl-C.

    python benchmarks/server_load.py                      # builds a synthetic Mixtral in a temp folder
    python benchmarks/server_load.py --model PATH --clients 1,4,8 --expert-memory 25%
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def build_model(out: Path) -> Path:
    """A synthetic Mixtral: hidden 256, 8 experts of 1024 (top-2), 4 layers, fp32 (~100 MB of experts)."""
    from moepager.synth.checkpoint import SynthSpec, synth

    spec = SynthSpec(family="mixtral", hidden=256, intermediate=1024, experts=8, top_k=2, layers=4, heads=4,
                     kv_heads=2, head_dim=64, vocab=4096, dtype="float32", seed=0)  # fmt: skip
    return synth(out, spec, progress_bar=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in lines if ln and not ln.startswith("#"))}


def start_server(model: Path, port: int, expert_memory: str | None, timeout: float) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moepager", "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--model-name", "bench"]  # fmt: skip
    if expert_memory:
        cmd += ["--expert-memory", expert_memory]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("the server did not start in time")
            time.sleep(0.2)


def run_level(base: str, clients: int, requests: int, prompt_len: int, max_tokens: int, vocab: int,
              deadline: float) -> dict:  # fmt: skip
    """`clients` threads, each sending `requests` streaming completions one after another."""
    import openai

    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
    errors: list[str] = []
    tokens, ttft = [0] * clients, []
    lock = threading.Lock()

    def worker(c: int) -> None:
        for r in range(requests):
            if time.monotonic() > deadline:
                return
            prompt = [(7 * c + 13 * r + 31 * i) % (vocab - 2) + 1 for i in range(prompt_len)]
            t0 = time.perf_counter()
            try:
                stream = client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True})  # fmt: skip
                first = None
                for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].text:
                        first = time.perf_counter() - t0
                    if chunk.usage is not None:
                        tokens[c] += chunk.usage.completion_tokens
                with lock:
                    ttft.append(first or 0.0)
            except Exception as e:  # counted, not raised: the report says how many failed
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    before = metrics(base)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic() + 60))
    wall = time.perf_counter() - t0
    after = metrics(base)
    delta = lambda k: after.get(k, 0.0) - before.get(k, 0.0)  # noqa: E731
    total = sum(tokens)
    steps = delta("moepager_decode_steps_total")
    return {
        "clients": clients,
        "requests": len(ttft) + len(errors),
        "errors": len(errors),
        "first_errors": errors[:3],
        "completion_tokens": total,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(total / wall, 2) if wall > 0 else 0.0,
        "mean_batch": round(delta("moepager_decode_step_sequences_total") / steps, 2) if steps else 0.0,
        "ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
        "bytes_read_per_token": (
            round(delta("moepager_expert_read_bytes_total") / total)
            if total and "moepager_expert_read_bytes_total" in after
            else None
        ),  # None: resident
        "expert_hits": delta("moepager_expert_hits_total"),  # already resident
        "expert_prefetch_hits": delta("moepager_expert_prefetch_hits_total"),  # read ahead: still disk bytes
        "expert_misses": delta("moepager_expert_misses_total"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (default: build a synthetic Mixtral in a temp folder)")
    p.add_argument("--clients", default="1,4,8", help="comma list of concurrency levels")
    p.add_argument("--requests", type=int, default=2, help="requests per client per level")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--expert-memory", default="25%", help="passed to `moepager serve` ('' = all resident)")
    p.add_argument(
        "--time-limit", type=float, default=300, help="seconds for the whole run, server start included"
    )
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()

    deadline = time.monotonic() + args.time_limit
    with tempfile.TemporaryDirectory(prefix="moepager-load-") as tmp:
        model = Path(args.model) if args.model else build_model(Path(tmp) / "model")
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        port = free_port()
        proc = start_server(model, port, args.expert_memory or None, timeout=120)
        base = f"http://127.0.0.1:{port}"
        results = []
        try:
            for level in (int(x) for x in args.clients.split(",")):
                if time.monotonic() > deadline:
                    print(f"time limit reached; skipping {level} clients", file=sys.stderr)
                    break
                results.append(run_level(base, level, args.requests, args.prompt_tokens, args.max_tokens, vocab,
                                         deadline))  # fmt: skip
                print(json.dumps(results[-1]), flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(
        f"\nmodel: {args.model or 'synthetic mixtral D=256 E=8 K=2 L=4 fp32'}; expert memory: "
        f"{args.expert_memory or 'all resident'}; {args.prompt_tokens}-token prompts, {args.max_tokens} tokens each\n"
    )
    print(
        "| clients | requests | errors | tokens | tokens/s | mean batch | TTFT p50 s | bytes read / token |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        bpt = "n/a" if r["bytes_read_per_token"] is None else f"{r['bytes_read_per_token']:,}"
        print(
            f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['completion_tokens']} | {r['tokens_per_s']} "
            f"| {r['mean_batch']} | {r['ttft_p50_s']} | {bpt} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
