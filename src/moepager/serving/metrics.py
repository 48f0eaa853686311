"""Prometheus metrics of the server through prometheus-client: requests, tokens, batching, the expert cache.

Owns the metric names (Prometheus conventions: `_total` counters, `_seconds` and `_bytes` units) and the ASGI
middleware that counts requests. Each app has its own registry. Model-side numbers (the scheduler's counters,
engine.stats()) are read when /metrics is scraped, never pushed. Expert cache hits count experts already
resident; prefetch hits were read from disk ahead of time and are counted apart, with the bytes they cost.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..generation.batching import Scheduler
from ..runtime.engine import Engine

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))
_PATHS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"}
# expert cache stat -> (metric name without the moepager_expert_ prefix, kind, help)
_EXPERT = {
    "hits": ("hits", "counter", "experts found resident when their layer needed them (no disk read)"),
    "prefetch_hits": ("prefetch_hits", "counter", "experts needed that prefetch had read ahead (a disk read, early)"),
    "misses": ("misses", "counter", "experts read on demand while compute waited"),
    "bytes_read": ("read_bytes", "counter", "expert bytes read from disk, on demand and by prefetch"),
    "read_s": ("read_seconds", "counter", "time spent in expert reads, summed over threads"),
    "wait_s": ("wait_seconds", "counter", "time compute waited for expert reads"),
    "evictions": ("evictions", "counter", "experts evicted from the cache"),
    "prefetch_reads": ("prefetch_reads", "counter", "expert reads started by prefetch"),
    "prefetch_wasted": ("prefetch_wasted", "counter", "prefetched experts evicted before any use"),
    "hit_rate": ("hit_ratio", "gauge", "true hits / (hits + prefetch hits + misses) since start"),
    "resident_bytes": ("resident_bytes", "gauge", "bytes of experts resident in the cache"),
    "budget_bytes": ("budget_bytes", "gauge", "the expert cache's byte budget"),
    "total_expert_bytes": ("model_bytes", "gauge", "bytes of all routed experts of the model"),
}  # fmt: skip
# speculation stat -> (metric name without the moepager_speculative_ prefix, kind, help)
_SPECULATION = {
    "drafted": ("drafted_tokens", "counter", "drafted tokens offered to verification"),
    "accepted": ("accepted_tokens", "counter", "drafted tokens the model accepted"),
    "rounds": ("verify_passes", "counter", "verification forwards (each yields accepted drafts and one more token)"),
    "acceptance_rate": ("acceptance_ratio", "gauge", "accepted / drafted tokens since start"),
    "expert_reads_per_token": ("expert_reads_per_token", "gauge", "experts read from disk per token of speculative steps"),
}  # fmt: skip


class Metrics:
    """Request-side metrics, updated on the event loop; a collector reads the model side at scrape time."""

    def __init__(self, scheduler: Scheduler, engine: Engine):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "moepager_requests", "HTTP requests by path and status", ["path", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "moepager_prompt_tokens", "prompt tokens of finished requests", registry=r
        )
        self.completion_tokens = Counter(
            "moepager_completion_tokens", "tokens generated for clients", registry=r
        )
        self.latency = Histogram("moepager_request_duration_seconds", "time from request to its last byte",
                                 buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.first_token = Histogram("moepager_time_to_first_token_seconds", "time from request to first token",
                                     buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        r.register(_ModelCollector(scheduler, engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ModelCollector:
    def __init__(self, scheduler: Scheduler, engine: Engine):
        self.scheduler, self.engine = scheduler, engine

    def describe(self):
        return []  # names depend on the engine (paged or not): collected at scrape time only

    def collect(self):
        s = self.scheduler.stats

        def family(name: str, kind: str, help: str, value: float):
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            return cls(f"moepager_{name}", help, value=value)

        yield family("active_sequences", "gauge", "sequences in the running batch", s.active)
        yield family("waiting_sequences", "gauge", "sequences waiting to join the batch", s.waiting)
        yield family("decode_steps", "counter", "batched decode steps", s.steps)
        yield family(
            "decode_step_sequences", "counter", "sum of batch sizes over decode steps", s.step_sequences
        )
        yield family("prefill_tokens", "counter", "prompt tokens prefilled", s.prefill_tokens)
        yield family("prefill_seconds", "counter", "time spent in prefill", s.prefill_s)
        yield family("decode_tokens", "counter", "tokens decoded", s.decode_tokens)
        yield family("decode_seconds", "counter", "time spent in decode steps", s.decode_s)
        stats = self.engine.stats()
        yield family(
            "peak_memory_bytes", "gauge", "peak resident memory of the process", stats["peak_memory_bytes"]
        )
        experts = stats.get("experts") or {}
        for key, (name, kind, help) in _EXPERT.items():
            if key in experts:
                yield family(f"expert_{name}", kind, help, experts[key])
        speculation = stats.get("speculation") or {}
        for key, (name, kind, help) in _SPECULATION.items():
            if key in speculation:
                yield family(f"speculative_{name}", kind, help, speculation[key])


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
            self.metrics.requests.labels(path, str(status[0])).inc()
            if path.startswith("/v1/") and path != "/v1/models":
                self.metrics.latency.observe(time.perf_counter() - t0)
