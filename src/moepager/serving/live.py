"""The live view's event stream: what the page at `/` and `moepager top` draw, pushed as server-sent events.

Owns one event's JSON shape (documented in docs/live.md; `version` changes when a field changes meaning), the
rates computed over a sliding window of the engine's own counters, the expert heat map (which expert of which
layer was resident, hit, missed, prefetched, pinned or recently evicted since the last event), the memory
breakdown in the categories `moepager plan` uses, and the broadcast: one snapshot per tick, whatever the
number of clients, and none while no client listens. Does not own the counters themselves (the scheduler's
BatchStats, engine.stats(), ExpertCache.activity()), the page (web/) or the terminal drawing (serving/top.py).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator

EVENT_VERSION = 1
LIVE_HZ = 4  # events per second: enough to watch experts move, cheap next to a decode step
WINDOW_S = 2.0  # rates (tokens/s, hit rate, MB/s) are over about this much recent time
# heat map cells, one character per expert; when several apply since the last event, the first listed wins
STATES = {
    "m": "miss: read from disk on demand since the last event",
    "f": "prefetched: read ahead by prefetch since the last event, or waiting unused",
    "h": "hit: used since the last event, already resident",
    "p": "pinned: resident and never evicted",
    "r": "resident: in the cache, not used since the last event",
    "e": "evicted since the last event (and not back)",
    ".": "not in the cache",
}
MEMORY_CATEGORIES = ("runtime", "dense_weights", "kv_cache", "buffers", "expert_read_staging", "expert_cache")


class LiveFeed:
    """Snapshots of an engine and its scheduler, as events; `subscribe` yields them at LIVE_HZ."""

    def __init__(self, engine, scheduler, model_id: str, interval: float = 1 / LIVE_HZ):
        self.engine, self.scheduler, self.model_id, self.interval = engine, scheduler, model_id, interval
        self.cache = getattr(engine.experts, "cache", None)  # the ExpertCache when experts are paged
        self._window: deque[dict] = deque()
        self._activity: dict | None = None  # the cache's counters at the previous event
        self._clients: set[asyncio.Queue] = set()
        self._ticker: asyncio.Task | None = None
        self.seq = 0
        from ..model.decoder import weight_storages

        self.dense_bytes = sum(weight_storages(engine.model).values())
        if self.cache is not None:
            keys = self.cache.source.expert_keys()
            self.layers = sorted({layer for layer, _ in keys})
            self.num_experts = max(e for _, e in keys) + 1
        else:
            self.layers, self.num_experts = [], engine.config.num_experts

    # -------------------------------------------------------------------------------- one event

    def snapshot(self) -> dict:
        """The event for now (advances the window: call it once per tick)."""
        now = time.monotonic()
        s = self.scheduler.stats
        stats = self.engine.stats()
        x = stats.get("experts") or {}
        prefetch = x.get("prefetch") or {}
        counters = {"t": now, "decode_tokens": s.decode_tokens, "decode_s": s.decode_s,
                    "prefill_tokens": s.prefill_tokens, "bytes_read": x.get("bytes_read", 0),
                    "hits": x.get("hits", 0), "prefetch_hits": x.get("prefetch_hits", 0),
                    "misses": x.get("misses", 0), "guessed": prefetch.get("guessed", 0),
                    "correct": prefetch.get("correct", 0)}  # fmt: skip
        self._window.append(counters)
        while len(self._window) > 2 and now - self._window[1]["t"] >= WINDOW_S:
            self._window.popleft()
        first = self._window[0]
        d = {k: counters[k] - first[k] for k in counters}
        rate = lambda n, t: n / t if t > 0 else 0.0  # noqa: E731
        used = d["hits"] + d["prefetch_hits"] + d["misses"]
        self.seq += 1
        return {
            "version": EVENT_VERSION, "seq": self.seq, "time": time.time(), "interval_s": self.interval,
            "window_s": d["t"], "model": self.model_id,
            "speed": {
                "tokens_per_s": rate(d["decode_tokens"], d["t"]),
                "decode_tokens_per_s": rate(d["decode_tokens"], d["decode_s"]),
                "prefill_tokens_per_s": rate(s.prefill_tokens, s.prefill_s),
                "time_to_first_token_s": s.last_first_token_s,
                "mean_time_to_first_token_s": rate(s.first_token_s, s.first_tokens) or None,
                "decode_tokens": s.decode_tokens, "prefill_tokens": s.prefill_tokens,
            },
            "experts": None if not x else {
                "paged": self.cache is not None,
                "hit_rate": rate(d["hits"], used) if used else None,
                "hit_rate_total": x.get("hit_rate"),
                "prefetch_precision": rate(d["correct"], d["guessed"]) if d["guessed"] else None,
                "prefetch_precision_total": prefetch.get("precision") if prefetch else None,
                "mib_read_per_token": rate(d["bytes_read"], d["decode_tokens"]) / 2**20 if d["decode_tokens"] else None,
                "disk_mb_per_s": rate(d["bytes_read"], d["t"]) / 1e6,
                "hits": x.get("hits", 0), "prefetch_hits": x.get("prefetch_hits", 0), "misses": x.get("misses", 0),
                "bytes_read": x.get("bytes_read", 0), "evictions": x.get("evictions", 0),
                "capacity": x.get("capacity"), "total_experts": self.cache.num_keys if self.cache else None,
                "policy": x.get("policy"),
            },
            "memory": self._memory(),
            "requests": self._requests(),
            "heat": self._heat(x.get("layers") or {}),
        }  # fmt: skip

    def _heat(self, per_layer: dict) -> dict | None:
        if self.cache is None:
            return None
        act, prev = self.cache.activity(), self._activity
        self._activity = act
        prev = prev or {"uses": {}, "demand_reads": {}, "prefetch_reads": {}, "evicted": {}}
        changed = lambda name: [k for k, n in act[name].items() if prev[name].get(k) != n]  # noqa: E731
        width, row_of = self.num_experts, {layer: i for i, layer in enumerate(self.layers)}
        grid = bytearray(b"." * (width * len(self.layers)))

        def paint(keys, state: bytes):  # later calls win: painted from the weakest state to the strongest
            for layer, e in keys:
                if layer in row_of:
                    grid[row_of[layer] * width + e] = state[0]

        paint([k for k in changed("evicted") if k not in act["resident"]], b"e")
        paint(act["resident"], b"r")
        paint(act["pinned"], b"p")
        paint(changed("uses"), b"h")
        paint(changed("prefetch_reads") + [k for k in act["prefetched"] if k in act["resident"]], b"f")
        paint(changed("demand_reads"), b"m")
        text = grid.decode()
        return {
            "layers": self.layers, "experts": width,
            "rows": [text[i * width : (i + 1) * width] for i in range(len(self.layers))],
            "layer_hit_rate": [per_layer.get(str(layer), {}).get("hit_rate") for layer in self.layers],
        }  # fmt: skip

    def _memory(self) -> dict:
        """Bytes per category of `moepager plan`, measured now; `buffers` is what the RSS holds beyond the rest."""
        from ..runtime.engine import current_rss

        rss, cache, experts = current_rss(), self.cache, self.engine.experts
        _, prefilling, running = self.scheduler.sequences()
        kv = 0
        for seq in running + ([prefilling] if prefilling is not None else []):
            c = seq.cache  # None once the sequence ended (on the worker thread)
            kv += c.nbytes() if c is not None and hasattr(c, "nbytes") else 0
        expert_bytes = cache.capacity * cache.slot_bytes if cache is not None else _nbytes(experts)
        parts = {"runtime": self.engine.rss_before_weights or 0, "dense_weights": self.dense_bytes, "kv_cache": kv,
                 "expert_read_staging": cache.staging_bytes if cache is not None else 0,
                 "expert_cache": expert_bytes}  # fmt: skip
        on_device = self.engine.device.type != "cpu"  # weights and slots are then device memory, not RSS
        in_ram = sum(
            v for k, v in parts.items() if not (on_device and k in ("dense_weights", "expert_cache"))
        )
        parts["buffers"] = max(0, rss - in_ram)
        return {
            "rss_bytes": rss, "limit_bytes": getattr(cache, "memory_limit", None), "device": str(self.engine.device),
            "categories": {k: parts[k] for k in MEMORY_CATEGORIES},
        }  # fmt: skip

    def _requests(self) -> dict:
        waiting, prefilling, running = self.scheduler.sequences()
        now, s = time.perf_counter(), self.scheduler.stats

        def row(seq, state: str) -> dict:
            return {"state": state, "prompt_tokens": len(seq.prompt), "generated": seq.produced,
                    "max_tokens": seq.max_tokens, "age_s": now - seq.submitted_at,
                    "time_to_first_token_s": None if seq.first_token_at is None
                    else seq.first_token_at - seq.submitted_at}  # fmt: skip

        rows = [row(q, "waiting") for q in waiting]
        rows += [row(prefilling, "prefill")] if prefilling is not None else []
        rows += [row(q, "decode") for q in running if not q.finished]
        return {"waiting": len(waiting), "running": sum(r["state"] == "decode" for r in rows),
                "max_batch": self.scheduler.max_batch, "mean_batch": s.step_sequences / s.steps if s.steps else None,
                "sequences": rows}  # fmt: skip

    # -------------------------------------------------------------------------------- broadcast

    async def subscribe(self) -> AsyncIterator[dict]:
        """Events from now on, at most LIVE_HZ a second; a slow client skips events rather than queueing them,
        and sees their heat map in the next (merge_heat)."""
        q: asyncio.Queue = asyncio.Queue(maxsize=1)
        self._clients.add(q)
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.create_task(self._tick())
        try:
            while True:
                yield await q.get()
        finally:
            self._clients.discard(q)

    async def _tick(self) -> None:
        while self._clients:
            event = self.snapshot()
            for q in list(self._clients):
                mine = event
                if q.full():  # the client has not taken the last one: the newest replaces it, keeping its map
                    mine = {**event, "heat": merge_heat(q.get_nowait()["heat"], event["heat"])}
                q.put_nowait(mine)
            await asyncio.sleep(self.interval)
        self._window.clear()  # a later client starts a fresh window
        self._activity = None


def merge_heat(skipped: dict | None, newer: dict | None) -> dict | None:
    """The heat map since the event before `skipped`: what happened in either, the first listed state winning.

    `r`, `p` and `.` say where an expert is now, so they come from `newer` alone; `m`, `f`, `h` and `e` say what
    happened since the event before, so a client that never saw `skipped` still sees them."""
    if skipped is None or newer is None:
        return newer
    rank = {s: i for i, s in enumerate(STATES)}

    def cell(old: str, new: str) -> str:
        return old if old in "mfhe" and rank[old] < rank[new] else new

    rows = ["".join(map(cell, a, b)) for a, b in zip(skipped["rows"], newer["rows"], strict=True)]
    return {**newer, "rows": rows}


def _nbytes(experts) -> int:
    """Bytes of resident experts (ResidentExperts.nbytes); 0 where they live elsewhere (Ray actors)."""
    return int(experts.nbytes()) if hasattr(experts, "nbytes") else 0
