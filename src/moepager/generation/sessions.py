"""Session files: a conversation's KV cache and token ids on disk, so it can resume after a restart.

Owns the file format and the model identity that guards it. Does not own the cache (model/kvcache.py, model/layers.py)
or deciding which prefix to reuse (runtime/engine.py).

Layout (little-endian):
    magic b"MOEPSESS" | format_version u32 | header_len u32 | header (JSON, utf-8)
    payload: token ids int64[token_count], then for each layer, for each run of `block_positions`
             positions (the last one shorter): keys [B, Hk, n, Dk] then values [B, Hk, n, Dv], C order
    trailer: crc32 of header + payload, u32 | b"MOEPEND\\0"
A file whose magic, version, size, checksum, model identity or dtype does not match is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import CorruptFile, MoepagerError
from ..model.kvcache import BlockKVCache
from ..model.layers import KVCache

MAGIC = b"MOEPSESS"
END = b"MOEPEND\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sII")  # magic, format_version, header_len
_TRAILER = struct.Struct("<I8s")  # crc32, end magic
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


class StaleSession(MoepagerError):
    """The session was written by another model, other weights, another dtype or another format."""


def model_identity(model: torch.nn.Module) -> str:
    """A hash of the architecture config and every resident (dense) weight, as loaded. A GGUF embedding's blocks
    are left out: under a memory limit they stay in the file (BlockEmbedding.rows_from_file), and a session is
    the same model's either way."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(dataclasses.asdict(model.config), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        if name == "embed.blocks":
            continue
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _layer_runs(cache, layer: int, run: int):
    """(k, v) runs of at most `run` positions covering a layer of either cache type, oldest first."""
    if isinstance(cache, BlockKVCache):
        yield from cache.layer_blocks(layer)
        return
    n = cache.length[layer]
    for i in range(0, n, run):
        yield cache.k[layer][:, :, i : min(n, i + run)], cache.v[layer][:, :, i : min(n, i + run)]


def save(path: str | os.PathLike, cache: KVCache | BlockKVCache, token_ids: list[int], identity: str) -> None:
    """Write atomically: a temp file beside `path`, fsync, rename, fsync the folder."""
    path = Path(path)
    n = cache.seq_len
    if len(token_ids) != n:
        raise ValueError(f"the cache holds {n} positions but {len(token_ids)} token ids were given")
    if n == 0:
        raise MoepagerError("nothing to save: the cache is empty")
    layers = len(cache.length)
    if any(cache.length[i] != n for i in range(layers)):
        raise ValueError("the cache is mid-step (its layers hold different lengths); save between tokens")
    run = cache.block_size if isinstance(cache, BlockKVCache) else 256
    shapes, dtype = [], None
    for layer in range(layers):
        if isinstance(cache, BlockKVCache):
            ks, vs, dtype = cache.layer_shapes(layer)
        else:
            ks, vs, dtype = cache.k[layer].shape, cache.v[layer].shape, cache.k[layer].dtype
        shapes.append([[ks[0], ks[1], ks[3]], [vs[0], vs[1], vs[3]]])
    payload = 8 * n + sum(n * (_prod(ks) + _prod(vs)) * dtype.itemsize for ks, vs in shapes)
    header = json.dumps({"format_version": FORMAT_VERSION, "model_identity": identity, "dtype": str(dtype),
                         "token_count": n, "num_layers": layers, "block_positions": run,
                         "layer_shapes": shapes, "payload_bytes": payload}).encode()  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)))
            crc = _write(f, header, 0)
            crc = _write(f, torch.tensor(token_ids, dtype=torch.int64).numpy().tobytes(), crc)
            for layer in range(layers):
                for k, v in _layer_runs(cache, layer, run):
                    crc = _write(f, _bytes(k), crc)
                    crc = _write(f, _bytes(v), crc)
            f.write(_TRAILER.pack(crc, END))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def load(path: str | os.PathLike, identity: str, dtype: torch.dtype,
         new_cache: Callable[[], BlockKVCache]) -> tuple[BlockKVCache, list[int]]:  # fmt: skip
    """Read a session into a fresh cache from new_cache(); every check passes before anything is returned."""
    path = Path(path)
    if not path.is_file():
        raise MoepagerError(f"no session file at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(_PREFIX.size)
        if len(head) < _PREFIX.size or head[:8] != MAGIC:
            raise CorruptFile(f"{path} is not a moepager session file (bad magic); delete it to start fresh")
        _, version, hlen = _PREFIX.unpack(head)
        if version != FORMAT_VERSION:
            raise StaleSession(f"{path} has session format_version {version}; this moepager reads version "
                               f"{FORMAT_VERSION}. Delete the file to start a fresh session")  # fmt: skip
        raw = f.read(hlen)
        if len(raw) < hlen:
            raise CorruptFile(f"{path} is truncated ({size} bytes, its header alone needs "
                              f"{_PREFIX.size + hlen}); delete it to start fresh")  # fmt: skip
        try:
            header = json.loads(raw)
            count, layers, run = header["token_count"], header["num_layers"], header["block_positions"]
            shapes, payload = header["layer_shapes"], header["payload_bytes"]
        except (ValueError, KeyError, TypeError):
            raise CorruptFile(
                f"{path}: the session header is corrupt; delete the file to start fresh"
            ) from None
        expected = _PREFIX.size + hlen + payload + _TRAILER.size
        if size != expected:
            what = "truncated" if size < expected else "longer than its header says"
            raise CorruptFile(
                f"{path} is {what} ({size} bytes, expected {expected}); delete it to start fresh"
            )
        if header.get("model_identity") != identity:
            raise StaleSession(f"{path} was saved with a different model or different weights (identity "
                               f"{str(header.get('model_identity'))[:12]}..., this model {identity[:12]}...); "
                               "delete it to start a fresh session")  # fmt: skip
        if header.get("dtype") != str(dtype) or header["dtype"] not in _DTYPES:
            raise StaleSession(f"{path} holds a {header.get('dtype')} cache but the model runs in {dtype}; "
                               "load the model with the same dtype or delete the session")  # fmt: skip
        crc = zlib.crc32(raw)
        ids_raw = f.read(8 * count)
        crc = zlib.crc32(ids_raw, crc)
        token_ids = torch.frombuffer(bytearray(ids_raw), dtype=torch.int64).tolist()
        cache = new_cache()
        if len(cache.length) != layers:
            raise StaleSession(f"{path} has {layers} layers but the model has {len(cache.length)}")
        for layer in range(layers):
            (b, hk, dk), (_, _, dv) = shapes[layer]
            for i in range(0, count, run):
                t = min(run, count - i)
                k, crc = _read(f, (b, hk, dk), t, dtype, crc)
                v, crc = _read(f, (b, hk, dv), t, dtype, crc)
                cache.append(layer, k, v)
            cache.enforce_budget()  # spill as we go, so a session larger than the budget still loads
        stored, end = _TRAILER.unpack(f.read(_TRAILER.size))
        if end != END or stored != crc:
            cache.close()
            raise CorruptFile(f"{path} is corrupt (checksum mismatch); delete it to start a fresh session")
    return cache, token_ids


def _write(f, data: bytes | memoryview, crc: int) -> int:
    f.write(data)
    return zlib.crc32(data, crc)


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def _read(f, shape: tuple[int, int, int], t: int, dtype: torch.dtype, crc: int) -> tuple[torch.Tensor, int]:
    b, hk, d = shape
    buf = bytearray(b * hk * t * d * dtype.itemsize)
    got = f.readinto(buf)
    if got != len(buf):
        raise CorruptFile(f"{f.name} ended early; delete it to start a fresh session")
    return torch.frombuffer(buf, dtype=dtype).view(b, hk, t, d), zlib.crc32(buf, crc)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out
