"""What the live view costs: decode tokens/s of a `moepager serve` with the page open (Debian's headless Chromium
on /, drawing every event) or a bare /events client, against no client at all, side by side in one run.

One server (the default model unless --model, experts paged at --expert-memory) serves every request; each round
runs the cases in alternating order (ABC, then CBA) with the same seed, so each case decodes the same tokens
through the same routing. Decode speed is measured by the client: generated tokens after the first / the time
from the first streamed token to the last. Prints a markdown table; --out writes it too.

    python benchmarks/live_view.py --rounds 6 --tokens 96 --out benchmarks/live_view.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def start_server(model: str | None, expert_memory: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "moepager", "serve", *([model] if model else []), "--port", str(port),
           "--expert-memory", expert_memory, "--model-name", "m"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=1).close()
            return proc, base
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"serve exited with {proc.returncode}: {' '.join(cmd)}") from None
            time.sleep(0.5)
    raise SystemExit("serve did not answer /health in 5 minutes")


def decode_rate(base: str, tokens: int, seed: int) -> float:
    """Tokens/s between the first streamed token and the last."""
    body = {"model": "m", "prompt": "The history of the printing press", "max_tokens": tokens, "temperature": 1.0,
            "seed": seed, "stream": True}  # fmt: skip
    req = urllib.request.Request(
        base + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    first = last = None
    n = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
                n += 1
    return (n - 1) / (last - first)


class EventsClient:
    """A bare /events subscriber that parses every event, as another tool drawing the stream would."""

    def __init__(self, base: str):
        self.r = urllib.request.urlopen(base + "/events", timeout=60)
        self.n = 0
        threading.Thread(target=self._read, daemon=True).start()
        while self.n < 2:
            time.sleep(0.05)

    def _read(self):
        try:
            for line in self.r:
                if line.startswith(b"data:"):
                    json.loads(line[5:])
                    self.n += 1
        except (OSError, ValueError, AttributeError):
            pass

    def close(self):
        self.r.close()


class PageClient:
    """The page at / open in a tab of an already running Chromium."""

    def __init__(self, context, base: str):
        self.page = context.new_page()
        self.page.goto(base + "/")
        self.page.wait_for_function("window.moepagerLive && window.moepagerLive.events > 2", timeout=60_000)

    def close(self):
        self.n = self.page.evaluate("window.moepagerLive.events")
        self.page.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="default: the embedded default model")
    p.add_argument("--expert-memory", default="25%")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    proc, base = start_server(args.model, args.expert_memory)
    profile = Path(tempfile.mkdtemp(prefix="moepager-chromium-"))
    results: dict[str, list[float]] = {"none": [], "events": [], "page": []}
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
                viewport={"width": 1280, "height": 900},
            )  # fmt: skip
            decode_rate(base, 16, seed=999)  # warm-up: kernels, first reads
            openers = {"none": lambda: None, "events": lambda: EventsClient(base),
                       "page": lambda: PageClient(browser, base)}  # fmt: skip
            for rnd in range(args.rounds):
                order = list(results) if rnd % 2 == 0 else list(results)[::-1]
                for case in order:
                    client = openers[case]()
                    rate = decode_rate(base, args.tokens, seed=rnd)
                    if client is not None:
                        client.close()
                    results[case].append(rate)
                    print(f"round {rnd + 1} {case:6s} {rate:6.2f} tok/s", flush=True)
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
    table = report(results, args)
    print(table)
    if args.out:
        args.out.write_text(table)


def report(results: dict[str, list[float]], args) -> str:
    base = results["none"]
    lines = ["| case | " + " | ".join(f"round {i + 1}" for i in range(len(base))) + " | median | median ratio to none |",
             "| --- |" + " --- |" * (len(base) + 2)]  # fmt: skip
    for case, rates in results.items():
        ratios = [r / b for r, b in zip(rates, base)]  # per round: same seed, same tokens
        lines.append(f"| {case} | " + " | ".join(f"{r:.2f}" for r in rates) +
                     f" | {statistics.median(rates):.2f} | {statistics.median(ratios):.3f} |")  # fmt: skip
    cmd = "python benchmarks/live_view.py " + " ".join(sys.argv[1:])
    return (
        f"`{cmd}` (decode tokens/s, {args.tokens} tokens per request, experts at {args.expert_memory})\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
