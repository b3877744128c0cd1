"""JSON from files and peers that are not trusted: size and nesting bounded before parsing.

Python's ``json`` recurses once per nesting level, so ``[`` repeated 100,000 times raises
RecursionError from inside the parser (and anything that walks the result recurses too).
:func:`parse` therefore measures the nesting depth first, without recursion and without
parsing (a scan that skips string contents, vectorised for long documents), and refuses a
document deeper or larger than its caller allows. It also refuses what ``json`` would otherwise
accept silently: bytes that are not UTF-8, ``NaN``/``Infinity`` (not JSON), and an object that
repeats a key (the last one would win, unseen). Every refusal is a :class:`BoundedJsonError` whose message says what was
wrong; the caller prefixes the file or message it came from.

This module owns no format: the checkpoint metadata and the state-section payloads use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import cache
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from ._lazy import lazy_module

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # only long documents need it, and it takes 0.1 s to import

#: Documents up to this many bytes (once escapes are dropped) are scanned without numpy: a
#: checkpoint's ``.meta`` is about 13 KB, and importing numpy costs ``vmmrun -r`` 0.1 s, more than
#: scanning them. Longer ones, which only a diff's page lists or a hostile peer make, are scanned
#: vectorised, in bounded memory.
SMALL_DOCUMENT = 64 << 10
#: A string, from its opening quote to its closing one (or the end of an unterminated one), once
#: escaped quotes and backslashes are gone.
_STRING = re.compile(rb'"[^"]*(?:"|\Z)')
#: Every byte but the four brackets, for ``bytes.translate`` to delete.
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
#: What each bracket does to the depth.
_STEP = [0] * 256
_STEP[ord("[")] = _STEP[ord("{")] = 1
_STEP[ord("]")] = _STEP[ord("}")] = -1
#: Bytes scanned per numpy step: bounds the scan's scratch memory.
_BLOCK = 1 << 20


@cache
def _codes() -> np.ndarray:
    """What each byte means to the vectorised scan: 2 a quote, 1 an opening bracket, -1 a closing one."""
    codes = np.zeros(256, np.int8)
    codes[ord('"')] = 2
    codes[[ord("["), ord("{")]] = 1
    codes[[ord("]"), ord("}")]] = -1
    return codes


class BoundedJsonError(ValueError):
    """A JSON document refused before or while parsing; the message says why."""


def nesting_depth(data: bytes, stop_above: int = 1 << 62) -> int:
    """The deepest nesting of arrays and objects in ``data``, brackets inside strings excluded.

    Exact for valid JSON; for invalid JSON it is exact up to the first error, which is as far as
    a parser gets, so a parse that follows this check never recurses deeper than it says. The
    scan of a long document stops early, returning a depth above ``stop_above``, once it has
    seen that deep.
    """
    # Inside strings, an escaped backslash or an escaped quote are the only sequences that could
    # be mistaken for a string's end: drop them (pairs first, so "\\\"" reads right), and every
    # remaining quote toggles in and out of a string.
    flat = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    return _depth_short(flat) if len(flat) <= SMALL_DOCUMENT else _depth_long(flat, stop_above)


def _depth_short(flat: bytes) -> int:
    """The scan of a short document, at C speed without numpy: strings removed (a regular
    expression), brackets kept (translate), the deepest running sum (accumulate)."""
    brackets = _STRING.sub(b"", flat).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets), initial=0))


def _depth_long(flat: bytes, stop_above: int) -> int:
    """The vectorised scan, a block at a time (the quote parity and the depth carried over)."""
    arr = np.frombuffer(flat, dtype=np.uint8)
    table = _codes()
    depth = deepest = in_string = 0
    for start in range(0, len(arr), _BLOCK):
        codes = table[arr[start : start + _BLOCK]]
        codes = codes[codes != 0]
        if not codes.size:
            continue
        quotes = codes == 2
        outside = ((np.cumsum(quotes, dtype=np.int64) + in_string) & 1) == 0
        running = np.cumsum(np.where(outside & ~quotes, codes, 0), dtype=np.int64) + depth
        deepest = max(deepest, int(running.max()))
        if deepest > stop_above:
            break
        depth = int(running[-1])
        in_string = (in_string + int(quotes.sum())) & 1
    return deepest


def _refuse_constant(name: str) -> Any:
    raise BoundedJsonError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise BoundedJsonError(f"key {key!r} appears twice in one object")
            seen.add(key)
    return out


@cache
def _decoder(object_hook: Callable[[dict[str, Any]], Any] | None) -> json.JSONDecoder:
    """A decoder that refuses NaN and repeated keys and gives each object to ``object_hook``;
    built once per hook (``json.loads`` builds one per call)."""
    if object_hook is None:
        pairs_hook = _unique_keys
    else:
        def pairs_hook(pairs: list[tuple[str, Any]]) -> Any:
            return object_hook(_unique_keys(pairs))
    return json.JSONDecoder(parse_constant=_refuse_constant, object_pairs_hook=pairs_hook)


def check_bounds(data: bytes, *, max_bytes: int, max_depth: int) -> None:
    """Refuse ``data`` longer than ``max_bytes`` or nested deeper than ``max_depth`` (``[[1]]``
    is 2): what :func:`parse` checks first, for writers that check before they write."""
    if len(data) > max_bytes:
        raise BoundedJsonError(f"{len(data)} bytes is more than the {max_bytes} allowed")
    # A document with no more opening brackets than the limit cannot nest deeper: skip the scan.
    depth = 0 if data.count(b"[") + data.count(b"{") <= max_depth else nesting_depth(data, max_depth)
    if depth > max_depth:
        raise BoundedJsonError(f"arrays and objects nest more than the {max_depth} levels allowed")


def parse(data: bytes, *, max_bytes: int, max_depth: int, object_hook: Callable[[dict[str, Any]], Any] | None = None) -> Any:
    """Parse UTF-8 JSON ``data`` within the bounds of :func:`check_bounds`, or raise
    :class:`BoundedJsonError`. ``object_hook``, when given, turns each object (its keys checked
    unique) into what the result holds instead; a hook refuses one by raising BoundedJsonError."""
    check_bounds(data, max_bytes=max_bytes, max_depth=max_depth)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BoundedJsonError(f"not UTF-8 (byte {err.start})") from None
    try:
        return _decoder(object_hook).decode(text)
    except BoundedJsonError:
        raise
    except ValueError as err:  # JSONDecodeError, or an integer of more digits than Python converts
        raise BoundedJsonError(f"not valid JSON ({err})") from None
