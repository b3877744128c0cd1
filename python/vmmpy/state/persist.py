"""The one persist pattern: each piece of state declares itself once; the declaration drives save and restore.

A declaration is a plain dataclass (the standard library's vocabulary, so ``vmm/`` and
``devices/``, which sit below this layer, declare without importing it)::

    @dataclasses.dataclass
    class UartState:
        VERSION: ClassVar[int] = 2      # what this vmmpy writes
        MIN_VERSION: ClassVar[int] = 1  # the oldest section version it still reads

        lcr: int
        rx_fifo: list[int]
        # Added in version 2: a version-1 section lacks it and reads as the default.
        loopback: bool = dataclasses.field(default=False, metadata={"since": 2})

        def validate(self) -> None:     # optional: ranges and consistency, raising ValueError
            ...

Field types: ``int``, ``bool``, ``str``, ``bytes``, another declaration (a nested struct),
``list[T]`` and ``dict[str, T]`` of any of these, ``T | None``, and a bare ``dict`` (any mapping,
for a layout its owner checks, such as a vCPU's pending read).
A nested struct's fields follow the section's version: ``since`` on a nested field is the
version of the whole section that added it.

:func:`dump` turns a declared object into a section payload (a dict for ``state/section.py``'s
encoding). :func:`load` turns a payload back into the declared type, given the version the
section was written at:

- a version newer than ``VERSION`` is refused (this vmmpy cannot know what the new fields
  mean), and one older than ``MIN_VERSION`` too, naming the section and both versions;
- a field the section's version has (``since`` <= version) must be present with its type;
- a field added later (``since`` > version) is absent and takes its declared default; it is
  refused if present, as is any field the declaration does not name: unknown fields are never
  dropped silently. (Fields unknown because they are newer arrive only in a newer version,
  which is refused as a whole before its fields are looked at.)
- then ``validate()`` runs, if the declaration has one.

Errors are :class:`PersistError` (a ``ValueError``) naming the section, the field path and the
value.

Both directions run inside a migration's downtime, so each declared type gets a loader and a
dumper built once (:func:`_struct_loader`, :func:`_dumper`) that do the checks above without
building field paths. A payload the built loader does not take is read again by the generic
reader (``_load_struct``), which names the field and value in its error: the built loader only
decides faster, the generic reader is the rule.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any

MISSING = dataclasses.MISSING


class PersistError(ValueError):
    """A payload that does not fit its declaration; the message names section, field and value."""


def version_of(cls: type) -> int:
    return cls.VERSION


def min_version_of(cls: type) -> int:
    return getattr(cls, "MIN_VERSION", cls.VERSION)


def check_version(cls: type, version: int, where: str) -> None:
    """Refuse a section version this declaration cannot read, naming the section and both versions."""
    newest, oldest = version_of(cls), min_version_of(cls)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PersistError(f"{where}: section version {version!r} is not a positive integer")
    if version > newest:
        raise PersistError(f"{where}: section version {version} is newer than this vmmpy reads (versions {oldest} to {newest})")
    if version < oldest:
        raise PersistError(f"{where}: section version {version} is older than this vmmpy still reads (versions {oldest} to {newest})")


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    kind: Any
    since: int
    default: Any  # MISSING when the field has no default
    factory: Any  # or a default_factory, called for each object read (never shared between them)

    def default_value(self) -> Any:
        return self.factory() if self.factory is not MISSING else self.default


@functools.cache
def fields_of(cls: type) -> tuple[_Field, ...]:
    """A declaration's fields with resolved types, once per class (resolving annotation strings
    is slow enough to matter inside a migration's downtime)."""
    hints = typing.get_type_hints(cls)
    version, oldest = getattr(cls, "VERSION", None), getattr(cls, "MIN_VERSION", None)
    if version is not None and oldest is not None and not 1 <= oldest <= version:
        raise TypeError(f"{cls.__name__}: MIN_VERSION {oldest} must be from 1 to VERSION {version}")
    out = []
    for f in dataclasses.fields(cls):
        since = f.metadata.get("since", 1)
        if version is not None and since > version:
            raise TypeError(f"{cls.__name__}.{f.name}: added in version {since}, after the declaration's VERSION {version}")
        if since > 1 and f.default is MISSING and f.default_factory is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: a field added in version {since} needs a default for older sections")
        out.append(_Field(f.name, hints[f.name], since, f.default, f.default_factory))
    return tuple(out)


def prepare(*classes: type) -> int:
    """Resolve the field types of these declarations and every struct they nest, and build their
    loaders and dumpers, ahead of a restore that must be quick; returns how many declarations."""
    seen: set[type] = set()
    todo = list(classes)
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        _struct_loader(cls)
        _struct_dumper(cls)
        for f in fields_of(cls):
            todo.extend(t for t in _leaf_types(f.kind) if dataclasses.is_dataclass(t))
    return len(seen)


def _leaf_types(kind: Any) -> list[Any]:
    args = typing.get_args(kind)
    if not args:
        return [kind]
    return [leaf for arg in args for leaf in _leaf_types(arg)]


# --- save -------------------------------------------------------------------------------------


def dump(obj: Any) -> dict[str, Any]:
    """A declared object as a section payload: every field, nested structs as mappings."""
    return _struct_dumper(type(obj))(obj)


_SCALARS = frozenset({int, bool, str, bytes, float, type(None)})


@functools.cache
def _struct_dumper(cls: type) -> Callable[[Any], dict[str, Any]]:
    fields = [(f.name, _dumper(f.kind)) for f in fields_of(cls)]

    def dump_struct(obj: Any) -> dict[str, Any]:
        return {name: dump_field(getattr(obj, name)) for name, dump_field in fields}
    return dump_struct


@functools.cache
def _dumper(kind: Any) -> Callable[[Any], Any]:
    """How to dump a value declared as ``kind``: what ``_dump_value`` does, decided once per kind
    for the values that are what they are declared as, and by ``_dump_value`` for any other."""
    if dataclasses.is_dataclass(kind):
        # Looked up when called, not now: a declaration may nest itself.
        return lambda value: _struct_dumper(kind)(value) if type(value) is kind else _dump_value(value)
    if typing.get_origin(kind) is list:
        def dump_list(value: Any) -> Any:
            if type(value) is list and all(type(v) in _SCALARS for v in value):
                return value.copy()
            return _dump_value(value)
        return dump_list
    return lambda value: value if type(value) in _SCALARS else _dump_value(value)


def _dump_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dump(value)
    if isinstance(value, dict):
        for key in value:
            if type(key) is not str:
                raise TypeError(f"state keys must be strings, got {key!r}")
        return {k: _dump_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dump_value(v) for v in value]
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


# --- restore ----------------------------------------------------------------------------------

_NAMES = {int: "an int", bool: "a bool", str: "a string", bytes: "bytes", dict: "a mapping", type(None): "null"}


def load(cls: type, payload: Any, version: int, *, where: str) -> Any:
    """The declared object a section payload of ``version`` holds (module doc for the rules);
    ``where`` (the section's name) starts every error."""
    check_version(cls, version, where)
    try:
        state = _struct_loader(cls)(payload, version)
    except _Mismatch:
        state = _load_struct(cls, payload, version, where, "")  # the rule: names the field it refuses
    validate = getattr(state, "validate", None)
    if validate is not None:
        try:
            validate()
        except PersistError:
            raise
        except ValueError as err:
            text = str(err)
            raise PersistError(text if text.startswith(f"{where}:") else f"{where}: {text}") from None
    return state


class _Mismatch(Exception):
    """A payload a built loader does not take (the generic reader says why)."""


_Loader = Callable[[Any, int], Any]


@functools.cache
def _struct_loader(cls: type) -> _Loader:
    """``_load_struct`` for ``cls``, built once: raises :class:`_Mismatch` instead of naming the field."""
    fields = [(f.name, f.since, f.default_value, _loader(f.kind)) for f in fields_of(cls)]
    names = frozenset(name for name, *_ in fields)

    def load_struct(payload: Any, version: int) -> Any:
        if type(payload) is not dict or not names.issuperset(payload):
            raise _Mismatch
        values = {}
        for name, since, default_value, load_field in fields:
            if since > version:
                if name in payload:
                    raise _Mismatch
                values[name] = default_value()
            elif name in payload:
                values[name] = load_field(payload[name], version)
            else:
                raise _Mismatch
        return cls(**values)
    return load_struct


@functools.cache
def _loader(kind: Any) -> _Loader:
    """``_load_value`` for values declared as ``kind``, built once (see :func:`_struct_loader`)."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if (origin is dict and len(args) != 2) or (origin is list and len(args) != 1):
        return _refuse  # a bare typing.Dict or List: not a declarable type, the generic reader says so
    if origin is dict:
        load_item = _loader(args[1])

        def load_dict(value: Any, version: int) -> Any:
            if not isinstance(value, dict):
                raise _Mismatch
            return {k: load_item(v, version) for k, v in value.items()}
        return load_dict
    if origin is list:
        (item,) = args
        load_item, scalar = _loader(item), item if item in (int, str) else None

        def load_list(value: Any, version: int) -> Any:
            items = _as_list(value)
            if scalar is not None and all(type(v) is scalar for v in items):
                return items.copy()
            return [load_item(v, version) for v in items]
        return load_list
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        inner = [o for o in options if o is not type(None)]
        if len(inner) != 1:
            return _refuse  # not a declarable type: the generic reader says so
        load_inner, none_ok = _loader(inner[0]), type(None) in options
        return lambda value, version: None if value is None and none_ok else load_inner(value, version)
    if dataclasses.is_dataclass(kind):
        # Looked up when called, not now: a declaration may nest itself (a list of its own type).
        return lambda value, version: _struct_loader(kind)(value, version)
    if kind is Any:
        return lambda value, version: value

    def load_leaf(value: Any, version: int) -> Any:
        if type(value) is kind or (isinstance(value, kind) and not (kind is int and isinstance(value, bool))):
            return value
        raise _Mismatch
    return load_leaf


def _refuse(value: Any, version: int) -> Any:
    raise _Mismatch


def _as_list(value: Any) -> list:
    if not isinstance(value, list):
        raise _Mismatch
    return value


def _load_struct(cls: type, payload: Any, version: int, where: str, path: str) -> Any:
    if not isinstance(payload, dict):
        raise PersistError(f"{where}: {path or 'payload'}: expected a mapping, got {type(payload).__name__}")
    fields = fields_of(cls)
    names = {f.name for f in fields}
    unknown = sorted(k for k in payload if k not in names)
    if unknown:
        raise PersistError(f"{where}: unknown field '{path}{unknown[0]}' (not in version {version} of this section)")
    values = {}
    for f in fields:
        field_path = f"{path}{f.name}"
        if f.since > version:
            if f.name in payload:
                raise PersistError(f"{where}: field '{field_path}' was added in version {f.since}; a version {version} section cannot have it")
            values[f.name] = f.default_value()
            continue
        if f.name not in payload:
            raise PersistError(f"{where}: missing field '{field_path}'")
        values[f.name] = _load_value(f.kind, payload[f.name], version, where, field_path)
    return cls(**values)


def _load_value(kind: Any, value: Any, version: int, where: str, path: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is dict:
        _, item = typing.get_args(kind)
        if not isinstance(value, dict):
            raise PersistError(f"{where}: {path}: expected a mapping, got {_show(value)}")
        return {k: _load_value(item, v, version, where, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, list):
            raise PersistError(f"{where}: {path}: expected a list, got {_show(value)}")
        return [_load_value(item, v, version, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _load_value(inner, value, version, where, path)
    if dataclasses.is_dataclass(kind):
        return _load_struct(kind, value, version, where, f"{path}.")
    if kind is Any:
        return value
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise PersistError(f"{where}: {path}: expected {_NAMES.get(kind, kind.__name__)}, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    return f"{value!r:.60}"
