"""Prometheus metrics of the server: request counts and latencies, tokens, batching, and the expert cache.

Owns the text exposition format and the ASGI middleware that counts requests. Model-side numbers
(the scheduler's counters, engine.stats()) are read when /metrics is scraped, never pushed.
"""

from __future__ import annotations

import time
from collections import Counter

from .batching import Scheduler
from .engine import Engine

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))
# cumulative expert cache stats; everything else it reports is a level (resident bytes, capacity, ...)
_EXPERT_COUNTERS = {"hits", "prefetch_hits", "misses", "bytes_read", "read_s", "wait_s", "evictions",
                    "prefetch_reads", "prefetch_wasted"}  # fmt: skip
_PATHS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"}


class Metrics:
    """Counters for /metrics, updated on the event loop; the model-side numbers are read at scrape time."""

    def __init__(self):
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = self.completion_tokens = 0
        self.latency = {name: [0] * len(_LATENCY_BUCKETS) + [0.0] for name in ("request", "first_token")}

    def observe(self, name: str, seconds: float) -> None:
        h = self.latency[name]
        for i, edge in enumerate(_LATENCY_BUCKETS):
            h[i] += seconds <= edge
        h[-1] += seconds

    def render(self, scheduler: Scheduler, engine: Engine) -> str:
        out: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]):
            out.extend([f"# HELP moepager_{name} {help}", f"# TYPE moepager_{name} {kind}"])
            out.extend(f"moepager_{name}{labels} {value}" for labels, value in samples)

        metric("requests_total", "counter", "HTTP requests by path and status",
               [(f'{{path="{p}",status="{s}"}}', n) for (p, s), n in sorted(self.requests.items())])  # fmt: skip
        metric(
            "prompt_tokens_total", "counter", "prompt tokens of finished requests", [("", self.prompt_tokens)]
        )
        metric(
            "completion_tokens_total",
            "counter",
            "tokens generated for clients",
            [("", self.completion_tokens)],
        )
        for name, help in (
            ("request", "time from request to the last byte"),
            ("first_token", "time to first token"),
        ):
            h = self.latency[name]
            samples = [
                (f'_bucket{{le="{"+Inf" if e == float("inf") else e}"}}', h[i])
                for i, e in enumerate(_LATENCY_BUCKETS)
            ]
            samples += [("_sum", h[-1]), ("_count", h[len(_LATENCY_BUCKETS) - 1])]
            metric(f"{name}_duration_seconds", "histogram", help, samples)
        s = scheduler.stats
        metric("active_sequences", "gauge", "sequences in the running batch", [("", s.active)])
        metric("waiting_sequences", "gauge", "sequences waiting to join the batch", [("", s.waiting)])
        metric("decode_steps_total", "counter", "batched decode steps", [("", s.steps)])
        metric("decode_step_sequences_total", "counter", "sum of batch sizes over decode steps", [("", s.step_sequences)])  # fmt: skip
        metric("prefill_tokens_total", "counter", "prompt tokens prefilled", [("", s.prefill_tokens)])
        metric("prefill_seconds_total", "counter", "time spent in prefill", [("", s.prefill_s)])
        metric("decode_tokens_total", "counter", "tokens decoded", [("", s.decode_tokens)])
        metric("decode_seconds_total", "counter", "time spent in decode steps", [("", s.decode_s)])
        stats = engine.stats()
        metric(
            "peak_memory_bytes",
            "gauge",
            "peak resident memory of the process",
            [("", stats["peak_memory_bytes"])],
        )
        # the expert cache names its own stats (hits, misses, bytes_read, resident_bytes, ...)
        for key, value in sorted((stats.get("experts") or {}).items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                kind = "counter" if key in _EXPERT_COUNTERS else "gauge"
                metric(f"experts_{key}", kind, f"expert cache: {key}", [("", value)])
        return "\n".join(out) + "\n"


class MeasureRequests:
    """ASGI middleware: counts requests by path and status and times them, streams included."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"] if scope["path"] in _PATHS else "other"
            self.metrics.requests[(path, status[0])] += 1
            if path.startswith("/v1/") and path != "/v1/models":
                self.metrics.observe("request", time.perf_counter() - t0)
