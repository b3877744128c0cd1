"""Sizes as people write them ("512M", "4G", "64GiB") and as people read them ("1.5 GiB");
link rates as they write them ("100M", "1.5G", "100Mbit", "10Gbit/s").

Our own rather than a library's: bhyve's rules (a bare ``-m`` number counts in MiB, K/M/G are
powers of two) are not what general-purpose size parsers do (K = 1000).
"""

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


def format_memsize(nbytes: int) -> str:
    """Bytes as ``-m`` spells them: ``256M``, ``4G``, ``1536M`` (the largest unit that divides)."""
    for suffix, scale in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if nbytes and nbytes % scale == 0:
            return f"{nbytes // scale}{suffix}"
    return str(nbytes)


def format_size(nbytes: float) -> str:
    """``1536 MiB`` -> ``'1.5 GiB'``; exact multiples print without decimals."""
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{nbytes:.0f} B"


_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b|bit|bps)?\s*(/s)?\s*$", re.IGNORECASE)
_SI = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_rate(value: int | str, *, what: str = "rate") -> int:
    """Bytes per second from ``100M``, ``1.5G``, ``50MB/s`` (bytes, K/M/G powers of two, as
    sizes) or ``100Mbit``, ``10Gbit/s``, ``800Mbps`` (bits, k/M/G powers of ten, as links are
    sold). An int is bytes per second."""
    if isinstance(value, int) and not isinstance(value, bool):
        return parse_size(value, what=what)
    if not isinstance(value, str):
        raise TypeError(f"{what} must be an int or a string like '100M' or '1Gbit', not {type(value).__name__}")
    match = _RATE.match(value)
    if not match:
        raise ValueError(f"{what} {value!r} is not a rate: use bytes/s with an optional K, M or G suffix ('100M', "
                         f"'1.5G') or bits/s ('100Mbit', '10Gbit/s')")
    number, prefix, unit, _ = match.groups()
    amount = float(number)
    if unit and unit.lower() in ("bit", "bps"):
        rate = amount * _SI[prefix.lower()] / 8
    else:
        rate = amount * _SUFFIXES[prefix.lower()]
    if rate < 1:
        raise ValueError(f"{what} {value!r} is less than one byte per second")
    return int(rate)
