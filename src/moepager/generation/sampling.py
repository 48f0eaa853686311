"""One request's processing of next-token logits: penalties, logit bias, a grammar mask, and logprobs.

The scheduler calls `process` before sampling and `accept` after, on its worker thread, only for sequences
that carry a LogitsProcessor: unconstrained requests pay nothing per token. Semantics follow OpenAI and vLLM:
presence and frequency penalties count the generated tokens (logit -= frequency * count + presence * [count > 0]);
the repetition penalty (as in transformers and vLLM) divides positive and multiplies negative logits of every
token seen in the prompt or the output; logit_bias is added; logprobs are the log-softmax of the model's raw
logits, before any of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .constrain import Constraint


@dataclass
class Adjustments:
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    repetition_penalty: float = 1.0  # > 0; 1 = none
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, [-100, 100]

    @property
    def any(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)  # fmt: skip


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the `top_logprobs` most likely tokens, most likely first


class LogitsProcessor:
    """Owned by one sequence; `logprobs` is filled before the scheduler announces each token."""

    def __init__(self, prompt: list[int], adjust: Adjustments, constraint: Constraint | None = None,
                 top_logprobs: int | None = None):  # fmt: skip
        self.prompt, self.adjust = prompt, adjust
        self.constraint, self.top_logprobs = constraint, top_logprobs  # top_logprobs None: no logprobs
        self.logprobs: list[TokenLogprob] = []
        self.counts: torch.Tensor | None = None  # [V] generated-token counts, made on first use
        self.seen: torch.Tensor | None = None  # [V] bool: in the prompt or the output

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V] (the model's; not modified) -> the logits to sample from [1, V]."""
        self.raw, a = logits, self.adjust
        if not a.any and self.constraint is None:  # only logprobs were asked for
            return logits
        out = logits.float().clone()
        if a.any:
            self._init_counts(out)
            if a.repetition_penalty != 1.0:
                x = out[0, self.seen]
                out[0, self.seen] = torch.where(x > 0, x / a.repetition_penalty, x * a.repetition_penalty)
            if a.frequency_penalty or a.presence_penalty:
                out[0] -= a.frequency_penalty * self.counts + a.presence_penalty * (self.counts > 0).float()
            for tid, bias in a.logit_bias.items():
                if tid < out.shape[-1]:
                    out[0, tid] += bias
        if self.constraint is not None:
            self.constraint.mask_(out)
        return out

    def accept(self, token: int) -> None:
        """The sampled token: advance the grammar, count it, record its logprobs."""
        if self.top_logprobs is not None:
            lp = torch.log_softmax(self.raw.float(), dim=-1)[0]  # [V]
            top = []
            if self.top_logprobs > 0:
                values, ids = torch.topk(lp, min(self.top_logprobs, lp.shape[-1]))
                top = list(zip(ids.tolist(), values.tolist()))
            self.logprobs.append(TokenLogprob(token, float(lp[token]), top))
        self.raw = None
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True
        if self.constraint is not None:
            self.constraint.advance(token)

    @property
    def finished(self) -> bool:
        return self.constraint is not None and self.constraint.finished

    def _init_counts(self, logits: torch.Tensor) -> None:
        if self.counts is None:
            v = logits.shape[-1]
            self.counts = torch.zeros(v, device=logits.device)
            self.seen = torch.zeros(v, dtype=torch.bool, device=logits.device)
            prompt = torch.tensor([t for t in self.prompt if t < v], dtype=torch.long, device=logits.device)
            self.seen[prompt] = True


def prompt_logprobs(logits: torch.Tensor, targets: list[int], top: int) -> list[TokenLogprob]:
    """logits [T, V] at positions 0..T-1 and the tokens that followed them [T] -> each one's TokenLogprob
    (the log-softmax of the model's raw logits, as for generated tokens)."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    chosen = lp.gather(1, torch.tensor(targets, dtype=torch.long, device=lp.device)[:, None])[:, 0].tolist()
    if top <= 0:
        return [TokenLogprob(t, v, []) for t, v in zip(targets, chosen)]
    values, ids = torch.topk(lp, min(top, lp.shape[-1]), dim=-1)  # [T, top] each
    return [
        TokenLogprob(t, v, list(zip(i, x)))
        for t, v, i, x in zip(targets, chosen, ids.tolist(), values.tolist())
    ]
