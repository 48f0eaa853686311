"""Safetensors files read by byte range: headers parsed here, so every tensor is a (file, offset, length).

Reading by range (not mmap) is what lets expert bytes be fetched one expert at a time, and lets the reader
evict what it read from the page cache, so the model never quietly stays in memory.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CorruptFile, MoepagerError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one .safetensors header; a corrupt or truncated file raises CorruptFile naming it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CorruptFile(f"{path}: too short to be a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise CorruptFile(f"{path}: header length {n} is impossible for a {size}-byte file")
            header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFile(f"{path}: corrupt safetensors header ({e}); re-download or re-convert the file")
    except OSError as e:
        raise MoepagerError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(header, dict):
        raise CorruptFile(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            begin, end = meta["data_offsets"]
            shape = tuple(meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise CorruptFile(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if base + end > size:
            raise CorruptFile(
                f"{path}: truncated: tensor {name!r} ends at byte {base + end} but the file has {size} bytes"
            )
        out[name] = TensorInfo(name, path, base + begin, end - begin, dtype, shape)
    return out


def read_index(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint folder: one model.safetensors, or shards listed by an index.json."""
    index_files = sorted(folder.glob("*.safetensors.index.json"))
    if index_files:
        try:
            weight_map = json.loads(index_files[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CorruptFile(f"{index_files[0]}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise MoepagerError(f"{folder}: no *.safetensors files; is this a Hugging Face checkpoint folder?")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise MoepagerError(f"{path}: listed in the index but missing; the checkpoint is incomplete")
        tensors.update(read_header(path))
    return tensors


def read_bytes(path: Path, offset: int, nbytes: int) -> bytearray:
    """Read a byte range, then drop it from the page cache: the caller keeps the only copy."""
    buf = bytearray(nbytes)
    fd = os.open(path, os.O_RDONLY)
    try:
        view, done = memoryview(buf), 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CorruptFile(f"{path}: truncated while reading bytes {offset}..{offset + nbytes}")
            done += n
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return buf


def read_tensor(info: TensorInfo) -> torch.Tensor:
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    buf = read_bytes(info.file, info.offset, info.nbytes)
    return torch.frombuffer(buf, dtype=info.dtype).reshape(info.shape)
