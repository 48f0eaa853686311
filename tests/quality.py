"""How far a lossy model's logits lie from the exact model's, measured against what the routed experts add.

A tiny random model's logits come mostly from the embedding and attention path, so a plain relative logit error
is small even for a model whose routed experts are all zero. Measured instead per token: the error as a share
of the experts' contribution, |lossy - exact| / |zeroed - exact|, which is 1 for the zeroed model."""

from __future__ import annotations

import copy

import torch

# a token whose top-k router scores nearly tie (margin ~1e-3) picks another expert under any rounding, and its
# error is then that expert's whole output: such tokens are counted apart instead of averaged in
FLIPPED = 0.5
# the median share lost, per expert type; measured on the tiny models of every family: bf16 0.003-0.006, int8
# 0.006-0.012 and Q8_0 0.005-0.011 (about 0.7% rms error per weight over three matrices), int4 0.07-0.16 and
# Q4_0 0.06-0.16. A plain relative logit error over all tokens is ruled by the near-tie tokens instead: 0.020 for
# test_gguf.py's Q8_0 Mixtral, whose one token at a top-2 margin of 0.001 errs by 0.14 and the others by 0.002.
LIMITS = {"bf16": 0.01, "int8": 0.02, "Q8_0": 0.02, "int4": 0.25, "Q4_0": 0.25, "Q4_K": 0.25}


def zeroed_experts(ref):
    """A copy of the transformers model `ref` with every routed expert's weights and biases zero (shared
    experts, routers and dense layers kept)."""
    z = copy.deepcopy(ref)
    with torch.no_grad():
        for name, p in z.named_parameters():
            if ".mlp.experts." in name:
                p.zero_()
    assert any(".mlp.experts." in n for n, _ in z.named_parameters())
    return z


def expert_share_error(got: torch.Tensor, exact: torch.Tensor, zeroed: torch.Tensor) -> torch.Tensor:
    """[tokens] |got - exact| / |zeroed - exact| over the vocabulary, for logits [B, T, V]."""
    return (got - exact).norm(dim=-1).flatten() / (zeroed - exact).norm(dim=-1).flatten()


def check_lossy(got, exact, zeroed, max_share: float, max_flipped: float = 0.1) -> tuple[float, float]:
    """Assert that `got` is lossy (not the exact logits), that its median share of the experts' contribution
    lost is below max_share and that at most max_flipped of the tokens lost more than FLIPPED of it.
    -> (median share, share of tokens flipped)."""
    share = expert_share_error(got, exact, zeroed)
    median, flipped = share.median().item(), (share > FLIPPED).float().mean().item()
    assert median > 0, "the lossy model gave the exact logits"
    assert median < max_share, f"median share of the experts' contribution lost {median:.4f} >= {max_share}"
    assert flipped <= max_flipped, f"{flipped:.2f} of tokens lost more than {FLIPPED} of it"
    return median, flipped
