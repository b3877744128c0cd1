"""Sections and their container.

Payload encoding: canonical JSON (sorted keys, no spaces, UTF-8). ``bytes`` values are written
as ``{"$bytes": "<base64>"}`` and come back as ``bytes``. Integers of any size survive exactly.

Container (little-endian), used for ``FILE.kern`` and for the migration stream's state message::

    magic "VMMPYSEC" | u32 container version (1) | u32 section count
    per section:  u16 name length | name (UTF-8) | u32 section version
                  | u64 payload length | u64 checksum | payload

The checksum is xxh3-64 over the name, the version, the length and the payload, so a flipped
bit anywhere in a section is caught and the section is named.

Bounds, checked before writing and when reading: at most ``MAX_SECTIONS`` sections; a name is
1 to ``MAX_NAME`` bytes of printable UTF-8, unique in its container; a version is at least 1;
a payload is at most ``MAX_PAYLOAD`` bytes, a JSON object nested at most ``MAX_PAYLOAD_DEPTH``
deep (checked before parsing, so no nesting can exhaust the parser's stack), without NaN or a
repeated key, whose ``$bytes`` values are base64 strings.

Decoding checks everything and names the section at fault: a bad magic, a truncated section,
a checksum mismatch, a payload that is not the encoding above.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .. import _core
from ..boundedjson import BoundedJsonError, check_bounds, parse
from ..errors import VmmpyError

MAGIC = b"VMMPYSEC"
CONTAINER_VERSION = 1
_HEAD = struct.Struct("<8sII")
_NAME_LEN = struct.Struct("<H")
_SECTION = struct.Struct("<IQQ")
MAX_SECTIONS = 4096
MAX_NAME = 255
MAX_PAYLOAD = 64 << 20
#: Real payloads nest 5 levels at most (a vCPU's registers in a list in an object).
MAX_PAYLOAD_DEPTH = 64


class SectionError(VmmpyError, ValueError):
    """State that cannot be read: the message names the section (or container) and the problem."""


@dataclass(frozen=True)
class Section:
    name: str
    version: int
    payload: dict[str, Any]

    def encode(self) -> bytes:
        return encode_payload(self.payload)


def _encode_value(value: Any) -> Any:
    """What the JSON encoder writes for a value JSON has no type for (its ``default``)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}  # bytes(b) is b: no copy of bytes
    raise TypeError(f"state values must be JSON types or bytes, got {type(value).__name__}")


def _decode_object(value: dict[str, Any]) -> Any:
    """An object as the payload holds it: a ``$bytes`` object comes back as ``bytes``."""
    if len(value) == 1 and "$bytes" in value:
        encoded = value["$bytes"]
        if not isinstance(encoded, str):
            raise BoundedJsonError(f"a $bytes value must be a base64 string, not {type(encoded).__name__}")
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error as err:
            raise BoundedJsonError(f"a $bytes value is not base64 ({err})") from None
    return value


def encode_payload(payload: dict[str, Any]) -> bytes:
    """The canonical encoding (module doc), written by the C encoder in one pass: it calls back
    only for the values JSON has no type for (bytes). Keys must be strings: ``persist.dump``
    refuses others (this encoder would write an int key as a string)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=_encode_value, allow_nan=False).encode()


def decode_payload(name: str, data: bytes, *, what: str | None = None) -> dict[str, Any]:
    """A section's payload; ``what`` (the container's name) prefixes errors when given."""
    where = f"{what}: section '{name}'" if what else f"section '{name}'"
    try:
        value = parse(data, max_bytes=MAX_PAYLOAD, max_depth=MAX_PAYLOAD_DEPTH, object_hook=_decode_object)
    except BoundedJsonError as err:
        raise SectionError(f"{where}: payload is not valid state encoding ({err})") from None
    if not isinstance(value, dict):
        raise SectionError(f"{where}: payload is a {type(value).__name__}, not a mapping")
    return value


def _name_problem(raw: bytes) -> str | None:
    """Why ``raw`` cannot be a section name, or None."""
    if not 1 <= len(raw) <= MAX_NAME:
        return f"a name of {len(raw)} bytes (1 to {MAX_NAME} allowed)"
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"a name that is not UTF-8 ({raw[:40]!r})"
    if not name.isprintable():
        return f"a name with unprintable characters ({name[:40]!r})"
    return None


@dataclass(frozen=True)
class SectionRecord:
    """Where a section lies in its container: ``offset`` and ``size`` span its whole record,
    from the name-length field to the end of the payload."""

    name: str
    version: int
    offset: int
    size: int
    checksum: int


def encode_sections(sections: Iterable[Section]) -> bytes:
    """The container of ``sections``; ValueError (naming the section) for any a reader would refuse."""
    return encode_container(sections)[0]


def encode_container(sections: Iterable[Section]) -> tuple[bytes, list[SectionRecord]]:
    """The container of ``sections`` and where each section lies in it (the records
    ``read_container`` would find), so a writer that lists its sections (a checkpoint's metadata)
    never parses the bytes it just made. ValueError (naming the section) as ``encode_sections``."""
    sections = list(sections)
    if len(sections) > MAX_SECTIONS:
        raise ValueError(f"{len(sections)} sections is more than the {MAX_SECTIONS} a reader takes")
    parts = [_HEAD.pack(MAGIC, CONTAINER_VERSION, len(sections))]
    offset = _HEAD.size
    records: list[SectionRecord] = []
    seen: set[str] = set()
    for section in sections:
        name = section.name.encode()
        problem = _name_problem(name)
        if problem or section.name in seen:
            raise ValueError(f"section {section.name!r}: {problem or 'appears twice'}")
        seen.add(section.name)
        if not 1 <= section.version < 1 << 32:
            raise ValueError(f"section '{section.name}': version {section.version} is not 1 to {(1 << 32) - 1}")
        try:
            payload = section.encode()
        except (TypeError, ValueError) as err:  # a value JSON cannot hold, NaN
            raise type(err)(f"section '{section.name}': {err}") from None
        try:
            check_bounds(payload, max_bytes=MAX_PAYLOAD, max_depth=MAX_PAYLOAD_DEPTH)
        except BoundedJsonError as err:
            raise ValueError(f"section '{section.name}': payload {err}") from None
        checksum = _checksum(name, section.version, payload)
        record = _NAME_LEN.pack(len(name)) + name + _SECTION.pack(section.version, len(payload), checksum)
        parts += (record, payload)
        records.append(SectionRecord(section.name, section.version, offset, len(record) + len(payload), checksum))
        offset += len(record) + len(payload)
    return b"".join(parts), records


def _checksum(name: bytes, version: int, payload: bytes) -> int:
    return _core.xxh3_64(name + struct.pack("<IQ", version, len(payload)) + payload)


def section_checksum(section: Section) -> int:
    """The checksum the container stores for this section."""
    return _checksum(section.name.encode(), section.version, section.encode())


def read_container(data: bytes, *, what: str = "state") -> list[tuple[SectionRecord, Section]]:
    """Decode a container into its records and sections, checking every field (module doc);
    ``what`` names it in errors (a file name, "migration stream")."""
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
    out: list[tuple[SectionRecord, Section]] = []
    seen: set[str] = set()
    for index in range(count):
        start = offset
        if offset + _NAME_LEN.size > len(view):
            raise SectionError(f"{what}: truncated before section {index} of {count}")
        (name_len,) = _NAME_LEN.unpack_from(view, offset)
        offset += _NAME_LEN.size
        if offset + name_len + _SECTION.size > len(view):
            raise SectionError(f"{what}: truncated in the header of section {index} of {count}")
        raw_name = bytes(view[offset : offset + name_len])
        problem = _name_problem(raw_name)
        if problem:
            raise SectionError(f"{what}: section {index} of {count} has {problem}")
        name = raw_name.decode()
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
        if sec_version < 1:
            raise SectionError(f"{what}: section '{name}' has invalid version {sec_version}")
        seen.add(name)
        record = SectionRecord(name, sec_version, start, offset - start, checksum)
        out.append((record, Section(name, sec_version, decode_payload(name, payload, what=what))))
    if offset != len(view):
        raise SectionError(f"{what}: {len(view) - offset} unexpected bytes after the last section")
    return out


def decode_sections(data: bytes, *, what: str = "state") -> list[Section]:
    """Decode a container; ``what`` names it in errors (a file name, "migration stream")."""
    return [section for _, section in read_container(data, what=what)]


class SectionRegistry:
    """Which sections, at which versions, this vmmpy can read: for each, the version it writes
    (the newest it reads) and the oldest it still reads.

    Keys are section names or name families: a device section ``virtio-blk@pci.0.3.0`` is looked
    up by its emulation (``virtio-blk``) when there is no exact entry.
    """

    def __init__(self, versions: dict[str, int] | None = None) -> None:
        #: name -> the version this vmmpy writes (also what a migration's handshake compares)
        self.versions: dict[str, int] = dict(versions or {})
        #: name -> the oldest version still read (the written one when not registered)
        self.oldest: dict[str, int] = {}

    def register(self, name: str, version: int, oldest: int | None = None) -> None:
        self.versions[name] = version
        self.oldest[name] = version if oldest is None else oldest

    def _key(self, name: str) -> str | None:
        if name in self.versions:
            return name
        family = name.split("@", 1)[0]
        return family if family in self.versions else None

    def reader_version(self, name: str) -> int | None:
        key = self._key(name)
        return None if key is None else self.versions[key]

    def check(self, section_name: str, version: int, *, what: str = "state") -> None:
        key = self._key(section_name)
        if key is None:
            raise SectionError(f"{what}: section '{section_name}' is unknown to this vmmpy")
        newest = self.versions[key]
        oldest = self.oldest.get(key, newest)
        if version < 1:
            raise SectionError(f"{what}: section '{section_name}' has invalid version {version}")
        if version > newest:
            raise SectionError(
                f"{what}: section '{section_name}' version {version} is newer than this vmmpy reads (versions {oldest} to {newest})")
        if version < oldest:
            raise SectionError(
                f"{what}: section '{section_name}' version {version} is older than this vmmpy still reads (versions {oldest} to {newest})")
