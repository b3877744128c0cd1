"""Sizes as people write them ("512M", "4G", "64GiB") and as people read them ("1.5 GiB")."""

from __future__ import annotations

import re

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SUFFIXES = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(value: int | str, *, default_unit: int = 1, what: str = "size") -> int:
    """Turn ``512M``, ``4G``, ``64GiB``, ``4096`` or an int into bytes.

    A number without a suffix counts in ``default_unit`` (bhyve's ``-m`` counts in MiB).
    """
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int or a string like '512M', not a bool")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what} must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"{what} must be an int or a string like '512M', not {type(value).__name__}")
    match = _SIZE.match(value)
    if not match:
        raise ValueError(f"{what} {value!r} is not a size: use a number with an optional K, M, G or T suffix, like '512M'")
    number, suffix, _ = match.groups()
    scale = _SUFFIXES[suffix.lower()] if suffix else default_unit
    return int(number) * scale


def format_size(nbytes: float) -> str:
    """``1536 MiB`` -> ``'1.5 GiB'``; exact multiples print without decimals."""
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{nbytes:.0f} B"
