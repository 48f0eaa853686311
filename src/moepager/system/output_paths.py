"""Checks of the paths a command will write, made before any work: a missing or read-only folder is found
in a second, not after a whole generation or conversion. Writing itself stays with each writer."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import MoepagerError


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """A file to be written (or replaced) at `path`: its folder must exist and be writable."""
    p = Path(path).expanduser()
    folder = p.parent
    if p.is_dir():
        raise MoepagerError(f"{flag} {path} is a folder: give a file path")
    if not folder.is_dir():
        raise MoepagerError(
            f"{flag} {path}: the folder {folder} does not exist; create it or give another path"
        )
    if not os.access(folder, os.W_OK):
        raise MoepagerError(
            f"{flag} {path}: the folder {folder} cannot be written (read-only or not yours); give another path"
        )


def check_output_folder(path: str | os.PathLike, what: str) -> None:
    """A folder to be created at `path` (with its missing parents): the nearest existing one must be writable."""
    p = Path(path).expanduser().absolute()
    existing = next(a for a in [p, *p.parents] if a.exists())
    if not existing.is_dir():
        raise MoepagerError(f"{what} {path}: {existing} is a file, not a folder; give another path")
    if existing == p:
        existing = p.parent  # the new folder is written beside it, then renamed into place
    if not os.access(existing, os.W_OK):
        raise MoepagerError(
            f"{what} {path}: {existing} cannot be written (read-only or not yours); give another folder"
        )
