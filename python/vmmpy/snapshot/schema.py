"""Typed field checks for JSON read from checkpoint files: every failure names the field's path.

A spec is a function ``(value, path) -> value`` that returns the value when it fits and raises
:class:`FieldError` otherwise, saying what the field at ``path`` (``memory.chunk_hashes[3]``,
``basic metadata.devices_config.slots[0]``) must be and what it is. Specs compose:
:func:`record` (an object with required, optional and, if allowed, unknown keys), :func:`array`,
:func:`integer` with its range, :func:`string` with its choices or form, :func:`hexdigits`.
Integers are never booleans and never floats, so ``true`` and ``2.0`` are refused where a count
is expected. This module knows no format: ``meta`` and ``checkpoint`` write the specs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

Spec = Callable[[Any, str], Any]


class FieldError(ValueError):
    """A field that does not fit its spec; the message starts with the field's path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"field '{path}' {message}")
        self.path = path


def describe(value: Any) -> str:
    """A JSON value as a message names it: its JSON type and, if short, the value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        text = str(value)
        return f"the integer {text}" if len(text) <= 40 else f"an integer of {len(text)} digits"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}" if len(value) <= 40 else f"a string of {len(value)} characters"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def shown(value: Any) -> str:
    """A JSON value as it reads in a message: short strings and integers as themselves
    (``'bhyve'``, ``3``), anything else by :func:`describe`."""
    if isinstance(value, (str, int)) and not isinstance(value, bool) and len(str(value)) <= 40:
        return repr(value)
    return describe(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int, high: int, *, multiple_of: int = 1) -> Spec:
    """An integer in ``low..high`` (inclusive), a multiple of ``multiple_of``."""
    expected = f"an integer from {low} to {high}" + (f", a multiple of {multiple_of}" if multiple_of > 1 else "")

    def check(value: Any, path: str) -> int:
        if not _is_int(value) or not low <= value <= high or value % multiple_of:
            raise FieldError(path, f"must be {expected}, got {describe(value)}")
        return value

    return check


def string(*, choices: Collection[str] | None = None, max_len: int = 255, min_len: int = 1) -> Spec:
    """A string: one of ``choices``, or any of ``min_len..max_len`` characters."""
    if choices is not None:
        expected = "one of " + ", ".join(repr(c) for c in choices)
    else:
        expected = f"a string of {min_len} to {max_len} characters"

    def check(value: Any, path: str) -> str:
        fits = isinstance(value, str) and (value in choices if choices is not None else min_len <= len(value) <= max_len)
        if not fits:
            raise FieldError(path, f"must be {expected}, got {describe(value)}")
        return value

    return check


def hexdigits(count: int) -> Spec:
    """``count`` lowercase hex digits, as checksums and hashes are written."""
    form = re.compile(f"[0-9a-f]{{{count}}}")

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str) or not form.fullmatch(value):
            raise FieldError(path, f"must be {count} lowercase hex digits, got {describe(value)}")
        return value

    return check


def array(item: Spec, *, max_len: int, min_len: int = 0) -> Spec:
    """A list of ``min_len..max_len`` items, each fitting ``item``."""

    def check(value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise FieldError(path, f"must be a list, got {describe(value)}")
        if not min_len <= len(value) <= max_len:
            raise FieldError(path, f"must hold {min_len} to {max_len} items, got {len(value)}")
        for index, element in enumerate(value):
            item(element, f"{path}[{index}]")
        return value

    return check


def record(required: Mapping[str, Spec], optional: Mapping[str, Spec] | None = None, *, open: bool = False) -> Spec:
    """An object with every ``required`` key, any ``optional`` ones and, when ``open``, other
    keys of any JSON value (whose size and depth the parser bounded already)."""
    optional = dict(optional or {})
    known = {**required, **optional}

    def check(value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise FieldError(path, f"must be an object, got {describe(value)}")
        for key, spec in known.items():
            if key in value:
                spec(value[key], f"{path}.{key}" if path else key)
            elif key in required:
                raise FieldError(f"{path}.{key}" if path else key, "is missing")
        if not open:
            extra = sorted(set(value) - set(known))
            if extra:
                name = extra[0] if len(extra[0]) <= 40 else extra[0][:40] + "..."
                where = f"'{path}'" if path else "the top level"
                raise FieldError(f"{path}.{name}" if path else name, f"is not part of this format ({where} has {', '.join(sorted(known))})")
        return value

    return check
