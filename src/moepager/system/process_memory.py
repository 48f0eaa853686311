"""What this process holds: its resident bytes as a memory limit counts them, and handing freed heap back.

Owns nothing else; any layer may import it (it imports only psutil and ctypes, lazily)."""

from __future__ import annotations


def current_rss() -> int:
    """Resident bytes of this process now, as paging's footprint measures them."""
    import psutil

    return psutil.Process().memory_info().rss


def release_freed_heap() -> None:
    """Hand freed malloc memory back to the system: glibc keeps it, and a memory limit counts it.

    Called after a load step that frees many small objects (a GGUF's parsed metadata, a tokenizer's
    temporaries), never on the decode path."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass
