"""Token generation as layered generators: prefill, one decode step, and generate_step yielding token ids.

Knows nothing of text: tokenization and streaming text live in generation/tokenizer.py, HTTP above that.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import MoepagerError
from ..model.decoder import Transformer
from ..model.layers import KVCache


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    stop_ids: list[int] = field(default_factory=list)


def check_sampling(max_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                   prompt_tokens: int | None = None, context: int | None = None) -> None:  # fmt: skip
    """Refuse sampling parameters that cannot be honoured, with a message naming the flag (--max-tokens) and
    what to do. context: positions the model can hold; the prompt and the new tokens must fit. (The server
    refuses request fields through its request schemas, with HTTP errors naming the field.)"""
    name = lambda n: "--" + n.replace("_", "-")  # noqa: E731
    number = lambda x, kind=(int, float): isinstance(x, kind) and not isinstance(x, bool)  # noqa: E731
    if max_tokens is not None and not (number(max_tokens, int) and max_tokens >= 1):
        raise MoepagerError(f"{name('max_tokens')} {max_tokens!r}: give at least 1 token to generate")
    if not (number(temperature) and 0 <= temperature < float("inf")):
        raise MoepagerError(f"{name('temperature')} {temperature!r}: give a number >= 0 (0 = greedy)")
    if not (number(top_p) and 0 < top_p <= 1):
        raise MoepagerError(f"{name('top_p')} {top_p!r}: give a number in (0, 1] (1 = no nucleus cut)")
    if not (number(top_k, int) and top_k >= 0):
        raise MoepagerError(f"{name('top_k')} {top_k!r}: give an integer >= 0 (0 = no limit)")
    if None not in (max_tokens, prompt_tokens, context) and prompt_tokens + max_tokens > context:
        room = context - prompt_tokens
        fix = f"use {name('max_tokens')} {room} or less" if room > 0 else "shorten the prompt"
        raise MoepagerError(f"{name('max_tokens')} {max_tokens} after a {prompt_tokens}-token prompt passes the "
                            f"context of {context} tokens; {fix}")  # fmt: skip


@dataclass
class Timings:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    def as_dict(self) -> dict:
        rate = lambda n, s: n / s if s > 0 else 0.0
        return {
            "prefill_tokens": self.prefill_tokens,
            "prefill_s": self.prefill_s,
            "prefill_tokens_per_s": rate(self.prefill_tokens, self.prefill_s),
            "decode_tokens": self.decode_tokens,
            "decode_s": self.decode_s,
            "decode_tokens_per_s": rate(self.decode_tokens, self.decode_s),
        }


def probabilities(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logits [B, V] -> the distribution `sample` draws from [B, V] (float32): temperature, then top-k, then
    top-p. Speculative sampling compares the target's and the draft's through this same function."""
    logits = logits.float()  # [B, V]
    if p.temperature != 1.0:
        logits = logits / p.temperature  # a copy of its own: the filters below write into it
    elif p.top_k > 0 or p.top_p < 1.0:
        logits = logits.clone()  # else only read: at temperature 1 a plain draw copies nothing
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits.masked_fill_(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)  # [B, V] each
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= p.top_p  # keep the smallest set reaching top_p
        logits.scatter_(-1, order, sorted_logits.masked_fill_(drop, float("-inf")))
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if p.temperature <= 0:
        return logits.argmax(dim=-1)
    return draw(probabilities(logits, p), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs [B, V] (or [V]), drawn with probability proportional to its weight: the
    first index whose float64 running sum passes one uniform draw times the total (inverse transform sampling).
    torch.multinomial spent ~1 ms on a 49152-token vocabulary (a tenth of a decoded token of a small model),
    this ~0.05 ms. A weight of 0 is never drawn: its running sum equals the one before it, and the draw stays
    strictly below the total."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, dtype=torch.float64, generator=generator, device=probs.device)
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)


def prefill(model: Transformer, prompt: torch.Tensor, cache: KVCache, chunk: int) -> torch.Tensor:
    """Run a prompt [T] into the cache `chunk` tokens per forward (activations bounded by the chunk, not the
    prompt) -> the last position's logits [1, V]."""
    if chunk < 1:
        raise ValueError(f"prefill_chunk must be positive, got {chunk}")
    for i in range(0, prompt.shape[0], chunk):
        logits = model(prompt[None, i : i + chunk], cache, last_only=True)[:, -1]
    return logits


def first_token(model: Transformer, prompt: torch.Tensor, params: SamplingParams, cache: KVCache | None,
                timings: Timings | None, prefill_chunk: int):  # fmt: skip
    """How every decoding loop begins: (cache, timings, the seeded generator or None, the token sampled after the
    prompt [1]), the prompt's prefill timed."""
    cache = cache if cache is not None else KVCache(model.config.num_layers)
    timings = timings if timings is not None else Timings()
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=prompt.device).manual_seed(params.seed)
    t0 = time.perf_counter()
    token = sample(prefill(model, prompt, cache, prefill_chunk), params, generator)
    timings.prefill_tokens += prompt.shape[0]
    timings.prefill_s += time.perf_counter() - t0
    return cache, timings, generator, token


@torch.inference_mode()
def generate_step(
    model: Transformer,
    prompt: torch.Tensor,
    max_new_tokens: int,
    params: SamplingParams,
    cache: KVCache | None = None,
    timings: Timings | None = None,
    prefill_chunk: int = 512,
) -> Iterator[int]:
    """Yield up to max_new_tokens ids for one prompt [T]; stops after a stop id (which is yielded).

    The prompt goes through the model prefill_chunk tokens at a time, so activations stay bounded by the
    chunk, not the prompt; a given cache is continued (its positions come before the prompt).
    """
    cache, timings, generator, token = first_token(model, prompt, params, cache, timings, prefill_chunk)
    for i in range(max_new_tokens):
        tid = int(token)
        yield tid
        if tid in params.stop_ids or i == max_new_tokens - 1:
            return
        t0 = time.perf_counter()
        logits = model(token.view(1, 1), cache, last_only=True)[:, -1]
        token = sample(logits, params, generator)
        timings.decode_tokens += 1
        timings.decode_s += time.perf_counter() - t0
