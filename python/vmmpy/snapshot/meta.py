"""``PATH.meta``, the checkpoint's metadata: its fields and their ranges, its checksum, its MAC.

docs/checkpoint-format.md describes every field. This module owns the document as JSON: it
seals a metadata object into the file's bytes (checksum, and MAC when a key is given) and opens
the bytes again, checking in this order and refusing with :class:`CheckpointError` naming the
file and the field:

1. size (at most :data:`MAX_META_BYTES`) and nesting (at most :data:`MAX_META_DEPTH`) before
   parsing, then strict JSON (UTF-8, no NaN, no repeated key);
2. a JSON object with this format's magic, a version this vmmpy reads and the byte order;
3. ``meta_checksum``, so accidental damage is reported as damage;
4. the key: format versions 2 and 4 are keyed and open only with the key they were written
   with (``meta_mac`` must match); versions 1 and 3 are unkeyed and are refused when a key is
   given, because they cannot be authenticated (3 and 4 are diff checkpoints: ``parent``);
5. every field's type and range (:func:`fields`), with no key this format does not define
   (only ``basic metadata`` takes any further keys a writer adds).

Cross-field checks (the layout adds up, the lists match ``PATH.kern``) belong to ``files``.

The checksum is XXH3-64: it finds accidental damage, and anyone can recompute it after changing
a field. The MAC is HMAC-SHA256 under the checkpoint key: without the key, no change to the
metadata verifies; a keyed checkpoint's metadata also holds SHA-256 digests of ``PATH.kern``
and of every memory chunk (``keyed``), so the MAC covers all three files.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from .. import _core
from ..boundedjson import BoundedJsonError, parse
from ..memory import HIGHMEM_BASE, PAGE_SIZE
from ..state.section import MAX_SECTIONS
from .errors import CheckpointError
from .schema import FieldError, Spec, array, describe, hexdigits, integer, record, shown, string

FORMAT_MAGIC = "vmmpy-checkpoint"
#: The unkeyed format, as every vmmpy has written it.
FORMAT_VERSION = 1
#: The keyed format: version 1's fields plus ``meta_mac``, ``kern.sha256`` and
#: ``memory.chunk_sha256``. A reader that knows only version 1 refuses it rather than ignore the MAC.
KEYED_FORMAT_VERSION = 2
#: A diff checkpoint: version 1's (3) or version 2's (4) fields plus ``parent``; its memory file
#: holds only the pages ``parent.pages`` lists, the rest comes from the parent. A reader that
#: knows only versions 1 and 2 refuses it rather than restore a guest from holes.
DIFF_FORMAT_VERSION = 3
KEYED_DIFF_FORMAT_VERSION = 4
FORMAT_VERSIONS = (FORMAT_VERSION, KEYED_FORMAT_VERSION, DIFF_FORMAT_VERSION, KEYED_DIFF_FORMAT_VERSION)
KEYED_VERSIONS = (KEYED_FORMAT_VERSION, KEYED_DIFF_FORMAT_VERSION)
DIFF_VERSIONS = (DIFF_FORMAT_VERSION, KEYED_DIFF_FORMAT_VERSION)
#: A chain of diffs is at most this long (a restore reads every file of it).
MAX_CHAIN = 256
BYTE_ORDER = "little"

#: Bounds checked before parsing. 64 MiB holds the chunk hashes of a 4 TiB guest in 4 MiB chunks
#: (the writer refuses a larger document and says to raise the chunk size); the deepest field
#: (``basic metadata.devices_config.slots``) nests 4 levels.
MAX_META_BYTES = 64 << 20
MAX_META_DEPTH = 16
#: Field ranges: generous for any guest this vmmpy runs, small enough that no arithmetic on them
#: or allocation from them can run away.
MAX_MEMSIZE = 1 << 46
MAX_KERN_BYTES = 1 << 30
MAX_NCPUS = 1024
MAX_LISTED_SECTIONS = MAX_SECTIONS  # a .kern holds at most this many (state/section.py)
MAX_CHUNK_SIZE = 1 << 40
#: A checkpoint key, like a migration key, is at least this long.
MIN_KEY_BYTES = 16
#: The MAC's domain: a MAC made under the same key for anything else (a migration handshake)
#: never verifies as a checkpoint's.
_MAC_LABEL = b"vmmpy checkpoint metadata\x00"

_CHECKSUM, _MAC = "meta_checksum", "meta_mac"


def _fields(version: int) -> Spec:
    keyed = version in KEYED_VERSIONS
    page = integer(0, MAX_MEMSIZE // PAGE_SIZE)
    parent = {"parent": record({
        "path": string(max_len=4096),
        "meta_sha256": hexdigits(64),
        "pages": array(array(page, min_len=2, max_len=2), max_len=MAX_META_BYTES // 8),
    })} if version in DIFF_VERSIONS else {}
    offset = integer(0, MAX_KERN_BYTES)
    listing = array(
        record({"device": string(), "size": offset, "file_offset": offset}), max_len=MAX_LISTED_SECTIONS
    )
    sha256 = {"sha256": hexdigits(64)} if keyed else {}
    chunk_sha256 = {"chunk_sha256": array(hexdigits(64), max_len=MAX_META_BYTES // 64)} if keyed else {}
    mac = {_MAC: hexdigits(64)} if keyed else {}
    page_multiple = integer(0, MAX_MEMSIZE, multiple_of=PAGE_SIZE)
    count = integer(0, MAX_MEMSIZE)
    live = {"live": record({
        "pause_us": count,
        "copied_before_write_pages": page,
        "peak_held_pages": page,
        "throttled_writes": count,
        "throttled_us": count,
        "bytes_written": integer(0, MAX_MEMSIZE),
        "write_us": count,
    })}
    return record({
        "format": string(choices=(FORMAT_MAGIC,)),
        "format_version": integer(version, version),
        "byte_order": string(choices=(BYTE_ORDER,)),
        "writer": string(max_len=200),
        "basic metadata": record(
            {
                "ncpus": integer(1, MAX_NCPUS),
                "vmname": string(),
                "memsize": integer(PAGE_SIZE, MAX_MEMSIZE, multiple_of=PAGE_SIZE),
                "memflags": integer(0, (1 << 31) - 1),
            },
            open=True,
        ),
        "kern_structs": listing,
        "devices": listing,
        "sections": array(
            record({
                "name": string(),
                "version": integer(1, (1 << 32) - 1),
                "offset": offset,
                "size": offset,
                "checksum": hexdigits(16),
            }),
            max_len=MAX_LISTED_SECTIONS,
        ),
        "kern": record({"size": integer(1, MAX_KERN_BYTES), "checksum": hexdigits(16), **sha256}),
        "memory": record({
            "lowmem": page_multiple,
            "highmem": page_multiple,
            "lowmem_limit": integer(PAGE_SIZE, HIGHMEM_BASE, multiple_of=PAGE_SIZE),
            "highmem_base": integer(0, MAX_MEMSIZE),
            "page_size": integer(1, 1 << 30),
            "file_size": integer(0, MAX_MEMSIZE),
            "chunk_size": integer(PAGE_SIZE, MAX_CHUNK_SIZE, multiple_of=PAGE_SIZE),
            "chunk_hash": string(choices=("xxh3-128",)),
            "chunk_hashes": array(hexdigits(32), max_len=MAX_META_BYTES // 32),
            **chunk_sha256,
        }),
        _CHECKSUM: hexdigits(16),
        **mac,
        **parent,
    }, live)


_FIELDS = {version: _fields(version) for version in FORMAT_VERSIONS}


def check_field(value: Any, spec: Spec, where: str, path: str) -> Any:
    """``spec(value, path)``, its FieldError made a CheckpointError naming the file ``where``."""
    try:
        return spec(value, path)
    except FieldError as err:
        raise CheckpointError(f"checkpoint '{where}': {err}") from None


def check_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        size = len(key) if isinstance(key, bytes) else type(key).__name__
        raise CheckpointError(f"a checkpoint key needs at least {MIN_KEY_BYTES} bytes, this has {size}")
    return key


def _canonical(meta: Mapping[str, Any], leave_out: tuple[str, ...]) -> bytes:
    body = {k: v for k, v in meta.items() if k not in leave_out}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def meta_checksum(meta: Mapping[str, Any]) -> str:
    """XXH3-64 of the canonical JSON of everything but the checksum itself (the MAC included)."""
    return f"{_core.xxh3_64(_canonical(meta, (_CHECKSUM,))):016x}"


def meta_mac(meta: Mapping[str, Any], key: bytes) -> str:
    """HMAC-SHA256 under ``key`` of the label and the canonical JSON of everything but the
    checksum and the MAC."""
    return hmac.new(key, _MAC_LABEL + _canonical(meta, (_CHECKSUM, _MAC)), hashlib.sha256).hexdigest()


def seal(meta: dict[str, Any], key: bytes | None, where: str) -> bytes:
    """The file's bytes for ``meta``: its format version set (keyed or not), its MAC when
    ``key`` is given, then its checksum; checked as a reader checks it, so nothing is written
    that a reader would refuse. ``meta`` is completed in place; ``where`` names the file."""
    diff = "parent" in meta
    if key is None:
        meta["format_version"] = DIFF_FORMAT_VERSION if diff else FORMAT_VERSION
    else:
        meta["format_version"] = KEYED_DIFF_FORMAT_VERSION if diff else KEYED_FORMAT_VERSION
    meta.pop(_MAC, None)
    meta.pop(_CHECKSUM, None)
    if key is not None:
        meta[_MAC] = meta_mac(meta, check_key(key))
    meta[_CHECKSUM] = meta_checksum(meta)
    data = (json.dumps(meta, indent=1) + "\n").encode()
    if len(data) > MAX_META_BYTES:
        raise CheckpointError(
            f"checkpoint '{where}': the metadata would be {len(data)} bytes, more than the {MAX_META_BYTES} a reader takes; "
            "use a larger chunk size (fewer chunk hashes)"
        )
    check_field(meta, _FIELDS[meta["format_version"]], where, "")
    return data


def open_meta(raw: bytes, where: str, key: bytes | None) -> dict[str, Any]:
    """Parse and check the metadata file's bytes (steps 1-5 of the module doc); ``where`` names
    the file in errors. ``key``: the checkpoint key, or None for an unkeyed checkpoint."""
    try:
        meta = parse(raw, max_bytes=MAX_META_BYTES, max_depth=MAX_META_DEPTH)
    except BoundedJsonError as err:
        raise CheckpointError(f"checkpoint '{where}': {err}; the file is damaged, truncated or not a checkpoint's metadata") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint '{where}': metadata is {describe(meta)}, expected a JSON object")
    fmt = meta.get("format")
    if fmt != FORMAT_MAGIC:
        raise CheckpointError(f"checkpoint '{where}': format is {shown(fmt)}, expected {FORMAT_MAGIC!r}: not a vmmpy checkpoint")
    version = meta.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in FORMAT_VERSIONS:
        readable = ", ".join(str(v) for v in FORMAT_VERSIONS)
        raise CheckpointError(f"checkpoint '{where}': format version {shown(version)} is not one this vmmpy reads ({readable})")
    order = meta.get("byte_order")
    if order != BYTE_ORDER:
        raise CheckpointError(f"checkpoint '{where}': byte order {shown(order)} is not one this vmmpy reads ({BYTE_ORDER!r})")
    stored = meta.get(_CHECKSUM)
    computed = meta_checksum(meta)
    if stored != computed:
        raise CheckpointError(
            f"checkpoint '{where}': metadata checksum mismatch (stored {shown(stored)}, computed {computed!r}); "
            "the file was damaged or changed"
        )
    _authenticate(meta, version, where, key)
    check_field(meta, _FIELDS[version], where, "")
    return meta


def _authenticate(meta: dict[str, Any], version: int, where: str, key: bytes | None) -> None:
    if version in KEYED_VERSIONS and key is None:
        raise CheckpointError(
            f"checkpoint '{where}': this checkpoint is keyed (its metadata carries an HMAC-SHA256): "
            "give the key it was written with (--key-file FILE) to restore it"
        )
    if version not in KEYED_VERSIONS:
        if key is not None:
            raise CheckpointError(
                f"checkpoint '{where}': this checkpoint has no MAC (format version {version}, written without a key), "
                "so the key cannot authenticate it; restore it without --key-file only if you trust where it came from"
            )
        return
    check_key(key)
    stored = check_field(meta.get(_MAC), hexdigits(64), where, _MAC)
    if not hmac.compare_digest(stored, meta_mac(meta, key)):
        raise CheckpointError(
            f"checkpoint '{where}': metadata MAC mismatch: the checkpoint was changed after it was written, "
            "or it was written with another key"
        )
