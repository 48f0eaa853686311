"""Eviction policies for the expert cache: small swappable objects that choose which resident expert leaves.

A policy only ranks keys. The cache (residency.py, Residency) owns what is resident, what is in use and what is
pinned, and asks the policy for victims among the keys it may evict. A new policy is one class with
`access`, `remove` and `victim`; register it in POLICIES to make it reachable by name. Subclassing Policy adds
`victims` (several at once) as a loop over `victim`, and `access_step` (a step's uses at once) as a loop over
`access`; a policy that can do either in one pass overrides it.

Keys are (layer, expert). The cache calls `access_step(layer, experts)` once per layer step with every expert that
step uses (hit or miss), in order: `access` of each; `remove` when a key leaves the cache; and
`victims(n, evictable, incoming)` (or `victim`) when it needs slots for a layer step's misses (`incoming` is one of
them), before that step's accesses. `victims(n, ...)` must equal n calls of `victim`, each followed by `remove` of
the key it chose.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Protocol

from ..errors import MoepagerError

Key = Hashable  # (layer, expert) in the cache; any hashable in tests


class Policy(Protocol):
    name: str

    def access(self, key: Key) -> None:
        """key was used by the current layer step (after it was loaded, on a miss)."""
        ...

    def access_step(self, layer: int, experts: list[int]) -> None:
        """The keys (layer, e) of one layer step used, in order: `access` of each, which a policy may do at once
        (a decoded token calls this at every MoE layer)."""
        for e in experts:
            self.access((layer, e))

    def remove(self, key: Key) -> None:
        """key left the cache."""
        ...

    def victim(self, evictable: Callable[[Key], bool], incoming: Key | None = None) -> Key | None:
        """The resident key to evict among those `evictable` accepts, to make room for `incoming` (the key
        about to be loaded, when known); None when there is none."""
        ...

    def victims(self, n: int, evictable: Callable[[Key], bool], incoming: Key | None = None) -> list[Key]:
        """Up to n keys to evict, in the order n calls of `victim` would give them (none is removed here)."""
        return victims_by_loop(self, n, evictable, incoming)


def victims_by_loop(
    policy, n: int, evictable: Callable[[Key], bool], incoming: Key | None = None
) -> list[Key]:
    """n calls of `victim`, each excluding the keys already chosen: any policy's `victims`."""
    chosen: dict[Key, None] = {}
    while len(chosen) < n:
        key = policy.victim(lambda k: k not in chosen and evictable(k), incoming)
        if key is None:
            break
        chosen[key] = None
    return list(chosen)


class LRU(Policy):
    """Least recently used: evict the key whose last use is oldest."""

    name = "lru"

    def __init__(self):
        self.order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def access(self, key):
        self.order[key] = None
        self.order.move_to_end(key)

    def remove(self, key):
        self.order.pop(key, None)

    def victim(self, evictable, incoming=None):
        return next((k for k in self.order if evictable(k)), None)

    def victims(self, n, evictable, incoming=None):
        return list(itertools.islice((k for k in self.order if evictable(k)), n))


class LFU(Policy):
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

    def _rank(self, key) -> tuple[int, int]:
        return self.count.get(key, 0), self.last[key]  # no ties: every resident key has its own last use

    def victim(self, evictable, incoming=None):
        return min((k for k in self.last if evictable(k)), key=self._rank, default=None)

    def victims(self, n, evictable, incoming=None):
        return heapq.nsmallest(n, (k for k in self.last if evictable(k)), key=self._rank)


class NextUse(Policy):
    """Layer-aware expected next use: evict the key whose next use is predicted furthest away (Belady's rule
    with an estimate of the future).

    Layers run in a cycle, one step per layer per token. An expert of layer l chosen with probability p at a
    step of l is next needed after about dist(current layer -> l) + L * (1 / p - 1) layer steps. p blends two
    frequencies decayed per step of the expert's own layer, so that every layer is judged on the same number
    of chances whatever the phase of the cycle: a long one (half-life `long_half_life` tokens: which experts a
    layer keeps coming back to, what LRU forgets) and a short one (half-life `short_half_life`: consecutive
    tokens route alike, what LFU misses). Distances count from the layer of the key that needs the slot:
    victims are chosen before the step's own `access` calls.
    """

    name = "nextuse"

    def __init__(
        self, long_half_life: float = 128.0, short_half_life: float = 1.0, short_weight: float = 0.3
    ):
        self.d_long = 0.5 ** (1.0 / long_half_life)  # decay per step of the key's layer
        self.d_short = 0.5 ** (1.0 / short_half_life)
        self.w = short_weight
        self.counts: dict[Key, tuple[float, float, int]] = {}  # key -> (long count, short count, at run)
        self.resident: dict[Key, int] = {}  # resident key -> step of its last use
        self.by_layer: dict = {}  # layer -> {its resident keys}
        self.ranked: dict = {}  # layer -> (ahead, [(wait, key)] most evictable first); dropped on change
        self.pos: dict = {}  # layer -> its place in the cycle of layers
        self.runs: dict = {}  # layer -> steps it has run
        self.step = 0
        self.layer = None

    def _enter(self, layer) -> None:
        if layer == self.layer:
            return  # the same step (its waves)
        self.layer = layer
        self.step += 1
        self.pos.setdefault(layer, len(self.pos))
        self.runs[layer] = self.runs.get(layer, 0) + 1
        self.ranked.pop(layer, None)  # its keys aged

    def access(self, key):
        self.access_step(key[0], [key[1]])

    def access_step(self, layer, experts):
        # one layer's keys in one pass: one _enter, one run count and one ranking dropped
        self._enter(layer)
        runs, counts, resident, step = self.runs[layer], self.counts, self.resident, self.step
        mine = self.by_layer.setdefault(layer, {})
        for e in experts:
            key = (layer, e)
            long, short, at = counts.get(key, (0.0, 0.0, runs))
            age = runs - at
            counts[key] = (long * self.d_long**age + 1.0, short * self.d_short**age + 1.0, runs)
            resident[key] = step
            mine[key] = None
        self.ranked.pop(layer, None)

    def remove(self, key):
        if key in self.resident:
            del self.resident[key], self.by_layer[key[0]][key]
            cached = self.ranked.get(key[0])
            if cached is not None:  # the others keep their waits and order: drop the key, do not re-rank
                self.ranked[key[0]] = (cached[0], [wk for wk in cached[1] if wk[1] != key])

    def _waits(self, layer, keys, ahead: int = 0) -> list[float]:
        """Expected layer steps from the next run of `layer` to each of its keys' next use (a tie: the older waits
        longer); ahead = 1 counts a run of the layer that has started but not reached the policy yet. The layer's
        terms once, then a few products a key: a miss ranks every resident key of each layer that ran since."""
        runs, counts, resident = self.runs.get(layer, 0), self.counts, self.resident
        # a count decayed per step over the same decayed count of steps: a probability per step of its layer
        norm = 1 - self.d_long ** min(max(runs + ahead, 1), 100_000)
        n = max(len(self.pos), 1)
        d_long, d_short, w = self.d_long, self.d_short, self.w
        long_rate, short_rate, long_w = 1 - d_long, 1 - d_short, 1 - w
        out = []
        for key in keys:
            long, short, at = counts.get(key, (0.0, 0.0, runs))
            age = runs + ahead - at
            p = w * (short * d_short**age) * short_rate + long_w * (long * d_long**age * long_rate / norm)
            out.append(n * (1.0 / max(min(p, 1.0), 1e-6) - 1.0) - 1e-9 * resident[key])
        return out

    def _dist(self, layer, here) -> int:
        """Layer steps from a step of `here` until `layer` runs again (1 for the next layer, n for `here`)."""
        n = max(len(self.pos), 1)
        return (self.pos.get(layer, 0) - self.pos.get(here, 0) - 1) % n + 1

    def _ahead(self, layer, here) -> int:
        # a step of `here` that has not reached access() yet: its keys outside that step just missed a chance
        return int(layer == here != self.layer)

    def _wait(self, key, ahead: int = 0) -> float:
        return self._waits(key[0], [key], ahead)[0]

    def _expected_next_use(self, key, here) -> float:
        return self._dist(key[0], here) + self._wait(key, self._ahead(key[0], here))

    def _ranking(self, layer, ahead: int) -> list[tuple[float, Key]]:
        # a layer's order only changes when it runs or one of its keys is used or leaves
        cached = self.ranked.get(layer)
        if cached is None or cached[0] != ahead:
            keys = list(self.by_layer[layer])
            waits = zip(self._waits(layer, keys, ahead), keys)
            cached = self.ranked[layer] = (ahead, sorted(waits, key=lambda wk: -wk[0]))
        return cached[1]

    def victim(self, evictable, incoming=None):
        here = self.layer if incoming is None else incoming[0]  # the layer whose step needs the slot
        # each layer's best candidate, then the best of those: O(layers) per miss, not O(resident keys)
        best, best_score = None, -math.inf
        for layer in self.by_layer:
            ranked = self._ranking(layer, self._ahead(layer, here))
            wait, key = next(((w, k) for w, k in ranked if evictable(k)), (0.0, None))
            if key is not None and (score := self._dist(layer, here) + wait) > best_score:
                best, best_score = key, score
        return best

    def victims(self, n, evictable, incoming=None):
        """A step's victims in one pass: the layers' rankings merged, highest expected next use first.

        Equal to n calls of victim: removing a key leaves the order of its layer's other keys as it was, and
        ties go to the earlier layer, then the earlier key of a ranking, as victim's strict `>` does."""
        if n <= 0:
            return []
        here = self.layer if incoming is None else incoming[0]

        def candidates(layer):  # -score ascending within a layer: its ranking's order
            dist = self._dist(layer, here)
            return (
                (-(dist + w), k) for w, k in self._ranking(layer, self._ahead(layer, here)) if evictable(k)
            )

        # merge breaks ties by the position of the iterable: the earlier layer, as victim does
        merged = heapq.merge(*(candidates(layer) for layer in self.by_layer), key=lambda sk: sk[0])
        return [k for _, k in itertools.islice(merged, n)]


POLICIES: dict[str, Callable[[], Policy]] = {"lru": LRU, "lfu": LFU, "nextuse": NextUse}


def make_policy(policy: str | Policy | None) -> Policy:
    if policy is None:
        return NextUse()
    if not isinstance(policy, str):
        return policy
    if policy not in POLICIES:
        raise MoepagerError(f"unknown eviction policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[policy]()
