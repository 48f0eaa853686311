"""Prefetch: guess the next MoE layer's experts and read them into the cache in the background.

The guess applies layer L+1's router to layer L's hidden state (the residual stream changes little from one
layer to the next, so the next router mostly picks the same experts). The routers come in as callables
(layer -> x [N, D] -> ids [N, K]) built by the engine, so the model knows nothing of prefetching. A guess
only moves bytes: the layer always computes with the experts its own router chose, so a wrong guess costs
a read, never a different output. The reads themselves and the slots they may take are the cache's.

Guesses that keep missing stop themselves, per layer: each layer's precision over its last WINDOW steps is
scored, reads for that layer stop while it is below MIN_PRECISION, and the guesses go on being made and
scored without reading (a router call, no I/O), which is the probe that turns the layer back on once they
hit again.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable

import torch

Router = Callable[[torch.Tensor], torch.Tensor]  # x [N, D] -> ids [N, K]

# Below half, most prefetched bytes are wasted. A wasted read takes as much disk time as a right one, and a
# right one saves at most its own read's stall (the demand read it replaces), so on a disk-bound step the
# guesses then cost more than they save; a wrong guess also evicts an expert that may be needed later.
MIN_PRECISION = 0.5
# Steps of a layer (tokens, in decode) per verdict: with K guesses a step that is 8K guesses, enough to tell
# 0.5 from a random guess's K/E on small models (binomial sd <= 0.1 for K >= 4), yet quick to react.
WINDOW = 8


class LayerScore:
    """One layer's recent guesses: (correct, guessed) per step, over the last WINDOW steps."""

    def __init__(self):
        self.steps: deque[tuple[int, int]] = deque(maxlen=WINDOW)

    def add(self, correct: int, guessed: int) -> float | None:
        """Record a step; the window's precision once the window is full, else None."""
        self.steps.append((correct, guessed))
        if len(self.steps) < WINDOW:
            return None
        guessed = sum(g for _, g in self.steps)
        return sum(c for c, _ in self.steps) / guessed if guessed else None


class RouterPrefetcher:
    def __init__(self, routers: dict[int, Router], cache, max_fraction: float = 0.5):
        self.routers, self.cache = routers, cache
        order = sorted(routers)
        self.next = dict(itertools.pairwise(order))  # MoE layer -> the MoE layer after it
        # a prefill guessing every expert is no guess
        self.max_guess = max(1, int(cache.capacity * max_fraction))
        self.predicted: dict[int, set[int]] = {}  # layer -> its guessed experts, until the layer runs
        self.scores: dict[int, LayerScore] = {}
        self.off: set[int] = set()  # layers whose guesses are scored but not read
        self.correct = self.guessed = self.needed = self.reads = self.skipped = 0

    def observe(self, layer: int, needed: list[int]) -> None:
        """Score the guess for `layer` against what its router chose."""
        guess = self.predicted.pop(layer, None)
        if guess is None:
            return
        correct = len(guess.intersection(needed))
        self.correct += correct
        self.guessed += len(guess)
        self.needed += len(needed)
        precision = self.scores.setdefault(layer, LayerScore()).add(correct, len(guess))
        if precision is None:
            return
        now_off = precision < MIN_PRECISION
        if now_off != (layer in self.off):
            # a switch: judge the new state on a full window of its own, so it cannot flap step by step
            self.off.symmetric_difference_update({layer})
            self.scores[layer] = LayerScore()

    def predict(self, layer: int, x: torch.Tensor) -> None:
        """x [N, D]: the input of `layer`'s experts. Start reads for the next MoE layer's likely experts."""
        nxt = self.next.get(layer)
        if nxt is not None:
            self.start_guess(layer, self.routers[nxt](x).flatten().tolist())

    def start_guess(self, layer: int, ids: list[int]) -> None:
        """Start reads for the next MoE layer's likely experts `ids`: its router's picks on the input of `layer`'s
        experts (computed by predict, or by a caller that had that router's logits at hand)."""
        nxt = self.next.get(layer)
        if nxt is None:
            return
        guess = sorted(set(ids))
        self.predicted[nxt] = set(guess)
        if len(guess) > self.max_guess:
            return
        if nxt in self.off:
            self.skipped += 1
            return
        self.reads += self.cache.prefetch(nxt, guess)

    def stats(self) -> dict:
        return {
            "precision": self.correct / self.guessed
            if self.guessed
            else 0.0,  # guessed experts that were used
            "recall": self.correct / self.needed if self.needed else 0.0,  # used experts that were guessed
            "guessed": self.guessed,
            "correct": self.correct,
            "reads_started": self.reads,
            "layers_off": sorted(self.off),  # guesses scored, not read: they kept missing
            "guesses_skipped": self.skipped,  # layer steps whose guess was not read for that reason
        }
