"""Prefetch: guess the next MoE layer's experts and read them into the cache in the background.

The guess applies layer L+1's router to layer L's hidden state (the residual stream changes little from one
layer to the next, so the next router mostly picks the same experts). The routers come in as callables
(layer -> x [N, D] -> ids [N, K]) built by the engine, so the model knows nothing of prefetching. A guess
only moves bytes: the layer always computes with the experts its own router chose, so a wrong guess costs
a read, never a different output. The reads themselves and the slots they may take are the cache's.
"""

from __future__ import annotations

from typing import Callable

import torch

Router = Callable[[torch.Tensor], torch.Tensor]  # x [N, D] -> ids [N, K]


class RouterPrefetcher:
    def __init__(self, routers: dict[int, Router], cache, max_fraction: float = 0.5):
        self.routers, self.cache = routers, cache
        order = sorted(routers)
        self.next = dict(zip(order, order[1:]))  # MoE layer -> the MoE layer after it
        self.max_guess = max(
            1, int(cache.capacity * max_fraction)
        )  # a prefill guessing every expert is no guess
        self.predicted: dict[int, set[int]] = {}  # layer -> its guessed experts, until the layer runs
        self.correct = self.guessed = self.needed = self.reads = 0

    def observe(self, layer: int, needed: list[int]) -> None:
        """Score the guess for `layer` against what its router chose."""
        guess = self.predicted.pop(layer, None)
        if guess is not None:
            self.correct += len(guess.intersection(needed))
            self.guessed += len(guess)
            self.needed += len(needed)

    def predict(self, layer: int, x: torch.Tensor) -> None:
        """x [N, D]: the input of `layer`'s experts. Start reads for the next MoE layer's likely experts."""
        nxt = self.next.get(layer)
        if nxt is None:
            return
        guess = sorted(set(self.routers[nxt](x).flatten().tolist()))
        self.predicted[nxt] = set(guess)
        if len(guess) <= self.max_guess:
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
        }
