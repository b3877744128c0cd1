"""An independent check of migrated memory: every byte of one guest's memory against another's
(or against a copy taken earlier), compared with numpy on the segments' views. It shares nothing
with vmmpy's page hashes or digests, so a migration whose commit check passed with wrong memory
(a page the dirty tracking dropped, under ``verify="incremental"``) still fails a test.

Guest memory is anonymous and sparse (a 64 GiB guest may touch a few MiB), so only pages resident
on either side (mincore(2)) are read; a page resident on neither has never been written on either
and is zero on both. Reading never faults a page in on a side where it was not resident, unless
the other side holds it.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

from vmmpy import PAGE_SIZE, GuestMemory

#: Pages compared per step: bounds the copies a comparison makes to 16 MiB a side.
CHUNK_PAGES = 4096

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def _pages(view: np.ndarray) -> np.ndarray:
    return view.reshape(-1, PAGE_SIZE)


def resident_pages(view: np.ndarray) -> np.ndarray:
    """Indexes of the pages of ``view`` (a segment's whole view) that are in memory."""
    vec = np.zeros(len(view) // PAGE_SIZE, dtype=np.uint8)
    if _libc.mincore(view.ctypes.data, len(view), vec.ctypes.data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mincore on a guest memory segment: {os.strerror(err)}")
    return np.flatnonzero(vec & 1)


@dataclass(frozen=True)
class MemoryImage:
    """A copy of a guest memory's resident pages, per segment: what it held at one moment."""

    layout: tuple[tuple[str, int, int], ...]  # (name, gpa, size) per segment
    pages: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (page indexes, their bytes as (n, PAGE_SIZE))

    @classmethod
    def of(cls, memory: GuestMemory) -> MemoryImage:
        pages = {}
        for seg in memory.segments:
            view = np.frombuffer(seg, dtype=np.uint8)
            index = resident_pages(view)
            pages[seg.name] = (index, _pages(view)[index])  # fancy indexing copies
            del view  # a segment with an exported view cannot be unmapped
        return cls(_layout(memory), pages)


def _layout(memory: GuestMemory) -> tuple[tuple[str, int, int], ...]:
    return tuple((seg.name, seg.gpa, seg.size) for seg in memory.segments)


def memory_differences(memory: GuestMemory, image: MemoryImage, limit: int = 10,
                       labels: tuple[str, str] = ("now", "in the image")) -> list[str]:
    """The pages where ``memory`` now and ``image`` differ, the first ``limit`` described by
    guest-physical address (``labels`` name the two sides); [] when every byte is equal."""
    if _layout(memory) != image.layout:
        return [f"memory layout differs: {list(_layout(memory))} {labels[0]}, {list(image.layout)} {labels[1]}"]
    found: list[str] = []
    for seg in memory.segments:
        index, data = image.pages[seg.name]
        view = np.frombuffer(seg, dtype=np.uint8)
        live = _pages(view)
        either = np.union1d(resident_pages(view), index)
        for at in range(0, len(either), CHUNK_PAGES):
            chunk = either[at:at + CHUNK_PAGES]
            theirs = np.zeros((len(chunk), PAGE_SIZE), dtype=np.uint8)
            held = np.isin(chunk, index)
            theirs[held] = data[np.searchsorted(index, chunk[held])]
            bad = np.flatnonzero((live[chunk] != theirs).any(axis=1))
            for i in bad[:limit - len(found)]:
                page = chunk[i]
                first = int(np.flatnonzero(live[page] != theirs[i])[0])
                found.append(f"page at gpa {seg.gpa + int(page) * PAGE_SIZE:#x}: first differing byte at +{first:#x} "
                             f"({int(live[page][first]):#04x} {labels[0]}, {int(theirs[i][first]):#04x} {labels[1]})")
            if len(found) >= limit:
                break
        del view, live
        if len(found) >= limit:
            break
    return found
