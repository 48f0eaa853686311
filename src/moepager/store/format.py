"""The expert-aligned store's on-disk format: file names, the manifest schema, and its validation.

A store is a folder:
  manifest.json      magic + format_version, the model's config.json, and where every expert lives
  experts.bin        every routed expert, each starting at a 4 KiB-aligned offset: one read per expert
  dense.safetensors  every resident tensor under moepager's names (Checkpoint.dense_state_dict() keys)
  tokenizer files    copied unchanged from the source checkpoint

An expert is its tensors back to back (each at a 64-byte-aligned offset inside the expert), as described by
its layout: a list of (name, dtype, shape, offset, nbytes) with an `encoding`. Experts with the same layout
share one entry of `layouts`. Encoding "plain" means the tensors are the canonical gate [I, D], up [I, D],
down [D, I] (+ *_bias) of the experts contract; a quantized encoding adds its own tensors (scales, ...) and
its own decoder, and is the extension point for `--experts-dtype`.

A store edited in place (editable.py) is format_version 2 and keeps generations: each commit appends its new
bytes in files of its own (experts.N.bin, dense.N.safetensors, never rewritten), writes its whole manifest to
generations/N.json, then replaces manifest.json (the current generation, plus the list of generations) by an
atomic rename. Version 2 adds per expert the file it lies in, the dense files in order (a later one's tensors
replace an earlier one's), and absent experts (removed, disabled or padding: never routed). A converted store
stays version 1, read as its generation 0.

This module reads and checks manifests; it does not read tensor bytes (reading.py does).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CorruptFile, MoepagerError
from ..system.direct_reader import ALIGN

MAGIC = "moepager-store"
FORMAT_VERSION = 2  # the newest this moepager reads; convert writes 1, an edit 2
EDITED_VERSION = 2
MANIFEST = "manifest.json"
GENERATIONS = "generations"  # folder of every kept generation's manifest, N.json
EXPERTS_FILE = "experts.bin"
DENSE_FILE = "dense.safetensors"
TENSOR_ALIGN = 64  # offset of each tensor inside an expert: keeps every dtype's views aligned
ENCODINGS = ("plain", "int8", "int4")  # expert encodings this version can decode (int*: see encoding.py)
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
)}  # fmt: skip
RECONVERT = "re-convert it with `moepager convert MODEL OUT --force`"


@dataclass(frozen=True)
class TensorEntry:
    name: str  # gate/up/down/gate_bias/... for encoding "plain"
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the expert
    nbytes: int


@dataclass(frozen=True)
class Layout:
    encoding: str
    tensors: tuple[TensorEntry, ...]


@dataclass(frozen=True)
class ExpertEntry:
    offset: int  # absolute, multiple of ALIGN
    nbytes: int  # bytes of tensors, without the padding to the next expert
    layout: str  # key of Manifest.layouts
    crc32: int  # zlib.crc32 of the nbytes bytes
    file: str = EXPERTS_FILE  # the file of the store it lies in (version 2: each commit adds its own)


@dataclass
class Manifest:
    config: dict  # the source checkpoint's config.json, unchanged
    dtype: str  # dtype of the source weights, e.g. "bfloat16"
    layouts: dict[str, Layout]
    experts: dict[tuple[int, int], ExpertEntry]
    files: dict[str, dict]  # name -> {"size": bytes, "crc32": int | None}: truncation shows without reading
    source: str = ""  # where it was converted from (informational)
    format_version: int = 1
    # version 2 (edited stores)
    generation: int = 0  # this manifest's generation id
    dense_files: tuple[str, ...] = (DENSE_FILE,)  # in order: a later file's tensors replace earlier ones
    absent: dict[int, tuple[int, ...]] = field(default_factory=dict)  # layer -> experts never routed
    history: list[dict] = field(default_factory=list)  # manifest.json only: {id, parent, time, message}

    def to_json(self) -> dict:
        out = self._v1_json()
        if self.format_version >= 2:
            out.update(generation=self.generation, dense_files=list(self.dense_files),
                       absent_experts={str(k): list(v) for k, v in sorted(self.absent.items()) if v},
                       generations=self.history)  # fmt: skip
            for x, (key, entry) in zip(out["experts"], sorted(self.experts.items())):
                x["file"] = entry.file
        return out

    def _v1_json(self) -> dict:
        return {
            "magic": MAGIC,
            "format_version": self.format_version,
            "source": self.source,
            "dtype": self.dtype,
            "alignment": ALIGN,
            "config": self.config,
            "files": self.files,
            "layouts": {k: {"encoding": v.encoding, "tensors": [
                {"name": t.name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                 "offset": t.offset, "nbytes": t.nbytes} for t in v.tensors]} for k, v in self.layouts.items()},
            "experts": [{"layer": layer, "expert": e, "offset": x.offset, "nbytes": x.nbytes, "layout": x.layout,
                         "crc32": x.crc32} for (layer, e), x in sorted(self.experts.items())],
        }  # fmt: skip


def is_store(folder: Path) -> bool:
    """True when the folder holds a moepager manifest (whatever its version: reading it reports that)."""
    path = folder / MANIFEST
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return MAGIC.encode() in head


def read_manifest(folder: Path, generation: int | None = None) -> Manifest:
    """The current manifest, or with `generation` the one kept for that generation."""
    path = folder / MANIFEST if generation is None else generation_path(folder, generation)
    if generation is not None and not path.is_file():
        raise MoepagerError(
            f"{folder}: no generation {generation} (see `moepager experts {folder} generations`)"
        )
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise MoepagerError(f"{path}: missing; {folder} is not a moepager store") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFile(f"{path}: corrupt manifest ({e}); {RECONVERT}") from None
    if not isinstance(raw, dict) or raw.get("magic") != MAGIC:
        raise CorruptFile(f"{path}: not a moepager store manifest (magic {raw.get('magic')!r}); {RECONVERT}")
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise MoepagerError(
            f"{path}: format_version {version!r} was written by a newer moepager (this one reads up to "
            f"{FORMAT_VERSION}); upgrade moepager or re-convert with `moepager convert MODEL OUT --force`"
        )
    if version < 1:
        raise CorruptFile(f"{path}: impossible format_version {version}; {RECONVERT}")
    try:
        return _parse(raw, path)
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFile(f"{path}: corrupt manifest (bad or missing field: {e}); {RECONVERT}") from None


def _parse(raw: dict, path: Path) -> Manifest:
    if raw["alignment"] != ALIGN:
        raise CorruptFile(f"{path}: alignment {raw['alignment']} is not {ALIGN}; {RECONVERT}")
    layouts = {}
    for key, lay in raw["layouts"].items():
        if lay["encoding"] not in ENCODINGS:
            raise MoepagerError(
                f"{path}: expert encoding {lay['encoding']!r} is not known to this moepager (it reads "
                f"{', '.join(ENCODINGS)}); upgrade moepager or re-convert without it"
            )
        tensors = []
        for t in lay["tensors"]:
            if t["dtype"] not in DTYPES:
                raise CorruptFile(f"{path}: layout {key}: unknown dtype {t['dtype']!r}; {RECONVERT}")
            dtype, shape = DTYPES[t["dtype"]], tuple(int(s) for s in t["shape"])
            numel = 1
            for s in shape:
                numel *= s
            if numel * dtype.itemsize != t["nbytes"]:
                raise CorruptFile(f"{path}: layout {key}: tensor {t['name']!r} size does not match its shape")
            tensors.append(TensorEntry(str(t["name"]), dtype, shape, int(t["offset"]), int(t["nbytes"])))
        layouts[str(key)] = Layout(lay["encoding"], tuple(tensors))
    experts = {}
    for x in raw["experts"]:
        entry = ExpertEntry(int(x["offset"]), int(x["nbytes"]), str(x["layout"]), int(x["crc32"]),
                            str(x.get("file", EXPERTS_FILE)))  # fmt: skip
        if entry.file not in raw["files"]:
            raise CorruptFile(f"{path}: expert {x['expert']} of layer {x['layer']} lies in {entry.file!r}, "
                              f"which the manifest does not list; {RECONVERT}")  # fmt: skip
        layout = layouts[entry.layout]
        if (
            entry.offset % ALIGN
            or max((t.offset + t.nbytes for t in layout.tensors), default=0) > entry.nbytes
        ):
            raise CorruptFile(
                f"{path}: expert {x['expert']} of layer {x['layer']}: bad offset or size; {RECONVERT}"
            )
        experts[(int(x["layer"]), int(x["expert"]))] = entry
    files = {str(k): dict(v) for k, v in raw["files"].items()}
    m = Manifest(raw["config"], str(raw["dtype"]), layouts, experts, files, str(raw.get("source", "")),
                 raw["format_version"])  # fmt: skip
    if m.format_version >= 2:
        m.generation = int(raw["generation"])
        m.dense_files = tuple(str(f) for f in raw["dense_files"])
        m.absent = {int(k): tuple(int(e) for e in v) for k, v in raw["absent_experts"].items()}
        m.history = [dict(h) for h in raw.get("generations") or []]
        missing = [f for f in m.dense_files if f not in files]
        if missing:
            raise CorruptFile(f"{path}: dense file {missing[0]!r} is not listed in files; {RECONVERT}")
    return m


def generation_path(folder: Path, generation: int) -> Path:
    return folder / GENERATIONS / f"{generation}.json"


def check_files(folder: Path, manifest: Manifest) -> None:
    """Every data file is present with the size the manifest records: a cheap truncation check on open."""
    for name, meta in manifest.files.items():
        path = folder / name
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise MoepagerError(f"{path}: missing from the store; {RECONVERT}") from None
        if size != meta["size"]:
            raise CorruptFile(f"{path}: truncated or altered: {size} bytes, the manifest says {meta['size']}; "
                              f"{RECONVERT}")  # fmt: skip


def write_manifest(folder: Path, manifest: Manifest, path: Path | None = None) -> None:
    """Write the manifest (to manifest.json unless `path` is given) and fsync it. Not atomic on its own: an
    edit writes to a temporary name and renames (editable.py)."""
    path = path or folder / MANIFEST
    with open(path, "w") as f:
        json.dump(manifest.to_json(), f, separators=(",", ":"))  # magic lands in the first bytes (is_store)
        f.flush()
        os.fsync(f.fileno())
