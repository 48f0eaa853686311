"""Sampling against transformers' own logits warpers (the same filtered distribution), and draws that follow
it."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from moepager.generation.generate import SamplingParams, draw, probabilities, sample


def _reference(logits, p: SamplingParams) -> torch.Tensor:
    """transformers' warpers in generate()'s order (temperature, top-k, top-p), then softmax."""
    scores = TemperatureLogitsWarper(p.temperature)(None, logits.float())
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (20, 1.0), (0, 0.9), (0, 0.3), (50, 0.8), (3, 0.99)])
def test_sample_draws_from_what_transformers_keeps(top_k, top_p):
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 3
    before = logits.clone()
    p = SamplingParams(temperature=0.7, top_p=top_p, top_k=top_k)
    expected = _reference(logits, p)
    assert torch.allclose(probabilities(logits, p), expected, atol=1e-7, rtol=0)
    for seed in range(20):  # every draw is a token the warpers kept
        got = sample(logits, p, torch.Generator().manual_seed(seed))
        assert (expected[torch.arange(3), got] > 0).all()
    assert torch.equal(logits, before)  # the caller's logits are left alone


def test_draws_follow_the_distribution():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.15, 0.05, 0.0])  # zeros first, inside and last
    n = 40_000
    got = draw(probs.expand(n, -1), torch.Generator().manual_seed(3))
    counts = torch.bincount(got, minlength=len(probs)).double()
    assert counts[probs == 0].sum() == 0
    sigma = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() <= 5 * sigma).all(), counts.tolist()
    # one row alone, and the same generator state gives the same token
    one = draw(probs, torch.Generator().manual_seed(9))
    assert one.shape == () and int(one) == int(draw(probs, torch.Generator().manual_seed(9)))


def test_top_p_keeps_the_smallest_set_reaching_it():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]]).log_softmax(-1)  # probs ~ [0.70, 0.26, 0.01, 0.00]
    p = SamplingParams(temperature=1.0, top_p=0.9)
    draws = {int(sample(logits, p, torch.Generator().manual_seed(s))) for s in range(200)}
    assert draws == {0, 1}


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample(logits, SamplingParams(), None), logits.argmax(-1))
