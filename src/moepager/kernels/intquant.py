"""Weight-only int8/int4 matrices and `linear`: the quantized math of our own int8/int4 experts.

Owns the quantization rules (int8 per output channel; int4 in groups along the input), the int4 byte layouts
(what stores hold, "rows", and what this machine's CPU kernel reads), and the compute paths. The store's
encoding of a quantized expert (names, repacking on read and write, QuantizingSource) is store/encoding.py's.
Quantization is lossy: nothing here runs unless an experts dtype is asked for by name.

Compute paths, chosen per call from where the weight lives and what the kernels accept:
- CPU: torch's weight-only kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) with bf16
  activations. Measured here (benchmarks/quantization_kernels.md) they match or beat fp32 F.linear from 1 to
  64 tokens, while dequantizing to fp32 per call cost several times more, so prefill uses them too.
- elsewhere (CUDA) or for shapes the kernels reject: dequantize to the activation dtype, then F.linear.

Letters: N output features, K input features, G groups along K (K / group_size).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import MoepagerError

INT4_GROUP_SIZES = (128, 64, 32)  # the int4 kernel's group sizes, largest (fewest scales) first


# int4 byte layouts. "rows" (what stores hold): byte [n, c] = code [n, 2c] | code [n, 2c+1] << 4.
# The CPU kernel wants its own, which depends on the CPU torch dispatches to: rows in tiles, each tile
# stored input-column-major, its rows paired either half-with-half or neighbour-with-neighbour; a last
# partial tile always pairs neighbours. (tile rows, pair halves) per layout:
_KERNEL_LAYOUTS = {"tiles64": (64, True), "tiles32": (32, True), "pairs32": (32, False)}


def pack_int4(codes: torch.Tensor, layout: str = "rows") -> torch.Tensor:
    """Codes [N, K] (uint8, 0..15) -> bytes [N, K/2] in `layout`."""
    n, k = codes.shape
    if layout == "rows":
        return codes[:, 0::2] | (codes[:, 1::2] << 4)
    tile, halves = _KERNEL_LAYOUTS[layout]
    full = n // tile * tile
    parts = []
    if full:
        t = codes[:full].view(full // tile, tile, k)
        lo, hi = (t[:, : tile // 2], t[:, tile // 2 :]) if halves else (t[:, 0::2], t[:, 1::2])
        parts.append((lo | (hi << 4)).transpose(1, 2).reshape(-1))  # [tiles, K, tile/2]
    if n > full:
        t = codes[full:]
        parts.append((t[0::2] | (t[1::2] << 4)).t().reshape(-1))  # [K, rows/2]
    return torch.cat(parts).view(n, k // 2)


def unpack_int4(packed: torch.Tensor, layout: str = "rows") -> torch.Tensor:
    """Inverse of pack_int4: bytes [N, K/2] -> codes [N, K] (uint8, 0..15)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if layout == "rows":
        return torch.stack((packed & 15, packed >> 4), dim=-1).view(n, k)
    tile, halves = _KERNEL_LAYOUTS[layout]
    flat, full = packed.reshape(-1), n // tile * tile
    rows = []
    if full:
        b = flat[: full * k // 2].view(full // tile, k, tile // 2).transpose(1, 2)  # [tiles, tile/2, K]
        pair = torch.cat((b & 15, b >> 4), dim=1) if halves else torch.stack((b & 15, b >> 4), dim=2)
        rows.append(pair.reshape(full, k))
    if n > full:
        b = flat[full * k // 2 :].view(k, (n - full) // 2).t()  # [rows/2, K]
        rows.append(torch.stack((b & 15, b >> 4), dim=1).reshape(n - full, k))
    return torch.cat(rows)


@functools.cache
def cpu_int4_layout() -> str | None:
    """The layout this machine's int4 kernel reads, or None (then int4 takes the dequantize path).

    Found once by packing a probe with torch's own converter, which covers full and partial tiles of
    every known layout, so the kernel is never fed bytes in a layout it does not read.
    """
    probe = torch.randint(0, 16, (112, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    except (RuntimeError, AttributeError):
        return None
    codes = probe.to(torch.uint8)
    for layout in _KERNEL_LAYOUTS:
        if theirs.shape == (112, 32) and torch.equal(theirs, pack_int4(codes, layout)):
            return layout
    return None


def tile_rows(layout: str) -> int:
    """Rows of one packing tile: matrices stacked along their rows pack alike only in whole tiles."""
    return _KERNEL_LAYOUTS[layout][0] if layout in _KERNEL_LAYOUTS else 1


@functools.cache
def native_int4_layout() -> str:
    """The layout int4 codes have in memory on this machine: what its CPU kernel reads, else "rows"."""
    return cpu_int4_layout() or "rows"


@dataclass
class QuantizedWeight:
    """A weight-only quantized [N, K] matrix: a view over codes and scales, built per call (no copies).

    int8: w = codes * scales[:, None].
    int4: w[n, k] = (code[n, k] - 8) * scales[k // g, n, 0] + scales[k // g, n, 1], codes packed in `layout`.
    """

    kind: str  # "int8" or "int4"
    shape: tuple[int, int]  # (N, K) of the float matrix it stands for
    data: torch.Tensor  # int8 [N, K] | uint8 [N, K/2]
    scales: torch.Tensor  # bf16 [N] | bf16 [G, N, 2] (scale, zero)
    group_size: int = 0  # int4: input columns per scale
    layout: str = "rows"  # int4: see pack_int4

    @classmethod
    def of(cls, codes: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
        """The in-memory form (codes, scales) -> a view; kind, shape and group size follow from the shapes."""
        if codes.dtype == torch.int8:
            return cls("int8", (codes.shape[0], codes.shape[1]), codes, scales)
        n, k = codes.shape[0], codes.shape[1] * 2
        return cls("int4", (n, k), codes, scales, k // scales.shape[0], native_int4_layout())

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

    def with_layout(self, layout: str) -> QuantizedWeight:
        if self.kind != "int4" or layout == self.layout:
            return self
        data = pack_int4(unpack_int4(self.data, self.layout), layout)
        return QuantizedWeight(self.kind, self.shape, data, self.scales, self.group_size, layout)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float matrix [N, K] these codes stand for."""
        s = self.scales.to(dtype)
        if self.kind == "int8":
            return self.data.to(dtype) * s[:, None]
        n, k = self.shape
        codes = unpack_int4(self.data, self.layout).to(dtype).view(n, k // self.group_size, self.group_size)
        scale, zero = s[..., 0].t(), s[..., 1].t()  # [N, G] each
        return ((codes - 8) * scale[..., None] + zero[..., None]).view(n, k)  # [N, K]

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or self.data.device.type != "cpu":
            return False
        n, k = self.shape
        if self.kind == "int8":  # the kernel reads K in steps of 16; other K give wrong sums
            return k % 16 == 0
        layout = cpu_int4_layout()
        return (
            layout is not None
            and self.layout == layout
            and n % 16 == 0
            and self.group_size in INT4_GROUP_SIZES
        )

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x @ w.T [..., N], in x's dtype."""
        if not self._kernel_ok(x):
            return F.linear(x, self.dequantize(x.dtype))
        shape = x.shape
        xb = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # the kernels are fast with bf16 activations only
        s = self.scales.to(torch.bfloat16)  # already bf16 unless a caller cast it (exact either way)
        if self.kind == "int8":
            y = torch._weight_int8pack_mm(xb, self.data, s)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.data, self.group_size, s)
        return y.to(x.dtype).view(*shape[:-1], self.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None,
           scales: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """F.linear for a float weight, quantized codes with their scales, or a QuantizedWeight.
    A float weight of x's dtype takes F.linear itself: unquantized experts compute exactly as before."""
    if scales is not None:
        w = QuantizedWeight.of(w, scales)
    if isinstance(w, QuantizedWeight):
        y = w.linear(x)
        return y if bias is None else y + bias.to(y.dtype)
    if w.dtype != x.dtype:  # e.g. bf16 experts in an fp32 model: compute in the weight's dtype
        return F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype)).to(x.dtype)
    return F.linear(x, w, bias)


def int4_group_size(k: int) -> int:
    """The largest kernel group size dividing K; small or odd K get one group per row."""
    return next((g for g in INT4_GROUP_SIZES if k % g == 0), k)


def quantize(w: torch.Tensor, kind: str, group_size: int | None = None) -> QuantizedWeight:
    """Round a float [N, K] matrix to int8 (symmetric, per output channel) or int4 (min/max per group).

    Scales are rounded to bf16 before the codes are chosen, so the kernels (which take bf16 scales) and
    `dequantize` see the very same weights. int4 codes come packed in this machine's native layout.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize takes a 2-d weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    wf = w.detach().float()
    if kind == "int8":
        scale = (wf.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # [N]
        q = torch.round(wf / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight("int8", (n, k), q.contiguous(), scale)
    if kind == "int4":
        g = group_size or int4_group_size(k)
        if k % g:
            raise MoepagerError(
                f"int4 group size {g} does not divide the {k} input columns of a {n}x{k} matrix"
            )
        if n % 2 or k % 2:
            raise MoepagerError(f"int4 packs two codes a byte: a {n}x{k} matrix needs even sides; use int8")
        groups = wf.view(n, k // g, g)
        lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, G]
        scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
        zero = (lo + 8 * scale).to(torch.bfloat16).float()  # the value of code 8
        codes = torch.round((groups - zero[..., None]) / scale[..., None]) + 8
        codes = codes.clamp(0, 15).to(torch.uint8).view(n, k)
        scales = torch.stack((scale.t(), zero.t()), dim=-1).to(torch.bfloat16).contiguous()  # [G, N, 2]
        layout = native_int4_layout()
        return QuantizedWeight("int4", (n, k), pack_int4(codes, layout), scales, g, layout)
    raise ValueError(f"unknown quantization {kind!r}; use int8 or int4")
