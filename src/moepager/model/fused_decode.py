"""The decode step compiled: one numba call for every layer and one for the output head (kernels/decode_step.py)
instead of ~50 torch ops and kernel calls per layer, swapped in after the model is built like any capability.

`swap_fused_decode(model)` turns the model into a FusedDecodeTransformer when every layer is of the plain kind
the compiled step computes (float32 on the CPU: RMSNorm, grouped-query attention with full rotary halves and
optional per-head qk-norm, no biases, clipping, sinks or windows; softmax top-k routing in torch's order to
SwiGLU experts without a shared expert, or a dense SwiGLU MLP); otherwise the model is left as it is.
Transformer.forward stays the definition: a call that is not one token of one sequence in a plain KVCache, or
whose experts are not every expert resident as float32 banks (paging, a trace recorder, quantized experts), or
while any module carries a hook or a router masks experts (drafting), goes through it unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .compact import MatvecLinear
from .decoder import Transformer
from .layers import MLP, Attention, KVCache, RMSNorm
from .moe import MoE, ResidentExperts

_LINEARS = (nn.Linear, MatvecLinear)
_UNSET = object()  # no experts object seen yet


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _plain(model: Transformer) -> bool:
    """Whether every layer is what kernels/decode_step.py computes, in float32 on the CPU."""
    c = model.config
    config_ok = (
        c.attention == "gqa" and c.norm == "rms" and not (c.qkv_bias or c.o_bias or c.attention_sinks)
        and c.qk_norm in ("none", "head") and c.clip_qkv is None and not any(c.sliding_windows)
        and not c.rope_interleave and c.rope_dim in (0, c.head_dim) and c.head_dim % 2 == 0
        and c.routing == "softmax_topk" and c.routing_order == "torch" and not c.router_bias
        and c.expert_act == "swiglu" and not c.shared_expert_size and not c.lm_head_bias and not c.absent_experts
    )  # fmt: skip
    if not config_ok or type(model.norm) is not RMSNorm or type(model.lm_head) not in _LINEARS:
        return False
    if type(model.embed) is not nn.Embedding:
        return False
    for block in model.layers:
        a, ffn = block.attn, block.ffn
        if type(a) is not Attention or not (type(ffn) is MoE and ffn.shared is None or type(ffn) is MLP):
            return False
        dense = (ffn.gate_proj, ffn.up_proj, ffn.down_proj) if type(ffn) is MLP else ()
        if not all(type(m) in _LINEARS for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, *dense)):
            return False
        if not all(type(n) is RMSNorm for n in (block.attn_norm, block.ffn_norm)):
            return False
    return all(
        p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous() for p in model.parameters()
    )


class _Weights:
    """The model's weights as kernels/decode_step.layers_step takes them: a typed list per kind of tensor with
    one entry per layer (views of the model's own tensors; a placeholder where a layer has no such tensor),
    the experts' banks once an experts object is seen, and the KV cache's buffers while they stay the same."""

    def __init__(self, model: Transformer):
        from numba.typed import List

        f = np.float32
        blocks = list(model.layers)
        moe = [type(b.ffn) is MoE for b in blocks]
        empty, none2, none3 = np.empty(0, f), np.zeros((1, 1), f), np.zeros((1, 1, 1), f)
        norm = model.config.qk_norm == "head"

        def each(get):  # one entry per layer
            return List([get(b) for b in blocks])

        def weight(*path):  # the weight of a submodule of each layer, or a placeholder where it has none
            def get(b):
                m = b
                for name in path:
                    m = getattr(m, name, None)
                return none2 if m is None else _array(m.weight)

            return each(get)

        self.attn = (
            each(lambda b: _array(b.attn_norm.weight)),
            *(weight("attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
            each(lambda b: _array(b.attn.q_norm.weight) if norm else empty),
            each(lambda b: _array(b.attn.k_norm.weight) if norm else empty),
        )
        self.ffn_norm = each(lambda b: _array(b.ffn_norm.weight))
        self.is_moe = np.array(moe)
        self.routers = weight("ffn", "router")
        self.mlp = tuple(weight("ffn", n) for n in ("gate_proj", "up_proj", "down_proj"))
        self.head = (_array(model.norm.weight), _array(model.lm_head.weight))
        self.scale, self.eps = float(blocks[0].attn.scale), float(model.config.norm_eps)
        self.layer_ids = [b.ffn.layer if ok else None for b, ok in zip(blocks, moe)]
        self.moes = [b.ffn for b, ok in zip(blocks, moe) if ok]
        self.routers_of = [m.router for m in self.moes]
        self.placeholder = none3
        # every module's hook tables (the dicts registering a hook adds to): any hook sends a step the eager way
        self.hooks = [d for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)]
        self.embed = _array(model.embed.weight)
        # cos / sin of positions computed ahead by the model's own RotaryEmbedding, elementwise in the position,
        # so a table holds the same values; longrope's depend on the longest position and are made per step
        self.rope_table = (
            None if model.config.rope.get("rope_type") == "longrope" else (np.empty((0, 0), f),) * 2
        )
        self.experts = (_UNSET, None)  # (the experts object, its (gate_ups, downs) lists or None)
        self.kv = ([], None)  # (the cache's buffers, their (k, v) lists)

    def rope(self, rotary, pos: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [Dh] of position pos, as rotary computes them."""
        if self.rope_table is None:
            return tuple(t.reshape(-1).numpy() for t in rotary(torch.tensor([pos]), torch.float32))
        if pos >= len(self.rope_table[0]):
            n = max(2 * (pos + 1), 256)
            self.rope_table = tuple(t.numpy() for t in rotary(torch.arange(n), torch.float32))  # [n, Dh]
        return self.rope_table[0][pos], self.rope_table[1][pos]

    def banks(self, experts) -> tuple | None:
        if self.experts[0] is not experts:
            self.experts = (experts, _bank_lists(experts, self.layer_ids, self.placeholder))
        return self.experts[1]

    def caches(self, cache: KVCache) -> tuple:
        """(k, v) typed lists of every layer's buffers [Hk, capacity, Dh], made again when a buffer grew."""
        buffers = cache.k + cache.v
        if len(buffers) != len(self.kv[0]) or any(a is not b for a, b in zip(buffers, self.kv[0])):
            from numba.typed import List

            self.kv = (
                buffers,
                (List([t.numpy()[0] for t in cache.k]), List([t.numpy()[0] for t in cache.v])),
            )
        return self.kv[1]


class FusedDecodeTransformer(Transformer):
    """A Transformer whose single-token steps over a plain KVCache run two compiled calls: every layer, then
    the output head."""

    def forward(
        self, ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        banks = self._banks() if ids.shape == (1, 1) and type(cache) is KVCache else None
        if banks is None or ids.device.type != "cpu" or len(set(cache.length)) != 1:
            return super().forward(ids, cache, last_only)
        token = int(ids)
        if not 0 <= token < self.config.vocab_size:  # the embedding's own error
            return super().forward(ids, cache, last_only)
        import numba

        from ..kernels import matvec
        from ..kernels.decode_step import head_step, layers_step

        c, w = self.config, self._fused
        pos = cache.seq_len
        x = w.embed[token].copy()  # [D], the residual stream, updated in place
        cos, sin = w.rope(self.rotary, pos)  # [Dh] each
        like = torch.empty(1, c.num_kv_heads, 0, c.head_dim)
        if cache.k[0] is None or pos + 1 > cache.k[0].shape[2]:
            w.kv = ([], None)  # the buffers grow: each layer's old one is freed as its new one is made
        for i in range(c.num_layers):
            cache.reserve(i, pos + 1, like, like)
        k_caches, v_caches = w.caches(cache)
        matvec.sync_threads()  # numba's threads as many as torch's
        threads = numba.get_num_threads()
        layers_step(x, cos, sin, pos, w.scale, w.eps, c.top_k, c.norm_topk_prob, threads, *w.attn,
                    k_caches, v_caches, w.ffn_norm, w.is_moe, w.routers, *banks, *w.mlp)  # fmt: skip
        cache.length[:] = [pos + 1] * c.num_layers
        logits = torch.empty(c.vocab_size)
        head_step(x, *w.head, w.eps, logits.numpy(), threads)
        return logits.view(1, 1, -1)

    def _banks(self) -> tuple | None:
        """The (gate_ups, downs) lists of every layer when every expert is resident in float32 banks and no
        hook or router mask asks for the eager path; else None."""
        w = self._fused
        experts = w.moes[0].experts if w.moes else None
        if w.moes and (type(experts) is not ResidentExperts or any(m.experts is not experts for m in w.moes)):
            return None
        if any(r.absent is not None for r in w.routers_of) or any(w.hooks):
            return None
        return w.banks(experts)


def _bank_lists(experts: ResidentExperts | None, layers: list[int | None], placeholder) -> tuple | None:
    """(gate_ups, downs): typed lists of every layer's banks [E, 2I, D] and [E, D, I] (a placeholder for a
    dense layer), or None when a bank is not float32 on the CPU with gate and up fused and no biases."""
    from numba.typed import List

    gate_ups, downs = List(), List()
    for layer in layers:
        if layer is None:
            gate_ups.append(placeholder)
            downs.append(placeholder)
            continue
        bank = experts.banks[layer]
        matrices = (bank.gate_up, bank.down)
        if bank.gate_up_bias is not None or bank.down_bias is not None or not all(
            getattr(m, "w", None) is not None and m.w.dtype == torch.float32 and m.w.device.type == "cpu"
            and m.w.is_contiguous() for m in matrices
        ):  # fmt: skip
            return None
        gate_ups.append(_array(bank.gate_up.w))
        downs.append(_array(bank.down.w))
    return gate_ups, downs


def swap_fused_decode(model: Transformer) -> bool:
    """Make `model` a FusedDecodeTransformer if every layer is of the kind the compiled step computes (the same
    module and weights; only forward changes). Loads the compiled kernels now, not at the first token."""
    if type(model) is not Transformer or not _plain(model):
        return False
    from ..kernels.decode_step import warm_up

    model._fused = _Weights(model)
    model.__class__ = FusedDecodeTransformer
    warm_up()
    return True
