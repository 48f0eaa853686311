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
