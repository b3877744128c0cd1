"""The SHA-256 digests a keyed checkpoint records: of ``PATH.kern`` and of every memory chunk.

The XXH3 checksums every checkpoint carries find accidental damage quickly, but XXH3 is not
built to resist someone who chooses the bytes: a forger could change a chunk or a section and
keep its XXH3 value. A MAC over the metadata covers the other files only through digests that
cannot be matched that way, so a keyed checkpoint also records SHA-256 of ``PATH.kern`` and of
each memory chunk (the same chunks as the XXH3-128 hashes: ``chunk_size`` bytes of the file,
the last one short).

Chunk digests are computed from the memory file, reading only its data extents (SEEK_DATA /
SEEK_HOLE) and hashing holes as the zeros they read as; a chunk that is all hole costs one
cached digest. The file is read, never the guest's memory, so hashing maps no guest page.
"""

from __future__ import annotations

import errno
import hashlib
import os
from functools import lru_cache

#: Bytes read per call: big enough to keep hashing at memory speed, small enough to stay cached.
_READ = 1 << 20
_ZEROS = bytes(_READ)


def kern_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@lru_cache(maxsize=4)
def _zero_chunk_sha256(size: int) -> str:
    digest = hashlib.sha256()
    _feed_zeros(digest, size)
    return digest.hexdigest()


def _feed_zeros(digest: "hashlib._Hash", count: int) -> None:
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


def _feed_file(digest: "hashlib._Hash", fd: int, start: int, end: int, buffer: memoryview) -> None:
    offset = start
    while offset < end:
        data = _next_data(fd, offset, end)
        _feed_zeros(digest, data - offset)
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        while data < hole:
            got = os.preadv(fd, [buffer[: min(_READ, hole - data)]], data)
            if got <= 0:
                raise OSError(errno.EIO, f"the memory file ended at byte {data}, before {end}")
            digest.update(buffer[:got])
            data += got
        offset = hole


def memory_chunk_sha256(fd: int, size: int, chunk_size: int) -> list[str]:
    """SHA-256, as hex, of each ``chunk_size`` piece of the first ``size`` bytes of file ``fd``."""
    buffer = memoryview(bytearray(_READ))
    digests = []
    for start in range(0, size, chunk_size):
        end = min(start + chunk_size, size)
        if _next_data(fd, start, end) >= end:
            digests.append(_zero_chunk_sha256(end - start))
            continue
        digest = hashlib.sha256()
        _feed_file(digest, fd, start, end, buffer)
        digests.append(digest.hexdigest())
    return digests
