"""What a GGUF file holds, read without the model: every metadata field and every tensor's place
(`read_header`), and a tensor's bytes as floats (`dequantize`, gguf-py's reference dequantizers). The source that
runs a file (sources/gguf.py) builds on these; the tokenizer and tests read headers through them too."""

from __future__ import annotations

import gc
import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import CorruptFile
from ..system.process_memory import release_freed_heap

_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def dequantize(raw: torch.Tensor | np.ndarray, qtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Bytes of a GGUF tensor (or whole rows of one) -> a new tensor of `shape` (numpy order, outer first)."""
    import gguf

    data = raw.numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw).reshape(-1).view(np.uint8)
    name = gguf.GGMLQuantizationType(qtype).name
    if name in _PLAIN:  # stored as is: keep the dtype
        return torch.from_numpy(data.copy()).view(_PLAIN[name]).reshape(shape)
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows = data.reshape(-1, shape[-1] // block * block_bytes)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(rows, qtype), np.float32)).reshape(
        shape
    )


class TensorInfo(NamedTuple):
    """Where one tensor of a GGUF lies and what it is (gguf-py's ReaderTensor, without the reader)."""

    name: str
    shape: tuple[int, ...]  # innermost first, as GGUF lists dims
    tensor_type: int
    n_bytes: int
    data_offset: int


def read_header(path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    """Every metadata field's value and every tensor's place in a GGUF file.

    gguf-py's reader parses each string of the vocabulary into numpy objects of its own (~170 MiB for a
    49k-token vocabulary). What is kept is a small share of that; created among the parser's objects it would
    pin their freed memory, so it is copied out through one pickle, made again after the reader is freed and
    its memory handed back to the system."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError or struct errors on a damaged file
        raise CorruptFile(f"{path}: not a readable GGUF file ({e})") from None
    fields = {name: f.contents() for name, f in reader.fields.items()}
    tensors = {t.name: TensorInfo(t.name, tuple(int(s) for s in t.shape), int(t.tensor_type), int(t.n_bytes),
                                  int(t.data_offset)) for t in reader.tensors}  # fmt: skip
    blob = pickle.dumps((fields, tensors), protocol=pickle.HIGHEST_PROTOCOL)
    del reader, fields, tensors
    gc.collect()
    release_freed_heap()
    return pickle.loads(blob)
