"""The SHA-256 digests a keyed checkpoint records: of ``PATH.kern`` and of every memory chunk.

The XXH3 checksums every checkpoint carries find accidental damage quickly, but XXH3 is not
built to resist someone who chooses the bytes: a forger could change a chunk or a section and
keep its XXH3 value. A MAC over the metadata covers the other files only through digests that
cannot be matched that way, so a keyed checkpoint also records SHA-256 of ``PATH.kern`` and of
each memory chunk (the same chunks as the XXH3-128 hashes: ``chunk_size`` bytes of the file,
the last one short).

Chunk digests follow the memory file's data extents (SEEK_DATA / SEEK_HOLE): holes hash as the
zeros they read as, and a chunk that is all hole costs one cached digest. The data itself comes
from the file (a reader: what will be restored) or, for the writer, from the guest memory the
file was just written from (the guest is stopped, so the bytes are the same, and the memory is
at hand while the file written with O_DIRECT would have to come back from the disk). Only data
extents are read either way, so no untouched guest page is mapped.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

#: Bytes read per call: big enough to keep hashing at memory speed, small enough to stay cached.
_READ = 1 << 20
#: Chunks hashed at once. Each thread hashes whole chunks (only the lseeks share the fd, and
#: they are given explicit offsets), so the digests do not depend on this.
HASH_THREADS = min(4, os.cpu_count() or 1)
_ZEROS = bytes(_READ)


def kern_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=4)
def _zero_chunk_sha256(size: int) -> str:
    digest = hashlib.sha256()
    _feed_zeros(digest, size)
    return digest.hexdigest()


def _feed_zeros(digest: hashlib._Hash, count: int) -> None:
    while count:
        step = min(count, _READ)
        digest.update(_ZEROS[:step])
        count -= step


def _next_data(fd: int, offset: int, end: int) -> int:
    try:
        return min(os.lseek(fd, offset, os.SEEK_DATA), end)
    except OSError as err:
        if err.errno == errno.ENXIO:  # only a hole from here to the end of the file
            return end
        raise


#: Feeds a digest the data at file offsets ``start..end``.
DataReader = Callable[["hashlib._Hash", int, int], None]


def file_reader(fd: int) -> DataReader:
    """Data from the file itself."""
    buffer = memoryview(bytearray(_READ))

    def feed(digest: hashlib._Hash, start: int, end: int) -> None:
        while start < end:
            got = os.preadv(fd, [buffer[: min(_READ, end - start)]], start)
            if got <= 0:
                raise OSError(errno.EIO, f"the memory file ended at byte {start}, before {end}")
            digest.update(buffer[:got])
            start += got

    return feed


def _feed_chunk(digest: hashlib._Hash, fd: int, start: int, end: int, feed_data: DataReader) -> None:
    offset = start
    while offset < end:
        data = _next_data(fd, offset, end)
        _feed_zeros(digest, data - offset)
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        feed_data(digest, data, hole)
        offset = hole


def memory_chunk_sha256(fd: int, size: int, chunk_size: int, feed_data: DataReader | None = None) -> list[str]:
    """SHA-256, as hex, of each ``chunk_size`` piece of the first ``size`` bytes of file ``fd``:
    holes as zeros, data from ``feed_data`` (default: the file). Chunks are hashed on up to
    :data:`HASH_THREADS` threads at once (hashlib releases the GIL; SHA-256 is the cost here)."""

    def chunk_digest(start: int) -> str:
        end = min(start + chunk_size, size)
        if _next_data(fd, start, end) >= end:
            return _zero_chunk_sha256(end - start)
        digest = hashlib.sha256()
        _feed_chunk(digest, fd, start, end, feed_data or file_reader(fd))
        return digest.hexdigest()

    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        return list(pool.map(chunk_digest, range(0, size, chunk_size)))
