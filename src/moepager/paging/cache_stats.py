"""An expert cache's counters, per layer and summed: hits, misses, reads and their time, evictions and prefetch;
and their table as `moepager stats` prints it (render_stats)."""

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


def render_stats(stats: dict) -> str:
    """The expert cache part of `engine.stats()` (or of a `moepager run --json` record) as a table."""
    from ..system.sizes import format_bytes

    x = stats["experts"]
    cols = ["hits", "prefetch_hits", "misses", "hit_rate", "evictions", "bytes_read", "read_s", "wait_s",
            "resident_bytes"]  # fmt: skip

    def cell(d, c):
        v = d.get(c, 0)
        if c.endswith("bytes") or c == "bytes_read":
            return format_bytes(v)
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [
        [f"layer {k}"] + [cell(v, c) for c in cols]
        for k, v in sorted(x["layers"].items(), key=lambda i: int(i[0]))
    ]
    rows.append(["total"] + [cell(x, c) for c in cols])
    head = ["", *cols]
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: "  ".join(str(v).rjust(w) for v, w in zip(r, widths))  # noqa: E731
    out = [
        f"expert cache: {x['capacity']} slots of {format_bytes(x['slot_bytes'])} = {format_bytes(x['allocated_bytes'])}"
        f" (budget {format_bytes(x['budget_bytes'])}, all experts {format_bytes(x['total_expert_bytes'])}), "
        f"policy {x['policy']}, {x['pinned']} pinned, peak resident {format_bytes(x['peak_resident_bytes'])}",
        line(head),
        *[line(r) for r in rows],
    ]
    if x.get("prefetch"):
        p = x["prefetch"]
        out.append(
            f"prefetch: precision {p['precision']:.3f}, recall {p['recall']:.3f}, {p['reads_started']} reads, "
            f"off (kept missing) in layers {p.get('layers_off') or 'none'}"
        )
    if "tiers" in stats:  # a remote source: the network and local disk tiers under the cache
        r, d = stats["tiers"]["remote"], stats["tiers"]["local"]
        out.append(
            f"remote: {format_bytes(r['bytes_fetched'])} fetched in {r['requests']} requests ({r['retries']} "
            f"retried), {r['experts_fetched']} experts, {r['wait_s']:.2f} s waited; local disk: "
            f"{d['experts_stored']} of {d['experts_total']} experts stored ({format_bytes(d['disk_bytes'])} "
            f"on disk), {d['from_local']} of {d['expert_reads']} reads already local, {d['evictions']} evicted"
        )
    if "decode_tokens_per_s" in stats:
        out.append(
            f"decode {stats['decode_tokens_per_s']:.2f} tokens/s, prefill {stats['prefill_tokens_per_s']:.2f}"
        )
    return "\n".join(out)
