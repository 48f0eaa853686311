"""Routing and the experts contract.

The model never holds routed expert weights. Each MoE layer routes its tokens, then calls
`experts(layer, x, ids, weights) -> y`, an object swapped in after the model is built: ResidentExperts
here, paged or quantized experts elsewhere. Every implementation runs an expert only on the tokens routed
to it, through `expert_forward`.

Letters: N tokens (batch*time flattened), D hidden, E experts, K active per token, I expert intermediate.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import MLP
from .quant import linear

ExpertWeights = dict[str, torch.Tensor]  # gate [I, D], up [I, D], down [D, I]; optional *_bias


class Experts(Protocol):
    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], ids [N, K] (int64), weights [N, K] -> y [N, D] = sum_k weights * expert_ids(x)."""
        ...


def expert_forward(w: ExpertWeights, x: torch.Tensor, act: str, alpha: float = 1.702, limit: float = 7.0):
    """One expert on its tokens x [n, D] -> [n, D]."""
    gate = linear(x, w["gate"], w.get("gate_bias"), w.get("gate_scales"))  # [n, I]
    up = linear(x, w["up"], w.get("up_bias"), w.get("up_scales"))  # [n, I]
    if act == "gptoss":  # GPT-OSS clamps, then gates with x * sigmoid(alpha x) and shifts up by one
        gate = gate.clamp(max=limit)
        up = up.clamp(-limit, limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * alpha))
    else:
        h = F.silu(gate) * up
    return linear(h, w["down"], w.get("down_bias"), w.get("down_scales"))


def group_by_expert(ids: torch.Tensor) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """ids [N, K] -> [(expert, token rows [n], slot positions into ids.flatten() [n])], experts ascending."""
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat).tolist()
    groups, start = [], 0
    for e, n in enumerate(counts):
        if n:
            slots = order[start : start + n]
            groups.append((e, slots // ids.shape[1], slots))
            start += n
    return groups


def accumulate(y, x, flat_w, groups, get: Callable[[int], ExpertWeights], config: ModelConfig) -> None:
    """y += each group's expert on its tokens, weighted: the expert math every Experts implementation shares.
    groups: entries of group_by_expert; flat_w: the routing weights flattened [N*K]."""
    for e, rows, slots in groups:
        out = expert_forward(get(e), x[rows], config.expert_act, config.swiglu_alpha, config.swiglu_limit)
        y.index_add_(0, rows, out * flat_w[slots, None].to(out.dtype))


def combine(x, ids, weights, get: Callable[[int], ExpertWeights], config: ModelConfig) -> torch.Tensor:
    """Run each routed expert on its tokens and sum the weighted outputs."""
    y = torch.zeros_like(x)
    accumulate(y, x, weights.flatten(), group_by_expert(ids), get, config)
    return y


class ResidentExperts:
    """Every expert held in memory: the reference implementation of the contract."""

    def __init__(self, config: ModelConfig, experts: dict[tuple[int, int], ExpertWeights]):
        self.config, self.experts = config, experts

    def __call__(self, layer, x, ids, weights):
        return combine(x, ids, weights, lambda e: self.experts[(layer, e)], self.config)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.experts.values() for t in w.values())


# ------------------------------------------------------------------------------------------ routing


def _sparsemixer_pick(scores: torch.Tensor, masked: torch.Tensor, eps: float):
    """PhiMoE's deterministic (eval) sparsemixer step: the max of `masked`, its weight over a near-max mask."""
    threshold, top = masked.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    gates = masked.masked_fill((threshold - scores) / factor > 2 * eps, float("-inf"))
    return torch.softmax(gates, dim=-1).gather(-1, top), top


def route(logits: torch.Tensor, config: ModelConfig, correction_bias: torch.Tensor | None = None):
    """Router logits [N, E] -> (weights [N, K], ids [N, K]) by the family's rule."""
    k = config.top_k
    if config.routing == "softmax_topk":  # Mixtral, Qwen-MoE, OLMoE
        probs = torch.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(probs, k, dim=-1)
        if config.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return w.to(logits.dtype), ids
    if config.routing == "topk_softmax":  # GPT-OSS
        top, ids = torch.topk(logits, k, dim=-1)
        return torch.softmax(top, dim=-1), ids
    if config.routing == "sigmoid_group":  # DeepSeek-V3: pick groups, then experts; weigh by raw scores
        scores = logits.float().sigmoid()
        choice = scores + correction_bias if correction_bias is not None else scores
        n, e, g = scores.shape[0], config.num_experts, config.n_group
        group_scores = choice.view(n, g, e // g).topk(2, dim=-1)[0].sum(dim=-1)  # [N, G]
        group_idx = torch.topk(group_scores, config.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(n, g, e // g).reshape(n, e)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k, dim=-1, sorted=False)[1]
        w = scores.gather(1, ids)
        if config.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * config.routed_scaling_factor, ids
    if config.routing == "sparsemixer":  # PhiMoE, top-2
        eps = config.router_jitter_eps
        w1, id1 = _sparsemixer_pick(logits, logits, eps)
        w2, id2 = _sparsemixer_pick(logits, torch.scatter(logits, -1, id1, float("-inf")), eps)
        return torch.cat((w1, w2), dim=-1), torch.cat((id1, id2), dim=-1)
    raise ValueError(f"unknown routing {config.routing!r}")


class Router(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None
        if config.routing == "sigmoid_group":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, K], ids [N, K])."""
        if self.config.routing == "sigmoid_group":  # the reference routes DeepSeek in fp32
            logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight, self.bias)
        return route(logits, self.config, self.e_score_correction_bias)


class MoE(nn.Module):
    """Router + routed experts (through the contract) + optional always-on shared expert."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.router = Router(config)
        self.shared = MLP(config.hidden_size, config.shared_expert_size) if config.shared_expert_size else None
        self.shared_gate = nn.Linear(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
        self.experts: Experts | None = None  # swapped in after construction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        weights, ids = self.router(x)
        y = self.experts(self.layer, x, ids, weights)
        if self.shared is not None:
            s = self.shared(x)
            y = y + (torch.sigmoid(self.shared_gate(x)) * s if self.shared_gate is not None else s)
        return y.reshape(shape)
