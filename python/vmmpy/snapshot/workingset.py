"""The working-set file ``PATH.ws``: which memory chunks a guest restored lazily from checkpoint
``PATH`` touched first, so the next lazy restore of that checkpoint loads them before the rest.

It is a hint, never trusted for content: every chunk is still checked against the hashes of the
checkpoint's ``.meta`` when it is loaded, so the worst a wrong working set can do is load chunks
in a worse order. Hence the policy: a missing file is fine (the rest is filled in order), and a
damaged, foreign or stale one (written for another checkpoint, or for this path before the
checkpoint was rewritten) is ignored with a warning naming the file and what was wrong; the
restore goes on. It is not keyed: a keyed checkpoint's working set can only reorder loads.

Bytes (little-endian; ``MAX_CHUNKS`` bounds the file before it is read)::

    offset  size     field
    0       8        magic b"VMMPYWS\\0"
    8       4        version (1)
    12      4        count: chunk indices that follow (at most MAX_CHUNKS)
    16      8        chunk_size of the checkpoint (bytes)
    24      32       SHA-256 of the checkpoint's .meta file: the checkpoint this was recorded for
    56      4*count  chunk indices (u32), in the order the guest first touched them, no repeats
    end-32  32       SHA-256 of every byte before it

Written atomically (a temporary name in the same directory, fsync, rename, fsync of the
directory) when recording ends after a lazy restore (``checkpoint.restore_guest``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import struct
from dataclasses import dataclass, field

from .errors import CheckpointError

log = logging.getLogger("vmmpy.snapshot")

WS_SUFFIX = ".ws"
MAGIC = b"VMMPYWS\0"
VERSION = 1
#: At most this many chunks are recorded (256 GiB of 4 MiB chunks) and read back.
MAX_CHUNKS = 65536
_HEADER = struct.Struct("<8sIIQ32s")
_DIGEST = 32


@dataclass(frozen=True)
class WorkingSet:
    """A working set as read for a restore: ``chunks`` to load first (empty unless ``status`` is
    "used"), ``status`` "used", "missing" or "ignored", and for "ignored" the ``reason``."""

    path: str
    status: str
    chunks: list[int] = field(default_factory=list, repr=False)
    reason: str | None = None

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"path": self.path, "status": self.status, "chunks": len(self.chunks)}
        if self.reason:
            out["reason"] = self.reason
        return out


def encode_working_set(chunks: list[int], *, chunk_size: int, meta_sha256: str) -> bytes:
    """The bytes of a working-set file; ValueError for chunks out of bounds or repeated."""
    if len(chunks) > MAX_CHUNKS:
        raise ValueError(f"a working set holds at most {MAX_CHUNKS} chunks, not {len(chunks)}")
    if len(set(chunks)) != len(chunks) or any(not 0 <= c < 1 << 32 for c in chunks):
        raise ValueError("working-set chunk indices must be distinct and fit 32 bits")
    body = _HEADER.pack(MAGIC, VERSION, len(chunks), chunk_size, bytes.fromhex(meta_sha256)) + struct.pack(f"<{len(chunks)}I", *chunks)
    return body + hashlib.sha256(body).digest()


def write_working_set(checkpoint_path: str, chunks: list[int], *, chunk_size: int, meta_sha256: str) -> str:
    """Write ``checkpoint_path``.ws atomically; its path. OSError if it cannot be written."""
    path = checkpoint_path + WS_SUFFIX
    data = encode_working_set(chunks, chunk_size=chunk_size, meta_sha256=meta_sha256)
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            os.write(fd, data)  # a few KiB at most: one write
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def decode_working_set(data: bytes, *, chunk_size: int, chunks: int, meta_sha256: str) -> list[int]:
    """The chunk indices of a working-set file recorded for the checkpoint whose ``.meta`` has
    SHA-256 ``meta_sha256`` (``chunks`` chunks of ``chunk_size``); CheckpointError naming the
    field that is wrong (the caller names the file)."""
    if len(data) < _HEADER.size + _DIGEST:
        raise CheckpointError(f"is {len(data)} bytes, shorter than the {_HEADER.size + _DIGEST} of an empty working set")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError("its SHA-256 does not match its contents (damaged or truncated)")
    magic, version, count, size, bound = _HEADER.unpack_from(body)
    if magic != MAGIC:
        raise CheckpointError(f"magic {magic!r} is not {MAGIC!r}: not a working-set file")
    if version != VERSION:
        raise CheckpointError(f"version {version} is not the {VERSION} this vmmpy reads")
    if bound.hex() != meta_sha256:
        raise CheckpointError(f"it was recorded for another checkpoint (.meta SHA-256 {bound.hex()[:16]}..., this one's is "
                              f"{meta_sha256[:16]}...): stale or foreign")
    if size != chunk_size:
        raise CheckpointError(f"chunk_size {size} is not the checkpoint's {chunk_size}")
    if count > MAX_CHUNKS or len(body) != _HEADER.size + 4 * count:
        raise CheckpointError(f"count {count} does not match its size of {len(data)} bytes (or exceeds {MAX_CHUNKS})")
    indices = list(struct.unpack_from(f"<{count}I", body, _HEADER.size))
    bad = next((c for c in indices if c >= chunks), None)
    if bad is not None:
        raise CheckpointError(f"chunk {bad} is past the checkpoint's {chunks} chunks")
    if len(set(indices)) != len(indices):
        raise CheckpointError("a chunk is listed twice")
    return indices


def read_working_set(checkpoint_path: str, *, chunk_size: int, chunks: int, meta_sha256: str) -> WorkingSet:
    """The working set beside ``checkpoint_path`` for that checkpoint: "used" with its chunks,
    "missing", or "ignored" with the reason (also logged as a warning). Never raises for the
    file's contents: it is only a hint."""
    path = checkpoint_path + WS_SUFFIX
    try:
        with open(path, "rb") as f:
            data = f.read(_HEADER.size + 4 * MAX_CHUNKS + _DIGEST + 1)
    except FileNotFoundError:
        return WorkingSet(path, "missing")
    except OSError as err:
        return _ignored(path, f"cannot be read: {err.strerror or err}")
    try:
        return WorkingSet(path, "used", decode_working_set(data, chunk_size=chunk_size, chunks=chunks, meta_sha256=meta_sha256))
    except CheckpointError as err:
        return _ignored(path, str(err))


def _ignored(path: str, why: str) -> WorkingSet:
    reason = f"working set '{path}' ignored: {why}; chunks load in order instead"
    log.warning("%s", reason)
    return WorkingSet(path, "ignored", reason=reason)


__all__ = ["MAX_CHUNKS", "WS_SUFFIX", "WorkingSet", "decode_working_set", "encode_working_set", "read_working_set",
           "write_working_set"]
