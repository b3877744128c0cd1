"""Sections and their container.

Payload encoding: canonical JSON (sorted keys, no spaces, UTF-8). ``bytes`` values are written
as ``{"$bytes": "<base64>"}`` and come back as ``bytes``. Integers of any size survive exactly.

Container (little-endian), used for ``FILE.kern`` and for the migration stream's state message::

    magic "VMMPYSEC" | u32 container version (1) | u32 section count
    per section:  u16 name length | name (UTF-8) | u32 section version
                  | u64 payload length | u64 checksum | payload

The checksum is xxh3-64 over the name, the version, the length and the payload, so a flipped
bit anywhere in a section is caught and the section is named.

Decoding checks everything and names the section at fault: a bad magic, a truncated section,
a checksum mismatch, a payload that is not the encoding above.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .. import _core

MAGIC = b"VMMPYSEC"
CONTAINER_VERSION = 1
_HEAD = struct.Struct("<8sII")
_NAME_LEN = struct.Struct("<H")
_SECTION = struct.Struct("<IQQ")
MAX_SECTIONS = 4096
MAX_PAYLOAD = 64 << 20


class SectionError(ValueError):
    """State that cannot be read: the message names the section (or container) and the problem."""


@dataclass(frozen=True)
class Section:
    name: str
    version: int
    payload: dict[str, Any]

    def encode(self) -> bytes:
        return encode_payload(self.payload)


def _to_json(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"state keys must be strings, got {key!r}")
            out[key] = _to_json(item)
        return out
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state values must be JSON types or bytes, got {type(value).__name__}")


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and "$bytes" in value:
            return base64.b64decode(value["$bytes"], validate=True)
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


def encode_payload(payload: dict[str, Any]) -> bytes:
    return json.dumps(_to_json(payload), sort_keys=True, separators=(",", ":")).encode()


def decode_payload(name: str, data: bytes) -> dict[str, Any]:
    try:
        value = _from_json(json.loads(data))
    except (UnicodeDecodeError, ValueError) as err:
        raise SectionError(f"section '{name}': payload is not valid state encoding ({err})") from None
    if not isinstance(value, dict):
        raise SectionError(f"section '{name}': payload is a {type(value).__name__}, not a mapping")
    return value


def encode_sections(sections: Iterable[Section]) -> bytes:
    sections = list(sections)
    parts = [_HEAD.pack(MAGIC, CONTAINER_VERSION, len(sections))]
    for section in sections:
        name = section.name.encode()
        payload = section.encode()
        parts.append(_NAME_LEN.pack(len(name)) + name)
        parts.append(_SECTION.pack(section.version, len(payload), _checksum(name, section.version, payload)))
        parts.append(payload)
    return b"".join(parts)


def _checksum(name: bytes, version: int, payload: bytes) -> int:
    return _core.xxh3_64(name + struct.pack("<IQ", version, len(payload)) + payload)


def section_checksum(section: Section) -> int:
    """The checksum the container stores for this section."""
    return _checksum(section.name.encode(), section.version, section.encode())


def decode_sections(data: bytes, *, what: str = "state") -> list[Section]:
    """Decode a container; ``what`` names it in errors (a file name, "migration stream")."""
    view = memoryview(data)
    if len(view) < _HEAD.size:
        raise SectionError(f"{what}: {len(view)} bytes is too short for a state container")
    magic, version, count = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise SectionError(f"{what}: not a vmmpy state container (magic {magic!r}, expected {MAGIC!r})")
    if version != CONTAINER_VERSION:
        raise SectionError(f"{what}: state container version {version} is not one this vmmpy reads ({CONTAINER_VERSION})")
    if count > MAX_SECTIONS:
        raise SectionError(f"{what}: {count} sections is more than the {MAX_SECTIONS} allowed")
    offset = _HEAD.size
    sections: list[Section] = []
    seen: set[str] = set()
    for index in range(count):
        if offset + _NAME_LEN.size > len(view):
            raise SectionError(f"{what}: truncated before section {index} of {count}")
        (name_len,) = _NAME_LEN.unpack_from(view, offset)
        offset += _NAME_LEN.size
        if offset + name_len + _SECTION.size > len(view):
            raise SectionError(f"{what}: truncated in the header of section {index} of {count}")
        raw_name = bytes(view[offset : offset + name_len])
        name = raw_name.decode(errors="replace")
        offset += name_len
        sec_version, length, checksum = _SECTION.unpack_from(view, offset)
        offset += _SECTION.size
        if length > MAX_PAYLOAD:
            raise SectionError(f"{what}: section '{name}' claims {length} bytes, more than the {MAX_PAYLOAD} allowed")
        if offset + length > len(view):
            raise SectionError(f"{what}: section '{name}' is truncated ({len(view) - offset} of {length} bytes)")
        payload = bytes(view[offset : offset + length])
        offset += length
        actual = _checksum(raw_name, sec_version, payload)
        if actual != checksum:
            raise SectionError(f"{what}: section '{name}' checksum mismatch (stored {checksum:#018x}, computed {actual:#018x})")
        if name in seen:
            raise SectionError(f"{what}: section '{name}' appears twice")
        seen.add(name)
        sections.append(Section(name, sec_version, decode_payload(name, payload)))
    if offset != len(view):
        raise SectionError(f"{what}: {len(view) - offset} unexpected bytes after the last section")
    return sections


class SectionRegistry:
    """Which sections, at which versions, this vmmpy can read.

    Keys are section names or name families: a device section ``virtio-blk@pci.0.3.0`` is looked
    up by its emulation (``virtio-blk``) when there is no exact entry.
    """

    def __init__(self, versions: dict[str, int] | None = None) -> None:
        self.versions: dict[str, int] = dict(versions or {})

    def register(self, name: str, version: int) -> None:
        self.versions[name] = version

    def reader_version(self, name: str) -> int | None:
        if name in self.versions:
            return self.versions[name]
        family = name.split("@", 1)[0]
        return self.versions.get(family)

    def check(self, section_name: str, version: int, *, what: str = "state") -> None:
        supported = self.reader_version(section_name)
        if supported is None:
            raise SectionError(f"{what}: section '{section_name}' is unknown to this vmmpy")
        if version > supported:
            raise SectionError(f"{what}: section '{section_name}' version {version} is newer than this vmmpy reads ({supported})")
        if version < 1:
            raise SectionError(f"{what}: section '{section_name}' has invalid version {version}")
