"""The ModelSource contract: where a model's weights come from, with routed experts readable one at a time
(and, optionally, many at a time).

Implementations: Checkpoint (Hugging Face safetensors folder, read in place), the expert-aligned store
written by `moepager convert`, GGUF files. The engine, the expert cache and the benchmarks only see this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..generation.tokenizer import Tokenizer
from ..model.config import ModelConfig
from ..model.moe import ExpertWeights


class ModelSource(Protocol):
    path: Path  # folder or file the model came from (tokenizer files are looked for beside it)
    config: ModelConfig

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """Every resident tensor under moepager's names (see checkpoint.NAME_RULES)."""
        ...

    def expert_keys(self) -> list[tuple[int, int]]:
        """(layer, expert) of every routed expert, sorted."""
        ...

    def expert_nbytes(self, layer: int, expert: int) -> int:
        """Bytes one read of this expert costs on disk."""
        ...

    def read_expert(self, layer: int, expert: int, out: ExpertWeights | None = None) -> ExpertWeights:
        """The expert in canonical form (gate [I, D], up [I, D], down [D, I], optional *_bias) on the CPU.

        With `out` (tensors of the right shapes and dtype), fill it in place and return it, so a cache can
        reuse its buffers. Safe to call from several threads at once.
        """
        ...


class BatchedSource(ModelSource, Protocol):
    """Optional: a ModelSource whose experts can be fetched together (Checkpoint, StoreSource). The expert
    cache uses read_experts when a source has it and one read_expert call per expert otherwise."""

    def read_experts(self, keys: list[tuple[int, int]], outs: list[ExpertWeights], land=None) -> None:
        """Fill outs[i] in place with expert keys[i], as read_expert(*keys[i], out=outs[i]) would, in as few
        large reads as the layout allows (neighbouring experts share one request, staging stays bounded).

        land(i, name, view) -> bool, if given, is offered each tensor of outs[i] taken as stored that arrives
        whole in one staging view (uint8): True means the caller has put it into outs[i] itself (an expert
        cache repacking blocks straight from the staging, model/moe.py ExpertBank.land), so it is not copied.

        Destinations that are contiguous CPU tensors of the stored dtype and shape (e.g. slots of a bigger
        bank) take the stored bytes directly; others are decoded and copied. On an error (a checksum mismatch
        raises CorruptFile) any out may be partly written: the caller must not use them. Safe from several
        threads at once.
        """
        ...


def expert_formats(source) -> dict:
    """A source's block-quantized expert matrices (GgufSource.expert_formats); other sources' formats are
    told by their tensors."""
    return source.expert_formats() if hasattr(source, "expert_formats") else {}


def source_tokenizer(source) -> Tokenizer | None:
    """The tokenizer a source carries (a GGUF's metadata), else the tokenizer files in its folder."""
    inner = getattr(source, "source", source)  # a QuantizingSource wraps the source it reads
    if hasattr(inner, "tokenizer"):
        return inner.tokenizer()
    return Tokenizer.from_folder(source.path)
