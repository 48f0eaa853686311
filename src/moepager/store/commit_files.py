"""The files a commit writes, and frees: an expert's bytes packed for its aligned slot, the small dense file
of changed tensors, the manifest written atomically, a generation's line in the history, and the disk ranges
of experts only dropped generations used (punched out). The edits and the order of a commit are editable.py's."""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path

import torch

from ..system.direct_reader import align_up, aligned_buffer
from ..system.durable import fsync_dir
from ..system.safetensors import DTYPES as ST_DTYPES
from .convert import layout_of
from .format import Layout, Manifest, write_manifest

_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def history_record(gid: int, parent: int | None, message: str, stamp: bool = True) -> dict:
    """A generation's line in the history (a converted store's generation 0 has no commit time)."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) if stamp else ""
    return {"id": gid, "parent": parent, "time": when, "message": message}


def layout_like(stored: dict[str, torch.Tensor], like: Layout) -> Layout:
    layout = layout_of(stored)
    return Layout(like.encoding, layout.tensors)


def pack_expert(layout: Layout, stored: dict[str, torch.Tensor] | None) -> tuple[memoryview, int]:
    """The expert's bytes (zeros when `stored` is None) padded to ALIGN, in an aligned buffer -> (view, size)."""
    nbytes = max(t.offset + t.nbytes for t in layout.tensors)
    buf = aligned_buffer(align_up(nbytes))
    flat = torch.frombuffer(buf, dtype=torch.uint8)
    flat.zero_()
    if stored is not None:
        for t in layout.tensors:
            flat[t.offset : t.offset + t.nbytes].copy_(stored[t.name].contiguous().view(-1).view(torch.uint8))
    return memoryview(buf), nbytes


def write_dense(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """A small safetensors file of the changed dense tensors, fsynced -> its files entry (size, crc32)."""
    names = sorted(tensors)
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    data = struct.pack("<Q", len(blob)) + blob
    data += b"".join(tensors[n].contiguous().view(-1).view(torch.uint8).numpy().tobytes() for n in names)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "crc32": zlib.crc32(data)}


def write_manifest_atomically(folder: Path, manifest: Manifest, path: Path) -> None:
    """Write to a temporary name beside `path`, fsync, rename, fsync the folder: all or nothing."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    write_manifest(folder, manifest, tmp)
    os.rename(tmp, path)
    fsync_dir(path.parent)


def dead_experts(dropped: list, kept: list) -> list[tuple[str, int, int]]:
    """(file, offset, bytes) of the experts only dropped generations use: replaced or removed since. Each
    starts at an ALIGN boundary and the next expert no earlier than its aligned end, so that range is its own."""
    live = {(x.file, x.offset) for m in kept for x in m.experts.values()}
    dead = {(x.file, x.offset, align_up(x.nbytes)) for m in dropped for x in m.experts.values()}
    return sorted(d for d in dead if d[:2] not in live)


def punch_experts(folder: Path, ranges: list[tuple[str, int, int]]) -> int:
    """Free the disk blocks of dead experts in files kept generations still read (the file keeps its size and
    the range reads as zeros) -> bytes freed. After the commit point: a crash here only leaves bytes unfreed."""
    from ..system.durable import punch_hole

    freed = 0
    for name, offset, nbytes in ranges:
        path = folder / name
        if not path.is_file():  # the whole file went with its generations
            continue
        fd = os.open(path, os.O_WRONLY)
        try:
            if punch_hole(fd, offset, nbytes):
                freed += nbytes
            os.fsync(fd)
        finally:
            os.close(fd)
    return freed
