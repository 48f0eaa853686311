"""An expert cache's counters, per layer and summed: hits, misses, reads and their time, evictions and prefetch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class CacheStats:
    hits: int = 0  # expert already resident when its layer needed it
    prefetch_hits: int = 0  # resident (or arriving) because prefetch guessed it
    misses: int = 0  # read on demand while compute waited
    bytes_read: int = 0  # demand and prefetch reads
    read_s: float = 0.0  # time spent in reads, summed over threads
    wait_s: float = 0.0  # time compute waited on I/O
    evictions: int = 0
    prefetch_reads: int = 0
    prefetch_wasted: int = 0  # prefetched, then evicted without being used
    prefetch_cancelled: int = 0  # wrong guesses dropped before their read started

    def add(self, other: CacheStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict:
        d = asdict(self)
        used = self.hits + self.prefetch_hits + self.misses
        # a prefetch hit still cost a disk read (ahead of time): only true hits count toward the hit rate
        d["hit_rate"] = self.hits / used if used else 0.0
        return d


def summary(cache) -> dict:
    """An ExpertCache's counters summed over its layers, each layer's own (with the bytes it holds), and its
    sizes and settings. The caller holds the cache's lock."""
    total, per_layer = CacheStats(), {}
    for layer in sorted(cache.layer_stats):
        total.add(cache.layer_stats[layer])
        per_layer[str(layer)] = cache.layer_stats[layer].as_dict()
        per_layer[str(layer)]["resident_bytes"] = (
            sum(k[0] == layer for k in cache.res.slot) * cache.slot_bytes
        )
    out = total.as_dict()
    out.update(
        resident_bytes=len(cache.res.slot) * cache.slot_bytes,
        peak_resident_bytes=cache.peak_resident_bytes,
        allocated_bytes=cache.capacity * cache.slot_bytes,
        budget_bytes=cache.budget_bytes,
        total_expert_bytes=cache.total_bytes,
        slot_bytes=cache.slot_bytes,
        capacity=cache.capacity,
        pinned=len(cache.res.pinned),
        policy=getattr(cache.policy, "name", type(cache.policy).__name__),
        device=str(cache.device),
        layers=per_layer,
    )
    return out


def activity(cache) -> dict:
    """Per expert, as copies (the caller holds the cache's lock): the cumulative counters (uses, demand_reads,
    prefetch_reads, evicted: {key: n}) and the sets now (resident, pinned, prefetched and not used yet)."""
    return {"uses": dict(cache.uses), "demand_reads": dict(cache.demand_reads),
            "prefetch_reads": dict(cache.prefetch_reads), "evicted": dict(cache.evicted),
            "resident": set(cache.res.slot), "pinned": set(cache.res.pinned),
            "prefetched": cache.prefetched | set(cache.queued)}  # fmt: skip
