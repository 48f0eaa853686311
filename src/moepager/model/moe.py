"""Routing, the experts contract, and the one experts primitive every implementation shares.

The model never holds routed expert weights. Each MoE layer routes its tokens, then calls
`experts(layer, x, ids, weights) -> y`, an object swapped in after the model is built: ResidentExperts
here, paged experts (paging/paged.py) elsewhere. Both keep experts in an ExpertBank, one storage per matrix
over slots ([S, 2I, D] gate and up fused, [S, D, I] down), and compute a whole layer with `switch_glu` over
the slots the tokens were routed to: resident experts sit in slot = expert id; paged ones wherever the cache
put them, decided once per layer on the host. Float, int8/int4 and GGUF-quantized banks share this math
(kernels/banks.py holds the per-format products).

Letters: N tokens (batch*time flattened), D hidden, E experts, K active per token, I expert intermediate,
S slots of a bank.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import hugepages
from ..kernels.banks import FloatBank, GgufBank, MatrixBank, QuantBank
from ..kernels.ggml import swiglu_experts
from ..kernels.intquant import linear, native_int4_layout, tile_rows
from .config import ModelConfig
from .layers import MLP

ExpertWeights = dict[str, torch.Tensor]  # gate [I, D], up [I, D], down [D, I]; optional *_bias, *_scales
DENSE_SHARE = 0.5  # K/E from which a resident layer computes every expert densely (see ResidentExperts)


class NotResident(Exception):
    """A draft forward (routed among resident experts only) needed an expert that is not resident."""


class Experts(Protocol):
    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, D], ids [N, K] (int64), weights [N, K] -> y [N, D] = sum_k weights * expert_ids(x)."""
        ...


def activation(gate: torch.Tensor, up: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """SwiGLU; GPT-OSS clamps, then gates with x * sigmoid(alpha x) and shifts up by one."""
    if config.expert_act == "gptoss":
        limit = config.swiglu_limit
        gate = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(gate * config.swiglu_alpha))
    return F.silu(gate) * up


def expert_forward(w: ExpertWeights, x: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """One expert given as plain tensors on its tokens x [n, D] -> [n, D]: the per-expert reference (benchmark
    peers, tests); the engine computes through banks."""
    gate = linear(x, w["gate"], w.get("gate_bias"), w.get("gate_scales"))  # [n, I]
    up = linear(x, w["up"], w.get("up_bias"), w.get("up_scales"))  # [n, I]
    return linear(activation(gate, up, config), w["down"], w.get("down_bias"), w.get("down_scales"))


# ------------------------------------------------------------------------------------------ banks


@dataclass(frozen=True)
class BankSpec:
    """How S experts shaped like one template expert lie in a bank: storage shape and dtype per part (per
    slot), the matrix format of each part, and where each of the template's tensors sits in a slot."""

    parts: dict[str, tuple[tuple[int, ...], torch.dtype]]  # "gate_up", "down", "down_scales", ... per slot
    formats: dict[str, str]  # matrix part -> "float", "int8", "int4" or "gguf"
    views: dict[str, tuple[str, tuple]]  # template name -> (part, index into the part's slot)
    # "gguf" parts: raw blocks in a flat slot sized for the largest layer; layer -> (qtype, rows, row bytes)
    blocks: dict[str, dict[int, tuple[int, int, int]]]

    @property
    def slot_bytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.parts.values())

    def dtypes(self) -> dict[str, torch.dtype]:
        """dtype of each template tensor once in a slot."""
        return {name: self.parts[part][1] for name, (part, _) in self.views.items()}

    def storage(self, slots: int, device: torch.device | str) -> dict[str, torch.Tensor]:
        """One tensor [slots, ...] per part, in huge pages on the CPU (the kernels stream through them)."""
        return {p: hugepages.empty((slots, *shape), dt, device) for p, (shape, dt) in self.parts.items()}

    def allocate(self, slots: int, device: torch.device | str, layer: int | None = None) -> ExpertBank:
        return ExpertBank(self, self.storage(slots, device), layer)

    def for_layer(self, layer: int) -> BankSpec:
        """The spec of one layer's own bank: its block parts sized for that layer's blocks, not the largest
        layer's (a Q4_K_M file's Q6_K down matrices in some layers made every resident slot 7% larger)."""
        if not self.blocks:
            return self
        parts, blocks = dict(self.parts), {}
        for part, layers in self.blocks.items():
            qtype, rows, row_bytes = layers[layer]
            parts[part] = ((rows * row_bytes,), torch.uint8)
            blocks[part] = {layer: layers[layer]}
        return BankSpec(parts, self.formats, self.views, blocks)


def matrix_format(template: ExpertWeights, name: str, formats: dict) -> str:
    if name in formats:
        return "gguf"
    if f"{name}_scales" in template:
        return "int8" if template[name].dtype == torch.int8 else "int4"
    return "float"


def bank_spec(
    template: ExpertWeights, formats: dict | None = None, dtype: torch.dtype | None = None
) -> BankSpec:
    """The bank layout for experts shaped like `template` (as a ModelSource reads them). formats: the
    source's block-quantized matrices (GgufSource.expert_formats); dtype: the compute dtype of float parts
    (None keeps theirs).

    gate and up become one [2I, ...] part (one matmul for both) when they have one format and shape, and,
    for int4, when I is whole packing tiles (so two packed halves are the packed whole)."""
    formats = formats or {}
    kinds = {m: matrix_format(template, m, formats) for m in ("gate", "up", "down")}
    parts: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    part_formats: dict[str, str] = {}
    views: dict[str, tuple[str, tuple]] = {}

    def add(part: str, names: list[str], kind: str, suffix: str = "") -> None:
        """One part holding the template tensors `names` stacked along their output rows."""
        ts = [template[n + suffix] for n in names]
        float_part = kind == "float" or suffix == "_bias"
        dt = dtype if dtype is not None and float_part and ts[0].is_floating_point() else ts[0].dtype
        rows_dim = 1 if suffix == "_scales" and ts[0].dim() == 3 else 0  # int4 scales are [G, R, 2]
        shape = list(ts[0].shape)
        shape[rows_dim] = sum(t.shape[rows_dim] for t in ts)
        parts[part + suffix] = (tuple(shape), dt)
        start = 0
        for n, t in zip(names, ts):
            index = (slice(None),) * rows_dim + (slice(start, start + t.shape[rows_dim]),)
            views[n + suffix] = (part + suffix, index)
            start += t.shape[rows_dim]

    g, u = template["gate"], template["up"]
    fuse = kinds["gate"] == kinds["up"] != "gguf" and g.shape == u.shape and g.dtype == u.dtype
    if kinds["gate"] == "int4":
        fuse = fuse and g.shape[0] % tile_rows(native_int4_layout()) == 0
    groups = [("gate_up", ["gate", "up"])] if fuse else [("gate", ["gate"]), ("up", ["up"])]
    for part, names in groups + [("down", ["down"])]:
        part_formats[part] = kinds[names[0]]
        if kinds[names[0]] == "gguf":  # a flat byte slot the largest layer's blocks fit in
            parts[part] = ((max(rows * rb for _, rows, rb in formats[part].values()),), torch.uint8)
            views[part] = (part, ())
            continue
        add(part, names, kinds[names[0]])
        if f"{names[0]}_scales" in template:
            add(part, names, kinds[names[0]], "_scales")
    if "gate_bias" in template:
        add("gate_up", ["gate", "up"], "float", "_bias")
    if "down_bias" in template:
        add("down", ["down"], "float", "_bias")
    blocks = {p: dict(formats[p]) for p, f in part_formats.items() if f == "gguf"}
    return BankSpec(parts, part_formats, views, blocks)


class ExpertBank:
    """S experts in one storage per part: the resident experts of a layer (slot = expert id) or an expert
    cache's slots. `slots[s]` holds slot s's tensors under the template's names: what a source fills.
    Block-quantized parts are read as `layer`'s type (a cache keeps one ExpertBank per layer over one storage)."""

    def __init__(self, spec: BankSpec, storage: dict[str, torch.Tensor], layer: int | None = None):
        self.spec, self.storage = spec, storage
        self.size = next(iter(storage.values())).shape[0]
        self.matrices: dict[str, MatrixBank] = {p: self._matrix(p, f, layer) for p, f in spec.formats.items()}
        self.gate_up = self.matrices.get("gate_up")
        self.down = self.matrices["down"]
        self.gate_up_bias = storage.get("gate_up_bias")  # [S, 2I]
        self.down_bias = storage.get("down_bias")  # [S, D]
        self._slots: list[ExpertWeights] | None = None

    def _matrix(self, part: str, fmt: str, layer: int | None) -> MatrixBank:
        w = self.storage[part]
        if fmt == "float":
            return FloatBank(w)
        if fmt in ("int8", "int4"):
            return QuantBank(w, self.storage[f"{part}_scales"])
        layouts = self.spec.blocks[part]
        qtype, rows, rb = layouts[layer if layer is not None else next(iter(layouts))]
        return GgufBank(qtype, w.as_strided((self.size, rows, rb), (w.stride(0), rb, 1)))  # [S, R, row bytes]

    @property
    def slots(self) -> list[ExpertWeights]:
        if self._slots is None:
            self._slots = [
                {n: self.storage[p][s][i] for n, (p, i) in self.spec.views.items()} for s in range(self.size)
            ]
        return self._slots

    def repack_slot(self, slot: int, landed: set[str] | frozenset[str] = frozenset()) -> None:
        """Slot `slot` was just filled (with an expert of this bank's layer): its blocks into llama.cpp's layout,
        but for the parts `land` put there already."""
        for part, m in self.matrices.items():
            if isinstance(m, GgufBank) and part not in landed:
                m.repack_slot(slot)

    def land(self, slot: int, name: str, source: torch.Tensor) -> bool:
        """Tensor `name` of slot `slot`'s expert, as the file holds it (uint8, e.g. a read's staging), put in the
        slot in its bank's layout straight from there: True where its bank repacks blocks, else False (the
        caller copies it: the slot then holds it as read)."""
        m = self.matrices.get(name)
        return isinstance(m, GgufBank) and m.land(slot, source)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage.values())

    def gate_and_up(self, x: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D], slots [N, K] -> gate, up [N, K, I] (biases added)."""
        if self.gate_up is not None:
            gu = self.gate_up.gather_mv(x, slots)  # [N, K, 2I]
        else:
            gu = torch.cat(
                [self.matrices["gate"].gather_mv(x, slots), self.matrices["up"].gather_mv(x, slots)], -1
            )
        if self.gate_up_bias is not None:
            gu = gu + self.gate_up_bias[slots].to(gu.dtype)
        return gu.chunk(2, dim=-1)

    def fused_swiglu(self, config: ModelConfig) -> bool:
        """Whether every matrix is GGUF blocks of a plain SwiGLU without biases (llama.cpp's own MoE graph): such
        a layer's pairs run as one graph (swiglu_pairs), for prefill as for decode."""
        m = self.matrices
        return (config.expert_act != "gptoss" and self.gate_up is None and self.gate_up_bias is None
                and self.down_bias is None and all(isinstance(m.get(p), GgufBank) for p in ("gate", "up", "down")))  # fmt: skip

    def swiglu_pairs(
        self, x: torch.Tensor, slots: torch.Tensor, config: ModelConfig, weights: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """x [N, D], slots [N, K] -> unweighted outputs [N, K, D] in one kernel call, or with weights [N, K]
        their weighted sum [N, D] in llama.cpp's order (sum_in_order), when fused_swiglu; None otherwise."""
        if not self.fused_swiglu(config) or x.dim() != 2:
            return None
        m = self.matrices
        parts = (m["gate"], m["up"], m["down"])
        out = swiglu_experts(
            tuple(p.qtype for p in parts),
            tuple(p.raw for p in parts),
            x,
            slots,
            weights,
            tuple(p.layout for p in parts),
        )
        return out.to(x.dtype)

    def expert(self, x: torch.Tensor, slot: int, config: ModelConfig) -> torch.Tensor:
        """The expert in `slot` on its tokens x [n, D] -> [n, D] (the grouped path)."""
        if self.gate_up is not None:
            gu = self.gate_up.apply(x, slot)  # [n, 2I]
        else:
            gu = torch.cat([self.matrices["gate"].apply(x, slot), self.matrices["up"].apply(x, slot)], -1)
        if self.gate_up_bias is not None:
            gu = gu + self.gate_up_bias[slot].to(gu.dtype)
        out = self.down.apply(activation(*gu.chunk(2, dim=-1), config), slot)  # [n, D]
        return out if self.down_bias is None else out + self.down_bias[slot].to(out.dtype)


# ------------------------------------------------------------------------------------------ the primitive


def gathered(
    bank: ExpertBank, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, config: ModelConfig
):
    """Decode: every (token, expert) pair read straight from the bank, a handful of ops whatever K is."""
    y = bank.swiglu_pairs(x, slots, config, weights)  # GGUF blocks: the whole layer in one call
    if y is not None:
        return y
    gate, up = bank.gate_and_up(x, slots)  # [N, K, I] each
    out = bank.down.gather_mv(activation(gate, up, config), slots)  # [N, K, D]
    if bank.down_bias is not None:
        out = out + bank.down_bias[slots].to(out.dtype)
    return torch.bmm(weights[:, None].to(out.dtype), out)[:, 0]  # sum_k weights * out: [N, D]


def sum_in_order(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out [N, K, D], weights [N, K] -> sum_k weights * out [N, D] as llama.cpp's build_moe_ffn adds them (and
    swiglu_experts with weights): each product rounded, then slot after slot. For pairs computed elsewhere."""
    weighted = out * weights[..., None].to(out.dtype)
    y = weighted[:, 0]
    for j in range(1, weighted.shape[1]):
        y = y + weighted[:, j]
    return y


def grouped(bank, x, ids, slots, weights, config: ModelConfig) -> torch.Tensor:
    """Prefill: one pass per routed expert over its tokens (ascending expert id, so every bank sums alike).
    Slots < 0 are skipped: experts the caller computes in another wave."""
    y = torch.zeros_like(x)
    flat_w, flat_slots = weights.flatten(), slots.flatten().tolist()
    for _, rows, pos in group_by_expert(ids):
        s = flat_slots[int(pos[0])]
        if s >= 0:
            out = bank.expert(x[rows], s, config)
            y.index_add_(0, rows, out * flat_w[pos, None].to(out.dtype))
    return y


def dense(bank: ExpertBank, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, config: ModelConfig):
    """Every expert of a resident float bank on every token, unrouted ones weighted 0: two big matmuls, for
    layers that route to most of their experts (K/E >= DENSE_SHARE), where skipping the rest saves little."""
    n, e = x.shape[0], bank.size
    gu = F.linear(x, bank.gate_up.all_rows()).view(n, e, -1)  # [N, E, 2I]
    if bank.gate_up_bias is not None:
        gu = gu + bank.gate_up_bias
    h = activation(*gu.chunk(2, dim=-1), config)  # [N, E, I]
    w = torch.zeros(n, e, dtype=h.dtype, device=x.device).scatter_(1, ids, weights.to(h.dtype))  # [N, E]
    h = h * w[..., None]
    y = torch.bmm(h.transpose(0, 1), bank.down.w.transpose(1, 2)).sum(0)  # [E, N, D] -> [N, D]
    return y if bank.down_bias is None else y + w @ bank.down_bias


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


def switch_glu(bank: ExpertBank, x, ids, slots, weights, config: ModelConfig) -> torch.Tensor:
    """The MoE layer's routed experts: x [N, D], ids/slots/weights [N, K] -> y [N, D]. Few tokens (decode,
    small batches) take the gathered kernels; many (prefill) the grouped pass, where each expert's matmul
    over its tokens outweighs the loop. GGUF blocks always take ggml's graph, which groups tokens itself."""
    if few_tokens(ids, config) or bank.fused_swiglu(config):
        return gathered(bank, x, slots, weights, config)
    return grouped(bank, x, ids, slots, weights, config)


GATHERED_TOKENS = (
    8  # a decode batch or a speculative verification: one gathered call beats a loop over experts
)


def few_tokens(ids: torch.Tensor, config: ModelConfig) -> bool:
    """Whether a layer's (token, expert) pairs are few enough for the gathered kernels. Up to GATHERED_TOKENS
    tokens always are: the grouped pass's loop over experts (Python, an index_add per expert) cost 3.5x the
    gathered call at 5 tokens of the default model (top-26 of 32), where every expert has several tokens."""
    n, k = ids.shape
    return n <= GATHERED_TOKENS or n * k <= max(2 * k, config.num_experts)


class ResidentExperts:
    """Every routed expert in memory, one bank per MoE layer with slot = expert id: no host decision at all."""

    def __init__(self, config: ModelConfig, banks: dict[int, ExpertBank]):
        self.config, self.banks = config, banks
        # most experts of a layer are routed every token: for many tokens, computing all of them densely is
        # two matmuls instead of a pass per expert (a decoded token still reads only its own experts)
        self.dense = config.top_k >= DENSE_SHARE * config.num_experts

    def __call__(self, layer, x, ids, weights):
        bank = self.banks[layer]
        if self.dense and not few_tokens(ids, self.config) and _float_bank(bank, x.dtype):
            return dense(bank, x, ids, weights, self.config)
        return switch_glu(bank, x, ids, ids, weights, self.config)

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.banks.values())

    def drafting(self, model) -> contextlib.AbstractContextManager:
        """Drafts route among resident experts (see PagedExperts.drafting): here every expert is resident."""
        return contextlib.nullcontext()


def _float_bank(bank: ExpertBank, dtype: torch.dtype) -> bool:
    return all(isinstance(m, FloatBank) and m.w.dtype == dtype for m in (bank.gate_up, bank.down))


# ------------------------------------------------------------------------------------------ routing


def _sparsemixer_pick(scores: torch.Tensor, masked: torch.Tensor, eps: float):
    """PhiMoE's deterministic (eval) sparsemixer step: the max of `masked`, its weight over a near-max mask."""
    threshold, top = masked.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    gates = masked.masked_fill((threshold - scores) / factor > 2 * eps, float("-inf"))
    return torch.softmax(gates, dim=-1).gather(-1, top), top


def route(
    logits: torch.Tensor,
    config: ModelConfig,
    correction_bias: torch.Tensor | None = None,
    absent: torch.Tensor | None = None,
):
    """Router logits [N, E] -> (weights [N, K], ids [N, K]) by the family's rule. absent [E] (bool): experts
    never picked, as if the layer did not have them (their logit is -inf before any normalization)."""
    k = config.top_k
    if absent is not None and config.routing != "sigmoid_group":
        logits = logits.masked_fill(absent, float("-inf"))
    # a softmax then top-k: also DeepSeek-V2 without groups, whose weights are then scaled
    plain_softmax = config.routing == "softmax_topk" or (
        config.routing == "softmax_group" and config.n_group == 1
    )
    if plain_softmax and config.routing_order == "llama.cpp":
        from ..kernels import ggml_routing  # imported only where a GGUF file is run

        w, ids = ggml_routing.softmax_topk(logits, k, config.norm_topk_prob)
        w = w.to(logits.dtype)
        return (w * config.routed_scaling_factor if config.routed_scaling_factor != 1.0 else w), ids
    if config.routing == "softmax_topk":  # Mixtral, Qwen-MoE, OLMoE
        probs = torch.softmax(logits.float(), dim=-1)
        w, ids = torch.topk(probs, k, dim=-1)
        if config.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return w.to(logits.dtype), ids
    if config.routing == "topk_softmax":  # GPT-OSS
        top, ids = torch.topk(logits, k, dim=-1)
        return torch.softmax(top, dim=-1), ids
    if config.grouped_routing:  # DeepSeek-V3, -V2: pick groups, then experts
        if config.routing == "sigmoid_group":
            scores = logits.float().sigmoid()
        else:
            scores = torch.softmax(logits.float(), dim=-1)
        choice = scores + correction_bias if correction_bias is not None else scores
        if absent is not None:  # the weights come from the scores of picked experts only
            choice = choice.masked_fill(absent, float("-inf"))
        n, e, g = scores.shape[0], config.num_experts, config.n_group
        if g > 1:
            grouped = choice.view(n, g, e // g)
            if config.group_score == "max":
                group_scores = grouped.max(dim=-1).values  # [N, G]
            else:
                group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
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
    def __init__(self, config: ModelConfig, absent: tuple[int, ...] = ()):
        super().__init__()
        self.config = config
        if absent:
            # [E] bool, from the config (not a weight): built on the CPU even when the model is on meta
            with torch.device("cpu"):
                mask = torch.zeros(config.num_experts, dtype=torch.bool)
                mask[list(absent)] = True
            self.register_buffer("absent", mask, persistent=False)
        else:
            self.absent = None
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_bias else None
        if config.routing == "sigmoid_group":
            self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (weights [N, K], ids [N, K])."""
        if self.config.grouped_routing:  # the reference routes DeepSeek in fp32
            logits = F.linear(x.float(), self.weight.float())
        else:
            logits = F.linear(x, self.weight, self.bias)
        return route(logits, self.config, self.e_score_correction_bias, self.absent)


class SharedGate(nn.Linear):
    """A shared expert's gate (Qwen2-MoE): x [N, D] -> sigmoid(x @ weight.T) [N, 1]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(super().forward(x))


class MoE(nn.Module):
    """Router + routed experts (through the contract) + optional always-on shared expert."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.router = Router(config, config.absent_experts.get(layer, ()))
        self.shared = (
            MLP(config.hidden_size, config.shared_expert_size) if config.shared_expert_size else None
        )
        self.shared_gate = (
            SharedGate(config.hidden_size, 1, bias=False) if config.shared_expert_gate else None
        )
        self.experts: Experts | None = None  # swapped in after construction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        return self.combine(x, *self.router(x)).reshape(shape)

    def combine(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [N, D] routed to ids [N, K] with weights [N, K] -> the routed experts' sum plus the shared expert [N, D]."""
        y = self.experts(self.layer, x, ids, weights)
        if self.shared is not None:
            s = self.shared(x)
            y = y + (self.shared_gate(x) * s if self.shared_gate is not None else s)
        return y
