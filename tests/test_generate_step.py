"""Sampling against transformers' own logits warpers: the same filtered distribution, the same draws."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from moepager.generation.generate import SamplingParams, sample


def _reference(logits, p: SamplingParams, generator) -> torch.Tensor:
    """transformers' warpers in generate()'s order (temperature, top-k, top-p), then one multinomial draw."""
    scores = TemperatureLogitsWarper(p.temperature)(None, logits.float())
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    return torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator).squeeze(-1)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (20, 1.0), (0, 0.9), (0, 0.3), (50, 0.8), (3, 0.99)])
def test_sample_draws_what_transformers_draws(top_k, top_p):
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 3
    before = logits.clone()
    for seed in range(20):
        p = SamplingParams(temperature=0.7, top_p=top_p, top_k=top_k)
        got = sample(logits, p, torch.Generator().manual_seed(seed))
        assert torch.equal(got, _reference(logits, p, torch.Generator().manual_seed(seed)))
    assert torch.equal(logits, before)  # the caller's logits are left alone


def test_top_p_keeps_the_smallest_set_reaching_it():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]]).log_softmax(-1)  # probs ~ [0.70, 0.26, 0.01, 0.00]
    p = SamplingParams(temperature=1.0, top_p=0.9)
    draws = {int(sample(logits, p, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingParams(), None), logits.argmax(-1))
