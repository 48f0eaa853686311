"""What a GGUF file holds, read without the model: every metadata field and every tensor's place
(`read_header`), and a tensor's bytes as floats (`dequantize`, gguf-py's reference dequantizers). The source that
runs a file (sources/gguf.py) builds on these; the tokenizer and tests read headers through them too."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..errors import CorruptFile

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


# GGUF metadata value types (gguf-py's GGUFValueType): struct format of each fixed-size one
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAGIC = b"GGUF"
_FIRST_READ = 4 << 20  # bytes of the file read for its header at first; more while it runs longer


class _Short(Exception):
    """The header runs past the bytes read so far: args[0] bytes are needed."""


class _Cursor:
    """Reads GGUF's little-endian values from the first bytes of a file of `size` bytes, front to back."""

    def __init__(self, buf: bytes, path: Path, size: int):
        self.buf, self.pos, self.path, self.size = buf, 0, path, size

    def need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            if self.pos + n > self.size:  # a damaged length: never read on past the file for it
                raise CorruptFile(f"{self.path}: not a readable GGUF file (its header runs past its end)")
            raise _Short(self.pos + n)

    def take(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        self.need(size)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("Q")
        self.need(n)
        value = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return value

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype != _ARRAY:
            raise CorruptFile(f"{self.path}: not a readable GGUF file (metadata value type {vtype})")
        item, count = self.take("I"), self.take("Q")
        if item in _SCALARS:  # numbers in one read: a vocabulary's scores are 10^5 of them
            size = struct.calcsize("<" + _SCALARS[item]) * count
            self.need(size)
            values = list(struct.unpack_from(f"<{count}{_SCALARS[item]}", self.buf, self.pos))
            self.pos += size
            return values
        return [self.value(item) for _ in range(count)]


def read_header(path: Path) -> tuple[dict, dict[str, TensorInfo]]:
    """Every metadata field's value (as gguf-py's ReaderField.contents gives it) and every tensor's place in a
    GGUF file (version 2 or 3, little-endian).

    Parsed here rather than by gguf-py's GGUFReader, which makes numpy objects of each string of the vocabulary:
    2.5 s and ~170 MiB for a 49k-token vocabulary, most of a small model's start, against ~0.1 s here. Only the
    header is read: its first 4 MiB, then more while it runs longer."""
    size = path.stat().st_size
    want = min(size, _FIRST_READ)
    with open(path, "rb") as f:
        while True:
            f.seek(0)
            try:
                return _parse(_Cursor(f.read(want), path, size))
            except _Short as short:
                want = min(size, max(4 * want, short.args[0]))


def _parse(c: _Cursor) -> tuple[dict, dict[str, TensorInfo]]:
    import gguf

    path = c.path
    if c.buf[:4] != _MAGIC:
        raise CorruptFile(f"{path}: not a readable GGUF file (it does not start with {_MAGIC!r})")
    c.pos = 4
    version = c.take("I")
    if version not in (2, 3):
        detail = "big-endian, which moepager does not read" if version > 0xFFFF else f"version {version}"
        raise CorruptFile(f"{path}: not a readable GGUF file ({detail}); convert it again with llama.cpp")
    n_tensors, n_fields = c.take("Q"), c.take("Q")
    # the header's own counts first, under the names gguf-py's reader gives them
    fields = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_fields}
    for _ in range(n_fields):
        key = c.string()
        fields[key] = c.value(c.take("I"))
    places = []
    for _ in range(n_tensors):
        name = c.string()
        shape = tuple(c.take("Q") for _ in range(c.take("I")))
        places.append((name, shape, c.take("I"), c.take("Q")))
    alignment = int(fields.get("general.alignment", 32))
    data_start = -(-c.pos // alignment) * alignment
    tensors = {}
    for name, shape, qtype, offset in places:
        if qtype not in gguf.GGMLQuantizationType._value2member_map_:
            raise CorruptFile(f"{path}: tensor {name!r} has GGML type {qtype}, which gguf-py does not know")
        block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        n_bytes = math.prod(shape) // block * block_bytes
        if data_start + offset + n_bytes > c.size:
            raise CorruptFile(f"{path}: not a readable GGUF file (tensor {name!r} runs past its end)")
        tensors[name] = TensorInfo(name, shape, qtype, n_bytes, data_start + offset)
    return fields, tensors
