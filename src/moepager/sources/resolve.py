"""MODEL as a user names it -> a GGUF file to open, when it names one.

A path to a GGUF (known by its magic, whatever the file is called) or a model pulled by ollama
(`qwen3:30b-a3b`, `hf.co/org/repo:tag`: its blob, read in place). Anything else (a checkpoint folder, a
store, a hub id in the local Hugging Face cache) is left to store/checkpoint.resolve.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MoepagerError
from . import ollama

GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_file(model: str | Path) -> Path | None:
    """The GGUF file MODEL names, or None when it names something else."""
    text = str(model)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        return path  # GgufSource says what is wrong with a missing or damaged one
    if path.exists():
        return path if path.is_file() and is_gguf(path) else None
    found = ollama.find(text)
    if found is not None:
        return found.gguf
    if ":" in text and ollama.looks_like_name(text):  # a tag: only ollama names look like this
        raise MoepagerError(
            f"{text!r} is not a file and not a model pulled by ollama (no {ollama.manifest_path(text)}); "
            f"pull it with `ollama pull {text}` (or set $OLLAMA_MODELS to ollama's models folder)"
        )
    return None
