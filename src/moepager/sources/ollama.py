"""Models pulled by ollama, read in place from its store: a name -> its manifest -> the model layer's blob.

ollama keeps `manifests/HOST/NAMESPACE/MODEL/TAG` (JSON: layers with a mediaType and a sha256 digest) and
`blobs/sha256-HEX` under $OLLAMA_MODELS (default ~/.ollama/models). The layer of mediaType
`application/vnd.ollama.image.model` is a GGUF file; it is used where it lies, never copied. ollama's own
Go chat template layer is not used: the GGUF carries the model's Jinja template.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoepagerError

MODEL_LAYER = "application/vnd.ollama.image.model"
REGISTRY, NAMESPACE, TAG = "registry.ollama.ai", "library", "latest"
# ollama's name grammar: [host/][namespace/]model[:tag]
_NAME = re.compile(r"(?:[\w.-]+/){0,2}[\w.-]+(?::[\w.-]+)?")


def models_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def looks_like_name(text: str) -> bool:
    return bool(_NAME.fullmatch(text)) and not text.startswith((".", "/", "~"))


def manifest_path(name: str) -> Path:
    """The manifest file of an ollama model name (`qwen3:30b-a3b`, `library/qwen3`, `hf.co/org/repo:tag`)."""
    model, _, tag = name.partition(":")
    parts = model.split("/")
    parts = (
        [REGISTRY, NAMESPACE, *parts] if len(parts) == 1 else [REGISTRY, *parts] if len(parts) == 2 else parts
    )
    return models_dir().joinpath("manifests", *parts, tag or TAG)


def display_name(manifest: Path) -> str:
    """How ollama names the model of a manifest path (the short form for its own library)."""
    host, namespace, model, tag = manifest.relative_to(models_dir() / "manifests").parts[-4:]
    if host == REGISTRY:
        return f"{model}:{tag}" if namespace == NAMESPACE else f"{namespace}/{model}:{tag}"
    return f"{host}/{namespace}/{model}:{tag}"


@dataclass
class OllamaModel:
    name: str  # as ollama names it
    gguf: Path  # the model layer's blob (a GGUF file)
    size: int  # bytes of that blob, as the manifest states


def read_manifest(manifest: Path, name: str) -> OllamaModel:
    try:
        layers = json.loads(manifest.read_text()).get("layers") or []
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise MoepagerError(
            f"{manifest}: not a readable ollama manifest ({e}); re-pull it: ollama pull {name}"
        )
    model = next((layer for layer in layers if layer.get("mediaType") == MODEL_LAYER), None)
    if model is None or not str(model.get("digest", "")).startswith("sha256:"):
        raise MoepagerError(
            f"{manifest}: no GGUF model layer ({MODEL_LAYER}) in the ollama manifest of {name}"
        )
    blob = models_dir() / "blobs" / model["digest"].replace(":", "-")
    return OllamaModel(name, blob, int(model.get("size") or 0))


def find(name: str) -> OllamaModel | None:
    """The pulled model of that name, or None when ollama's store has no manifest for it."""
    if not looks_like_name(name):
        return None
    manifest = manifest_path(name)
    if not manifest.is_file():
        return None
    found = read_manifest(manifest, name)
    if not found.gguf.is_file():
        raise MoepagerError(
            f"ollama model {name}: its blob {found.gguf} is missing; re-pull it: ollama pull {name}"
        )
    if found.size and found.gguf.stat().st_size != found.size:
        raise MoepagerError(f"ollama model {name}: {found.gguf} is {found.gguf.stat().st_size} bytes, its "
                            f"manifest says {found.size}; re-pull it: ollama pull {name}")  # fmt: skip
    return found


def installed() -> list[OllamaModel]:
    """Every pulled model whose manifest has a model layer, sorted by name."""
    root = models_dir() / "manifests"
    found = []
    for manifest in sorted(root.glob("*/*/*/*")) if root.is_dir() else []:
        if manifest.is_file():
            try:
                found.append(read_manifest(manifest, display_name(manifest)))
            except MoepagerError:
                continue  # not a model (e.g. an embedding-only or broken manifest): nothing to run
    return sorted(found, key=lambda m: m.name)
