"""Speculative decoding: cheap drafts, verified by the model in one forward pass, exact.

Owns the drafters (prompt lookup `ngram`, the same model routed among resident experts `self`, a small
draft model), the verification of k drafted tokens in one batched forward (so a paged MoE layer reads the
union of their experts once, not once per token), rolling the KV cache back past rejected tokens, and the
counters. Greedy verification keeps the longest prefix of drafts equal to the model's own argmax, then adds
the model's next token: the output is the tokens decoding without speculation gives. Sampled verification is
standard speculative sampling (accept a draft d with probability min(1, p(d)/q(d)), else draw from
norm(max(0, p - q))), which leaves the output distributed as the model's own sampler.
Does not own sampling transforms (generate.probabilities) or which experts are resident (the experts object).

Letters: V vocabulary, n drafted tokens (<= k).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..errors import MoepagerError
from ..model.decoder import Transformer
from ..model.layers import KVCache
from ..model.moe import NotResident
from .generate import SamplingParams, Timings, draw, first_token, prefill, probabilities, sample

DRAFT_KINDS = ("ngram", "self")  # or a path / name of a draft model
NGRAM_MAX = 3  # the longest suffix prompt lookup matches (it tries shorter ones down to 1)


@dataclass
class Draft:
    tokens: list[int]  # [n] drafted ids
    q: torch.Tensor | None = None  # [n, V] the draft's distribution per token; None: deterministic (one-hot)


@dataclass
class SpeculationStats:
    rounds: int = 0  # verification forwards
    drafted: int = 0  # drafted tokens offered to verification
    accepted: int = 0  # drafted tokens the model accepted
    produced: int = 0  # tokens the rounds yielded (accepted drafts + one token of the model per round)
    expert_reads: int = 0  # experts read from disk while drafting and verifying (on demand and prefetch)
    expert_bytes: int = 0

    def as_dict(self) -> dict:
        per = lambda a, b: a / b if b else 0.0  # noqa: E731
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "produced": self.produced, "acceptance_rate": per(self.accepted, self.drafted),
                "tokens_per_round": per(self.produced, self.rounds), "expert_reads": self.expert_reads,
                "expert_reads_per_token": per(self.expert_reads, self.produced),
                "expert_bytes_per_token": per(self.expert_bytes, self.produced)}  # fmt: skip


class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the history's last few tokens and propose what
    followed it. No model, no reads; good where the output repeats its input (summaries, code edits)."""

    kind = "ngram"

    def __init__(self, max_ngram: int = NGRAM_MAX):
        self.max_ngram = max_ngram

    def draft(self, model, cache, history: list[int], k: int, params, generator) -> Draft:
        n_hist = len(history)
        for n in range(min(self.max_ngram, n_hist - 1), 0, -1):
            tail = history[-n:]
            for start in range(n_hist - n - 1, -1, -1):  # latest match first, never the tail itself
                if history[start : start + n] == tail:
                    follow = history[start + n : start + n + k]
                    if follow:
                        return Draft(follow)
        return Draft([])

    def close(self) -> None:
        pass


class SelfDrafter:
    """The model itself, routed only among the experts already resident: no disk reads while drafting.
    A lossy guess (some tokens get other experts than their router's first choice), made exact by
    verification. Drafting runs one token at a time on the model's own cache, then rolls it back."""

    kind = "self"

    def __init__(self, experts):
        if not hasattr(experts, "drafting"):
            raise MoepagerError("--speculate self needs experts in this process (paged or resident); "
                                "use --speculate ngram with --ray")  # fmt: skip
        self.experts = experts

    def draft(self, model, cache, history: list[int], k: int, params, generator) -> Draft:
        start, token = cache.seq_len, torch.tensor([[history[-1]]], device=model.norm.weight.device)
        tokens, qs = [], []
        try:
            with self.experts.drafting(model):
                for _ in range(k):
                    logits = model(token, cache, last_only=True)[:, -1]  # [1, V]
                    token = sample(logits, params, generator).view(1, 1)
                    tokens.append(int(token))
                    if params.temperature > 0:
                        qs.append(probabilities(logits, params)[0])
        except NotResident:  # a layer holds too few experts to route among: draft what was drafted so far
            pass
        finally:
            cache.truncate(start)
        return Draft(tokens, torch.stack(qs) if qs else None)

    def close(self) -> None:
        pass


class ModelDrafter:
    """A small model with the same vocabulary drafts with its own KV cache, kept in step with the history."""

    kind = "model"

    def __init__(self, engine, vocab_size: int, name: str):
        if engine.config.vocab_size != vocab_size:
            raise MoepagerError(f"--speculate {name}: its vocabulary has {engine.config.vocab_size} tokens, the "
                                f"model's {vocab_size}; use a draft model with the same tokenizer")  # fmt: skip
        self.engine, self.cache, self.ids = engine, engine.new_cache(), []  # ids: positions the cache holds

    def draft(self, model, cache, history: list[int], k: int, params, generator) -> Draft:
        keep = 0
        while keep < min(len(self.ids), len(history) - 1) and self.ids[keep] == history[keep]:
            keep += 1
        self.cache.truncate(keep)
        net, device = self.engine.model, self.engine.device
        logits = prefill(net, torch.tensor(history[keep:], device=device), self.cache, 512)
        self.ids = list(history)
        tokens, qs = [], []
        for i in range(k):
            token = sample(logits, params, generator)
            tokens.append(int(token))
            if params.temperature > 0:
                qs.append(probabilities(logits, params)[0].to(model.norm.weight.device))
            if i < k - 1:
                logits = net(token.view(1, 1), self.cache, last_only=True)[:, -1]
                self.ids.append(tokens[-1])
        return Draft(tokens, torch.stack(qs) if qs else None)

    def close(self) -> None:
        if hasattr(self.cache, "close"):
            self.cache.close()


def verify(model: Transformer, cache: KVCache, last: int, draft: Draft, params: SamplingParams,
           generator: torch.Generator | None) -> tuple[list[int], int]:  # fmt: skip
    """One forward over [last, d1..dn] -> (the tokens to emit: accepted drafts + the model's own next token,
    how many drafts were accepted). The cache keeps the positions of last and the accepted drafts only."""
    start, n = cache.seq_len, len(draft.tokens)
    ids = torch.tensor([[last, *draft.tokens]], device=model.norm.weight.device)  # [1, n+1]
    logits = model(ids, cache)[0]  # [n+1, V]
    if params.temperature <= 0:
        target = logits.argmax(dim=-1).tolist()
        taken = 0
        while taken < n and draft.tokens[taken] == target[taken]:
            taken += 1
        out = draft.tokens[:taken] + [target[taken]]
    else:
        out = _rejection(probabilities(logits, params), draft, generator)
        taken = len(out) - 1
    cache.truncate(start + 1 + taken)
    return out, taken


def _rejection(p: torch.Tensor, draft: Draft, generator: torch.Generator | None) -> list[int]:
    """Speculative sampling over the model's distributions p [n+1, V]: each draft d_i is kept with probability
    min(1, p_i(d_i) / q_i(d_i)); the first one rejected is replaced by a draw from norm(max(0, p_i - q_i));
    when all are kept, one more token is drawn from p_n."""
    out = []
    for i, d in enumerate(draft.tokens):
        q = draft.q[i] if draft.q is not None else None
        q_d = float(q[d]) if q is not None else 1.0
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * q_d < float(p[i, d]):  # u < p/q without dividing by a q of 0
            out.append(d)
            continue
        if q is None:
            residual = p[i].clone()
            residual[d] = 0.0
        else:
            residual = (p[i] - q).clamp_(min=0.0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: the residual is undefined, p is its limit
            residual = p[i]
        out.append(int(draw(residual, generator)))
        return out
    out.append(int(draw(p[len(draft.tokens)], generator)))
    return out


class Speculation:
    """A drafter, how many tokens it drafts per round, and the counters, held by the engine."""

    def __init__(self, drafter, draft_tokens: int, reads: Callable[[], tuple[int, int]] | None = None):
        if not (isinstance(draft_tokens, int) and draft_tokens >= 1):
            raise MoepagerError(f"--draft-tokens {draft_tokens!r}: give a positive number of tokens")
        self.drafter, self.k = drafter, draft_tokens
        self.reads = reads or (lambda: (0, 0))  # () -> (expert reads, expert bytes) so far
        self.stats = SpeculationStats()

    @property
    def kind(self) -> str:
        return self.drafter.kind

    def round(self, model: Transformer, cache: KVCache, history: list[int], params: SamplingParams,
              generator: torch.Generator | None, room: int) -> list[int]:  # fmt: skip
        """history: the ids so far, the last one not yet in the cache. Draft up to min(k, room - 1) tokens and
        verify them -> 1 .. k+1 tokens (room: how many more tokens may be emitted, >= 1)."""
        reads0, bytes0 = self.reads()
        k = min(self.k, room - 1)
        draft = self.drafter.draft(model, cache, history, k, params, generator) if k > 0 else Draft([])
        out, taken = verify(model, cache, history[-1], draft, params, generator)
        reads1, bytes1 = self.reads()
        s = self.stats
        s.rounds += 1
        s.drafted += len(draft.tokens)
        s.accepted += taken
        s.produced += len(out)
        s.expert_reads += reads1 - reads0
        s.expert_bytes += bytes1 - bytes0
        return out

    def close(self) -> None:
        self.drafter.close()


@torch.inference_mode()
def speculative_generate_step(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
                              params: SamplingParams, speculation: Speculation, cache: KVCache | None = None,
                              timings: Timings | None = None, prefill_chunk: int = 512) -> Iterator[int]:  # fmt: skip
    """generate_step's contract with speculation: yields the same tokens greedily, and tokens distributed as
    its samples when sampling. On return the cache holds every yielded token's position but the last."""
    cache, timings, generator, token = first_token(model, prompt, params, cache, timings, prefill_chunk)
    token = int(token)
    history = prompt.tolist() + [token]
    base = cache.seq_len - prompt.shape[0]  # positions the cache held before this prompt
    produced = 1
    yield token
    if token in params.stop_ids or max_new_tokens == 1:
        return
    while True:
        t0 = time.perf_counter()
        out = speculation.round(model, cache, history, params, generator, max_new_tokens - produced)
        timings.decode_tokens += len(out)
        timings.decode_s += time.perf_counter() - t0
        for tid in out:
            history.append(tid)
            produced += 1
            yield tid
            if tid in params.stop_ids or produced == max_new_tokens:
                # a stop inside the round: forget the positions past it, as decoding without drafts would
                cache.truncate(base + len(history) - 1)
                return
