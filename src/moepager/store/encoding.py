"""How a quantized expert is stored and converted: the `--experts-dtype` encodings of a store.

A quantized expert is plain tensors, so caches, stores and devices handle it like any expert: each matrix's
codes under its own name ("gate": int8 [N, K], or uint8 [N, K/2] holding two int4 codes a byte) and its
scales under "{name}_scales" (bf16, the kernels' own format). In memory, int4 codes are packed in the layout
this machine's CPU kernel reads (`native_int4_layout`); in a store they are in "rows", which no machine owns.
The arithmetic is kernels/intquant.py's; this module converts experts (QuantizingSource) and maps the stored
form to the in-memory one.
"""

from __future__ import annotations

import torch

from ..errors import MoepagerError
from ..kernels.ggml import dequantize
from ..kernels.intquant import native_int4_layout, pack_int4, quantize, unpack_int4
from ..sources.contract import expert_formats

EXPERT_DTYPES = ("bf16", "fp16", "int8", "int4")  # names accepted by --experts-dtype
FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # plain casts; int8/int4 are codes + scales


def check_experts_dtype(name: str | None) -> str | None:
    if name is not None and name not in EXPERT_DTYPES:
        raise MoepagerError(f"experts dtype {name!r} is not supported; use one of {', '.join(EXPERT_DTYPES)}")
    return name


def is_quantized(weights: dict[str, torch.Tensor]) -> bool:
    return any(name.endswith("_scales") for name in weights)


def convert_expert(weights: dict[str, torch.Tensor], experts_dtype: str) -> dict[str, torch.Tensor]:
    """One expert's gate/up/down in `experts_dtype` (bf16, fp16, int8, int4); biases stay as they are."""
    out: dict[str, torch.Tensor] = {}
    for name, t in weights.items():
        if name.endswith("_bias"):
            out[name] = t
        elif experts_dtype in FLOAT_DTYPES:
            out[name] = t.to(FLOAT_DTYPES[experts_dtype])
        else:
            q = quantize(t, experts_dtype)
            out[name], out[f"{name}_scales"] = q.data, q.scales
    return out


class QuantizingSource:
    """Any ModelSource with its routed experts converted to `experts_dtype` as they are read.

    Disk bytes per read are the wrapped source's (quantizing at load time shrinks memory, not reads);
    a store written by `moepager convert --experts-dtype` shrinks both.
    """

    def __init__(self, source, experts_dtype: str):
        self.source, self.experts_dtype = source, check_experts_dtype(experts_dtype)
        self.path, self.config = source.path, source.config

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        return self.source.dense_state_dict()

    def compact_dense(self) -> dict:
        """The wrapped source's dense matrices kept as GGUF blocks (dense_state_dict leaves them out)."""
        return self.source.compact_dense() if hasattr(self.source, "compact_dense") else {}

    def embedding_rows(self):
        return self.source.embedding_rows() if hasattr(self.source, "embedding_rows") else None

    def expert_keys(self) -> list[tuple[int, int]]:
        return self.source.expert_keys()

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return self.source.expert_nbytes(layer, expert)

    def read_expert(self, layer: int, expert: int, out=None):
        weights = self.source.read_expert(layer, expert)
        for part, layers in expert_formats(self.source).items():  # GGUF blocks: floats first
            weights[part] = dequantize(layers[layer][0], weights[part])
        weights = convert_expert(weights, self.experts_dtype)
        if out is None:
            return weights
        for name, t in weights.items():
            out[name].copy_(t)
        return out


# ------------------------------------------------------------------------------------ stored form
SCALES = ("gate_scales", "up_scales", "down_scales")  # tensors a quantized expert adds in a store


def _repack(weights: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    out = dict(weights)
    for name, t in weights.items():
        if f"{name}_scales" in weights and t.dtype == torch.uint8 and src != dst:
            out[name] = pack_int4(unpack_int4(t, src), dst)
    return out


def expert_tensors(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """An expert in memory -> (the tensors a store writes, its encoding: "plain", "int8" or "int4")."""
    if not is_quantized(weights):
        return dict(weights), "plain"
    encoding = "int8" if weights["gate"].dtype == torch.int8 else "int4"
    return _repack(weights, native_int4_layout(), "rows"), encoding


def expert_from_tensors(tensors: dict[str, torch.Tensor], encoding: str) -> dict[str, torch.Tensor]:
    """Inverse of expert_tensors: stored int4 codes ("rows") -> this machine's native layout."""
    return _repack(tensors, "rows", native_int4_layout()) if encoding == "int4" else tensors
