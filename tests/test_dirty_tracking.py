"""EPT-like dirty tracking: every write sets its page's bit; get-and-clear loses nothing."""

import ctypes
import threading
import time

import numpy as np
import pytest

from vmmpy import PAGE_SIZE, GuestMemory
from vmmpy.memory import HIGHMEM_BASE

from .conftest import KERNEL_UNAVAILABLE
from .smaps import host_offers_huge_pages, smaps_kib

HIGH_PFN = HIGHMEM_BASE // PAGE_SIZE


def test_api_writes_mark_exactly_the_pages_they_touch(tracking):
    mem = GuestMemory("5G", dirty_tracking=tracking)
    assert mem.dirty_tracking == tracking
    mem.write(PAGE_SIZE - 1, b"xy")  # straddles pages 0 and 1
    mem.write(10 * PAGE_SIZE, bytes(3 * PAGE_SIZE))  # pages 10, 11, 12
    mem.write(HIGHMEM_BASE + 5 * PAGE_SIZE, b"h")
    assert mem.dirty_count() == 6
    pfns = mem.get_and_clear_dirty()
    assert pfns.dtype == np.uint64
    assert pfns.tolist() == [0, 1, 10, 11, 12, HIGH_PFN + 5]
    assert mem.get_and_clear_dirty().size == 0, "the harvest clears what it reports"
    assert mem.dirty_count() == 0


def test_ranges_merge_adjacent_pages(tracking):
    mem = GuestMemory("5G", dirty_tracking=tracking)
    for page in (3, 4, 5, 9):
        mem.write(page * PAGE_SIZE, b"\1")
    mem.write(HIGHMEM_BASE, bytes(2 * PAGE_SIZE))
    assert [(r.gpa, r.length) for r in mem.get_and_clear_dirty_ranges()] == [
        (3 * PAGE_SIZE, 3 * PAGE_SIZE),
        (9 * PAGE_SIZE, PAGE_SIZE),
        (HIGHMEM_BASE, 2 * PAGE_SIZE),
    ]
    assert mem.get_and_clear_dirty_ranges() == []


def test_restore_and_receive_writes_are_not_guest_writes(tracking):
    mem = GuestMemory("1M", dirty_tracking=tracking)
    mem.write_untracked(0, bytes(range(256)) * 64)
    assert mem.read(0, 4) == b"\0\1\2\3"
    assert mem.get_and_clear_dirty().size == 0


def test_wired_memory_starts_clean_and_tracks_writes(tracking):
    mem = GuestMemory("4M", wired=True, dirty_tracking=tracking)
    assert mem.get_and_clear_dirty().size == 0
    mem.write(7 * PAGE_SIZE, b"w")
    assert mem.get_and_clear_dirty().tolist() == [7]


def test_wired_memory_on_huge_pages_is_tracked_per_4k_page(tracking):
    """Wiring puts whole 2 MiB regions on huge pages where it times them cheaper (always its first
    steps); a write is still one 4 KiB page, round after round, whether vmmpy makes it or (kernel
    backend) a raw store does, which splits the huge page it lands in."""
    mem = GuestMemory("64M", wired=True, dirty_tracking=tracking)
    assert mem.get_and_clear_dirty().size == 0
    address = mem.view().__array_interface__["data"][0]
    huge_before = smaps_kib(address, "AnonHugePages")
    if host_offers_huge_pages():
        assert huge_before > 0, f"wiring took no huge page ({mem.wiring()})"
    for round_no in range(3):
        # Five 2 MiB regions written each round, two pages in the first.
        pages = [7 + round_no, 100 + round_no, 513 + round_no, 1030 + round_no, 5000 + 3 * round_no, 16383 - round_no]
        for page in pages:
            if tracking == "kernel":
                ctypes.memmove(address + page * PAGE_SIZE + 5, b"raw", 3)
            else:
                mem.write(page * PAGE_SIZE + 5, b"api")
        assert mem.get_and_clear_dirty().tolist() == sorted(pages), f"round {round_no}"
    assert mem.get_and_clear_dirty().size == 0
    assert mem.read(7 * PAGE_SIZE + 5, 3) == (b"raw" if tracking == "kernel" else b"api")
    if tracking == "kernel" and huge_before >= 56 * 1024:
        # At most four of the 32 regions were small, so a written one was huge: the kernel split it.
        assert smaps_kib(address, "AnonHugePages") < huge_before


@pytest.mark.timeout(120)
def test_get_and_clear_loses_nothing_under_a_concurrent_writer(tracking):
    """The migration invariant: copy what each harvest reports; the copy ends equal to memory.

    A writer thread keeps rewriting pages while the main thread harvests and copies the reported
    pages into a shadow, as pre-copy rounds do. A write lost between harvests would leave the
    shadow stale.
    """
    pages = 512
    mem = GuestMemory(pages * PAGE_SIZE, dirty_tracking=tracking)
    view = mem.view()
    shadow = np.zeros(pages * PAGE_SIZE, dtype=np.uint8)
    stop = threading.Event()
    order = np.random.default_rng(1234).integers(0, pages, size=4096).tolist()
    writes = 0

    def writer():
        nonlocal writes
        while not stop.is_set():
            for page in order:
                mem.write(page * PAGE_SIZE + writes % 4000, writes.to_bytes(8, "little"))
                writes += 1

    shadow_pages = shadow.reshape(pages, PAGE_SIZE)
    guest_pages = view.reshape(pages, PAGE_SIZE)

    def copy_dirty_pages():
        dirty = mem.get_and_clear_dirty()
        shadow_pages[dirty] = guest_pages[dirty]

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        # Pre-copy rounds racing the writer: at least 100, and on until the writer has made 10,000
        # writes alongside them (on a loaded machine it may get little CPU), for at most 60 s.
        deadline, rounds = time.monotonic() + 60, 0
        while rounds < 100 or (writes <= 10_000 and time.monotonic() < deadline):
            copy_dirty_pages()
            rounds += 1
    finally:
        stop.set()
        thread.join(timeout=60)
    copy_dirty_pages()  # the final stop-and-copy round
    assert writes > 10_000, "the writer must have run alongside the harvests"
    mismatched = np.flatnonzero((shadow != view).reshape(pages, PAGE_SIZE).any(axis=1))
    assert mismatched.size == 0, f"pages lost between harvests: {mismatched[:10].tolist()}"


@pytest.mark.skipif(bool(KERNEL_UNAVAILABLE), reason=f"kernel dirty tracking unavailable: {KERNEL_UNAVAILABLE}")
def test_both_backends_report_the_same_pages_for_the_same_writes():
    soft = GuestMemory("5G", dirty_tracking="soft")
    kernel = GuestMemory("5G", dirty_tracking="kernel")
    rng = np.random.default_rng(42)
    low_pages = 3 * 1024 * 1024 * 1024 // PAGE_SIZE
    for round_no in range(5):
        for _ in range(300):
            if rng.random() < 0.7:
                gpa = int(rng.integers(0, low_pages - 2)) * PAGE_SIZE
            else:
                gpa = HIGHMEM_BASE + int(rng.integers(0, 2 * 1024 * 1024 * 1024 // PAGE_SIZE - 2)) * PAGE_SIZE
            gpa += int(rng.integers(0, PAGE_SIZE))
            data = rng.bytes(int(rng.integers(1, 2 * PAGE_SIZE)))
            soft.write(gpa, data)
            kernel.write(gpa, data)
        from_soft = soft.get_and_clear_dirty()
        from_kernel = kernel.get_and_clear_dirty()
        assert from_soft.size > 0
        np.testing.assert_array_equal(from_soft, from_kernel, err_msg=f"round {round_no}")


@pytest.mark.skipif(bool(KERNEL_UNAVAILABLE), reason=f"kernel dirty tracking unavailable: {KERNEL_UNAVAILABLE}")
def test_kernel_backend_sees_writes_through_raw_pointers():
    """What sets the kernel backend apart: a store that bypasses vmmpy's write paths is seen."""
    mem = GuestMemory("1M", dirty_tracking="kernel")
    soft = GuestMemory("1M", dirty_tracking="soft")
    for m in (mem, soft):
        address = m.view().__array_interface__["data"][0]
        ctypes.memmove(address + 9 * PAGE_SIZE + 5, b"raw", 3)
        assert m.read(9 * PAGE_SIZE + 5, 3) == b"raw"
    assert mem.get_and_clear_dirty().tolist() == [9]
    assert soft.get_and_clear_dirty().tolist() == [], "the soft bitmap only sees vmmpy's own writes"


def test_auto_says_which_backend_it_picked():
    mem = GuestMemory("1M", dirty_tracking="auto")
    if KERNEL_UNAVAILABLE:
        assert mem.dirty_tracking == "soft" and mem.dirty_tracking_fallback
    else:
        assert mem.dirty_tracking == "kernel" and mem.dirty_tracking_fallback is None


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="dirty_tracking must be one of auto, soft, kernel, kvm, kvm-ring; got 'ept'"):
        GuestMemory("1M", dirty_tracking="ept")
