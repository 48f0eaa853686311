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
REGUESS_HORIZON = 64


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


def guess_shares(
    counts: dict[int, list[int]], room: int, top_k: int, horizon: int = REGUESS_HORIZON
) -> dict[int, int]:
    """Each layer's share of `room` guess slots after a prompt, counts[layer][e]: picks of expert e. In proportion
    to the experts the prompt left unused that the layer will pick within `horizon` tokens, by a Pólya urn fitted
    to that layer's picks (fill.py): a layer whose prompt tokens spread over many experts keeps finding new ones,
    one whose tokens kept to a few rarely does. Never more than a layer's unused experts."""
    new = {}
    for layer, c in counts.items():
        experts, picks, seen = len(c), sum(c), sum(1 for n in c if n)
        if picks == 0:
            new[layer] = float(experts)
            continue
        alpha = fit_alpha(picks, seen, experts)
        new[layer] = max(0.0, expected_distinct(alpha, picks + horizon * top_k, experts) - seen)
    unused = {layer: sum(1 for n in c if not n) for layer, c in counts.items()}
    shares = {layer: 0 for layer in counts}
    left = room
    while left > 0:  # proportional shares, a layer capped at its unused experts and the rest shared again
        open_layers = [layer for layer in counts if shares[layer] < unused[layer] and new[layer] > 0]
        if not open_layers:
            break
        weight = sum(new[layer] for layer in open_layers)
        given = 0
        for layer in open_layers:
            add = min(unused[layer] - shares[layer], max(1, int(left * new[layer] / weight)))
            add = min(add, left - given)
            shares[layer] += add
            given += add
        left -= given
        if given == 0:
            break
    return shares


def reguess_from_prompt(cache: ExpertCache, counts: dict[int, list[int]], top_k: int) -> int:
    """Place the cache's guesses again by a prompt's routing (counts: guess_shares'): a layer keeps those of its
    guesses it still gets a share for and reads the rest of its share, lowest-numbered first; the guesses of
    layers given fewer go. Returns the experts read."""
    guessed, free = cache.guesses()
    resident = set(cache.resident())
    shares = guess_shares(counts, len(guessed) + free, top_k)
    keep, read = [], []
    for layer, c in counts.items():
        unused = [(layer, e) for e in range(len(c)) if not c[e]]
        held = [k for k in unused if k in guessed]
        rest = [k for k in unused if k not in resident]
        wanted = (held + rest)[: shares[layer]]
        keep += [k for k in wanted if k in guessed]
        read += [k for k in wanted if k not in guessed]
    cache.forget_guesses(guessed.difference(keep))
    return cache.fill(sorted(read))
