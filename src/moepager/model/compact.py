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

from ..kernels import ggml, hugepages, matvec


class BlockLinear(nn.Module):
    """x [..., C] -> [..., R] with the weight as GGUF blocks uint8 [R, row bytes]."""

    def __init__(self, qtype: int, rows: int, cols: int, row_bytes: int, bias: bool):
        super().__init__()
        self.qtype, self.out_features, self.in_features = qtype, rows, cols
        self.register_buffer("blocks", torch.empty(rows, row_bytes, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(rows)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ggml.mul_mat(self.qtype, self.blocks, x.reshape(-1, self.in_features))  # [N, R] fp32
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class BlockEmbedding(nn.Module):
    """ids [...] -> rows [..., D] of a GGUF block matrix [V, row bytes], only the looked-up rows decoded."""

    def __init__(self, qtype: int, rows: int, cols: int, row_bytes: int, dtype: torch.dtype):
        super().__init__()
        self.qtype, self.dim, self.dtype = qtype, cols, dtype
        self.register_buffer("blocks", torch.empty(rows, row_bytes, dtype=torch.uint8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = ggml.dequantize(self.qtype, self.blocks[ids.flatten().cpu()])  # [n, D] float32
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
