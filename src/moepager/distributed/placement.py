"""Which actor holds which routed expert: round-robin, or balanced by measured usage, with the hottest experts
of each layer optionally held by two actors.

A plan maps (layer, expert) -> the actors holding it (the first is its home). Usage comes from a routing
trace (`moepager run ... --trace FILE`): the layer steps that used each expert.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import MoepagerError

Key = tuple[int, int]  # (layer, expert)
Plan = dict[Key, list[int]]


def usage_from_trace(path: str | Path) -> dict[Key, int]:
    """Layer steps that used each (layer, expert) in a routing trace file."""
    from ..paging.trace import load_trace

    uses: dict[Key, int] = {}
    for layer, experts in load_trace(path).requests():
        for e in experts:
            uses[(layer, e)] = uses.get((layer, e), 0) + 1
    return uses


def place(keys: list[Key], actors: int, usage: dict[Key, int] | None = None, replicate: int = 0) -> Plan:
    """Spread each layer's experts over `actors` in equal counts (at most one apart).

    Without usage: expert e of a layer goes to actor e % actors. With usage: a layer's experts, most used
    first, each go to the actor with the least usage so far that still has room, so every actor serves about
    the same share of the layer's tokens. replicate: the layer's `replicate` most used experts get a second
    actor (the least loaded other one), which the driver may send their tokens to instead.
    """
    if actors < 1:
        raise MoepagerError(f"ray_actors must be at least 1, got {actors}")
    if replicate < 0:
        raise MoepagerError(f"ray_replicate must be 0 or more, got {replicate}")
    if replicate and usage is None:
        raise MoepagerError(
            "replicating hot experts needs their usage: give a routing trace as the placement "
            "(moepager run ... --trace FILE, then --ray-placement FILE)"
        )
    if replicate and actors < 2:
        raise MoepagerError("replicating hot experts needs at least 2 actors")
    by_layer: dict[int, list[int]] = {}
    for layer, e in keys:
        by_layer.setdefault(layer, []).append(e)
    plan: Plan = {}
    for layer, experts in sorted(by_layer.items()):
        if usage is None:
            for e in experts:
                plan[(layer, e)] = [e % actors]
            continue
        room = math.ceil(len(experts) / actors)
        load, count = [0] * actors, [0] * actors
        hottest = sorted(experts, key=lambda e: (-usage.get((layer, e), 0), e))
        for e in hottest:
            a = min((i for i in range(actors) if count[i] < room), key=lambda i: (load[i], i))
            plan[(layer, e)] = [a]
            load[a] += usage.get((layer, e), 0)
            count[a] += 1
        for e in hottest[:replicate]:
            home = plan[(layer, e)][0]
            plan[(layer, e)].append(min((i for i in range(actors) if i != home), key=lambda i: (load[i], i)))
    return plan


def shards(plan: Plan, actors: int) -> list[list[Key]]:
    """The keys each actor holds, sorted."""
    out: list[list[Key]] = [[] for _ in range(actors)]
    for key, owners in sorted(plan.items()):
        for a in owners:
            out[a].append(key)
    return out
