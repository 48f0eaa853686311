"""A GGUF model's decode step as one ggml call (kernels/ggml_step.py) instead of three a layer (one a MoE layer
when its experts are paged), swapped in after the model is built like any capability.

`swap_ggml_decode(model)` turns the model into a GgmlDecodeTransformer when every layer is a GgmlBlock whose
feed-forward the step graph computes: softmax top-K routing in llama.cpp's order over a GgmlRouter (no bias,
scaling or masked experts) to SwiGLU experts, with or without a shared expert (BlockMLP, gated or not), or a
dense BlockMLP; with a GgmlRMSNorm and a BlockLinear output head. Transformer.forward stays the definition: a
call that is not one token of one sequence in a plain KVCache, whose experts are neither every expert resident
in GGUF banks nor a CPU expert cache a token's experts fit (waves, a trace recorder, Ray), while any module
carries a hook or a router masks experts, goes through it unchanged. Where the loaded libggml computes a softmax in
another float form than llama.cpp built for this CPU (the wheel's AVX2 build on an AVX-512 CPU), a token whose
router nearly ties goes through it too, after the step: kernels/ggml_routing.py routes it in llama.cpp's form.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from ..kernels import ggml_block, ggml_float, ggml_routing, ggml_step
from .compact import BlockEmbedding, BlockLinear, BlockMLP, GgmlBlock, GgmlRMSNorm, GgmlRouter, GgmlSharedGate
from .decoder import Transformer
from .layers import KVCache
from .moe import MoE, ResidentExperts


def _matrix(m: BlockLinear) -> ggml_block.Matrix:
    return ggml_block.Matrix(m.qtype, m.blocks, m.layout, m.bias)


def _norm(n: GgmlRMSNorm) -> ggml_block.Norm:
    return ggml_block.Norm(n.weight, n.eps)


def _dense(mlp: BlockMLP) -> ggml_step.Dense:
    mats = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return ggml_step.Dense(
        tuple(m.qtype for m in mats), tuple(m.blocks for m in mats), tuple(m.layout for m in mats)
    )


def _fits(model: Transformer) -> bool:
    """Whether every layer and the head are what kernels/ggml_step.py computes."""
    c = model.config
    if type(model.norm) is not GgmlRMSNorm or type(model.lm_head) is not BlockLinear:
        return False
    embed = model.embed
    if type(embed) not in (BlockEmbedding, nn.Embedding):
        return False
    if (embed.dtype if type(embed) is BlockEmbedding else embed.weight.dtype) != torch.float32:
        return False
    routing_ok = (c.routing == "softmax_topk" and c.routing_order == "llama.cpp" and c.expert_act == "swiglu"
                  and c.routed_scaling_factor == 1.0 and not c.absent_experts)  # fmt: skip
    for block in model.layers:
        ffn = block.ffn
        if type(block) is not GgmlBlock:
            return False
        if type(ffn) is MoE:
            if not routing_ok or type(ffn.router) is not GgmlRouter or ffn.router.bias is not None:
                return False
            if ffn.shared is not None and (type(ffn.shared) is not BlockMLP or type(ffn.shared_gate) not in (GgmlSharedGate, type(None))):  # fmt: skip
                return False
        elif type(ffn) is not BlockMLP:
            return False
    return True


class GgmlDecodeTransformer(Transformer):
    """A Transformer whose single-token steps over a plain KVCache run as one ggml graph."""

    def forward(
        self, ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        weights = self._weights() if ids.shape == (1, 1) and type(cache) is KVCache else None
        if weights is None or ids.device.type != "cpu" or len(set(cache.length)) != 1:
            return super().forward(ids, cache, last_only)
        pos = cache.seq_len
        if weights.embed is None:
            x = self.embed(ids)[0]  # [1, D]
        else:  # the graph looks the row up; an id out of the table goes to the layers, which say so
            token = int(ids)
            if not 0 <= token < weights.embed.rows.shape[0]:
                return super().forward(ids, cache, last_only)
            x = torch.tensor([token], dtype=torch.int32)
        buffers = self._kv_buffers(cache, weights, ggml_float.cached_positions(pos + 1))
        experts, check = self._step[0], ggml_routing.emulated()
        if hasattr(experts, "hold_step"):  # an expert cache: its slots are held between the step's graphs
            holds = experts.hold_step, experts.release_step, experts.step_guesses()
            logits = ggml_step.decode_step_paged(weights, x, buffers, pos, *holds, check)
        else:
            logits = ggml_step.decode_step(weights, x, buffers, pos, check)
        if logits is None:  # a router nearly tied: the layers route it as llama.cpp's form for this CPU would
            return super().forward(ids, cache, last_only)
        cache.length[:] = [pos + 1] * len(cache.length)
        cache.mirrored[:] = [pos + 1] * len(cache.length)
        return logits.view(1, 1, -1)

    def _kv_buffers(self, cache: KVCache, weights: ggml_step.Step, n_kv: int) -> ggml_step.Caches:
        """The cache's buffers as the step takes them, holding n_kv positions, the values by position up to date:
        the object of the last token while the cache neither grew nor had positions appended by another path."""
        kept = cache.step_view
        if kept is not None and n_kv <= kept.capacity and cache.mirrored == cache.length:
            return kept
        buffers = []
        for i, lay in enumerate(weights.layers):
            _, hk, dh = lay.heads
            like = torch.empty(1, hk, 0, dh)
            cache.reserve(i, n_kv, like, like)
            vt = cache.values_by_position(i)  # brought up to date with what other paths appended
            buffers.append((cache.k[i][0], cache.v[i][0], vt[0]))
        cache.step_view = ggml_step.Caches(buffers)
        return cache.step_view

    def _weights(self) -> ggml_step.Step | None:
        """The step's weights when the experts are GGUF banks of one SwiGLU, every expert resident (slot = expert
        id) or an expert cache on the CPU whose slots a token's experts always fit, and nothing asks for the eager
        path (hooks, masked routers); else None."""
        moes = self._moes
        if moes:
            experts = moes[0].experts
            if any(m.experts is not experts or m.router.absent is not None for m in moes):
                return None
            if type(experts) is not ResidentExperts and not (
                hasattr(experts, "hold_step") and experts.step_fits()
            ):
                return None
        else:
            experts = None
        if any(self._hooks):
            return None
        table = self.embed.read_rows is None if type(self.embed) is BlockEmbedding else True
        if self._step[0] is not experts or self._step[1] != table:
            self._step = (experts, table, self._gather(experts, table))
        return self._step[2]

    def _gather(self, experts, table: bool) -> ggml_step.Step | None:
        """The step's weights; table: the graph looks the token's row up in the embedding table."""
        c, out = self.config, []
        for block in self.layers:
            a, ffn = block.attn, block.ffn
            if type(ffn) is MoE:
                resident = type(experts) is ResidentExperts
                bank = experts.banks[ffn.layer] if resident else experts.step_bank(ffn.layer)
                if (
                    not bank.fused_swiglu(c)
                    or (resident and bank.size != c.num_experts)
                    or ffn.layer != len(out)
                ):
                    return None
                parts = [bank.matrices[p] for p in ("gate", "up", "down")]
                ffn_step = ggml_step.Experts(
                    ffn.router.weight,
                    c.top_k,
                    c.norm_topk_prob,
                    tuple(p.qtype for p in parts),
                    tuple(p.raw for p in parts),
                    tuple(p.layout for p in parts),
                    _dense(ffn.shared) if ffn.shared is not None else None,
                    ffn.shared_gate.weight if ffn.shared_gate is not None else None,
                )
            else:
                ffn_step = _dense(ffn)
            qk = (_norm(a.q_norm), _norm(a.k_norm)) if a.qk_norm != "none" else (None, None)
            out.append(ggml_step.Layer(
                _norm(block.attn_norm), *(_matrix(m) for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)),
                a.qk_norm, *qk, (a.h, a.hk, a.dh), (a.rope_dims, a.rope_base), a.scale, _norm(block.ffn_norm),
                ffn_step,
            ))  # fmt: skip
        embed = None
        if table and type(self.embed) is BlockEmbedding:
            embed = ggml_step.Table(self.embed.qtype, self.embed.blocks)
        elif table:  # float32 rows (_fits)
            embed = ggml_step.Table(int(Q.F32), self.embed.weight.detach().view(torch.uint8))
        return ggml_step.step(out, _norm(self.norm), _matrix(self.lm_head), embed)


def swap_ggml_decode(model: Transformer) -> bool:
    """Make `model` a GgmlDecodeTransformer if its layers are what the step graph computes (the same modules and
    weights; only forward changes)."""
    if type(model) is not Transformer or not _fits(model):
        return False
    model.__class__ = GgmlDecodeTransformer
    model._hooks = [d for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)]
    model._moes = [b.ffn for b in model.layers if type(b.ffn) is MoE]
    # (the experts object the layers were gathered for, whether the graph embeds, the step's weights)
    model._step = (object(), None, None)
    return True
