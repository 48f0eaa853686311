"""Sizes as people write them ("512MiB", "2GB", "25%") read into bytes, and bytes written back for people."""

from __future__ import annotations

import re

from ..errors import MoepagerError

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}  # fmt: skip


def parse_bytes(value: int | str, total: int | None = None, what: str = "expert_memory") -> int:
    """Bytes from "512MiB", "2GB", 1234 or, when `total` is given, "25%" of it."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise MoepagerError(f"{what}: expected a size like 512MiB, 2GB or 25%, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise MoepagerError(f"{what}: must be positive, got {value}")
        return value
    text = value.strip()
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)\s*%", text):
        if total is None:
            raise MoepagerError(
                f"{what}: a percentage ({text}) is not meaningful here; give bytes like 700MiB"
            )
        pct = float(m[1])
        if not 0 < pct <= 100:
            raise MoepagerError(f"{what}: {text} is not a percentage in (0, 100]")
        return max(1, int(total * pct / 100))
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-zA-Z]*)", text)
    if not m or m[2].lower() not in _UNITS:
        raise MoepagerError(
            f"{what}: cannot read {value!r}; use bytes with a unit (512MiB, 2GB, 1.5GiB) or a percentage (25%)"
        )
    n = int(float(m[1]) * _UNITS[m[2].lower()])
    if n <= 0:
        raise MoepagerError(f"{what}: must be positive, got {value!r}")
    return n


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def parse_size(text: str) -> int:
    """'8GiB', '512MiB', '2GB', '1000' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}  # fmt: skip
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or value < 0:
        raise MoepagerError(f"size {text!r} is not understood; write e.g. 8GiB, 512MiB or 2GB")
    return int(value * units[unit])
