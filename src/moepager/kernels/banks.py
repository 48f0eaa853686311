"""Matrix banks: one expert matrix (gate_up, gate, up or down) for every slot of a bank, in one storage per
format, and the two products the experts primitive needs from it.

- `gather_mv(x, slots)`: decode. out[n, k] = W[slots[n, k]] @ x[n] (or x[n, k]), every pair in a few calls.
- `apply(x, slot)`: grouped (prefill). x [n, C] @ W[slot].T for the tokens routed to one slot.

Formats, each kept in the form it is computed from (a quantized bank never holds a dequantized copy):
- "float": W [S, R, C] in the compute dtype. CPU float32 decode runs the numba gathered kernel (matvec.py).
- "int8" / "int4": our stores' weight-only codes with bf16 scales, computed by torch's CPU kernels
  (intquant.py), one call per distinct slot.
- "gguf": llama.cpp blocks [S, R, row bytes] as they lie in the file, read as one layer's type (a cache's
  slots are sized for the largest layer, so the view may skip bytes between slots), computed by llama.cpp's
  own kernels (kernels/ggml.py): one mul_mat_id call per product, activations quantized as llama.cpp does;
  where llama.cpp interleaves a matrix's rows (kernels/ggml_repack.py), each slot is repacked as it is filled.

Letters: S slots, R rows (outputs), C columns (inputs), N tokens, K experts per token, G int4 groups.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES

from . import ggml, ggml_repack, matvec
from .ggml_library import Q
from .intquant import QuantizedWeight


class MatrixBank:
    """Storage [S, ...] for one matrix of every slot. Subclasses give `apply`; `gather_mv` defaults to one
    `apply` per distinct slot (a host sync, fine for kernels that are per-matrix anyway)."""

    rows: int

    def apply(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        raise NotImplementedError

    def gather_mv(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """x [N, C] or [N, K, C], slots [N, K] -> [N, K, R]."""
        n, k = slots.shape
        xs = x[:, None].expand(n, k, x.shape[-1]) if x.dim() == 2 else x
        xs = xs.reshape(n * k, -1)  # [N*K, C]
        flat = slots.flatten()
        out = None
        for s in torch.unique(flat).tolist():
            rows = (flat == s).nonzero().flatten()
            y = self.apply(xs[rows], s)
            if out is None:
                out = y.new_empty(n * k, self.rows)
            out[rows] = y
        return out.view(n, k, self.rows)


class FloatBank(MatrixBank):
    def __init__(self, w: torch.Tensor):
        self.w = w  # [S, R, C]
        self.rows = w.shape[1]

    def apply(self, x, slot):
        w = self.w[slot]
        if w.dtype != x.dtype:  # e.g. bf16 experts in an fp32 model: compute in the weight's dtype
            return F.linear(x.to(w.dtype), w).to(x.dtype)
        return F.linear(x, w)

    def gather_mv(self, x, slots):
        if matvec.can_use(self.w, x):
            return matvec.gather_matvec(self.w, x, slots)
        if self.w.device.type == "cuda":  # gathered batched matmul: no host sync, so it can be captured
            n, k = slots.shape
            w = self.w[slots.flatten()]  # [N*K, R, C]
            xs = (x[:, None].expand(n, k, x.shape[-1]) if x.dim() == 2 else x).reshape(n * k, -1, 1)
            return torch.bmm(w, xs.to(w.dtype)).view(n, k, self.rows).to(x.dtype)
        return super().gather_mv(x, slots)

    def all_rows(self) -> torch.Tensor:
        """Every slot's rows as one [S*R, C] matrix (a view): the dense path's single matmul."""
        return self.w.view(-1, self.w.shape[-1])


class QuantBank(MatrixBank):
    """Our int8 / int4 codes: int8 codes [S, R, C] with scales [S, R]; int4 bytes [S, R, C/2] with scales
    [S, G, R, 2], packed in this machine's kernel layout."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        self.codes, self.scales = codes, scales
        self.rows = codes.shape[1]

    def apply(self, x, slot):
        return QuantizedWeight.of(self.codes[slot], self.scales[slot]).linear(x)


class GgufBank(MatrixBank):
    """llama.cpp quantized blocks, bytes [S, R, row bytes], computed on the blocks themselves. Both products
    go through ggml's mul_mat_id, so a (token, slot) pair gives the same bits decoded or grouped."""

    def __init__(self, qtype: int, raw: torch.Tensor):
        self.qtype, self.raw = qtype, raw
        self.rows = raw.shape[1]
        qk, block_bytes = GGML_QUANT_SIZES[Q(qtype)]
        # llama.cpp's interleaved layout where it would use one: each slot is repacked as its bytes land
        self.layout = ggml_repack.layout(qtype, self.rows, raw.shape[2] // block_bytes * qk)

    def repack_slot(self, slot: int) -> None:
        """Slot `slot` was just filled with the file's bytes: put them in this bank's layout."""
        if self.layout:
            ggml_repack.repack(self.qtype, self.layout, self.raw[slot])

    def land(self, slot: int, source: torch.Tensor) -> bool:
        """The file's bytes of slot `slot` (uint8, e.g. a read's staging) put in this bank's layout straight from
        there, where this bank repacks them; False where it keeps the file's rows (the caller copies them)."""
        if not self.layout or source.numel() != self.raw[slot].numel():
            return False
        ggml_repack.repack(self.qtype, self.layout, self.raw[slot], source)
        return True

    def apply(self, x, slot):
        ids = torch.full((x.shape[0], 1), slot, dtype=torch.int32)
        return ggml.mul_mat_id(self.qtype, self.raw, x, ids, self.layout)[:, 0].to(x.dtype)

    def gather_mv(self, x, slots):
        return ggml.mul_mat_id(self.qtype, self.raw, x, slots, self.layout).to(x.dtype)
