"""The cold-start fill model: how many experts each decode token will miss as a cache fills over a run.

Owns the continuation of a short routing trace to a longer run and its replay through an eviction policy.
Each MoE layer's routing is modelled as a Pólya urn (a symmetric Dirichlet-multinomial): an expert is picked
in proportion to how often it was picked before plus a prior `alpha / experts`, so a run keeps finding new
experts at the rate the trace found them, and popular ones stay popular. `alpha` is fitted, one for all layers,
so that the trace's picks show as many distinct experts per layer as the urn would on average. The traced
tokens are replayed as they were; the rest of the run is drawn from the urns (seeded). Replaying it all through
the cache's policy (trace.replay_steps: the live cache's own bookkeeping) gives the misses of every token, from
a cold cache to the warm steady state. It knows nothing of time or of the model: runtime/plan.py prices the misses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .policies import Policy
from .trace import replay_steps

Request = tuple[int, list[int]]  # (layer, distinct experts ascending): what one layer step asks the cache for


def expected_distinct(alpha: float, picks: int, experts: int) -> float:
    """Distinct experts seen on average after `picks` draws from a Pólya urn of `experts` with prior alpha.
    An expert is never drawn with probability Γ(α)Γ(N+α-a) / (Γ(α-a)Γ(N+α)), a = α/E."""
    a = alpha / experts
    lg = math.lgamma
    never = lg(alpha) + lg(picks + alpha - a) - lg(alpha - a) - lg(picks + alpha)
    return experts * (1.0 - math.exp(never))


def fit_alpha(picks: int, distinct: float, experts: int, lo: float = 1e-3, hi: float = 1e6) -> float:
    """The urn's alpha under which `picks` draws show `distinct` experts on average (bisection in log alpha;
    clamped to [lo, hi]: hi is as good as uniform routing)."""
    if picks <= 0 or distinct >= expected_distinct(hi, picks, experts):
        return hi
    if distinct <= expected_distinct(lo, picks, experts):
        return lo
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        if expected_distinct(mid, picks, experts) < distinct:
            lo = mid
        else:
            hi = mid
    return math.sqrt(lo * hi)


@dataclass
class RoutingSample:
    """One generation's routing: per MoE layer the experts each token picked, prompt first, then decode."""

    prompt: list[Request]  # the prefill's layer steps (every prompt token's experts of a layer at once)
    decode: list[list[Request]]  # per decoded token, its layer steps in layer order
    counts: dict[int, list[int]]  # layer -> picks per expert over prompt and decode
    experts: int  # routed experts per layer
    top_k: int

    @classmethod
    def from_steps(cls, steps: list[tuple[int, list[list[int]]]], experts: int, top_k: int) -> RoutingSample:
        """From a trace's steps (layer, ids [N][K]): the first pass through the layers, and any pass of several
        tokens (a prompt longer than a prefill chunk), is the prefill; each later pass of one token a decode."""
        prompt, decode, counts = [], [], {}
        passes: list[list[tuple[int, list[list[int]]]]] = []  # a layer seen again opens the next pass
        for layer, ids in steps:
            if not passes or any(layer == seen for seen, _ in passes[-1]):
                passes.append([])
            passes[-1].append((layer, ids))
            c = counts.setdefault(layer, [0] * experts)
            for token in ids:
                for e in token:
                    c[e] += 1
        for i, one in enumerate(passes):
            requests = [(layer, sorted({e for token in ids for e in token})) for layer, ids in one]
            if i == 0 or any(len(ids) > 1 for _, ids in one):  # the prefill, in one or more chunks
                prompt += requests
            else:
                decode.append(requests)
        return cls(prompt, decode, counts, experts, top_k)

    def alpha(self) -> float:
        """The urns' prior, fitted to the distinct experts per layer the sample shows."""
        if not self.counts:
            return 1e6
        picks = sum(map(sum, self.counts.values())) / len(self.counts)
        distinct = sum(sum(c > 0 for c in row) for row in self.counts.values()) / len(self.counts)
        return fit_alpha(round(picks), distinct, self.experts)

    def continued(self, tokens: int, seed: int = 0) -> list[list[Request]]:
        """The decode routing of a run of `tokens` decode steps: the sample's own, then urn draws (seeded)."""
        out = list(self.decode[:tokens])
        if len(out) >= tokens:
            return out
        prior = self.alpha() / self.experts
        urns = {layer: torch.tensor(c, dtype=torch.float64) for layer, c in self.counts.items()}
        order = [layer for layer, _ in self.decode[0]] if self.decode else [layer for layer, _ in self.prompt]
        g = torch.Generator().manual_seed(seed)
        k = min(self.top_k, self.experts)
        while len(out) < tokens:
            step = []
            for layer in order:
                picked = torch.multinomial(urns[layer] + prior, k, replacement=False, generator=g)  # [K]
                urns[layer][picked] += 1
                step.append((layer, sorted(picked.tolist())))
            out.append(step)
        return out


@dataclass
class FillForecast:
    prompt_misses: int  # experts the prefill reads into the cold cache
    misses: list[int]  # per decode token of the run
    steady_misses: float  # per decode token once the cache is warm
    steady_hit_rate: float
    alpha: float  # the urns' fitted prior (small: routing concentrated; large: spread)


def forecast(sample: RoutingSample, capacity: int, tokens: int, policy: Policy, seed: int = 0,
             steady_tokens: int | None = None) -> FillForecast:  # fmt: skip
    """Misses of a run of `tokens` decode steps with `capacity` slots, from a cold cache; the steady state is
    measured over as many tokens again after the cache has had time to fill (at least 4 x its slots in picks)."""
    per_token = max(1, sum(len(e) for _, e in sample.decode[0]) if sample.decode else sample.top_k)
    warm = max(tokens, math.ceil(4 * capacity / per_token))
    steady_tokens = steady_tokens or max(32, tokens)
    routing = sample.continued(warm + steady_tokens, seed)
    counts = [[] for _ in routing]  # per decode token: (hits, asked) per layer step
    prompt_asked = prompt_hits = 0
    flat = [*sample.prompt, *(r for step in routing for r in step)]
    where = [None] * len(sample.prompt) + [i for i, step in enumerate(routing) for _ in step]
    for token, (hits, asked) in zip(where, replay_steps(flat, capacity, policy)):
        if token is None:
            prompt_asked += asked
            prompt_hits += hits
        else:
            counts[token].append((hits, asked))
    misses = [sum(a - h for h, a in c) for c in counts]
    late = counts[warm:]
    asked = sum(a for c in late for _, a in c)
    hits = sum(h for c in late for h, _ in c)
    return FillForecast(prompt_asked - prompt_hits, misses[:tokens], sum(misses[warm:]) / len(late),
                        hits / asked if asked else 1.0, sample.alpha())  # fmt: skip
