"""`moepager convert`: a Hugging Face checkpoint -> an expert-aligned store (layout in format.py).

Owns writing a store: experts streamed one at a time (memory stays at one expert plus one dense tensor),
the dense safetensors file written tensor by tensor, tokenizer files copied, and the manifest. Everything is
written into a hidden folder next to OUT, fsynced, then renamed: a conversion that dies midway leaves nothing
under OUT. Reading a store is reading.py's job.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import torch

from ..errors import MoepagerError
from ..sources.checkpoint import Checkpoint
from ..system.direct_reader import align_up, aligned_buffer
from ..system.durable import fsync_dir
from ..system.output_paths import check_output_folder
from ..system.safetensors import DTYPES as ST_DTYPES
from ..system.safetensors import read_tensor
from .encoding import SCALES, check_experts_dtype, convert_expert, expert_tensors
from .format import (
    DENSE_FILE,
    EXPERTS_FILE,
    MANIFEST,
    TENSOR_ALIGN,
    ExpertEntry,
    Layout,
    Manifest,
    TensorEntry,
    is_store,
    write_manifest,
)  # fmt: skip

CANONICAL = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")  # order of tensors inside an expert
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".index.json")
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
SYNC_EVERY = 1 << 30  # flush and evict written pages every GiB, so conversion does not fill the page cache


def convert(
    model: str | Path,
    out: str | Path,
    force: bool = False,
    progress: bool = True,
    experts_dtype: str | None = None,
    dense_dtype: str | None = None,
) -> Path:
    """Write the store for `model` (checkpoint folder or cached hub id) to `out`; return its path.

    experts_dtype (bf16, fp16, int8, int4) converts routed experts, dense_dtype (bf16, fp16, fp32) the
    floating-point resident tensors; None keeps the checkpoint's. int8/int4 are lossy (store/encoding.py).
    """
    experts_dtype, dense = check_experts_dtype(experts_dtype), _dense_torch_dtype(dense_dtype)
    if is_store(Path(model)):
        raise MoepagerError(f"{model} is already a moepager store; convert the original checkpoint instead")
    check_output_folder(out, "the store folder")
    src = Checkpoint(model)
    out = Path(out).expanduser().absolute()
    _check_target(src, out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        layouts, experts, experts_size = _write_experts(src, tmp / EXPERTS_FILE, progress, experts_dtype)
        dense_size, dense_crc = _write_dense(src, tmp / DENSE_FILE, dense)
        copied = _copy_side_files(src.path, tmp)
        dtype = str(dense or src.dense["embed.weight"].dtype).removeprefix("torch.")
        files = {
            EXPERTS_FILE: {"size": experts_size, "crc32": None},
            DENSE_FILE: {"size": dense_size, "crc32": dense_crc},
        }
        files.update({name: {"size": (tmp / name).stat().st_size, "crc32": None} for name in copied})
        write_manifest(tmp, Manifest(src.raw_config, dtype, layouts, experts, files, source=str(src.path)))
        fsync_dir(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _remove_dead_partials(out: Path) -> None:
    """Folders left by conversions to `out` that were killed (SIGKILL, power loss): their process is gone."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(p, ignore_errors=True)


def _check_target(src: Checkpoint, out: Path, force: bool) -> None:
    if out == src.path.absolute() or src.path.absolute() in out.parents:
        raise MoepagerError(f"{out}: the store cannot be written inside the checkpoint it is converted from")
    if out.exists():
        if not force:
            raise MoepagerError(f"{out} already exists; pass --force to replace it")
        if not (out.is_dir() and (is_store(out) or not any(out.iterdir()))):
            raise MoepagerError(
                f"{out} exists and is not a moepager store; refusing to replace it even with --force"
            )
    need = sum(align_up(src.expert_nbytes(*k)) for k in src.expert_keys()) + sum(
        i.nbytes for i in src.dense.values()
    )  # fmt: skip
    parent = next(p for p in [out, *out.parents] if p.exists())
    free = shutil.disk_usage(parent).free
    if free < need:
        raise MoepagerError(f"{parent}: {free / 2**30:.1f} GiB free, the store needs {need / 2**30:.1f} GiB")


def layout_of(weights: dict[str, torch.Tensor]) -> Layout:
    """Where each canonical tensor sits inside the expert: in CANONICAL order, TENSOR_ALIGN-aligned."""
    tensors, pos = [], 0
    for name in (*CANONICAL, *SCALES):  # SCALES: only in quantized encodings
        if name in weights:
            t = weights[name]
            nbytes = t.numel() * t.element_size()
            tensors.append(TensorEntry(name, t.dtype, tuple(t.shape), pos, nbytes))
            pos = (pos + nbytes + TENSOR_ALIGN - 1) // TENSOR_ALIGN * TENSOR_ALIGN
    unknown = set(weights) - set(CANONICAL) - set(SCALES)
    if unknown:
        raise MoepagerError(f"expert tensors {sorted(unknown)} have no place in the store format")
    return Layout("plain", tuple(tensors))


def _write_experts(src: Checkpoint, path: Path, progress: bool, experts_dtype: str | None = None):
    from ..system.progress import progress_bar

    keys = src.expert_keys()
    layouts: dict[str, Layout] = {}
    layout_keys: dict[Layout, str] = {}
    experts: dict[tuple[int, int], ExpertEntry] = {}
    total = sum(src.expert_nbytes(*k) for k in keys)
    buf = None
    pos = unsynced = 0
    out = _ExpertsFile(path)
    with out, progress_bar(total=total, unit="B", unit_scale=True, desc="experts", enabled=progress) as bar:
        for layer, e in keys:
            weights, encoding = src.read_expert(layer, e), "plain"
            if experts_dtype is not None:
                weights, encoding = expert_tensors(convert_expert(weights, experts_dtype))
            layout = layout_of(weights)
            if encoding != "plain":  # same positions; the codes and scales need their decoder
                layout = Layout(encoding, layout.tensors)
            if layout not in layout_keys:
                layout_keys[layout] = str(len(layouts))
                layouts[layout_keys[layout]] = layout
            nbytes = layout.tensors[-1].offset + layout.tensors[-1].nbytes
            padded = align_up(nbytes)
            if buf is None or len(buf) < padded:
                buf = aligned_buffer(padded)  # reused for every expert; grown only for a larger one
                flat = torch.frombuffer(buf, dtype=torch.uint8)
            view = memoryview(buf)
            flat[:padded].zero_()  # padding between tensors and experts is zeros, so crc and files are stable
            for t in layout.tensors:
                flat[t.offset : t.offset + t.nbytes].copy_(
                    weights[t.name].contiguous().view(-1).view(torch.uint8)
                )
            experts[(layer, e)] = ExpertEntry(pos, nbytes, layout_keys[layout], zlib.crc32(view[:nbytes]))
            out.write(view[:padded])
            pos += padded
            unsynced += padded
            if unsynced >= SYNC_EVERY:
                out.sync()
                unsynced = 0
            bar.update(src.expert_nbytes(layer, e))
        out.sync()
    return layouts, experts, pos


def _write_dense(src: Checkpoint, path: Path, dense: torch.dtype | None = None) -> tuple[int, int]:
    """A safetensors file of the dense tensors, streamed one tensor at a time -> (size, crc32 of the file)."""
    names = sorted(src.dense)
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        info = src.dense[name]
        header[name] = {
            "dtype": _ST_NAMES[_stored_dtype(info, dense)],
            "shape": list(info.shape),
            "data_offsets": [pos, pos + _stored_nbytes(info, dense)],
        }
        pos += _stored_nbytes(info, dense)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors wants the data 8-byte aligned
    head = struct.pack("<Q", len(blob)) + blob
    crc = zlib.crc32(head)
    with open(path, "wb") as f:
        f.write(head)
        for name in names:
            stored = read_tensor(src.dense[name]).to(_stored_dtype(src.dense[name], dense))
            data = memoryview(stored.contiguous().view(-1).view(torch.uint8).numpy())
            crc = zlib.crc32(data, crc)
            f.write(data)
        _flush_and_evict(f)
    return len(head) + pos, crc


def _dense_torch_dtype(name: str | None) -> torch.dtype | None:
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name is not None and name not in names:
        raise MoepagerError(f"dense dtype {name!r} is not supported; use one of {', '.join(names)}")
    return names.get(name)


def _stored_dtype(info, dense: torch.dtype | None) -> torch.dtype:
    """The dense tensor's dtype in the store: --dense-dtype for floating-point tensors, else its own."""
    return dense if dense is not None and info.dtype.is_floating_point else info.dtype


def _stored_nbytes(info, dense: torch.dtype | None) -> int:
    return info.nbytes // info.dtype.itemsize * _stored_dtype(info, dense).itemsize


def _copy_side_files(folder: Path, tmp: Path) -> list[str]:
    """Tokenizer, chat template, generation config: every small non-weight file but config.json (in the manifest)."""
    copied = []
    for p in sorted(folder.iterdir()):
        name = p.name
        if not p.is_file() or name.startswith(".") or name.endswith(_WEIGHT_SUFFIXES):
            continue
        if name in ("config.json", MANIFEST, EXPERTS_FILE):
            continue
        shutil.copyfile(p, tmp / name)
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
        copied.append(name)
    return copied


class _ExpertsFile:
    """experts.bin, appended in ALIGN-multiples from an aligned buffer: written with O_DIRECT, so conversion
    neither fills the page cache nor stalls on dirty-page throttling; buffered + DONTNEED where refused."""

    def __init__(self, path: Path):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        try:
            self.fd, self.direct = os.open(path, flags | os.O_DIRECT, 0o644), True
        except (OSError, AttributeError):
            self.fd, self.direct = os.open(path, flags, 0o644), False

    def write(self, view: memoryview) -> None:
        while len(view):
            view = view[os.write(self.fd, view) :]

    def sync(self) -> None:
        os.fsync(self.fd)
        if not self.direct:
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _flush_and_evict(f) -> None:
    f.flush()
    os.fdatasync(f.fileno())
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished store to its name; an older store there is swapped out first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
