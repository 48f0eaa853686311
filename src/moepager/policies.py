"""Eviction policies for the expert cache: small swappable objects that choose which resident expert leaves.

A policy only ranks keys. The cache (cache.Residency) owns what is resident, what is in use and what is
pinned, and asks the policy for a victim among the keys it may evict. A new policy is one class with
`access`, `remove` and `victim`; register it in POLICIES to make it reachable by name.

Keys are (layer, expert). The cache calls `access` once per layer step for every expert that step uses
(hit or miss), `remove` when a key leaves the cache, and `victim(evictable)` when it needs a slot.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Hashable, Protocol

from .errors import MoepagerError

Key = Hashable  # (layer, expert) in the cache; any hashable in tests


class Policy(Protocol):
    name: str

    def access(self, key: Key) -> None:
        """key was used by the current layer step (after it was loaded, on a miss)."""
        ...

    def remove(self, key: Key) -> None:
        """key left the cache."""
        ...

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        """The resident key to evict among those `evictable` accepts; None when there is none."""
        ...


class LRU:
    """Least recently used: evict the key whose last use is oldest."""

    name = "lru"

    def __init__(self):
        self.order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def access(self, key):
        self.order[key] = None
        self.order.move_to_end(key)

    def remove(self, key):
        self.order.pop(key, None)

    def victim(self, evictable):
        return next((k for k in self.order if evictable(k)), None)


class LFU:
    """Least frequently used, with aging: every `age_every` accesses all counts are halved, so experts that
    were popular long ago do not stay forever. Counts survive eviction (a returning expert keeps its history).
    Ties go to the least recently used."""

    name = "lfu"

    def __init__(self, age_every: int = 4096):
        self.age_every = age_every
        self.count: dict[Key, int] = {}  # every key ever seen, resident or not
        self.last: dict[Key, int] = {}  # resident keys -> time of last use
        self.clock = 0

    def access(self, key):
        self.clock += 1
        self.count[key] = self.count.get(key, 0) + 1
        self.last[key] = self.clock
        if self.clock % self.age_every == 0:
            self.count = {k: c // 2 for k, c in self.count.items() if c // 2 or k in self.last}

    def remove(self, key):
        self.last.pop(key, None)

    def victim(self, evictable):
        keys = [k for k in self.last if evictable(k)]
        return min(keys, key=lambda k: (self.count.get(k, 0), self.last[k]), default=None)


class NextUse:
    """Layer-aware expected next use: evict the key whose next use is predicted furthest away (Belady's rule
    with an estimate of the future).

    Layers run in a cycle, one step per layer per token. An expert of layer l chosen with probability p per
    token is next needed after about dist(current layer -> l) + L * (1 / p - 1) layer steps. p blends two
    decayed per-token frequencies: a long one (half-life `long_half_life` tokens: which experts a layer keeps
    coming back to, what LRU forgets) and a short one (half-life `short_half_life`: consecutive tokens route
    alike, what LFU misses).
    """

    name = "nextuse"

    def __init__(
        self, long_half_life: float = 128.0, short_half_life: float = 1.0, short_weight: float = 0.3
    ):
        self.d_long = 0.5 ** (1.0 / long_half_life)  # decay per token
        self.d_short = 0.5 ** (1.0 / short_half_life)
        self.w = short_weight
        self.counts: dict[Key, tuple[float, float, int]] = {}  # key -> (long count, short count, at token)
        self.resident: dict[Key, int] = {}  # resident key -> step of its last use
        self.pos: dict = {}  # layer -> its place in the cycle of layers
        self.token = 0  # a step of the first layer of the cycle starts a token
        self.step = 0
        self.layer = None

    def _enter(self, layer) -> None:
        if layer == self.layer:
            return
        self.layer = layer
        self.step += 1
        if layer not in self.pos:
            self.pos[layer] = len(self.pos)
        elif self.pos[layer] == 0:
            self.token += 1

    def _decayed(self, key) -> tuple[float, float]:
        long, short, at = self.counts.get(key, (0.0, 0.0, self.token))
        age = self.token - at
        return long * self.d_long**age, short * self.d_short**age

    def access(self, key):
        self._enter(key[0])
        long, short = self._decayed(key)
        self.counts[key] = (long + 1.0, short + 1.0, self.token)
        self.resident[key] = self.step

    def remove(self, key):
        self.resident.pop(key, None)

    def _expected_next_use(self, key) -> float:
        long, short = self._decayed(key)
        # a count decayed per token over the same decayed count of tokens: a probability per token
        seen = self.token + 1
        p_long = long * (1 - self.d_long) / (1 - self.d_long ** min(seen, 100_000))
        p = self.w * short * (1 - self.d_short) + (1 - self.w) * p_long
        n = max(len(self.pos), 1)
        dist = (
            self.pos.get(key[0], 0) - self.pos.get(self.layer, 0) - 1
        ) % n + 1  # steps until its layer runs
        return dist + n * (1.0 / max(min(p, 1.0), 1e-6) - 1.0) - 1e-9 * self.resident[key]

    def victim(self, evictable):
        keys = [k for k in self.resident if evictable(k)]
        return max(keys, key=self._expected_next_use, default=None)


POLICIES: dict[str, Callable[[], Policy]] = {"lru": LRU, "lfu": LFU, "nextuse": NextUse}


def make_policy(policy: str | Policy | None) -> Policy:
    if policy is None:
        return NextUse()
    if not isinstance(policy, str):
        return policy
    if policy not in POLICIES:
        raise MoepagerError(f"unknown eviction policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[policy]()
