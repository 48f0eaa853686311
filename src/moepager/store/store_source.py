"""StoreSource: the ModelSource of a store written by `moepager convert` (format in format.py).

Owns reading a store: the manifest checked on open (magic, version, file sizes), dense tensors from
dense.safetensors, and each routed expert with one O_DIRECT read, checksum-verified by default.
It does not write stores (convert.py) or cache experts (the expert cache does).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from ..config import config_from_hf
from ..errors import CorruptFile, MoepagerError
from ..moe import ExpertWeights
from .encoding import expert_from_tensors
from .format import DENSE_FILE, EXPERTS_FILE, RECONVERT, check_files, read_manifest
from .reader import CHUNK, DirectReader, align_up, takes_bytes
from .safetensors import read_bytes, read_header, read_tensor


class StoreSource:
    """A converted store. `verify_checksums` checks each expert's crc32 as it is read (~6 GB/s of one core)."""

    def __init__(self, path: str | Path, reader: DirectReader | None = None, verify_checksums: bool = True):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        check_files(self.path, self.manifest)
        self.raw_config = self.manifest.config
        self.config = config_from_hf(self.raw_config)
        self.verify_checksums = verify_checksums
        self.experts_file = self.path / EXPERTS_FILE
        largest = max((align_up(x.nbytes) for x in self.manifest.experts.values()), default=0)
        self.reader = reader or DirectReader(buffer_bytes=min(largest, CHUNK))
        self._keys = sorted(self.manifest.experts)
        self._check_complete()

    def _check_complete(self) -> None:
        c = self.config
        for layer in range(c.num_layers):
            if c.moe_layers[layer]:
                for e in range(c.num_experts):
                    if (layer, e) not in self.manifest.experts:
                        raise CorruptFile(
                            f"{self.path}: expert {e} of layer {layer} is not in the manifest; {RECONVERT}"
                        )

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        path = self.path / DENSE_FILE
        infos = sorted(read_header(path).values(), key=lambda i: i.offset)
        sd = {info.name: read_tensor(info) for info in infos}
        if self.verify_checksums:
            self._check_dense(path, infos, sd)
        if "embed.weight" not in sd:
            raise CorruptFile(f"{self.path / DENSE_FILE}: no embed.weight; {RECONVERT}")
        if self.config.tie_embeddings or "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["embed.weight"]
        return sd

    def _check_dense(self, path: Path, infos: list, sd: dict[str, torch.Tensor]) -> None:
        """crc32 of the whole file, from its header bytes and the tensors just read (they tile the data)."""
        first = infos[0].offset if infos else path.stat().st_size
        crc = zlib.crc32(read_bytes(path, 0, first))
        for info in infos:
            if info.offset != first:
                raise CorruptFile(f"{path}: tensor data is not contiguous at {info.name!r}; {RECONVERT}")
            crc = zlib.crc32(sd[info.name].contiguous().view(-1).view(torch.uint8).numpy(), crc)
            first += info.nbytes
        if crc != self.manifest.files[DENSE_FILE]["crc32"]:
            raise CorruptFile(f"{path}: checksum mismatch; the store is damaged: {RECONVERT}")

    def expert_keys(self) -> list[tuple[int, int]]:
        return list(self._keys)

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return align_up(self.manifest.experts[(layer, expert)].nbytes)

    def encoding(self, layer: int, expert: int) -> str:
        """How the expert is stored: "plain" (canonical tensors) or a quantized encoding (quant.py)."""
        return self.manifest.layouts[self.manifest.experts[(layer, expert)].layout].encoding

    def read_raw(self, layer: int, expert: int) -> memoryview:
        """The expert's bytes as stored (checksum-verified if asked), valid until this thread's next read."""
        entry = self.manifest.experts[(layer, expert)]
        view = self.reader.read(self.experts_file, entry.offset, align_up(entry.nbytes))[: entry.nbytes]
        if self.verify_checksums:
            self.check(layer, expert, view)
        return view

    def check(self, layer: int, expert: int, view: memoryview) -> None:
        if zlib.crc32(view) != self.manifest.experts[(layer, expert)].crc32:
            raise self._mismatch(layer, expert)

    def _mismatch(self, layer: int, expert: int) -> CorruptFile:
        entry = self.manifest.experts[(layer, expert)]
        return CorruptFile(
            f"{self.experts_file}: checksum mismatch for expert {expert} of layer {layer} (bytes "
            f"{entry.offset}..{entry.offset + entry.nbytes}); the store is damaged: {RECONVERT}"
        )

    def _stream_into(self, layer: int, expert: int, out: ExpertWeights) -> ExpertWeights:
        """Copy the expert into `out` chunk by chunk, so a reading thread stages CHUNK bytes, not a whole expert."""
        entry = self.manifest.experts[(layer, expert)]
        layout = self.manifest.layouts[entry.layout]
        dests = [
            (t.offset, t.offset + t.nbytes, out[t.name].view(-1).view(torch.uint8)) for t in layout.tensors
        ]
        crc = 0
        for pos, view in self.reader.read_chunks(self.experts_file, entry.offset, entry.nbytes):
            if self.verify_checksums:
                crc = zlib.crc32(view, crc)
            chunk, end = torch.frombuffer(view, dtype=torch.uint8), pos + len(view)
            for a, b, dst in dests:
                lo, hi = max(a, pos), min(b, end)
                if lo < hi:
                    dst[lo - a : hi - a].copy_(chunk[lo - pos : hi - pos])
        if self.verify_checksums and crc != entry.crc32:
            raise self._mismatch(layer, expert)  # `out` holds damaged bytes: the caller must drop it
        return out

    def read_expert(self, layer: int, expert: int, out: ExpertWeights | None = None) -> ExpertWeights:
        if (layer, expert) not in self.manifest.experts:
            raise MoepagerError(f"{self.path}: no expert {expert} in layer {layer}")
        entry = self.manifest.experts[(layer, expert)]
        layout = self.manifest.layouts[entry.layout]
        if (
            out is not None
            and layout.encoding == "plain"
            and all(takes_bytes(out.get(t.name), t.dtype, t.shape) for t in layout.tensors)
        ):
            return self._stream_into(layer, expert, out)
        flat = torch.frombuffer(self.read_raw(layer, expert), dtype=torch.uint8)
        if layout.encoding != "plain":  # quantized: codes and scales become QuantizedWeights (quant.py)
            stored = {t.name: flat[t.offset : t.offset + t.nbytes].view(t.dtype).view(t.shape).clone()
                      for t in layout.tensors}  # fmt: skip
            weights = expert_from_tensors(stored, layout.encoding)
            if out is None:
                return weights
            for name, w in weights.items():
                out[name].copy_(w)
            return out
        weights = {}
        for t in layout.tensors:  # encoding "plain": the stored tensors are the canonical ones
            src = flat[t.offset : t.offset + t.nbytes].view(t.dtype).view(t.shape)
            if out is None:
                weights[t.name] = src.clone()  # the staging buffer is reused by this thread's next read
            else:
                out[t.name].copy_(src)
        return weights if out is None else out
