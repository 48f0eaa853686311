"""StoreSource: the ModelSource of a store written by `moepager convert` (format in format.py).

Owns reading a store: the manifest checked on open (magic, version, file sizes), dense tensors from
dense.safetensors (and, in an edited store, the later dense files over it), and each routed expert with one
O_DIRECT read, checksum-verified by default. A source reads one generation, fixed when it is opened: an edit
committed meanwhile adds files and never changes the ones it reads.
It does not write stores (convert.py) or cache experts (the expert cache does).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import torch

from ..errors import CorruptFile, MoepagerError
from ..model.config import config_from_hf
from ..model.moe import ExpertWeights
from ..system.direct_reader import (
    CHUNK,
    DirectReader,
    Scratch,
    align_up,
    bounded_groups,
    copy_piece,
    flat_bytes,
    offer_or_copy,
    takes_bytes,
)
from ..system.safetensors import read_bytes, read_header, read_tensor
from .encoding import expert_from_tensors
from .format import DENSE_FILE, EXPERTS_FILE, RECONVERT, check_files, read_manifest

# encodings whose stored tensors are the in-memory ones (encoding.expert_from_tensors leaves them as they
# are): their bytes can go straight into a cache's slots
AS_STORED = ("plain", "int8")


class StoreSource:
    """A converted store. `verify_checksums` checks each expert's crc32 as it is read (~6 GB/s of one core)."""

    def __init__(self, path: str | Path, reader: DirectReader | None = None, verify_checksums: bool = True,
                 generation: int | None = None):  # fmt: skip
        self.path = Path(path)
        self.manifest = read_manifest(self.path, generation)
        check_files(self.path, self.manifest)
        self.raw_config = self.manifest.config
        self.config = config_from_hf(self.raw_config)
        self.config.absent_experts = dict(self.manifest.absent)
        self.verify_checksums = verify_checksums
        self.experts_file = self.path / EXPERTS_FILE
        largest = max((align_up(x.nbytes) for x in self.manifest.experts.values()), default=0)
        self.reader = reader or DirectReader(buffer_bytes=min(largest, CHUNK))
        self._scratch = Scratch()  # per reading thread: experts assembled before they are decoded
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
        sd = {}
        for name in self.manifest.dense_files:  # a later file's tensors replace an earlier one's
            sd.update(self.dense_file(name))
        if "embed.weight" not in sd:
            raise CorruptFile(f"{self.path / DENSE_FILE}: no embed.weight; {RECONVERT}")
        if self.config.tie_embeddings or "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["embed.weight"]
        return sd

    def dense_file(self, name: str = DENSE_FILE) -> dict[str, torch.Tensor]:
        """The tensors of one dense file of the store, its checksum verified if asked."""
        path = self.path / name
        infos = sorted(read_header(path).values(), key=lambda i: i.offset)
        sd = {info.name: read_tensor(info) for info in infos}
        if self.verify_checksums:
            self._check_dense(path, infos, sd)
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
        if crc != self.manifest.files[path.name]["crc32"]:
            raise CorruptFile(f"{path}: checksum mismatch; the store is damaged: {RECONVERT}")

    def expert_keys(self) -> list[tuple[int, int]]:
        return list(self._keys)

    def expert_nbytes(self, layer: int, expert: int) -> int:
        return align_up(self.manifest.experts[(layer, expert)].nbytes)

    def encoding(self, layer: int, expert: int) -> str:
        """How the expert is stored: "plain" (canonical tensors) or a quantized encoding (encoding.py)."""
        return self.manifest.layouts[self.manifest.experts[(layer, expert)].layout].encoding

    def read_raw(self, layer: int, expert: int) -> memoryview:
        """The expert's bytes as stored (checksum-verified if asked), valid until this thread's next read."""
        entry = self.manifest.experts[(layer, expert)]
        view = self.reader.read(self.path / entry.file, entry.offset, align_up(entry.nbytes))[: entry.nbytes]
        if self.verify_checksums:
            self.check(layer, expert, view)
        return view

    def check(self, layer: int, expert: int, view: memoryview) -> None:
        if zlib.crc32(view) != self.manifest.experts[(layer, expert)].crc32:
            raise self._mismatch(layer, expert)

    def _mismatch(self, layer: int, expert: int) -> CorruptFile:
        entry = self.manifest.experts[(layer, expert)]
        return CorruptFile(
            f"{self.path / entry.file}: checksum mismatch for expert {expert} of layer {layer} (bytes "
            f"{entry.offset}..{entry.offset + entry.nbytes}); the store is damaged: {RECONVERT}"
        )

    def read_expert(self, layer: int, expert: int, out: ExpertWeights | None = None) -> ExpertWeights:
        if (layer, expert) not in self.manifest.experts:
            raise MoepagerError(f"{self.path}: no expert {expert} in layer {layer}")
        if out is not None:
            self.read_experts([(layer, expert)], [out])
            return out
        layout = self.manifest.layouts[self.manifest.experts[(layer, expert)].layout]
        flat = torch.frombuffer(self.read_raw(layer, expert), dtype=torch.uint8)
        # the staging buffer is reused by this thread's next read: clone what is returned
        stored = {t.name: flat[t.offset : t.offset + t.nbytes].view(t.dtype).view(t.shape).clone()
                  for t in layout.tensors}  # fmt: skip
        return expert_from_tensors(stored, layout.encoding)

    def read_experts(self, keys: list[tuple[int, int]], outs: list[ExpertWeights], land=None) -> None:
        """Fill each out with its expert, reading all of them together (see BatchedSource.read_experts).
        Experts lie back to back in experts.bin, so a layer's misses merge into a few large reads; each
        expert's crc32 is folded over its pieces as they pass."""
        as_stored, decoded = [], []
        for j, (key, out) in enumerate(zip(keys, outs)):
            if key not in self.manifest.experts:
                raise MoepagerError(f"{self.path}: no expert {key[1]} in layer {key[0]}")
            entry = self.manifest.experts[key]
            layout = self.manifest.layouts[entry.layout]
            ok = layout.encoding in AS_STORED and all(takes_bytes(out.get(t.name), t.dtype, t.shape)
                                                      for t in layout.tensors)  # fmt: skip
            if ok:
                dests = [
                    (t.offset, t.offset + t.nbytes, flat_bytes(out[t.name]), t.name) for t in layout.tensors
                ]
                as_stored.append((j, key, dests))
            else:
                decoded.append((key, out))
        if as_stored:
            self._read_as_stored(as_stored, land)
        sizes = [align_up(self.manifest.experts[k].nbytes) for k, _ in decoded]
        for group in bounded_groups(decoded, sizes, self.reader.chunk_bytes):  # bounds the scratch buffer
            self._read_decoded(group)

    def _pieces(self, keys: list[tuple[int, int]]):
        """(index into keys, position in the expert, view) over the experts' bytes, checksums folded as they
        pass: an expert whose last piece does not match raises before its bytes are used."""
        entries = [self.manifest.experts[k] for k in keys]
        crcs = [0] * len(keys)
        for i, pos, view in self.reader.read_pieces(
            [(self.path / x.file, x.offset, x.nbytes) for x in entries]
        ):
            if self.verify_checksums:
                crcs[i] = zlib.crc32(view, crcs[i])
                if pos + len(view) == entries[i].nbytes and crcs[i] != entries[i].crc32:
                    raise self._mismatch(*keys[i])  # `out` holds damaged bytes: the caller must drop it
            yield i, pos, view

    def _read_as_stored(self, items: list[tuple[int, tuple[int, int], list]], land=None) -> None:
        """Experts whose stored tensors are their in-memory ones: each piece lands in its destinations (a tensor
        whole in one piece is offered to `land` first)."""
        for i, pos, view in self._pieces([k for _, k, _ in items]):
            j, end = items[i][0], pos + len(view)
            for a, b, dst, name in items[i][2]:
                lo, hi = max(a, pos), min(b, end)
                if lo < hi:
                    offer_or_copy(land, j, name, dst, lo - a, view[lo - pos : hi - pos], b - a)

    def _read_decoded(self, items: list[tuple[tuple[int, int], ExpertWeights]]) -> None:
        """Experts to transform (int4 codes to this machine's layout) or asked for in another dtype or
        layout: read together into this thread's scratch buffer, checked, decoded, then copied."""
        keys = [k for k, _ in items]
        places, at = [], 0
        for k in keys:
            places.append(at)
            at += align_up(self.manifest.experts[k].nbytes)  # keeps every tensor's 64-byte alignment
        scratch = self._scratch.get(at)
        for i, pos, view in self._pieces(keys):
            copy_piece(scratch, places[i] + pos, view)
        for (key, out), place in zip(items, places):
            layout = self.manifest.layouts[self.manifest.experts[key].layout]
            stored = {}
            for t in layout.tensors:
                at = place + t.offset
                stored[t.name] = scratch[at : at + t.nbytes].view(t.dtype).view(t.shape)
            for name, w in expert_from_tensors(stored, layout.encoding).items():
                out[name].copy_(w)
