"""The on-disk world: checkpoint indexes, the expert-aligned store, readers. Never imported by the model."""

from __future__ import annotations

from pathlib import Path


def open(path: str | Path, writable: bool = False, **options):  # noqa: A001 (moepager.store.open reads well)
    """A store for reading (a StoreSource; options: generation, verify_checksums, reader) or, with
    writable=True, for editing (an EditableStore: replace, add, disable, remove, commit, rollback, gc)."""
    from .editable import open_store

    return open_store(path, writable, **options)
