"""The expert-aligned store: moepager's own on-disk format, and everything that writes or edits it.

Owns the format and its manifest (format.py), how experts are encoded, quantized ones included (encoding.py),
reading a store (reading.py: StoreSource), writing one from a checkpoint (convert.py), editing it in place in
generations (editable.py), exporting it back to a checkpoint (export.py), checking it (verify.py), and opening
any model path as a source (open_model.py), the one place that chooses between a store and the other sources.

Imports the sources (a checkpoint is what a store is made from), the model's types, kernels, system and errors;
never paging, the engine or anything above.
"""

from __future__ import annotations

from pathlib import Path


def open(path: str | Path, writable: bool = False, **options):  # noqa: A001 (moepager.store.open reads well)
    """A store for reading (a StoreSource; options: generation, verify_checksums, reader) or, with
    writable=True, for editing (an EditableStore: replace, add, disable, remove, commit, rollback, gc)."""
    from .editable import open_store

    return open_store(path, writable, **options)
