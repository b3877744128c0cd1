"""The three checkpoint files: write them atomically, read and verify them before anything is built.

A checkpoint at ``PATH`` is bhyve's three files (docs/checkpoint-format.md has every byte):

- ``PATH``       guest memory: lowmem at offset 0, highmem right after it, sparse (holes are zero);
                 a diff checkpoint's holds only the pages written since its parent, packed, and its
                 ``.meta`` names the parent (``DiffParent``; a reader follows the chain);
- ``PATH.kern``  the state sections, one ``vmmpy.state`` container;
- ``PATH.meta``  JSON: bhyve's keys ("basic metadata", "kern_structs", "devices") plus a format
                 magic and version, byte order, the memory layout, per-section offsets, versions and
                 checksums, the .kern checksum, the memory file's chunk hashes, and a checksum of
                 the metadata itself (``meta`` owns this document). Written with a key, it also
                 holds SHA-256 digests of the .kern file and of each memory chunk, and an
                 HMAC-SHA256 over itself: restore then needs the same key (``digests``, ``meta``).

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
failure is a :class:`CheckpointError` naming the file, the section or field and the value
expected.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import _core
from .._lazy import lazy_module
from ..memory import HIGHMEM_BASE, PAGE_SIZE, GuestMemory, LazyMemoryError
from ..progress import ProgressCallback, ProgressMeter, metered
from ..state import Section, SectionError, SectionRecord, SectionRegistry, encode_container, read_container
from ..state.kernel import KERNEL_NAMES
from .digests import kern_sha256, memory_chunk_sha256
from .errors import CheckpointError
from .meta import (
    BYTE_ORDER,
    FORMAT_MAGIC,
    FORMAT_VERSION,
    MAX_CHAIN,
    MAX_KERN_BYTES,
    MAX_META_BYTES,
    check_key,
    open_meta,
    seal,
)

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # 100 ms to import; a restore that never uses it does not pay

DEFAULT_CHUNK_SIZE: int = _core.DEFAULT_CHUNK_SIZE
#: bhyve's VM_MEM_F_WIRED, the "memflags" bit of a wired guest.
MEMFLAG_WIRED = 0x02
META_SUFFIX = ".meta"
# What a restore does with the page cache it reads the memory file through (restore_memory).
RESTORE_PAGE_CACHE = ("auto", "keep")
KERN_SUFFIX = ".kern"


def _writer() -> str:
    from .. import __version__

    return f"vmmpy {__version__}"


def _hex64(value: int) -> str:
    return f"{value:016x}"


def _hex128(value: int) -> str:
    return f"{value:032x}"


def _is_kern_struct(name: str) -> bool:
    """bhyve's kernel structs (snapshot_kern_structs[]) are ``state.kernel``'s sections: these go
    under "kern_structs" in the metadata, every other section under "devices"."""
    return name in KERNEL_NAMES


def _section_table(records: list[SectionRecord]) -> list[dict[str, Any]]:
    """The metadata's "sections": every record of the .kern file, in file order."""
    return [
        {"name": r.name, "version": r.version, "offset": r.offset, "size": r.size, "checksum": _hex64(r.checksum)}
        for r in records
    ]


def _listing(records: list[SectionRecord], kern_structs: bool) -> list[dict[str, Any]]:
    """bhyve's "kern_structs" (``kern_structs=True``) or "devices" list of the .kern records."""
    return [
        {"device": r.name, "size": r.size, "file_offset": r.offset}
        for r in records
        if _is_kern_struct(r.name) == kern_structs
    ]


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
    # A merge passes the chain's memflags on (its memory is restored unwired, for reading only).
    memflags = basic.get("memflags", MEMFLAG_WIRED if memory.wired else 0)
    out.update(ncpus=ncpus, vmname=vmname, memsize=memory.memsize, memflags=memflags)
    return out


def _written_chunk_sha256(path: str, memory: GuestMemory, size: int, chunk_size: int) -> list[str]:
    """SHA-256 of each chunk of the memory file just written from ``memory``: the file's extent
    map says where data lies, the stopped guest's memory (the same bytes) supplies it."""
    segments = _segment_views(memory)

    def feed(digest, start: int, end: int) -> None:
        for base, view in segments:
            a, b = max(start, base), min(end, base + len(view))
            if a < b:
                digest.update(view[a - base : b - base])

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return memory_chunk_sha256(fd, size, chunk_size, feed)
    finally:
        os.close(fd)
        for _, view in segments:
            view.release()  # a segment with exported views cannot be unmapped


@dataclass(frozen=True)
class LiveSource:
    """Where a live checkpoint's memory comes from: ``capture``, armed while the guest was paused
    for ``pause_seconds`` (recorded in the metadata); the guest has run on since."""

    capture: _core.LiveCapture
    pause_seconds: float


def _live_meta(stats: dict[str, Any], pause_seconds: float) -> dict[str, Any]:
    """The metadata's "live" record: how the guest paused and what copy-before-write did."""
    return {
        "pause_us": round(pause_seconds * 1e6),
        "copied_before_write_pages": stats["copied_pages"],
        "peak_held_pages": stats["peak_held_pages"],
        "throttled_writes": stats["throttled_writes"],
        "throttled_us": round(stats["throttled_seconds"] * 1e6),
        "bytes_written": stats["bytes_written"],
        "write_us": round(stats["seconds"] * 1e6),
    }


@dataclass(frozen=True)
class DiffParent:
    """What a diff checkpoint is written over: the parent checkpoint's path (absolute, or
    relative to the current directory), the SHA-256 of its ``.meta`` file as it was written or
    read, and the memory-file page indices (sorted) written since, which the diff carries."""

    path: str
    meta_sha256: str
    pages: np.ndarray = field(repr=False)


def page_runs(pages: np.ndarray) -> list[list[int]]:
    """Sorted page indices as ``[first, count]`` runs."""
    if len(pages) == 0:
        return []
    pages = np.asarray(pages, dtype=np.int64)
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return [[int(pages[a]), int(b - a)] for a, b in zip(starts, ends)]


def _segment_views(memory: GuestMemory) -> list[tuple[int, memoryview]]:
    """(file offset, bytes) of each memory segment, in file order. Release the views after use."""
    views = [(0, memoryview(memory.lowmem))]
    if memory.highmem is not None:
        views.append((memory.lowmem.size, memoryview(memory.highmem)))
    return views


#: One pread of a diff (applying it on restore) moves at most this many bytes.
_DIFF_IO_BYTES = 16 << 20


def _write_diff_memory(fd: int, memory: GuestMemory, runs: list[list[int]], chunk_size: int) -> dict[str, Any]:
    """Write the pages of ``runs`` back to back (packed) into the memory file ``fd``, straight
    from the stopped guest's page-aligned memory (so O_DIRECT works), hashed as they are written
    (``_core.write_packed_pages``: no read of the file)."""
    written = _core.write_packed_pages(memory.core, fd, [(first, count) for first, count in runs], chunk_size=chunk_size)
    pages = written.bytes_written // PAGE_SIZE
    return {
        "bytes_written": written.bytes_written, "data_pages": pages, "zero_pages": 0,
        "untouched_pages": memory.memsize // PAGE_SIZE - pages, "pwrite_calls": written.pwrite_calls,
        "file_size": written.bytes_written, "seconds": written.seconds, "chunk_hashes": written.chunk_hashes,
    }


def write_checkpoint(
    path: str | os.PathLike,
    memory: GuestMemory,
    sections: Iterable[Section],
    basic: Mapping[str, Any],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    direct_io: bool = True,
    key: bytes | None = None,
    meter: ProgressMeter | None = None,
    parent: DiffParent | None = None,
    live: LiveSource | None = None,
) -> dict[str, Any]:
    """Write the checkpoint ``path``, ``path.kern`` and ``path.meta`` atomically.

    With ``live`` the guest runs while the memory file is written: its memory is taken from the
    capture as it was when armed (``rust/memory/cow.rs``), and the metadata's ``live`` records the
    pause and what copy-before-write did. Its chunk hashes are those of the memory at the pause,
    and keyed SHA-256 digests are read back from the file. It cannot be a diff.

    With a ``parent`` it is a diff checkpoint (format version 3, keyed 4): its memory file holds
    only ``parent.pages`` (the rest are holes), and its metadata's ``parent`` names the parent
    (path relative to this checkpoint's directory), the parent's ``.meta`` SHA-256 and the pages.

    ``basic`` is bhyve's basic metadata: ``ncpus`` and ``vmname`` (required) and any further
    JSON keys; ``memsize`` and ``memflags`` are taken from ``memory``. The guest must be stopped.
    The memory file is written with O_DIRECT when ``direct_io`` and the filesystem allows it:
    every write is whole pages from page-aligned guest memory, and skipping the page cache
    measured 2 GB/s against 0.3-0.6 GB/s buffered here (tools/bench_checkpoint.py), since
    buffered writes must first allocate a page-cache page for every guest page.
    With a ``key`` (at least 16 bytes) the checkpoint is keyed: the metadata also records SHA-256
    of the .kern file and of every memory chunk (read back from the written file) and carries an
    HMAC-SHA256 under the key, and only a restore given the same key accepts it. A ``meter``
    (``vmmpy.progress``) advances as the memory file is written.
    Returns statistics: the memory write's (bytes_written, data_pages, zero_pages,
    untouched_pages, pwrite_calls, file_size, seconds) plus kern_bytes, memory_fsync_seconds,
    sha256_seconds (0 unkeyed) and total_seconds.
    """
    started = time.perf_counter()
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    sections = list(sections)
    basic_meta = _basic_metadata(memory, basic)
    if key is not None:
        check_key(key)
    if live is not None and parent is not None:
        raise CheckpointError(f"checkpoint '{path}': a live checkpoint cannot be a diff")
    try:
        kern, records = encode_container(sections)
    except (TypeError, ValueError) as err:  # SectionError is a ValueError
        raise CheckpointError(f"checkpoint '{path}{KERN_SUFFIX}': cannot encode the state sections: {err}") from None
    if len(kern) > MAX_KERN_BYTES:
        raise CheckpointError(f"checkpoint '{path}{KERN_SUFFIX}': the state sections take {len(kern)} bytes, more than the {MAX_KERN_BYTES} a reader takes")
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
            if live is not None:
                stats = _core.write_memory_file_live(live.capture, fd, chunk_size=chunk_size, meter=meter).as_dict()
                stats.update(live.capture.stats().as_dict())
            elif parent is None:
                stats = _core.write_memory_file(memory.core, fd, chunk_size=chunk_size, meter=meter).as_dict()
            else:
                runs = page_runs(parent.pages)
                stats = _write_diff_memory(fd, memory, runs, chunk_size)  # a few MiB: no meter
            stats["direct_io"] = direct_io
            fsync_started = time.perf_counter()
            os.fsync(fd)
            stats["memory_fsync_seconds"] = time.perf_counter() - fsync_started
        finally:
            os.close(fd)
        created.append(temp["kern"])
        _write_file(temp["kern"], kern)

        meta: dict[str, Any] = {
            "format": FORMAT_MAGIC,
            "format_version": FORMAT_VERSION,  # seal() makes it the keyed version when keyed
            "byte_order": BYTE_ORDER,
            "writer": _writer(),
            "basic metadata": basic_meta,
            "kern_structs": _listing(records, True),
            "devices": _listing(records, False),
            "sections": _section_table(records),
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
        if live is not None:
            meta["live"] = _live_meta(stats, live.pause_seconds)
        if parent is not None:
            meta["parent"] = {
                "path": os.path.relpath(os.path.abspath(parent.path), directory),
                "meta_sha256": parent.meta_sha256,
                "pages": runs,
            }
        stats["sha256_seconds"] = 0.0
        if key is not None:
            sha_started = time.perf_counter()
            meta["kern"]["sha256"] = kern_sha256(kern)
            if parent is None and live is None:
                meta["memory"]["chunk_sha256"] = _written_chunk_sha256(temp["memory"], memory, stats["file_size"], chunk_size)
            else:  # packed, or the guest ran on: hash the file as written
                fd = os.open(temp["memory"], os.O_RDONLY | os.O_CLOEXEC)
                try:
                    meta["memory"]["chunk_sha256"] = memory_chunk_sha256(fd, stats["file_size"], chunk_size)
                finally:
                    os.close(fd)
            stats["sha256_seconds"] = time.perf_counter() - sha_started
        created.append(temp["meta"])
        sealed = seal(meta, key, final["meta"])
        _write_file(temp["meta"], sealed)

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
    stats["meta_sha256"] = hashlib.sha256(sealed).hexdigest()
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
    #: A keyed checkpoint's SHA-256 of each memory chunk (hex), which the MAC vouches for;
    #: None for an unkeyed one.
    chunk_sha256: list[str] | None = field(default=None, repr=False)
    #: SHA-256 of the ``.meta`` file as read: what a diff written over this checkpoint records.
    meta_sha256: str = ""
    #: A diff checkpoint's parent (read and verified with it), else None.
    parent: Checkpoint | None = field(default=None, repr=False)
    #: A diff checkpoint's pages, ``[first, count]`` runs of page indices (lowmem then highmem),
    #: stored back to back in its memory file.
    diff_runs: list[list[int]] | None = field(default=None, repr=False)
    #: The memory file's size: memsize, or for a diff its pages' bytes.
    file_size: int = 0

    @property
    def keyed(self) -> bool:
        return self.chunk_sha256 is not None

    @property
    def chain(self) -> list[Checkpoint]:
        """The full checkpoint this one is built on, then each diff over it up to this one."""
        out: list[Checkpoint] = []
        node: Checkpoint | None = self
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    @property
    def kern_path(self) -> str:
        return self.path + KERN_SUFFIX

    @property
    def meta_path(self) -> str:
        return self.path + META_SUFFIX

    def gpa_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """The guest-physical ranges that memory-file bytes ``start..end`` hold (for a diff,
        through its packed pages)."""
        if self.diff_runs is None:
            return self.image_gpa_ranges(start, end)
        out, cursor = [], 0
        for first, count in self.diff_runs:
            a, b = max(start, cursor), min(end, cursor + count * PAGE_SIZE)
            if a < b:
                out += self.image_gpa_ranges(first * PAGE_SIZE + a - cursor, first * PAGE_SIZE + b - cursor)
            cursor += count * PAGE_SIZE
        return out

    def image_gpa_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """The guest-physical ranges of memory-image bytes ``start..end`` (lowmem, then highmem)."""
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


def _read_file(path: str, role: str, limit: int, expected_size: int | None = None) -> bytes:
    """The whole of a small checkpoint file, refused unread when it is not a regular file, is
    larger than ``limit`` or is not ``expected_size`` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block us
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}': missing ({role} of this checkpoint)") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint '{path}': cannot be read: {err.strerror or err}") from None
    try:
        st = os.fstat(fd)
        _require(stat.S_ISREG(st.st_mode), path, f"{role} is not a regular file")
        if expected_size is not None:
            _require(st.st_size == expected_size, path, f"file is {st.st_size} bytes, metadata says {expected_size}")
        _require(st.st_size <= limit, path, f"file is {st.st_size} bytes, more than the {limit} a checkpoint's {role} may be")
        parts, left = [], st.st_size
        while left > 0:
            part = os.read(fd, min(left, 1 << 24))
            if not part:
                break
            parts.append(part)
            left -= len(part)
        return b"".join(parts)
    except OSError as err:
        raise CheckpointError(f"checkpoint '{path}': cannot be read: {err.strerror or err}") from None
    finally:
        os.close(fd)


def _read_meta(meta_path: str, key: bytes | None) -> tuple[dict[str, Any], str]:
    raw = _read_file(meta_path, "the metadata", MAX_META_BYTES)
    return open_meta(raw, meta_path, key), hashlib.sha256(raw).hexdigest()


def _check_layout(meta: dict[str, Any], meta_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Relations between fields whose types and ranges ``open_meta`` checked already."""
    basic, mem = meta["basic metadata"], meta["memory"]
    _require(mem["page_size"] == PAGE_SIZE, meta_path, f"page size {mem['page_size']} is not this vmmpy's {PAGE_SIZE}")
    _require(mem["highmem_base"] == HIGHMEM_BASE, meta_path, f"highmem base {mem['highmem_base']:#x} is not this vmmpy's {HIGHMEM_BASE:#x}")
    memsize, low, high, limit = basic["memsize"], mem["lowmem"], mem["highmem"], mem["lowmem_limit"]
    _require(low == min(memsize, limit) and low + high == memsize, meta_path, f"memory layout lowmem {low} + highmem {high} does not fit memsize {memsize} with lowmem limit {limit}")
    if "parent" in meta:  # a diff's memory file holds just its pages, back to back
        size = sum(count for _, count in meta["parent"]["pages"]) * PAGE_SIZE
        _require(mem["file_size"] == size, meta_path, f"memory file size {mem['file_size']} is not the {size} bytes of the diff's pages")
    else:
        _require(mem["file_size"] == memsize, meta_path, f"memory file size {mem['file_size']} is not memsize {memsize}")
    chunk = mem["chunk_size"]
    expected = -(-mem["file_size"] // chunk)
    for key in ("chunk_hashes", "chunk_sha256"):
        if key in mem:
            count = len(mem[key])
            _require(count == expected, meta_path, f"{count} {key.replace('_', ' ')}, expected {expected} ({mem['file_size']} bytes in chunks of {chunk})")
    return basic, mem


def _first_difference(listed: list[dict[str, Any]], actual: list[dict[str, Any]]) -> str:
    for index, (a, b) in enumerate(zip(listed, actual)):
        if a != b:
            return f"entry {index} is {a}, the file has {b}"
    if len(listed) > len(actual):
        return f"entry {len(actual)} ({listed[len(actual)]}) is not in the file"
    return f"it lacks {actual[len(listed)]}" + (f" and {len(actual) - len(listed) - 1} more" if len(actual) - len(listed) > 1 else "")


def _check_kern(meta: dict[str, Any], kern_path: str, meta_path: str, registry: SectionRegistry) -> list[Section]:
    kern_meta = meta["kern"]
    data = _read_file(kern_path, "the state file", MAX_KERN_BYTES, expected_size=kern_meta["size"])
    _require(len(data) == kern_meta["size"], kern_path, f"file is {len(data)} bytes, metadata says {kern_meta['size']}")
    if "sha256" in kern_meta:  # keyed: the MAC vouches for this digest, which no forger can match
        _require(
            hmac.compare_digest(kern_sha256(data), kern_meta["sha256"]),
            kern_path,
            "SHA-256 does not match the metadata's: the file was changed or damaged after the checkpoint was written",
        )
    checksum = _hex64(_core.xxh3_64(data))
    _require(
        checksum == kern_meta["checksum"],
        kern_path,
        f"checksum {checksum} does not match the metadata's {kern_meta['checksum']!r}: damaged, or from another checkpoint",
    )
    what = f"checkpoint '{kern_path}'"
    try:
        contents = read_container(data, what=what)
        for _, section in contents:
            registry.check(section.name, section.version, what=what)
    except SectionError as err:
        raise CheckpointError(str(err)) from None
    records = [record for record, _ in contents]
    # Both ways: each list names exactly the file's sections of its kind, in file order, with
    # their offsets, sizes, versions and checksums ("sections" has the last two for all).
    for key, actual in (
        ("sections", _section_table(records)),
        ("kern_structs", _listing(records, True)),
        ("devices", _listing(records, False)),
    ):
        if meta[key] != actual:
            raise CheckpointError(
                f"checkpoint '{meta_path}': '{key}' does not match the sections of '{kern_path}': {_first_difference(meta[key], actual)}"
            )
    return [section for _, section in contents]


def read_checkpoint(path: str | os.PathLike, registry: SectionRegistry, *, key: bytes | None = None,
                    check_basic: Callable[[dict[str, Any]], None] | None = None, _depth: int = 0) -> Checkpoint:
    """Read and verify the checkpoint ``path`` (and ``path.kern``, ``path.meta``).

    Checks, in order, before anything is created: the metadata is at most 64 MiB, nested at
    most 16 deep, parses, has this format's magic, a version this vmmpy reads and the byte
    order, and its own checksum matches; the key: a keyed checkpoint (format version 2) needs
    ``key`` and its MAC must match, an unkeyed one is refused when a ``key`` is given; every
    field has its type and range; the memory layout is sane; the .kern file is a regular file of
    the recorded size, checksum (and SHA-256 when keyed), every section decodes with its checksum
    and this vmmpy reads its name and version (``registry``); "sections", "kern_structs" and
    "devices" list exactly the .kern file's sections; the memory file exists, is a regular file,
    and its size is lowmem + highmem. The memory file's bytes are checked against the chunk
    hashes when they are restored (eagerly: all before returning; lazily: each chunk before it
    can be used), or by :func:`verify_memory` (and against the chunk SHA-256 digests, when keyed,
    by any restore). Any failure raises :class:`CheckpointError`
    naming the file and the field. ``check_basic``, when given, sees the basic metadata once the
    metadata is verified and before the sections are read, so the caller can refuse in its own
    terms (a device saved but not configured) before a section it cannot place is met.
    A diff checkpoint's parent is read the same way (with the same key), then each of its
    parents: the chain is refused, naming the diff and the parent, when a parent is missing,
    fails any check above, is not the one the diff was written over (its ``.meta`` SHA-256) or
    has another memory layout.
    """
    path = os.fspath(path)
    meta_path, kern_path = path + META_SUFFIX, path + KERN_SUFFIX
    if key is not None:
        check_key(key)
    meta, meta_sha = _read_meta(meta_path, key)
    basic, mem = _check_layout(meta, meta_path)
    if check_basic is not None:
        check_basic(basic)
    sections = _check_kern(meta, kern_path, meta_path, registry)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}': missing (the memory file of this checkpoint)") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint '{path}': cannot be read: {err}") from None
    _require(stat.S_ISREG(st.st_mode), path, "the memory file is not a regular file")
    _require(st.st_size == mem["file_size"], path, f"memory file is {st.st_size} bytes, metadata says {mem['file_size']}")
    parent, runs = None, None
    if "parent" in meta:
        parent, runs = _read_parent(path, meta, registry, key, _depth)
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
        chunk_hashes=[int(h, 16) for h in mem["chunk_hashes"]],
        memory_file_identity=_identity(st),
        chunk_sha256=mem.get("chunk_sha256"),
        meta_sha256=meta_sha,
        parent=parent,
        diff_runs=runs,
        file_size=mem["file_size"],
    )


def _read_parent(path: str, meta: dict[str, Any], registry: SectionRegistry, key: bytes | None,
                 depth: int) -> tuple[Checkpoint, list[list[int]]]:
    """A diff's parent, read and verified whole (recursively, its own parents), and the diff's
    page runs; refused, naming the diff's metadata and the parent, when the parent is missing,
    damaged, not the checkpoint the diff was written over, or of another memory layout."""
    meta_path, link = path + META_SUFFIX, meta["parent"]
    pages = meta["basic metadata"]["memsize"] // PAGE_SIZE
    runs, end = link["pages"], 0
    for index, (first, count) in enumerate(runs):
        _require(count >= 1 and first >= end and first + count <= pages, meta_path,
                 f"parent.pages[{index}] [{first}, {count}] is out of order, overlaps or lies past the {pages} pages of memory")
        end = first + count
    _require(depth + 1 < MAX_CHAIN, meta_path, f"the chain of diff checkpoints is longer than {MAX_CHAIN}; merge it")
    parent_path = os.path.join(os.path.dirname(path), link["path"])
    try:
        parent = read_checkpoint(parent_path, registry, key=key, _depth=depth + 1)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint '{meta_path}': its parent '{parent_path}' is refused: {err}") from None
    _require(
        hmac.compare_digest(parent.meta_sha256, link["meta_sha256"]),
        meta_path,
        f"its parent '{parent_path}' is not the checkpoint it was written over (the parent's metadata has SHA-256 "
        f"{parent.meta_sha256}, this diff recorded {link['meta_sha256']}): the parent was changed or replaced",
    )
    mine, theirs = meta["memory"], parent.meta["memory"]
    for name in ("lowmem", "highmem", "lowmem_limit"):
        _require(mine[name] == theirs[name], meta_path,
                 f"its parent '{parent_path}' has another memory layout ({name} {theirs[name]}, this diff {mine[name]})")
    return parent, runs


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
    progress: ProgressCallback | None = None,
    backing: str = "anon",
    page_cache: str = "auto",
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
    be restored lazily. ``backing`` is the new memory's (``"anon"`` or ``"memfd"``).
    A keyed checkpoint's memory file is first checked against its SHA-256 digests, in either
    mode (:func:`verify_memory_sha256`: it reads the file's data once, so a keyed lazy restore
    is no longer constant time). ``progress`` is called every ``vmmpy.progress.TICK_S`` seconds
    with how far an eager read has got (``vmmpy.progress.metered``'s messages, phase "restore").
    A diff checkpoint's memory is its chain's (``_restore_chain``), in either mode.
    ``page_cache="auto"`` drops what the restore reads from the page cache once it is in guest
    memory, when the memory file was cold as the restore began (fewer than half of its data
    pages cached: read from the disk), so no second copy of the guest is left for the kernel to
    reclaim; a file found cached stays cached. ``"keep"`` leaves the cache as the reads leave it
    (an image restored again and again from the disk). docs/checkpoint-format.md has the rule.
    """
    if page_cache not in RESTORE_PAGE_CACHE:
        raise ValueError(f"page_cache must be 'auto' or 'keep', not {page_cache!r}")
    wired = checkpoint.wired if wired is None else wired
    if checkpoint.parent is not None:
        return _restore_chain(checkpoint, mode, dirty_tracking=dirty_tracking, wired=wired, progress=progress,
                              page_cache=page_cache)
    if checkpoint.keyed:
        if page_cache == "auto":  # asked before the SHA-256 pass brings the file into the cache
            page_cache = "release" if _memory_file_is_cold(checkpoint) else "keep"
        verify_memory_sha256(checkpoint)
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
                backing=backing,
                page_cache=page_cache,
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
        memory = GuestMemory(checkpoint.memsize, wired=wired, lowmem_limit=checkpoint.lowmem_limit, dirty_tracking=dirty_tracking,
                             backing=backing)
        try:
            with metered(progress, "restore") as meter:
                _core.read_memory_file(memory.core, fd, chunk_hashes=checkpoint.chunk_hashes, chunk_size=checkpoint.chunk_size,
                                       meter=meter, page_cache=page_cache)
        except BaseException as err:
            memory.close()
            if isinstance(err, OSError):
                raise CheckpointError(f"checkpoint '{checkpoint.path}': {err.strerror or err}") from None
            raise
    finally:
        os.close(fd)
    return memory


def _memory_file_is_cold(checkpoint: Checkpoint) -> bool:
    """Whether a restore would read ``checkpoint``'s memory file from the disk (see
    ``restore_memory``'s ``page_cache``)."""
    fd = _open_memory_file(checkpoint)
    try:
        return _core.memory_file_is_cold(fd)
    except OSError as err:
        raise CheckpointError(f"checkpoint '{checkpoint.path}': {err.strerror or err}") from None
    finally:
        os.close(fd)


def _restore_chain(checkpoint: Checkpoint, mode: str, *, dirty_tracking: str, wired: bool,
                   progress: ProgressCallback | None, page_cache: str) -> GuestMemory:
    """A diff checkpoint's memory: every diff's file is checked against its hashes first, then
    the full checkpoint at the chain's root is restored (eagerly: checked as it lands; lazily:
    each chunk checked when first needed) and each diff's pages are copied over it, oldest
    first. Lazily, only the root's chunks the diffs write to are loaded now (a damaged one is
    refused naming the root), so the time grows with the diffs, not with the guest."""
    chain = checkpoint.chain
    if mode not in ("eager", "lazy"):
        raise ValueError(f"mode must be 'eager' or 'lazy', not {mode!r}")
    for diff in chain[1:]:
        with _as_part_of(checkpoint, diff):
            verify_memory(diff)
    with _as_part_of(checkpoint, chain[0]):
        memory = restore_memory(chain[0], mode, dirty_tracking=dirty_tracking, wired=wired, progress=progress,
                                page_cache=page_cache)
    try:
        for diff in chain[1:]:
            try:
                _apply_diff(memory, diff)
            except LazyMemoryError as err:  # a root chunk under the diff's pages is damaged
                raise CheckpointError(f"checkpoint '{checkpoint.path}{META_SUFFIX}': its chain's '{chain[0].path}' is refused: "
                                      f"{err.strerror or err}") from None
    except BaseException as err:
        memory.close()
        if isinstance(err, OSError) and not isinstance(err, CheckpointError):
            raise CheckpointError(f"checkpoint '{diff.path}': {err.strerror or err}") from None
        raise
    return memory


def _apply_diff(memory: GuestMemory, diff: Checkpoint) -> None:
    """Copy a verified diff's pages from its memory file into ``memory`` (not marked dirty)."""
    fd = _open_memory_file(diff)
    try:
        offset = 0  # in the packed file
        while offset < diff.file_size:
            size = min(diff.file_size - offset, _DIFF_IO_BYTES)
            data = os.pread(fd, size, offset)
            _require(len(data) == size, diff.path, f"memory file ends at {offset + len(data):#x}, the diff's pages go to {diff.file_size:#x}")
            for gpa_start, gpa_end in diff.gpa_ranges(offset, offset + size):
                memory.write_untracked(gpa_start, data[: gpa_end - gpa_start])
                data = data[gpa_end - gpa_start :]
            offset += size
    finally:
        os.close(fd)


def merge_chain(checkpoint: Checkpoint, output: str | os.PathLike, *, key: bytes | None = None) -> dict[str, Any]:
    """Flatten a checkpoint read by :func:`read_checkpoint` (a diff: its whole chain) into one
    full checkpoint ``output`` with its state, memflags and chunk size (keyed with ``key``). The
    chain is restored eagerly (every file checked) into memory that is released afterwards;
    the chain's files are left as they are. Returns :func:`write_checkpoint`'s statistics."""
    memory = restore_memory(checkpoint, "eager", dirty_tracking="soft", wired=False)
    try:
        return write_checkpoint(output, memory, checkpoint.sections, checkpoint.basic, chunk_size=checkpoint.chunk_size, key=key)
    finally:
        memory.close()


def verify_chain(checkpoint: Checkpoint) -> None:
    """:func:`verify_memory` for every file of a checkpoint's chain (just itself when it is a
    full checkpoint), root first: every memory byte of the chain against its recorded hashes."""
    for node in checkpoint.chain:
        with _as_part_of(checkpoint, node):
            verify_memory(node)


@contextmanager
def _as_part_of(checkpoint: Checkpoint, node: Checkpoint) -> Iterator[None]:
    """A damaged older file of ``checkpoint``'s chain is refused as part of it (as
    :func:`read_checkpoint` refuses a parent's metadata): which checkpoint it stops, then the
    file's own error naming the file and the chunk."""
    try:
        yield
    except CheckpointError as err:
        if node is checkpoint:
            raise
        raise CheckpointError(f"checkpoint '{checkpoint.path}{META_SUFFIX}': its chain's '{node.path}' is refused: {err}") from None


def verify_memory(checkpoint: Checkpoint) -> None:
    """Check the memory file's bytes against the chunk hashes in the metadata (and, keyed, the
    SHA-256 digests), reading only its data extents (at disk or page-cache speed). Raises
    :class:`CheckpointError` naming the first bad chunk and its guest-physical range. A lazy
    restore checks each chunk as it is loaded; call this first to refuse a damaged file before the
    guest starts rather than when it gets there."""
    fd = _open_memory_file(checkpoint)
    try:
        hashes = _core.hash_memory_file(fd, chunk_size=checkpoint.chunk_size).chunk_hashes
    except OSError as err:
        raise CheckpointError(f"checkpoint '{checkpoint.path}': {err.strerror or err}") from None
    finally:
        os.close(fd)
    _compare_chunks(checkpoint, hashes, checkpoint.chunk_hashes, "hash")
    if checkpoint.keyed:
        verify_memory_sha256(checkpoint)


def _compare_chunks(checkpoint: Checkpoint, got: list, want: list, kind: str) -> None:
    """Refuse, naming the first differing chunk and its guest-physical range(s)."""
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    if len(got) != len(want):
        bad = bad or [min(len(got), len(want))]
    if bad:
        index = bad[0]
        start = index * checkpoint.chunk_size
        end = min(start + checkpoint.chunk_size, checkpoint.file_size)
        gpas = " and ".join(f"{a:#x}..{b:#x}" for a, b in checkpoint.gpa_ranges(start, end))
        more = f" ({len(bad)} chunks differ in all)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"checkpoint '{checkpoint.path}': memory chunk {index} (file bytes {start:#x}..{end:#x}, guest-physical {gpas}) "
            f"does not match its recorded {kind}{more}"
        )


def verify_memory_sha256(checkpoint: Checkpoint) -> None:
    """A keyed checkpoint's memory file against the SHA-256 digests its MAC vouches for,
    reading the file's data extents; every restore of a keyed checkpoint does this before any
    guest memory exists. Raises :class:`CheckpointError` naming the first bad chunk."""
    if checkpoint.chunk_sha256 is None:
        raise CheckpointError(f"checkpoint '{checkpoint.path}': not keyed: it records no SHA-256 digests")
    fd = _open_memory_file(checkpoint)
    try:
        digests = memory_chunk_sha256(fd, checkpoint.file_size, checkpoint.chunk_size)
    except OSError as err:
        raise CheckpointError(f"checkpoint '{checkpoint.path}': {err.strerror or err}") from None
    finally:
        os.close(fd)
    _compare_chunks(checkpoint, digests, checkpoint.chunk_sha256, "SHA-256")
