"""Residency: which expert holds which slot, and where an expert is evicted: the victim is the policy's choice
(policies.py) among the experts that may go (not in use, not being read, not pinned). Shared by the expert
cache and the offline replay of traces."""

from __future__ import annotations

import itertools
from collections.abc import Callable

from .policies import Policy, victims_by_loop

Key = tuple[int, int]  # (layer, expert)


class Residency:
    """Which key holds which slot, and what may be evicted. Pure bookkeeping: no tensors, no I/O, no lock
    (the caller holds one). The offline replay runs policies through this same class."""

    def __init__(self, capacity: int, policy: Policy):
        self.capacity, self.policy = capacity, policy
        self.slot: dict[Key, int] = {}  # resident or arriving key -> slot index
        self.free = list(range(capacity - 1, -1, -1))
        self.in_use: dict[Key, int] = {}  # key -> holders (the current layer step, a read in flight)
        self.pinned: set[Key] = set()
        self.unranked: dict[Key, None] = {}  # loaded by a guess, never used yet: the policy has not seen them
        # called with each key that leaves (the expert cache forgets its slot in the table)
        self.on_evict: Callable[[Key], None] | None = None

    def evictable(self, key: Key) -> bool:
        return key not in self.in_use and key not in self.pinned

    def hold(self, key: Key) -> None:
        self.hold_many((key,))

    def drop(self, key: Key) -> None:
        self.drop_many((key,))

    def hold_many(self, keys) -> None:
        in_use = self.in_use
        for key in keys:
            in_use[key] = in_use.get(key, 0) + 1

    def drop_many(self, keys) -> None:
        in_use = self.in_use
        for key in keys:
            n = in_use[key] - 1
            if n:
                in_use[key] = n
            else:
                del in_use[key]

    def _may_evict(self, may_evict=None):
        return self.evictable if may_evict is None else (lambda k: self.evictable(k) and may_evict(k))

    def _stale(self, ok, incoming: Key | None):
        """Guesses never used, which go first (nothing says they will be), those of incoming's layer before the
        others: a layer's misses then take the place of its own guesses, and each layer keeps its share of what a
        fill at load read (guesses.py fill_cache) until its own steps have used or replaced it. Lazy: a step takes
        the few it needs of what may be thousands after a fill."""
        layer = None if incoming is None else incoming[0]
        if layer is not None:
            yield from (k for k in self.unranked if k[0] == layer and ok(k))
        yield from (k for k in self.unranked if (layer is None or k[0] != layer) and ok(k))

    def victim(self, may_evict=None, incoming: Key | None = None) -> Key | None:
        ok = self._may_evict(may_evict)
        stale = next(self._stale(ok, incoming), None)
        return stale if stale is not None else self.policy.victim(ok, incoming)

    def victims(self, n: int, may_evict=None, incoming: Key | None = None) -> list[Key]:
        """Up to n victims chosen in one pass, as n calls of victim (each evicting its choice) would give."""
        ok = self._may_evict(may_evict)
        stale = list(itertools.islice(self._stale(ok, incoming), n))
        if len(stale) == n:
            return stale
        # unranked keys are unknown to the policy (it never saw them used), so it cannot pick them again
        if hasattr(self.policy, "victims"):
            return stale + self.policy.victims(n - len(stale), ok, incoming)
        # a policy object that does not subclass Policy
        return stale + victims_by_loop(self.policy, n - len(stale), ok, incoming)

    def claim(self, key: Key, may_evict=None) -> tuple[int, Key | None] | None:
        """A slot for key: a free one, or one taken from a victim. (slot, evicted key) or None if all busy."""
        if self.free:
            slot, evicted = self.free.pop(), None
        else:
            evicted = self.victim(may_evict, key)
            if evicted is None:
                return None
            slot = self.evict(evicted)
        self.slot[key] = slot
        return slot, evicted

    def claim_many(self, keys: list[Key], may_evict=None) -> list[tuple[Key, int, Key | None]]:
        """Slots for the keys of one layer step, in order, as long as slots can be had: free ones first, then
        victims chosen together. [(key, slot, evicted key or None)]; the same as claim called per key."""
        n_free = min(len(self.free), len(keys))
        victims = self.victims(len(keys) - n_free, may_evict, keys[n_free]) if len(keys) > n_free else []
        out = []
        for i, key in enumerate(keys[: n_free + len(victims)]):
            evicted = None if i < n_free else victims[i - n_free]
            slot = self.free.pop() if evicted is None else self.evict(evicted)
            self.slot[key] = slot
            out.append((key, slot, evicted))
        return out

    def evict(self, key: Key) -> int:
        slot = self.slot.pop(key)
        self.policy.remove(key)
        self.unranked.pop(key, None)
        if self.on_evict is not None:
            self.on_evict(key)
        return slot

    def release(self, key: Key) -> None:
        """Take key out of the cache now, its slot back to the free list."""
        self.free.append(self.evict(key))

    def used(self, key: Key) -> None:
        self.used_step(key[0], [key[1]])

    def used_step(self, layer: int, experts: list[int]) -> None:
        """used((layer, e)) for each of a layer step's experts, in order."""
        for e in experts:
            self.unranked.pop((layer, e), None)
        if hasattr(self.policy, "access_step"):
            self.policy.access_step(layer, experts)
        else:  # a policy object that does not subclass Policy
            for e in experts:
                self.policy.access((layer, e))
