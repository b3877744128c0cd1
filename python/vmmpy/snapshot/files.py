"""The three checkpoint files: write them atomically, read and verify them before anything is built.

A checkpoint at ``PATH`` is bhyve's three files (docs/checkpoint-format.md has every byte):

- ``PATH``       guest memory: lowmem at offset 0, highmem right after it, sparse (holes are zero);
- ``PATH.kern``  the state sections, one ``vmmpy.state`` container;
- ``PATH.meta``  JSON: bhyve's keys ("basic metadata", "kern_structs", "devices") plus a format
                 magic and version, byte order, the memory layout, per-section offsets, versions and
                 checksums, the .kern checksum, the memory file's chunk hashes, and a checksum of
                 the metadata itself.

This module knows nothing of VMs: it takes a GuestMemory, a list of Sections and the basic
metadata, and gives back the same. Orchestration (pausing vCPUs, asking devices for state,
restoring time) belongs to the caller.

Writing never leaves a plausible-but-incomplete checkpoint: each file is written under a
temporary name in the same directory and fsync'ed; then any old ``PATH.meta`` is removed, the
memory and .kern files are renamed into place, ``PATH.meta`` last, and the directory is fsync'ed.
A reader refuses a checkpoint without ``.meta``, and the .meta's checksums tie it to exactly the
.kern and memory file written with it, so a crash at any point leaves either the old checkpoint,
a checkpoint that is refused, or the new one. On failure the temporary files are removed.

Reading checks everything before a byte of guest memory exists (:func:`read_checkpoint`): every
failure is a :class:`CheckpointError` naming the file, the section and the value expected.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import _core
from ..memory import HIGHMEM_BASE, PAGE_SIZE, GuestMemory
from ..state import Section, SectionError, SectionRegistry, decode_sections, encode_sections
from ..state.section import _HEAD, _NAME_LEN, _SECTION

FORMAT_MAGIC = "vmmpy-checkpoint"
FORMAT_VERSION = 1
BYTE_ORDER = "little"
DEFAULT_CHUNK_SIZE: int = _core.DEFAULT_CHUNK_SIZE
#: bhyve's VM_MEM_F_WIRED, the "memflags" bit of a wired guest.
MEMFLAG_WIRED = 0x02
#: bhyve's kernel structs (snapshot_kern_structs[]): these sections go under "kern_structs" in the
#: metadata, every other section under "devices". A vCPU section "vmcx.0" counts as "vmcx".
KERN_STRUCTS = ("vhpet", "vm", "vioapic", "vlapic", "vmcx", "vatpit", "vatpic", "vpmtmr", "vrtc")
META_SUFFIX = ".meta"
KERN_SUFFIX = ".kern"


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message names the file and what is wrong."""


def _writer() -> str:
    from .. import __version__

    return f"vmmpy {__version__}"


def _hex64(value: int) -> str:
    return f"{value:016x}"


def _hex128(value: int) -> str:
    return f"{value:032x}"


def _meta_checksum(meta: Mapping[str, Any]) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_checksum"}
    return _hex64(_core.xxh3_64(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()))


def _family(name: str) -> str:
    return name.split("@", 1)[0].split(".", 1)[0]


def _section_table(kern: bytes) -> list[dict[str, Any]]:
    """Where each section's record lies in an encoded container, as the metadata lists it."""
    _, _, count = _HEAD.unpack_from(kern, 0)
    offset = _HEAD.size
    table = []
    for _ in range(count):
        start = offset
        (name_len,) = _NAME_LEN.unpack_from(kern, offset)
        offset += _NAME_LEN.size
        name = kern[offset : offset + name_len].decode()
        offset += name_len
        version, length, checksum = _SECTION.unpack_from(kern, offset)
        offset += _SECTION.size + length
        table.append({"name": name, "version": version, "offset": start, "size": offset - start, "checksum": _hex64(checksum)})
    return table


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _basic_metadata(memory: GuestMemory, basic: Mapping[str, Any]) -> dict[str, Any]:
    ncpus, vmname = basic.get("ncpus"), basic.get("vmname")
    if not isinstance(ncpus, int) or isinstance(ncpus, bool) or ncpus < 1:
        raise CheckpointError(f"basic metadata: ncpus must be a positive integer, got {ncpus!r}")
    if not isinstance(vmname, str) or not vmname:
        raise CheckpointError(f"basic metadata: vmname must be a non-empty string, got {vmname!r}")
    if "memsize" in basic and basic["memsize"] != memory.memsize:
        raise CheckpointError(f"basic metadata: memsize {basic['memsize']} does not match the guest memory's {memory.memsize}")
    out = dict(basic)
    out.update(ncpus=ncpus, vmname=vmname, memsize=memory.memsize, memflags=MEMFLAG_WIRED if memory.wired else 0)
    return out


def write_checkpoint(
    path: str | os.PathLike,
    memory: GuestMemory,
    sections: Iterable[Section],
    basic: Mapping[str, Any],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    kern_structs: Collection[str] = KERN_STRUCTS,
    direct_io: bool = True,
) -> dict[str, Any]:
    """Write the checkpoint ``path``, ``path.kern`` and ``path.meta`` atomically.

    ``basic`` is bhyve's basic metadata: ``ncpus`` and ``vmname`` (required) and any further
    JSON keys; ``memsize`` and ``memflags`` are taken from ``memory``. The guest must be stopped.
    The memory file is written with O_DIRECT when ``direct_io`` and the filesystem allows it:
    every write is whole pages from page-aligned guest memory, and skipping the page cache
    measured 2 GB/s against 0.3-0.6 GB/s buffered here (tools/bench_checkpoint.py), since
    buffered writes must first allocate a page-cache page for every guest page.
    Returns statistics: the memory write's (bytes_written, data_pages, zero_pages,
    untouched_pages, pwrite_calls, file_size, seconds) plus kern_bytes, memory_fsync_seconds and
    total_seconds.
    """
    started = time.perf_counter()
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    sections = list(sections)
    basic_meta = _basic_metadata(memory, basic)
    try:
        kern = encode_sections(sections)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{path}{KERN_SUFFIX}': cannot encode the state sections: {err}") from None
    table = _section_table(kern)
    lowmem = memory.lowmem.size
    highmem = memory.highmem.size if memory.highmem is not None else 0

    tag = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    final = {"memory": path, "kern": path + KERN_SUFFIX, "meta": path + META_SUFFIX}
    temp = {key: os.path.join(directory, "." + os.path.basename(name) + tag) for key, name in final.items()}
    created: list[str] = []
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(temp["memory"], flags | (os.O_DIRECT if direct_io else 0), 0o600)
        except OSError as err:
            if not direct_io or err.errno != errno.EINVAL:
                raise
            fd = os.open(temp["memory"], flags, 0o600)  # this filesystem has no O_DIRECT
            direct_io = False
        created.append(temp["memory"])
        try:
            stats = _core.write_memory_file(memory.core, fd, chunk_size=chunk_size)
            stats["direct_io"] = direct_io
            fsync_started = time.perf_counter()
            os.fsync(fd)
            stats["memory_fsync_seconds"] = time.perf_counter() - fsync_started
        finally:
            os.close(fd)
        created.append(temp["kern"])
        _write_file(temp["kern"], kern)

        def listing(kern_struct: bool) -> list[dict[str, Any]]:
            return [
                {"device": e["name"], "size": e["size"], "file_offset": e["offset"]}
                for e in table
                if (e["name"] in kern_structs or _family(e["name"]) in kern_structs) == kern_struct
            ]

        meta: dict[str, Any] = {
            "format": FORMAT_MAGIC,
            "format_version": FORMAT_VERSION,
            "byte_order": BYTE_ORDER,
            "writer": _writer(),
            "basic metadata": basic_meta,
            "kern_structs": listing(True),
            "devices": listing(False),
            "sections": table,
            "kern": {"size": len(kern), "checksum": _hex64(_core.xxh3_64(kern))},
            "memory": {
                "lowmem": lowmem,
                "highmem": highmem,
                "lowmem_limit": memory.lowmem_limit,
                "highmem_base": HIGHMEM_BASE,
                "page_size": PAGE_SIZE,
                "file_size": stats["file_size"],
                "chunk_size": chunk_size,
                "chunk_hash": "xxh3-128",
                "chunk_hashes": [_hex128(h) for h in stats.pop("chunk_hashes")],
            },
        }
        meta["meta_checksum"] = _meta_checksum(meta)
        created.append(temp["meta"])
        _write_file(temp["meta"], (json.dumps(meta, indent=1) + "\n").encode())

        # Commit: no .meta means "no checkpoint", so remove the old one before replacing the
        # files it vouches for, and put the new one in place last.
        try:
            os.unlink(final["meta"])
        except FileNotFoundError:
            pass
        for key in ("memory", "kern", "meta"):
            os.rename(temp[key], final[key])
            created.remove(temp[key])
        _fsync_dir(directory)
    except BaseException as err:
        for name in created:
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
        if isinstance(err, OSError):
            raise CheckpointError(f"checkpoint '{path}': writing failed, nothing was left behind: {err}") from err
        raise
    stats["kern_bytes"] = len(kern)
    stats["total_seconds"] = time.perf_counter() - started
    return stats


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint that :func:`read_checkpoint` has verified, except the memory file's bytes
    (checked against the chunk hashes by an eager restore, by a lazy restore chunk by chunk as
    they are first needed, or all at once by :func:`verify_memory`)."""

    path: str
    meta: dict[str, Any]
    sections: list[Section]
    basic: dict[str, Any]
    memsize: int
    lowmem: int
    highmem: int
    lowmem_limit: int
    wired: bool
    chunk_size: int
    chunk_hashes: list[int] = field(repr=False)
    #: (st_dev, st_ino, st_size, st_mtime_ns) of the memory file when it was read: a restore
    #: refuses a file that changed since.
    memory_file_identity: tuple[int, int, int, int] = field(repr=False)

    @property
    def kern_path(self) -> str:
        return self.path + KERN_SUFFIX

    @property
    def meta_path(self) -> str:
        return self.path + META_SUFFIX

    def gpa_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """The guest-physical ranges that memory-file bytes ``start..end`` hold."""
        out = []
        for seg_start, seg_size, gpa in ((0, self.lowmem, 0), (self.lowmem, self.highmem, HIGHMEM_BASE)):
            a, b = max(start, seg_start), min(end, seg_start + seg_size)
            if a < b:
                out.append((gpa + a - seg_start, gpa + b - seg_start))
        return out


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _require(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise CheckpointError(f"checkpoint '{where}': {message}")


def _int_field(obj: Mapping[str, Any], key: str, where: str, context: str) -> int:
    value = obj.get(key)
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, where, f"{context} '{key}' must be a non-negative integer, got {value!r}")
    return value


def _read_meta(meta_path: str) -> dict[str, Any]:
    try:
        with open(meta_path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{meta_path}': missing; without its metadata a checkpoint is incomplete") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint '{meta_path}': cannot be read: {err}") from None
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"checkpoint '{meta_path}': not valid JSON ({err}); the file is damaged or truncated") from None
    _require(isinstance(meta, dict), meta_path, f"metadata is a {type(meta).__name__}, expected a JSON object")
    fmt = meta.get("format")
    _require(fmt == FORMAT_MAGIC, meta_path, f"format is {fmt!r}, expected {FORMAT_MAGIC!r}: not a vmmpy checkpoint")
    version = meta.get("format_version")
    _require(version == FORMAT_VERSION, meta_path, f"format version {version!r} is not one this vmmpy reads ({FORMAT_VERSION})")
    order = meta.get("byte_order")
    _require(order == BYTE_ORDER, meta_path, f"byte order {order!r} is not one this vmmpy reads ({BYTE_ORDER!r})")
    stored = meta.get("meta_checksum")
    computed = _meta_checksum(meta)
    _require(stored == computed, meta_path, f"metadata checksum mismatch (stored {stored!r}, computed {computed!r}); the file was changed or damaged")
    return meta


def _check_layout(meta: dict[str, Any], meta_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    basic = meta.get("basic metadata")
    _require(isinstance(basic, dict), meta_path, "'basic metadata' is missing or not an object")
    for key in ("ncpus", "memsize", "memflags"):
        _int_field(basic, key, meta_path, "basic metadata")
    _require(basic["ncpus"] >= 1, meta_path, f"basic metadata 'ncpus' must be at least 1, got {basic['ncpus']}")
    _require(isinstance(basic.get("vmname"), str) and basic["vmname"], meta_path, f"basic metadata 'vmname' must be a non-empty string, got {basic.get('vmname')!r}")
    mem = meta.get("memory")
    _require(isinstance(mem, dict), meta_path, "'memory' is missing or not an object")
    for key in ("lowmem", "highmem", "lowmem_limit", "highmem_base", "page_size", "file_size", "chunk_size"):
        _int_field(mem, key, meta_path, "memory")
    _require(mem["page_size"] == PAGE_SIZE, meta_path, f"page size {mem['page_size']} is not this vmmpy's {PAGE_SIZE}")
    _require(mem["highmem_base"] == HIGHMEM_BASE, meta_path, f"highmem base {mem['highmem_base']:#x} is not this vmmpy's {HIGHMEM_BASE:#x}")
    memsize, low, high, limit = basic["memsize"], mem["lowmem"], mem["highmem"], mem["lowmem_limit"]
    _require(memsize > 0 and memsize % PAGE_SIZE == 0, meta_path, f"memsize {memsize} is not a positive multiple of {PAGE_SIZE}")
    _require(0 < limit <= HIGHMEM_BASE and limit % PAGE_SIZE == 0, meta_path, f"lowmem limit {limit:#x} must be a positive multiple of {PAGE_SIZE} up to {HIGHMEM_BASE:#x}")
    _require(low == min(memsize, limit) and low + high == memsize, meta_path, f"memory layout lowmem {low} + highmem {high} does not fit memsize {memsize} with lowmem limit {limit}")
    _require(mem["file_size"] == memsize, meta_path, f"memory file size {mem['file_size']} is not memsize {memsize}")
    chunk = mem["chunk_size"]
    _require(chunk > 0 and chunk % PAGE_SIZE == 0, meta_path, f"chunk size {chunk} is not a positive multiple of {PAGE_SIZE}")
    _require(mem.get("chunk_hash") == "xxh3-128", meta_path, f"chunk hash {mem.get('chunk_hash')!r} is not one this vmmpy reads ('xxh3-128')")
    hashes = mem.get("chunk_hashes")
    expected = -(-memsize // chunk)
    _require(isinstance(hashes, list) and len(hashes) == expected, meta_path, f"{len(hashes) if isinstance(hashes, list) else hashes!r} chunk hashes, expected {expected} ({memsize} bytes in chunks of {chunk})")
    return basic, mem


def _check_kern(meta: dict[str, Any], kern_path: str, meta_path: str, registry: SectionRegistry) -> list[Section]:
    kern_meta = meta.get("kern")
    _require(isinstance(kern_meta, dict), meta_path, "'kern' is missing or not an object")
    size = _int_field(kern_meta, "size", meta_path, "kern")
    try:
        with open(kern_path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{kern_path}': missing (the state file of this checkpoint)") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint '{kern_path}': cannot be read: {err}") from None
    _require(len(data) == size, kern_path, f"file is {len(data)} bytes, metadata says {size}")
    checksum = _hex64(_core.xxh3_64(data))
    _require(
        checksum == kern_meta.get("checksum"),
        kern_path,
        f"checksum {checksum} does not match the metadata's {kern_meta.get('checksum')!r}: damaged, or from another checkpoint",
    )
    what = f"checkpoint '{kern_path}'"
    try:
        sections = decode_sections(data, what=what)
        for section in sections:
            registry.check(section.name, section.version, what=what)
    except SectionError as err:
        raise CheckpointError(str(err)) from None
    listed = meta.get("sections")
    _require(isinstance(listed, list), meta_path, "'sections' is missing or not a list")
    try:
        table = _section_table(data)
    except (ValueError, IndexError, UnicodeDecodeError) as err:  # decode_sections passed, so only a bug lands here
        raise CheckpointError(f"{what}: section table unreadable: {err}") from None
    _require(listed == table, meta_path, f"section list does not match '{kern_path}' ({[e.get('name') for e in listed if isinstance(e, dict)]} vs {[e['name'] for e in table]})")
    by_name = {e["name"]: e for e in table}
    for key in ("kern_structs", "devices"):
        entries = meta.get(key)
        _require(isinstance(entries, list), meta_path, f"'{key}' is missing or not a list")
        for entry in entries:
            name = entry.get("device") if isinstance(entry, dict) else None
            sec = by_name.get(name)
            _require(
                sec is not None and entry.get("size") == sec["size"] and entry.get("file_offset") == sec["offset"],
                meta_path,
                f"'{key}' entry {entry!r} does not match a section of '{kern_path}'",
            )
    return sections


def read_checkpoint(path: str | os.PathLike, registry: SectionRegistry) -> Checkpoint:
    """Read and verify the checkpoint ``path`` (and ``path.kern``, ``path.meta``).

    Checks, in order, before anything is created: the metadata parses, has this format's magic,
    version and byte order and its own checksum matches; the memory layout is sane; the .kern
    file has the recorded size and checksum, every section decodes with its checksum and this
    vmmpy reads its name and version (``registry``); the section lists match the .kern file; the
    memory file exists, is a regular file, and its size is lowmem + highmem. The memory file's
    bytes are checked against the chunk hashes when they are restored (eagerly: all before
    returning; lazily: each chunk before it can be used), or by :func:`verify_memory`. Any failure
    raises :class:`CheckpointError` naming the file.
    """
    path = os.fspath(path)
    meta_path, kern_path = path + META_SUFFIX, path + KERN_SUFFIX
    meta = _read_meta(meta_path)
    basic, mem = _check_layout(meta, meta_path)
    sections = _check_kern(meta, kern_path, meta_path, registry)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}': missing (the memory file of this checkpoint)") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint '{path}': cannot be read: {err}") from None
    _require(os.path.isfile(path), path, "the memory file is not a regular file")
    _require(st.st_size == basic["memsize"], path, f"memory file is {st.st_size} bytes, metadata says {basic['memsize']}")
    try:
        hashes = [int(h, 16) for h in mem["chunk_hashes"]]
    except (TypeError, ValueError):
        raise CheckpointError(f"checkpoint '{meta_path}': chunk hashes must be hex strings") from None
    return Checkpoint(
        path=path,
        meta=meta,
        sections=sections,
        basic=dict(basic),
        memsize=basic["memsize"],
        lowmem=mem["lowmem"],
        highmem=mem["highmem"],
        lowmem_limit=mem["lowmem_limit"],
        wired=bool(basic["memflags"] & MEMFLAG_WIRED),
        chunk_size=mem["chunk_size"],
        chunk_hashes=hashes,
        memory_file_identity=_identity(st),
    )


def _open_memory_file(checkpoint: Checkpoint) -> int:
    try:
        fd = os.open(checkpoint.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise CheckpointError(f"checkpoint '{checkpoint.path}': cannot open the memory file: {err}") from None
    if _identity(os.fstat(fd)) != checkpoint.memory_file_identity:
        os.close(fd)
        raise CheckpointError(f"checkpoint '{checkpoint.path}': the memory file changed after the checkpoint was read; read it again")
    return fd


def restore_memory(
    checkpoint: Checkpoint,
    mode: str = "eager",
    *,
    dirty_tracking: str = "auto",
    wired: bool | None = None,
) -> GuestMemory:
    """Guest memory holding the checkpoint's memory image.

    ``mode="eager"`` creates fresh memory, reads only the file's data (holes cost nothing), and
    compares every chunk's hash before returning: on a mismatch the memory is released and
    :class:`CheckpointError` names the chunk and its guest-physical range. ``mode="lazy"`` reads
    nothing now (constant time whatever the guest's size): each chunk is read from the file and
    compared with its hash the first time anything needs a byte of it, and cannot be seen before
    (``GuestMemory.restore_lazy``). A chunk that fails raises ``vmmpy.LazyMemoryError`` on every
    access, naming this checkpoint, the chunk and its guest-physical range. The memory keeps the
    file open and never writes it; a file changed or truncated later fails the chunks not loaded
    yet, never the process. ``wired`` defaults to the checkpoint's memflags; wired memory cannot
    be restored lazily.
    """
    wired = checkpoint.wired if wired is None else wired
    if mode == "lazy":
        if wired:
            raise CheckpointError(
                f"checkpoint '{checkpoint.path}': a wired guest cannot be restored lazily (wiring would read and copy all "
                f"{checkpoint.memsize} bytes up front); restore it with mode='eager', or pass wired=False"
            )
        fd = _open_memory_file(checkpoint)
        try:
            core = _core.GuestMemory.from_file(
                fd,
                checkpoint.memsize,
                chunk_hashes=checkpoint.chunk_hashes,
                chunk_size=checkpoint.chunk_size,
                name=f"checkpoint '{checkpoint.path}'",
                wired=False,
                lowmem_limit=checkpoint.lowmem_limit,
                dirty_tracking=dirty_tracking,
            )
        except (OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint '{checkpoint.path}': lazy restore failed: {err}") from None
        finally:
            os.close(fd)
        return GuestMemory.wrap(core)
    if mode != "eager":
        raise ValueError(f"mode must be 'eager' or 'lazy', not {mode!r}")
    fd = _open_memory_file(checkpoint)
    try:
        memory = GuestMemory(checkpoint.memsize, wired=wired, lowmem_limit=checkpoint.lowmem_limit, dirty_tracking=dirty_tracking)
        try:
            _core.read_memory_file(memory.core, fd, chunk_hashes=checkpoint.chunk_hashes, chunk_size=checkpoint.chunk_size)
        except BaseException as err:
            memory.close()
            if isinstance(err, OSError):
                raise CheckpointError(f"checkpoint '{checkpoint.path}': {err.strerror or err}") from None
            raise
    finally:
        os.close(fd)
    return memory


def verify_memory(checkpoint: Checkpoint) -> None:
    """Check the memory file's bytes against the chunk hashes in the metadata, reading only its
    data extents (at disk or page-cache speed). Raises :class:`CheckpointError` naming the first
    bad chunk and its guest-physical range. A lazy restore checks each chunk as it is loaded; call
    this first to refuse a damaged file before the guest starts rather than when it gets there."""
    fd = _open_memory_file(checkpoint)
    try:
        hashes, _ = _core.hash_memory_file(fd, chunk_size=checkpoint.chunk_size)
    except OSError as err:
        raise CheckpointError(f"checkpoint '{checkpoint.path}': {err.strerror or err}") from None
    finally:
        os.close(fd)
    bad = [i for i, (got, want) in enumerate(zip(hashes, checkpoint.chunk_hashes)) if got != want]
    if len(hashes) != len(checkpoint.chunk_hashes):
        bad = bad or [min(len(hashes), len(checkpoint.chunk_hashes))]
    if bad:
        index = bad[0]
        start = index * checkpoint.chunk_size
        end = min(start + checkpoint.chunk_size, checkpoint.memsize)
        gpas = " and ".join(f"{a:#x}..{b:#x}" for a, b in checkpoint.gpa_ranges(start, end))
        more = f" ({len(bad)} chunks differ in all)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"checkpoint '{checkpoint.path}': memory chunk {index} (file bytes {start:#x}..{end:#x}, guest-physical {gpas}) "
            f"does not match its recorded hash{more}"
        )
