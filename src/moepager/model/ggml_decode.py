"""A model's decode step as one ggml call (kernels/ggml_step.py) instead of three a layer (GGUF) or the torch ops
of every layer (a float32 checkpoint), swapped in after the model is built like any capability.

`swap_ggml_decode(model)` turns the model into a GgmlDecodeTransformer when every layer is what the step graph
computes: a GgmlBlock (a GGUF file's), or a float32 checkpoint's plain Block on the CPU (_float_fits), whose
matrices the graph takes as ggml's F32 rows; the feed-forward softmax top-K routing (no bias, scaling or masked
experts) to SwiGLU experts, with or without a shared expert (gated or not), or a dense SwiGLU MLP.
Transformer.forward stays the definition: a call that is not one token of one sequence in a plain KVCache, whose
experts are neither every expert resident in GGUF or float32 banks nor a CPU expert cache a token's experts fit
(waves, a trace recorder, Ray), while any module carries a hook or a router masks experts, goes through it
unchanged. A token whose router nearly ties goes through it too, after the step, where the step's float ops could
pick otherwise than the reference: a checkpoint's (torch's sums, ggml_routing.TORCH_CLOSE), or a GGUF file's where
the loaded libggml computes a softmax in another float form than llama.cpp built for this CPU (the wheel's AVX2
build on an AVX-512 CPU; kernels/ggml_routing.py routes it in llama.cpp's form).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from ..kernels import ggml, ggml_block, ggml_float, ggml_routing, ggml_step
from ..kernels.banks import FloatBank
from .compact import (
    BlockEmbedding,
    BlockLinear,
    BlockMLP,
    GgmlAttention,
    GgmlBlock,
    GgmlRMSNorm,
    GgmlRouter,
    GgmlSharedGate,
    MatvecLinear,
)
from .decoder import Block, Transformer
from .layers import MLP, Attention, KVCache, RMSNorm
from .moe import MoE, ResidentExperts, Router, SharedGate

F32 = int(Q.F32)
TIE_TRIAL = 8  # from this many steps on, half of them handed to the layers sends the rest there (_ties_often)
_LINEARS = (nn.Linear, MatvecLinear, SharedGate)  # a float32 checkpoint's products (SharedGate: its gate's)


def _matrix(m: BlockLinear | nn.Linear) -> ggml_block.Matrix:
    if type(m) is BlockLinear:
        return ggml_block.Matrix(m.qtype, m.blocks, m.layout, m.bias)
    bias = None if m.bias is None else m.bias.detach()  # a float32 matrix's rows are ggml's F32 rows
    return ggml_block.Matrix(F32, m.weight.detach().view(torch.uint8), 0, bias)


def _norm(n: GgmlRMSNorm) -> ggml_block.Norm:
    return ggml_block.Norm(n.weight.detach(), n.eps)


def _dense(mlp: BlockMLP | MLP) -> ggml_step.Dense:
    mats = [_matrix(m) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    return ggml_step.Dense(
        tuple(m.qtype for m in mats), tuple(m.blocks for m in mats), tuple(m.layout for m in mats)
    )


def _fits(model: Transformer) -> bool:
    """Whether every layer and the head are what kernels/ggml_step.py computes: a GGUF model's modules, or a
    float32 checkpoint's plain ones on the CPU (_float_fits)."""
    c = model.config
    embed = model.embed
    if type(embed) not in (BlockEmbedding, nn.Embedding):
        return False
    if (embed.dtype if type(embed) is BlockEmbedding else embed.weight.dtype) != torch.float32:
        return False
    routing_ok = (c.routing == "softmax_topk" and c.expert_act == "swiglu" and c.routed_scaling_factor == 1.0
                  and not c.absent_experts)  # fmt: skip
    if any(type(b.ffn) is MoE for b in model.layers) and not routing_ok:
        return False
    if type(model.norm) is not GgmlRMSNorm or type(model.lm_head) is not BlockLinear:
        return _float_fits(model)
    for block in model.layers:
        ffn = block.ffn
        if type(block) is not GgmlBlock:
            return False
        if type(ffn) is MoE:
            if (
                c.routing_order != "llama.cpp"
                or type(ffn.router) is not GgmlRouter
                or ffn.router.bias is not None
            ):
                return False
            if ffn.shared is not None and (type(ffn.shared) is not BlockMLP or type(ffn.shared_gate) not in (GgmlSharedGate, type(None))):  # fmt: skip
                return False
        elif type(ffn) is not BlockMLP:
            return False
    return True


def _float_fits(model: Transformer) -> bool:
    """A float32 checkpoint on the CPU whose layers are the step's: RMSNorm, grouped-query attention with plain
    RoPE (halves, no scaling), optional per-head qk-norm and projection biases, no window, sinks or clipping;
    SwiGLU experts routed by softmax top K, with or without a shared expert, or a dense SwiGLU MLP."""
    c = model.config
    if c.attention != "gqa" or c.norm != "rms" or c.rope_interleave or c.rope.get("rope_type") != "default":
        return False
    if (
        type(model.norm) is not RMSNorm
        or type(model.lm_head) not in _LINEARS
        or model.lm_head.bias is not None
    ):
        return False
    modules = [model.norm, model.lm_head]
    for block in model.layers:
        a, ffn = block.attn, block.ffn
        if type(block) is not Block or type(a) is not Attention or a.qk_norm == "full":
            return False
        if a.window is not None or a.sinks is not None or a.clip is not None:
            return False
        norms = [block.attn_norm, block.ffn_norm] + ([a.q_norm, a.k_norm] if a.qk_norm == "head" else [])
        mats = [a.q_proj, a.k_proj, a.v_proj, a.o_proj]
        if type(ffn) is MoE:
            router = ffn.router
            if (
                type(router) is not Router
                or router.bias is not None
                or router.e_score_correction_bias is not None
            ):
                return False
            if ffn.shared is not None and (type(ffn.shared) is not MLP or type(ffn.shared_gate) not in (SharedGate, type(None))):  # fmt: skip
                return False
            dense = [ffn.shared] if ffn.shared is not None else []
            mats += [ffn.shared_gate] if ffn.shared_gate is not None else []
            modules.append(ffn.router)
        elif type(ffn) is MLP:
            dense = [ffn]
        else:
            return False
        mats += [m for mlp in dense for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        if not all(type(n) is RMSNorm for n in norms) or not all(type(m) in _LINEARS for m in mats):
            return False
        modules += norms + mats
    return all(
        p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous()
        for m in modules for p in m.parameters()
    )  # fmt: skip


def _expert_banks(bank, c) -> tuple[tuple, tuple, tuple] | None:
    """(types, banks, layouts) of gate, up and down for ggml_step.Experts: GGUF blocks as they are, float32
    experts (a checkpoint's: gate and up stacked in one matrix) as ggml's F32 rows; None for other banks."""
    m = bank.matrices
    if bank.fused_swiglu(c):
        parts = [m[p] for p in ("gate", "up", "down")]
        return tuple(p.qtype for p in parts), tuple(p.raw for p in parts), tuple(p.layout for p in parts)
    gate_up, down = m.get("gate_up"), m.get("down")
    if type(gate_up) is not FloatBank or type(down) is not FloatBank or bank.gate_up_bias is not None:
        return None
    if bank.down_bias is not None or any(b.w.dtype != torch.float32 or b.w.device.type != "cpu" for b in (gate_up, down)):  # fmt: skip
        return None
    rows = gate_up.w.view(torch.uint8)  # [S, 2I, D * 4]: gate's rows, then up's
    i = rows.shape[1] // 2
    return (F32,) * 3, (rows[:, :i], rows[:, i:], down.w.view(torch.uint8)), (0, 0, 0)


class GgmlDecodeTransformer(Transformer):
    """A Transformer whose single-token steps over a plain KVCache run as one ggml graph."""

    def forward(
        self, ids: torch.Tensor, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        weights = self._weights() if ids.shape == (1, 1) and type(cache) is KVCache else None
        ties = self._ties_often()
        if weights is None or ids.device.type != "cpu" or len(set(cache.length)) != 1 or ties:
            if self._torch_layers and (ids.numel() > 1 or ties):
                ggml.torch_threads()  # a prompt or a batch through torch's ops, on the cores the step took
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
        experts = self._step[0]
        if self.config.routing_order != "llama.cpp":  # a checkpoint: ties within the sums' error go to torch
            check = ggml_routing.TORCH_CLOSE
        else:
            check = ggml_routing.CLOSE if ggml_routing.emulated() else 0.0
        if hasattr(experts, "hold_step"):  # an expert cache: the step graph asks it for slots at each router
            logits = ggml_step.decode_step_paged(weights, x, buffers, pos, experts, check)
        else:
            logits = ggml_step.decode_step(weights, x, buffers, pos, check)
        self._steps[0] += 1
        if logits is None:  # a router nearly tied: the layers route it as the reference would
            self._steps[1] += 1
            return super().forward(ids, cache, last_only)
        cache.length[:] = [pos + 1] * len(cache.length)
        cache.mirrored[:] = [pos + 1] * len(cache.length)
        return logits.view(1, 1, -1)

    def _ties_often(self) -> bool:
        """Whether the first two steps, or half or more of TIE_TRIAL steps or more, went to the layers after all
        (routers that nearly tie on most tokens, as a moefied model's near-uniform ones do, where a step costs a
        token's time for nothing): its tokens then go there at once."""
        steps, handed = self._steps
        return handed == steps >= 2 or (steps >= TIE_TRIAL and 2 * handed >= steps)

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
                banks = _expert_banks(bank, c)
                if banks is None or (resident and bank.size != c.num_experts) or ffn.layer != len(out):
                    return None
                ffn_step = ggml_step.Experts(
                    ffn.router.weight.detach(),
                    c.top_k,
                    c.norm_topk_prob,
                    *banks,
                    _dense(ffn.shared) if ffn.shared is not None else None,
                    ffn.shared_gate.weight.detach() if ffn.shared_gate is not None else None,
                )
            else:
                ffn_step = _dense(ffn)
            qk = (_norm(a.q_norm), _norm(a.k_norm)) if a.qk_norm != "none" else (None, None)
            rope = (a.rope_dims, a.rope_base) if type(a) is GgmlAttention else (self.rotary.dim, float(c.rope["rope_theta"]))  # fmt: skip
            out.append(ggml_step.Layer(
                _norm(block.attn_norm), *(_matrix(m) for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)),
                a.qk_norm, *qk, (a.h, a.hk, a.dh), rope, a.scale, _norm(block.ffn_norm), ffn_step,
            ))  # fmt: skip
        embed = None
        if table and type(self.embed) is BlockEmbedding:
            embed = ggml_step.Table(self.embed.qtype, self.embed.blocks)
        elif table:  # float32 rows (_fits)
            embed = ggml_step.Table(F32, self.embed.weight.detach().view(torch.uint8))
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
    model._steps = [0, 0]  # steps run, and of those handed to the layers (near ties)
    # a float32 checkpoint: torch computes its layers (a prompt, a batch, a token whose routers nearly tie)
    model._torch_layers = type(model.lm_head) is not BlockLinear
    return True
