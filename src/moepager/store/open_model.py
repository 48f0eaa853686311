"""Any model path opened as a source: a GGUF file (or an ollama model name), a store written by `moepager
convert`, or a safetensors checkpoint. It lives with the store because it is the one place that chooses between
the store and the sources below it."""

from __future__ import annotations

from pathlib import Path

from ..sources.contract import ModelSource


def open_source(model: str | Path, **options) -> ModelSource:
    """A GGUF file (or ollama model name: sources/resolve.py), a store written by `moepager convert` when the folder
    holds its manifest, else a safetensors checkpoint.

    options go to the source's constructor (e.g. reader=DirectReader(...); verify_checksums for a store);
    compact=False has a GGUF's block-quantized matrices dequantized as they are read.
    """
    from ..sources.checkpoint import Checkpoint, resolve
    from ..sources.resolve import gguf_file
    from .format import is_store
    from .reading import StoreSource

    compact = options.pop("compact", True)
    gguf = gguf_file(model)  # a llama.cpp file: a path to one, or a model pulled by ollama
    if gguf is not None:
        from ..sources.gguf import GgufSource  # gguf-py only for GGUF files

        return GgufSource(gguf, compact=compact)
    path = resolve(model)
    if is_store(path):
        return StoreSource(path, **options)
    options.pop("verify_checksums", None)  # a checkpoint has no checksums
    return Checkpoint(path, **options)
