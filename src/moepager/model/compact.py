"""Dense layers computed by moepager's own kernels, swapped in after the model is built like any capability
(the decoder itself has only nn.Linear and nn.Embedding).

- GGUF blocks: a quantized model's attention, shared experts, embedding and output stay in their file's
  compact form instead of being expanded to floats (a Q4 model would take 8x its size), and are computed by
  llama.cpp's own kernels (kernels/ggml.py), as llama.cpp computes them.
  `swap_compact(model, {weight name: (qtype, blocks, (rows, cols))})` replaces each named module's weight by
  its blocks, a buffer `blocks` that load_state_dict then assigns like any tensor.
- `huge_page_weights(model)`: every large CPU weight moved into 2 MiB pages (kernels/hugepages.py), which
  the kernels stream through faster than through 4 KiB pages.
- fp32 on the CPU: `swap_matvec(model)` has every linear layer compute a single token (decode) with the
  numba matvec kernel, which read a 100 MiB output head at ~30 GB/s here where torch's sgemv read ~11.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import ggml, ggml_block, ggml_float, ggml_library, ggml_repack, hugepages, matvec
from .decoder import Block
from .layers import MLP, Attention, KVCache, RMSNorm
from .moe import MoE, Router, SharedGate, route


class BlockLinear(nn.Module):
    """x [..., C] -> [..., R] with the weight as GGUF blocks uint8 [R, row bytes]."""

    def __init__(self, qtype: int, rows: int, cols: int, row_bytes: int, bias: bool):
        super().__init__()
        self.qtype, self.out_features, self.in_features = qtype, rows, cols
        self.register_buffer("blocks", torch.empty(rows, row_bytes, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(rows)) if bias else None
        self.layout = 0  # the file's rows, until repack_block_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ggml.mul_mat(self.qtype, self.blocks, x.reshape(-1, self.in_features), self.layout)  # [N, R] fp32
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class BlockEmbedding(nn.Module):
    """ids [...] -> rows [..., D] of a GGUF block matrix [V, row bytes], only the looked-up rows decoded."""

    def __init__(self, qtype: int, rows: int, cols: int, row_bytes: int, dtype: torch.dtype):
        super().__init__()
        self.qtype, self.dim, self.dtype = qtype, cols, dtype
        self.register_buffer("blocks", torch.empty(rows, row_bytes, dtype=torch.uint8))
        self.read_rows = None  # ids [n] -> uint8 [n, row bytes] from the file, once rows_from_file is called

    def rows_from_file(self, read_rows) -> None:
        """Look rows up in the file instead of holding the table: read_rows(ids [n]) -> uint8 [n, row bytes]
        (a source's embedding_rows). A token needs one row, so under a memory limit the table's bytes (13.5 MiB
        of a 49k-word Q4_0 file, ~170 MiB of Qwen3-30B-A3B's) go to the expert cache instead, as llama.cpp's
        mapped file holds only the rows it touched."""
        self.read_rows = read_rows
        self.blocks = self.blocks.new_empty(0, self.blocks.shape[1])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.flatten().cpu()
        blocks = self.blocks[flat] if self.read_rows is None else self.read_rows(flat)
        rows = ggml.dequantize(self.qtype, blocks)  # [n, D] float32
        return rows.to(device=ids.device, dtype=self.dtype).view(*ids.shape, self.dim)


class BlockLatentKV(nn.Module):
    """MLA's kv_b_proj as llama.cpp's converter splits it and llama.cpp computes it (LatentKV's absorb and
    expand): k_b [H, kv_rank, row bytes] over nope inputs, v_b [H, Dv, row bytes] over kv_rank inputs, each a
    per-head product of 8-bit (or, for fp16 rows, fp16) activations."""

    def __init__(self, heads: int, k_b: tuple, v_b: tuple):
        super().__init__()
        self.heads = heads
        (self.k_type, k_rows, k_row_bytes), (self.v_type, v_rows, v_row_bytes) = k_b, v_b
        self.register_buffer("k_b", torch.empty(heads, k_rows // heads, k_row_bytes, dtype=torch.uint8))
        self.register_buffer("v_b", torch.empty(heads, v_rows // heads, v_row_bytes, dtype=torch.uint8))

    def _per_head(self, qtype: int, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [H, B, T, C] -> [H, B, T, R]"""
        h, b, t, c = x.shape
        return ggml.mul_mat(qtype, w, x.reshape(h, b * t, c)).view(h, b, t, -1).to(x.dtype)

    def absorb(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, H, T, nope] -> [B, H, T, kv_rank]"""
        return self._per_head(self.k_type, self.k_b, q.transpose(0, 1)).transpose(0, 1)

    def expand(self, o: torch.Tensor) -> torch.Tensor:
        """o [B, T, H, kv_rank] -> [B, T, H, Dv]"""
        return self._per_head(self.v_type, self.v_b, o.permute(2, 0, 1, 3)).permute(1, 2, 0, 3)


LATENT_PARTS = (".k_b", ".v_b")  # compact names of a kv_b_proj kept as llama.cpp's split (BlockLatentKV)


def swap_compact(model: nn.Module, compact: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replace the modules whose weights are given as blocks; returns their state ({name}.blocks -> bytes)
    for load_state_dict. dtype: what the embedding hands the model. An MLA kv_b_proj comes as its two parts,
    {module}.k_b and {module}.v_b."""
    state, compact = {}, dict(compact)
    for name in [n for n in compact if n.endswith(LATENT_PARTS[0])]:
        module_name = name.removesuffix(LATENT_PARTS[0])
        (k_type, k_b, k_shape), (v_type, v_b, v_shape) = (compact.pop(module_name + p) for p in LATENT_PARTS)
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        heads = getattr(parent, attr).heads
        new = BlockLatentKV(heads, (k_type, k_shape[0], k_b.shape[1]), (v_type, v_shape[0], v_b.shape[1]))
        setattr(parent, attr, new)
        state[module_name + ".k_b"] = k_b.view(heads, -1, k_b.shape[1])
        state[module_name + ".v_b"] = v_b.view(heads, -1, v_b.shape[1])
    for weight_name, (qtype, blocks, (rows, cols)) in compact.items():
        module_name = weight_name.removesuffix(".weight")
        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if isinstance(old, nn.Embedding):
            new = BlockEmbedding(qtype, rows, cols, blocks.shape[1], dtype)
        else:
            new = BlockLinear(qtype, rows, cols, blocks.shape[1], old.bias is not None)
        setattr(parent, attr, new)
        state[f"{module_name}.blocks"] = blocks
    return state


def repack_block_weights(model: nn.Module) -> None:
    """Each BlockLinear whose matrix llama.cpp would interleave (kernels/ggml_repack.py) repacked in place, once,
    after loading. A tied output head gets its own repacked copy, as llama.cpp loads one for its output layer:
    the embedding's lookups read the file's rows."""
    looked_up = {m.blocks.data_ptr() for m in model.modules() if isinstance(m, BlockEmbedding)}
    for m in model.modules():
        if not isinstance(m, BlockLinear) or m.blocks.device.type != "cpu":
            continue
        layout = ggml_repack.layout(m.qtype, m.out_features, m.in_features)
        if layout:
            if m.blocks.data_ptr() in looked_up:
                m.blocks = m.blocks.clone()
            ggml_repack.repack(m.qtype, layout, m.blocks)
            m.layout = layout


class GgmlRMSNorm(RMSNorm):
    """RMSNorm as llama.cpp computes it (ggml's rms_norm, then its product by the weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ggml_float.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)


class BlockMLP(MLP):
    """A SwiGLU feed-forward of three BlockLinear layers as one ggml graph, as llama.cpp's build_ffn runs it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mats = (self.gate_proj, self.up_proj, self.down_proj)
        y = ggml.swiglu_mlp(
            tuple(m.qtype for m in mats),
            tuple(m.blocks for m in mats),
            x.reshape(-1, x.shape[-1]),
            tuple(m.layout for m in mats),
        )
        return y.view(*x.shape[:-1], -1)


class GgmlRouter(Router):
    """Router logits by ggml's float32 product over the file's float32 router matrix, as llama.cpp takes them."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pick(
            ggml.mul_mat(ggml_library.F32, self.weight.view(torch.uint8), x.reshape(-1, x.shape[-1]))
        )

    def pick(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [N, E] of ggml's product (without the bias) -> (weights, ids), by the family's rule."""
        if self.bias is not None:
            logits = logits + self.bias
        return route(logits, self.config, self.e_score_correction_bias, self.absent)


class GgmlSharedGate(SharedGate):
    """A shared expert's gate as llama.cpp's qwen2moe graph computes it: ggml's product, then silu(z) / z."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ggml_float.sigmoid_gate(self.weight, x)


class GgmlAttention(Attention):
    """Attention as llama.cpp's graph runs it (kernels/ggml_float.py): ggml's rotary embedding, then K q, the
    masked softmax and V^T over llama.cpp's window of cached positions, for one sequence over the in-RAM
    KVCache (or none). Batches and blocked caches take Attention's own path."""

    rope_dims: int
    rope_base: float

    def forward(self, x, rope, cache, start, masks=None):
        if x.shape[0] != 1 or not (cache is None or isinstance(cache, KVCache)):
            return super().forward(x, rope, cache, start, masks)
        t = x.shape[1]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [1, T, H*Dh], [1, T, Hk*Dh] x2
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.view(t, self.h, self.dh), k.view(t, self.hk, self.dh), v.view(t, self.hk, self.dh)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        qk = ggml_float.rope(torch.cat([q, k], dim=1), start, self.rope_dims, self.rope_base)
        keys, values = self.cached(qk[:, self.h :], v, cache, start)
        return self.o_proj(ggml_float.attention(qk[:, : self.h], keys, values, start, self.scale)[None])

    def cached(self, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, start: int):
        """k, v [T, Hk, Dh] of positions start.. appended to the cache (or to a cache of this call alone) ->
        the keys [Hk, capacity, Dh] and values by position [Hk, Dh, capacity] attention reads."""
        t = k.shape[0]
        k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hk, T, Dh]
        n_kv = ggml_float.cached_positions(start + t)
        if cache is None:
            keys, values = k.new_zeros(self.hk, n_kv, self.dh), v.new_zeros(self.hk, self.dh, n_kv)
            keys[:, :t], values[:, :, :t] = k, v.transpose(1, 2)
            return keys, values
        cache.update(self.layer, k[None], v[None])
        cache.reserve(self.layer, n_kv, k[None], v[None])
        return cache.k[self.layer][0], cache.values_by_position(self.layer)[0]


class GgmlBlock(Block):
    """A decoder layer of GgmlAttention between GgmlRMSNorms over BlockLinear projections, computed in three ggml
    calls a step (kernels/ggml_block.py): the attention's inputs, then attention through the FFN norm and the
    router's logits, then the experts. The same ops as its modules' own, one by one (bit for bit); a batch, a
    blocked cache or non-float32 activations take Block's path."""

    def forward(self, x, rope, cache, start, masks):
        if x.shape[0] != 1 or x.dtype != torch.float32 or not (cache is None or isinstance(cache, KVCache)):
            return super().forward(x, rope, cache, start, masks)
        a, ffn = self.attn, self.ffn
        mats = [
            ggml_block.Matrix(m.qtype, m.blocks, m.layout, m.bias)
            for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj)
        ]
        norms = [ggml_block.Norm(n.weight, n.eps) for n in (self.attn_norm, self.ffn_norm)]
        qk_norms = (
            [ggml_block.Norm(n.weight, n.eps) for n in (a.q_norm, a.k_norm)]
            if a.qk_norm != "none"
            else [None, None]
        )
        q, k, v = ggml_block.attention_inputs(
            x[0],
            norms[0],
            *mats[:3],
            a.qk_norm,
            *qk_norms,
            (a.h, a.hk, a.dh),
            start,
            (a.rope_dims, a.rope_base),
        )  # [T, H, Dh], [T, Hk, Dh] x2
        keys, values = a.cached(k, v, cache, start)
        router = ffn.router.weight if isinstance(ffn, MoE) and type(ffn.router) is GgmlRouter else None
        h, normed, logits = ggml_block.attention_output(
            q, keys, values, start, a.scale, mats[3], x[0], norms[1], router
        )
        y = ffn(normed) if logits is None else ffn.combine(normed, *ffn.router.pick(logits))  # [T, D]
        return (h + y)[None]


def _fusable(block: nn.Module) -> bool:
    """Whether a block is GgmlBlock's: llama.cpp's attention and norms over GGUF block projections."""
    a = block.attn
    if type(block) is not Block or type(a) is not GgmlAttention:
        return False
    norms = (block.attn_norm, block.ffn_norm) + ((a.q_norm, a.k_norm) if a.qk_norm != "none" else ())
    mats = (a.q_proj, a.k_proj, a.v_proj, a.o_proj)
    floats = [n.weight for n in norms] + [m.bias for m in mats if getattr(m, "bias", None) is not None]
    return (all(type(n) is GgmlRMSNorm for n in norms) and all(type(m) is BlockLinear for m in mats)
            and all(w.dtype == torch.float32 for w in floats))  # fmt: skip


def swap_llama_cpp_ops(model: nn.Module) -> None:
    """A float32 GGUF model on the CPU: the float ops around its block products (norms, SwiGLU, router
    logits, a shared expert's gate, attention with plain RoPE) run as llama.cpp runs them, in ggml, so that no ulp of difference reaches
    the 8-bit rounding of the next product's activations (where one ulp can move a value a whole step). A layer
    made only of such modules then runs as GgmlBlock, in three ggml calls a step. Each swap keeps the module's
    parameters; only forward changes."""
    config = model.config
    plain_rope = config.rope.get("rope_type") == "default" and not config.rope_interleave
    for module in model.modules():
        if type(module) is Attention and plain_rope and module.window is None and module.sinks is None and module.clip is None:  # fmt: skip
            module.__class__ = GgmlAttention
            module.rope_dims, module.rope_base = model.rotary.dim, float(config.rope["rope_theta"])
        elif type(module) is RMSNorm:
            module.__class__ = GgmlRMSNorm
        elif type(module) is MLP and all(
            type(m) is BlockLinear and m.bias is None
            for m in (module.gate_proj, module.up_proj, module.down_proj)
        ):
            module.__class__ = BlockMLP
        elif type(module) is Router and module.weight.dtype == torch.float32:
            module.__class__ = GgmlRouter
        elif type(module) is SharedGate:
            module.__class__ = GgmlSharedGate
    for block in model.layers:
        if _fusable(block):
            block.__class__ = GgmlBlock


class MatvecLinear(nn.Linear):
    """nn.Linear whose one-token products run kernels/matvec.py (fp32, CPU); exact up to summation order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1] or not matvec.can_use(self.weight, x):
            return F.linear(x, self.weight, self.bias)
        y = matvec.gather_matvec(self.weight[None], x.reshape(1, -1), _ONE).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


_ONE = torch.zeros(1, 1, dtype=torch.long)  # token 0 uses matrix 0


def swap_matvec(model: nn.Module) -> None:
    """Every plain nn.Linear of an fp32 CPU model becomes a MatvecLinear: the same module and parameters,
    only forward changes (MatvecLinear adds no state). The kernel is loaded now, with the model, not by the
    first prompt: loading numba and the compiled kernel from its cache takes ~0.5 s, which was most of a short
    prompt's time to first token."""
    swapped = False
    for module in model.modules():
        if (
            type(module) is nn.Linear
            and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu"
        ):
            module.__class__ = MatvecLinear
            swapped = True
    if swapped:
        matvec.warm_up()


def huge_page_weights(model: nn.Module) -> None:
    """Move every CPU parameter and buffer of at least one huge page into huge-page memory, in place (a
    Parameter keeps its identity; tensors that were one, tied weights, stay one). The caller drops its own
    references to the old tensors first, so that each one is freed as soon as it is copied."""
    moved: dict[tuple, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None:
                    continue
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
                if key not in moved:
                    moved[key] = hugepages.moved(t.detach())
                new = moved[key]
                if new.data_ptr() == t.data_ptr():
                    continue
                if isinstance(t, nn.Parameter):
                    t.data = new
                else:
                    table[name] = new
