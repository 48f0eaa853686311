"""The fill's guesses: experts read into every free slot when a model loads (fill_cache), as llama.cpp's mapped file
is read whole, and placed again once the first prompt has shown how widely each layer routes (reguess_from_prompt).

A guess is an expert no token has used yet (Residency.unranked): the first to go when a step needs a slot, so
guessing never costs a used expert its place. Owns which keys are guessed, not how they are read (cache.fill).
"""

from __future__ import annotations

from ..system.progress import progress_bar
from .cache import ExpertCache
from .fill import expected_distinct, fit_alpha

FILL_BAR_BYTES = 1 << 30
# decode tokens a prompt's routing is extrapolated over when guesses are placed: the first replies' length, where
# first-use misses are; the share each layer gets hardly changes past it
REGUESS_HORIZON = 128
# expected hits a guess must gain to move from one layer to another as a prompt ends: a read then costs about half
# of a miss while decoding (the small Q4_0 file: 0.44 ms an expert read together at the prompt's end, 0.9 ms a miss)
MOVE_GAIN = 0.5


def fill_cache(cache: ExpertCache) -> None:
    """Read experts into every free slot now: each MoE layer its share of the slots, its lowest-numbered experts,
    so that a layer's experts come in a few large reads instead of one small read each as decoding misses them
    (ExpertCache.fill). A progress bar past FILL_BAR_BYTES."""
    by_layer: dict[int, list] = {}
    for key in sorted(cache.source.expert_keys()):
        if key not in cache.res.slot:
            by_layer.setdefault(key[0], []).append(key)
    room = len(cache.res.free)
    share, extra = divmod(room, max(1, len(by_layer)))
    keys = [k for i, layer in enumerate(by_layer.values()) for k in layer[: share + (i < extra)]]
    with progress_bar(total=len(keys), unit="expert", desc="filling the expert cache",
                      enabled=room * cache.slot_bytes >= FILL_BAR_BYTES) as bar:  # fmt: skip
        cache.fill(keys, bar.update)


def guess_targets(counts: dict[int, list[int]], guessed: dict[int, int], room: dict[int, int], free: int, top_k: int,
                  horizon: int = REGUESS_HORIZON) -> dict[int, int]:  # fmt: skip
    """How many guesses each layer should hold after a prompt. counts[layer][e]: the prompt's picks of expert e;
    guessed: the guesses a layer holds now; room: its unused experts not resident, which it may read; free: empty
    slots. An expert a layer's prompt left unused is picked within `horizon` tokens with the chance a Pólya urn
    fitted to that layer's picks gives (fill.py): high where the prompt spread over many experts, low where it kept
    to a few. Free slots go to the likeliest layers; a guess moves from one layer to another only where the chances
    differ by more than MOVE_GAIN, what reading it as the prompt ends costs against a miss while decoding."""
    chance = {}
    for layer, c in counts.items():
        experts, picks, seen = len(c), sum(c), sum(1 for n in c if n)
        if picks == 0 or seen == experts:
            chance[layer] = float(seen < experts)
            continue
        alpha = fit_alpha(picks, seen, experts)
        new = expected_distinct(alpha, picks + horizon * top_k, experts) - seen
        chance[layer] = min(1.0, max(0.0, new / (experts - seen)))
    target, room = {layer: guessed.get(layer, 0) for layer in counts}, dict(room)
    likeliest = sorted(counts, key=lambda layer: -chance[layer])
    for layer in likeliest:
        add = min(free, room[layer])
        target[layer] += add
        room[layer] -= add
        free -= add
    takers, givers = iter(likeliest), iter(reversed(likeliest))
    taker, giver = next(takers, None), next(givers, None)
    while taker is not None and giver is not None and chance[taker] - chance[giver] > MOVE_GAIN:
        n = min(room[taker], target[giver])
        target[taker] += n
        room[taker] -= n
        target[giver] -= n
        if room[taker] == 0:
            taker = next(takers, None)
        if target[giver] == 0:
            giver = next(givers, None)
    return target


def reguess_from_prompt(cache: ExpertCache, counts: dict[int, list[int]], top_k: int) -> int:
    """Place the cache's guesses again by a prompt's routing (counts: guess_targets'): a layer keeps as many of its
    guesses as its target, or reads up to it, lowest-numbered unused experts first. Returns the experts read."""
    guessed, free = cache.guesses()
    resident = set(cache.resident())
    held, rest = {}, {}
    for layer, c in counts.items():
        unused = [(layer, e) for e in range(len(c)) if not c[e]]
        held[layer] = [k for k in unused if k in guessed]
        rest[layer] = [k for k in unused if k not in resident]
    target = guess_targets(counts, {layer: len(k) for layer, k in held.items()},
                           {layer: len(k) for layer, k in rest.items()}, free, top_k)  # fmt: skip
    keep = [k for layer in counts for k in held[layer][: target[layer]]]
    read = [k for layer in counts for k in rest[layer][: max(0, target[layer] - len(held[layer]))]]
    cache.forget_guesses(guessed.difference(keep))
    return cache.fill(sorted(read))
