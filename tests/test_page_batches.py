"""Bulk page work from Python: batches sent from guest memory and received straight into another
guest's memory, bit-exact, without marking pages dirty; bad batches refused before any write."""

import errno
import re
import socket
import struct
import threading
import time

import numpy as np
import pytest

from vmmpy import PAGE_SIZE, GuestMemory, PageBatchError
from vmmpy.memory import HIGHMEM_BASE
from vmmpy.units import GiB, MiB


def transfer(send, receiver: GuestMemory, batches_expected=None, tracker=None):
    """Run `send(fd)` on one end of a socketpair while the receiver takes batches on the other
    (hashing them into `tracker` when given)."""
    a, b = socket.socketpair()
    sent = {}
    received = []
    try:
        def sender():
            sent.update(send(a.fileno()))
            a.shutdown(socket.SHUT_WR)

        thread = threading.Thread(target=sender)
        thread.start()
        while True:
            try:
                received.append(receiver.recv_pages(b.fileno(), tracker=tracker))
            except PageBatchError as err:
                if err.errno == errno.EPIPE and "0 of 40" in str(err):
                    break  # the sender finished: a clean end of stream between batches
                raise
        thread.join(timeout=60)
    finally:
        a.close()
        b.close()
    return sent, received


def fill_random(mem: GuestMemory, gpa: int, pages: int, seed: int) -> None:
    mem.write(gpa, np.random.default_rng(seed).integers(0, 256, pages * PAGE_SIZE, dtype=np.uint8))


def test_dirty_pages_arrive_bit_exact_and_clean(tracking):
    src = GuestMemory("5G", dirty_tracking=tracking)
    dst = GuestMemory("5G", dirty_tracking=tracking)
    fill_random(src, 0x10000, 64, seed=1)
    fill_random(src, HIGHMEM_BASE + 0x200000, 16, seed=2)
    src.write(0x90000, bytes(4 * PAGE_SIZE))  # dirty but all zero: travels without data
    sent, received = transfer(src.send_dirty_pages, dst)
    assert sent["data_pages"] == 80 and sent["zero_pages"] == 4
    assert sum(r["data_pages"] for r in received) == 80
    assert sent["batches"] == len(received) == 2  # one per segment
    np.testing.assert_array_equal(src.view("lowmem")[: 1 * MiB], dst.view("lowmem")[: 1 * MiB])
    assert dst.read(HIGHMEM_BASE + 0x200000, 16 * PAGE_SIZE) == src.read(HIGHMEM_BASE + 0x200000, 16 * PAGE_SIZE)
    assert src.digest() == dst.digest()
    assert src.dirty_count() == 0, "sending harvested and cleared the bits"
    assert dst.dirty_count() == 0, "receiving is not a guest write"


def test_zero_ranges_clear_stale_data_on_the_receiver():
    src = GuestMemory("1M")
    dst = GuestMemory("1M")
    dst.write(5 * PAGE_SIZE, b"stale" * 100)
    dst.get_and_clear_dirty()
    src.write(5 * PAGE_SIZE, bytes(PAGE_SIZE))
    sent, _ = transfer(src.send_dirty_pages, dst)
    assert sent["zero_pages"] == 1 and sent["data_pages"] == 0
    assert dst.read(5 * PAGE_SIZE, 500) == bytes(500)


def test_a_large_mostly_untouched_guest_sends_only_what_it_touched():
    src = GuestMemory("64G")
    dst = GuestMemory("64G")
    fill_random(src, 0x100000, 256, seed=3)  # 1 MiB of data in lowmem
    fill_random(src, HIGHMEM_BASE + 40 * GiB, 256, seed=4)  # and 1 MiB deep in highmem
    sent, _ = transfer(src.send_all_pages, dst)
    assert sent["data_pages"] == 512
    assert sent["data_bytes"] == 2 * MiB
    assert sent["wire_bytes"] < 3 * MiB, "untouched memory must cost ranges, not data"
    assert dst.resident_pages() == 512, "the receiver stays unpopulated where nothing was sent"
    assert dst.read(HIGHMEM_BASE + 40 * GiB, PAGE_SIZE) == src.read(HIGHMEM_BASE + 40 * GiB, PAGE_SIZE)


def test_a_page_list_sends_exactly_those_pages():
    src = GuestMemory("1M")
    dst = GuestMemory("1M")
    fill_random(src, 0, 256, seed=5)
    sent, _ = transfer(lambda fd: src.send_pages(fd, [7, 3, 4, 200]), dst)
    assert sent["data_pages"] == 4
    for pfn in (3, 4, 7, 200):
        assert dst.read(pfn * PAGE_SIZE, PAGE_SIZE) == src.read(pfn * PAGE_SIZE, PAGE_SIZE)
    assert dst.read(5 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)


def bad_batch_stream(src: GuestMemory, mutate) -> bytes:
    """A valid batch from `src`, captured as bytes and then damaged by `mutate`."""
    a, b = socket.socketpair()
    with a, b:
        src.send_pages(a.fileno(), [1])
        a.shutdown(socket.SHUT_WR)
        data = bytearray()
        while chunk := b.recv(1 << 16):
            data += chunk
    return bytes(mutate(bytearray(data)))


@pytest.mark.parametrize(
    "name, mutate, message",
    [
        ("magic", lambda d: d.__setitem__(slice(0, 4), b"XXXX") or d, "magic"),
        ("checksum", lambda d: d.__setitem__(slice(40, 48), struct.pack("<Q", 1 << 40)) or d, "checksum"),
        ("truncated", lambda d: d[: len(d) - 100], "ended"),
        ("empty", lambda d: d[:10], "ended"),
    ],
)
def test_a_damaged_batch_is_refused_before_memory_is_touched(name, mutate, message):
    src = GuestMemory("1M")
    src.write(PAGE_SIZE, b"\xee" * PAGE_SIZE)
    stream = bad_batch_stream(src, mutate)
    dst = GuestMemory("1M")
    dst.write(PAGE_SIZE, b"\x11" * 8)
    before = dst.digest()
    a, b = socket.socketpair()
    with a, b:
        a.sendall(stream)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(PageBatchError, match=message):
            dst.recv_pages(b.fileno())
    if name != "truncated":  # a stream cut inside page data leaves the pages read so far
        assert dst.digest() == before


def test_trackers_on_both_sides_follow_tracked_sends_and_receives():
    src, dst = GuestMemory("8M"), GuestMemory("8M")
    src_tracker, dst_tracker = src.digest_tracker(), dst.digest_tracker()
    assert src_tracker.stale_pages() == 2048, "a new tracker has every page stale"
    for rnd, pages in enumerate([(0, 1, 2, 700), (1, 5, 2047), (700,)]):
        for p in pages:
            src.write(p * PAGE_SIZE, bytes([rnd + 1]) * (100 + p))
        if rnd == 2:
            src.write(700 * PAGE_SIZE, bytes(PAGE_SIZE))  # back to zero: goes as a ZERO range
        a, b = socket.socketpair()
        with a, b:
            sent = src.send_dirty_pages(a, tracker=src_tracker)
            for _ in range(sent["batches"]):
                dst.recv_pages(b, tracker=dst_tracker)
        assert sent["data_pages"] + sent["zero_pages"] == len(pages)
        # Each side hashed exactly the pages that moved; the rest are stale until the first digest.
        left = 2048 - len(pages) if rnd == 0 else 0
        assert src_tracker.stale_pages() == left, "the sender hashes what it sends"
        assert dst_tracker.stale_pages() == left, "the receiver hashes what arrives"
        assert src_tracker.digest() == dst_tracker.digest() == src.commit_digest() == dst.commit_digest()
    assert src.commit_digest() != GuestMemory("8M").commit_digest()
    with pytest.raises(ValueError, match="other guest memory"):
        dst.recv_pages(0, tracker=src_tracker)


def test_the_commit_digest_sees_one_byte_and_ignores_residency():
    a, b = GuestMemory("4M"), GuestMemory("4M")
    assert a.commit_digest() == b.commit_digest()
    b.write(5 * PAGE_SIZE, bytes(PAGE_SIZE))  # touched, still zero
    assert a.commit_digest() == b.commit_digest()
    b.write(3 * PAGE_SIZE + 4095, b"\x01")
    assert a.commit_digest() != b.commit_digest()
    tracker = a.digest_tracker()
    tracker.digest()
    a.write(3 * PAGE_SIZE + 4095, b"\x01")
    tracker.mark(3 * PAGE_SIZE, 1)
    assert tracker.refresh() == (1, 1)
    assert tracker.digest() == b.commit_digest()


# -- compressed batches ------------------------------------------------------------------------

WORDS = b"guest memory page dirty round bhyve return struct 0x7f3a INFO value buffer socket".split()


def fill_text(mem: GuestMemory, gpa: int, pages: int, seed: int) -> None:
    """Text-like pages: words of a small vocabulary, different on every page (LZ4 halves them)."""
    rng = np.random.default_rng(seed)
    text = b" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), pages * PAGE_SIZE // 4))
    mem.write(gpa, text[: pages * PAGE_SIZE])


def test_compressible_zero_and_random_pages_round_trip_exactly_when_compressed():
    src = GuestMemory("5G")
    dst = GuestMemory("5G")
    fill_text(src, 0x100000, 600, seed=1)  # 2.3 MiB of text in lowmem
    src.write(0x400000, bytes(50 * PAGE_SIZE))  # written zeros: zero ranges, no data
    fill_random(src, 0x500000, 300, seed=2)  # incompressible: tried, sent plain
    fill_text(src, HIGHMEM_BASE + 0x10000, 300, seed=3)
    dst.write(0x400000, b"stale" * 1000)  # the zero range must clear this
    dst.get_and_clear_dirty()
    src_tracker, dst_tracker = src.digest_tracker(), dst.digest_tracker()
    src_tracker.digest(), dst_tracker.digest()  # all hashed: from here only what moves changes them
    sent, received = transfer(lambda fd: src.send_dirty_pages(fd, compress="lz4", tracker=src_tracker), dst,
                              tracker=dst_tracker)
    assert src_tracker.stale_pages() == dst_tracker.stale_pages() == 0, "compressed or not, every page was hashed as it moved"
    assert src_tracker.digest() == dst_tracker.digest() == src.commit_digest() == dst.commit_digest()
    assert sent["data_pages"] == 1200 and sent["zero_pages"] == 50
    assert sent["compressed_batches"] >= 3, sent
    assert sent["compress_attempts"] > sent["compressed_batches"], "the random pages were tried and went plain"
    assert sent["saved_bytes"] > 900 * PAGE_SIZE // 3, sent
    assert sent["wire_bytes"] == sum(r["wire_bytes"] for r in received)
    assert sent["compressed_batches"] == sum(r["compressed_batches"] for r in received)
    assert sent["saved_bytes"] == sum(r["saved_bytes"] for r in received)
    assert src.digest() == dst.digest()
    assert dst.dirty_count() == 0, "receiving is not a guest write"


def test_compression_off_sends_exactly_what_it_always_did():
    src = GuestMemory("1M")
    fill_text(src, 0, 100, seed=4)
    plain, _ = transfer(lambda fd: src.send_pages(fd, range(100)), GuestMemory("1M"))
    again, _ = transfer(lambda fd: src.send_pages(fd, range(100), compress="off"), GuestMemory("1M"))
    assert plain == again and plain["compressed_batches"] == 0 and plain["compress_attempts"] == 0
    assert plain["batches"] == 1 and plain["wire_bytes"] == 40 + 16 + 100 * PAGE_SIZE
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError, match="compression mode must be off, lz4 or auto; got \"zstd\""):
        src.send_pages(a.fileno(), [1], compress="zstd")


BATCH = struct.Struct("<4sHHQIIQQ")
ENTRY = struct.Struct("<QIB3x")


def batch_bytes(ranges, payload: bytes, *, flags=1, payload_len=None) -> bytes:
    """A page batch for segment 0 with ``ranges`` [(gpa, pages, kind)] and ``payload``, sealed with
    a correct header checksum (so only what a test breaks on purpose is wrong)."""
    from vmmpy import _core

    table = b"".join(ENTRY.pack(gpa, pages, kind) for gpa, pages, kind in ranges)
    length = len(payload) if payload_len is None else payload_len
    head = BATCH.pack(b"VMPB", 1, flags, 0, len(ranges), 0, length, 0)
    head = head[:32] + struct.pack("<Q", _core.xxh3_64(head[:32] + table))
    return head + table + payload


def lz4_block(content: bytes) -> bytes:
    """The LZ4 block the memory core makes of ``content`` (whole pages of one batch)."""
    src = GuestMemory("1M")
    src.write(PAGE_SIZE, content)
    a, b = socket.socketpair()
    with a, b:
        sent = src.send_pages(a.fileno(), range(1, 1 + len(content) // PAGE_SIZE), compress="lz4")
        a.shutdown(socket.SHUT_WR)
        stream = b"".join(iter(lambda: b.recv(1 << 16), b""))
    assert sent["compressed_batches"] == 1
    return stream[40 + 16 + 8:]


def sealed(block: bytes) -> bytes:
    from vmmpy import _core

    return struct.pack("<Q", _core.xxh3_64(block)) + block


TWO_PAGES = b"migrate me " * (2 * PAGE_SIZE // 11) + b"!" * (2 * PAGE_SIZE % 11)


def _hostile(name: str) -> bytes:
    block = lz4_block(TWO_PAGES)
    data = [(PAGE_SIZE, 2, 0)]
    if name == "good":
        return batch_bytes(data, sealed(block))
    if name == "checksum":  # a byte of the block flipped in flight
        payload = bytearray(sealed(block))
        payload[-3] ^= 0x10
        return batch_bytes(data, bytes(payload))
    if name == "garbage":  # not LZ4 at all, with a checksum that matches it
        return batch_bytes(data, sealed(bytes(np.random.default_rng(7).integers(0, 256, 300, dtype=np.uint8))))
    if name == "bomb":  # decompresses to more than the table's one page
        return batch_bytes([(PAGE_SIZE, 1, 0)], sealed(block))
    if name == "short":  # decompresses to fewer bytes than the table's three pages
        return batch_bytes([(PAGE_SIZE, 3, 0)], sealed(block))
    if name == "truncated":
        return batch_bytes(data, sealed(block))[:-5]
    if name == "lying-length":  # a payload longer than the pages it claims to compress
        return batch_bytes(data, sealed(block), payload_len=8 + 2 * PAGE_SIZE + 1)
    if name == "no-data":  # compressed flag on a batch of zero ranges only
        return batch_bytes([(PAGE_SIZE, 1, 1)], sealed(block))
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name, message",
    [
        ("checksum", "compressed page data checksum mismatch"),
        ("garbage", "compressed page data is not a valid LZ4 block of 8192 bytes"),
        ("bomb", "compressed page data is not a valid LZ4 block of 4096 bytes"),
        ("short", "compressed page data decompressed to 8192 bytes but the batch's DATA ranges hold 12288"),
        ("truncated", "page batch stream ended inside the compressed page data"),
        ("lying-length", "declares a 8201-byte payload for 8192 bytes of page data"),
        ("no-data", "compressed page batch carries 0 bytes of page data"),
    ],
)
def test_a_damaged_compressed_batch_is_refused_before_memory_is_touched(name, message):
    dst = GuestMemory("1M")
    dst.write(0, b"\x11" * 4 * PAGE_SIZE)
    before = dst.digest()
    a, b = socket.socketpair()
    with a, b:
        a.sendall(_hostile(name))
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(PageBatchError, match=message) as caught:
            dst.recv_pages(b.fileno())
    assert caught.value.errno in (errno.EBADMSG, errno.EPIPE)
    assert dst.digest() == before, "nothing of a refused compressed batch is written, even when cut short"


def test_a_well_formed_handmade_compressed_batch_is_received():
    dst = GuestMemory("1M")
    a, b = socket.socketpair()
    with a, b:
        a.sendall(_hostile("good"))
        got = dst.recv_pages(b.fileno())
    assert got["compressed_batches"] == 1 and got["data_pages"] == 2
    assert dst.read(PAGE_SIZE, 2 * PAGE_SIZE) == TWO_PAGES


def test_the_end_of_round_batch_and_header_decoder_are_the_memory_core_s():
    """Python neither packs nor parses a batch header itself: the end-of-round marker and the
    header the fault proxy reads come from the memory core, byte for byte the documented format."""
    from vmmpy import _core
    from vmmpy.migration import protocol as P

    head = BATCH.pack(b"VMPB", 1, 0, HIGHMEM_BASE, 0, 0, 0, 0)[:32]
    assert P.end_of_round_batch(HIGHMEM_BASE) == head + struct.pack("<Q", _core.xxh3_64(head))
    assert P.BATCH_HEADER_SIZE == BATCH.size == 40
    lz4 = batch_bytes([(PAGE_SIZE, 2, 0), (3 * PAGE_SIZE, 1, 1)], b"", payload_len=100)
    assert _core.decode_batch_header(lz4[:40]) == {"segment_gpa": 0, "flags": 1, "range_count": 2, "payload_len": 100}
    with pytest.raises(PageBatchError, match="page batch version 2 is not one this vmmpy reads"):
        _core.decode_batch_header(BATCH.pack(b"VMPB", 2, 0, 0, 0, 0, 0, 0))
    with pytest.raises(PageBatchError, match="declares 65537 ranges, more than the 65536"):
        _core.decode_batch_header(BATCH.pack(b"VMPB", 1, 0, 0, 65537, 0, 0, 0))
    with pytest.raises(PageBatchError, match="a page batch header is 40 bytes, got 39"):
        _core.decode_batch_header(lz4[:39])


def test_a_round_s_shares_are_received_whole_and_charged_to_one_budget():
    """recv_share reads a stream's batches until its empty one; the streams of a round share a
    page budget, so together they cannot carry more pages than it allows, whichever goes first."""
    from vmmpy import _core
    from vmmpy.memory import PageBudget
    from vmmpy.migration import protocol as P

    src = GuestMemory("1M")
    src.write(0, b"\x07" * (10 * PAGE_SIZE))
    dst = GuestMemory("1M")
    budget = PageBudget(16)
    got = []
    for pages in (range(0, 10), range(0, 10)):  # two shares of 10 pages each against 16
        a, b = socket.socketpair()
        with a, b:
            src.send_pages(a.fileno(), pages)
            a.sendall(P.end_of_round_batch(0))
            try:
                got.append(dst.recv_share(b.fileno(), budget=budget, compressed=False))
            except PageBatchError as err:
                got.append(err)
    assert got[0]["data_pages"] == 10 and got[0]["batches"] == 1
    assert got[0]["wire_bytes"] == 40 + 16 + 10 * PAGE_SIZE + _core.BATCH_HEADER_SIZE
    assert isinstance(got[1], PageBatchError) and got[1].errno == errno.EBADMSG
    assert str(got[1]).endswith("the round carried more pages (20) than the guest has (16)")
    assert budget.carried == 20


@pytest.mark.parametrize(("compress", "streams"), [("off", 2), ("off", 1), ("lz4", 1), ("off", 16)])
def test_pages_received_into_fresh_memory_are_installed_without_zeroing_and_exact(compress, streams):
    """A round's share big enough to pay for it goes into fresh unwired memory through
    userfaultfd (installed, never zeroed first): every byte lands, zero ranges and untouched
    pages read as zero, a later round over the same pages copies over them, and wired memory
    (populated up front) is written as before. Where the host offers transparent huge pages, the
    default instead reads a plain batch's whole 2 MiB regions straight onto them (the same bytes,
    nothing installed). ``streams``: 1 is the round's only stream, which
    installs its big plain batches on a second thread while it reads (the tracker's digest shows
    every page hashed as it landed); one of 2 installs 1 MiB windows, one of 16 (more streams than
    CPUs) 512 KiB ones."""
    from vmmpy.memory import PageBudget
    from vmmpy.migration import protocol as P

    def one_round(src, dst):
        a, b = socket.socketpair()
        with a, b:
            out = {}

            def sender():
                out.update(src.send_dirty_pages(a.fileno(), compress=compress))
                a.sendall(P.end_of_round_batch(0))

            thread = threading.Thread(target=sender)
            thread.start()
            got = dst.recv_share(b.fileno(), budget=PageBudget(64 * MiB // PAGE_SIZE), compressed=compress != "off",
                                 tracker=tracker, streams=streams)
            thread.join(timeout=60)
        assert got["data_pages"] == out["data_pages"] and got["zero_pages"] == out["zero_pages"]
        return got

    fill = fill_text if compress == "lz4" else fill_random
    for wired, tracking, huge in ((False, "kernel", False), (True, "soft", False), (False, "soft", False), (False, "soft", True)):
        src = GuestMemory("64M")
        fill(src, 0, 2048, seed=5)  # 8 MiB
        src.write(8 * MiB, bytes(16 * PAGE_SIZE))  # written zeros: a zero range
        fill(src, 9 * MiB, 1024, seed=6)  # 4 MiB more
        dst = GuestMemory("64M", wired=wired, dirty_tracking=tracking)
        if tracking == "soft" and not wired:
            # Installed with userfaultfd, or read straight onto huge pages (the default where the
            # host offers them, and the kernel backend is not in use).
            dst.core.segments[0].receives_huge = huge
            if huge and not dst.core.segments[0].receives_huge:
                continue  # this host offers no transparent huge pages
        if tracking == "kernel":
            dst.core.segments[0].receives_huge = True  # refused: the kernel gives that range no huge page
        assert not dst.core.segments[0].receives_huge or huge
        tracker = dst.digest_tracker()
        got = one_round(src, dst)
        assert got["data_pages"] == 3072 and got["zero_pages"] == 16
        if not wired:
            assert dst.resident_pages() <= 3072 + 64, "untouched pages stayed unpopulated"
        # Every received page was hashed as it landed (the rest, untouched, hash as zeros).
        assert tracker.digest() == src.commit_digest()
        np.testing.assert_array_equal(src.view("lowmem"), dst.view("lowmem"))
        if compress == "lz4":
            assert got["compressed_batches"] > 0
        if wired:
            assert dst.installed_pages() == 0, "wired memory is populated up front: nothing to install"
            continue
        if tracking == "kernel":
            # The kernel backend's userfaultfd holds the range: the kernel refuses a second one,
            # the refusal is named, and the pages are written as before.
            assert "UFFDIO_REGISTER" in dst.core.segments[0].install_refused()
            assert dst.installed_pages() == 0
            continue
        assert dst.core.segments[0].install_refused() is None
        if huge and compress == "off":
            # Whole 2 MiB regions of the 8 MiB and 4 MiB runs: 4 and 1 (or 3 and 1 where the
            # mapping is not 2 MiB-aligned); the rest written plainly, none installed.
            assert dst.huge_pages() in (2560, 2048) and dst.installed_pages() == 0
        elif compress == "off":
            assert dst.installed_pages() == 3072, "every data page was installed into fresh memory"
        else:  # lz4 batches are small: the share begins installing once 4 MiB have arrived on it
            assert 2048 <= dst.installed_pages() < 3072
            assert dst.huge_pages() == 0, "compressed batches are decompressed into place, never advised"
        assert dst.huge_pages() == 0 or huge
        # A later round over pages that are there now: copied over, none installed fresh or advised.
        installed, on_huge = dst.installed_pages(), dst.huge_pages()
        fill(src, 1 * MiB, 1200, seed=7)
        got = one_round(src, dst)
        assert got["data_pages"] == 1200
        np.testing.assert_array_equal(src.view("lowmem"), dst.view("lowmem"))
        assert dst.installed_pages() == installed
        assert dst.huge_pages() == on_huge, "memory already there is not advised again"
        assert tracker.digest() == src.commit_digest()


def plain_round(src: GuestMemory, dst: GuestMemory, *, all_pages: bool = False) -> dict:
    """One uncompressed round of ``src``'s dirty pages (or all of them, as a migration's round 0
    sends them) into ``dst`` over a socketpair."""
    from vmmpy.memory import PageBudget
    from vmmpy.migration import protocol as P

    a, b = socket.socketpair()
    with a, b:
        send = src.send_all_pages if all_pages else src.send_dirty_pages
        thread = threading.Thread(target=lambda: (send(a.fileno()), a.sendall(P.end_of_round_batch(0))))
        thread.start()
        got = dst.recv_share(b.fileno(), budget=PageBudget(dst.memsize // PAGE_SIZE), compressed=False)
        thread.join(timeout=60)
    return got


def test_a_run_with_a_page_already_there_is_not_advised_for_huge_pages():
    """A batch goes onto huge pages only over memory that is all still fresh: with one page of a
    16 MiB run received in an earlier round, the whole run is written as before (installed),
    none of it counted on huge pages, and the bytes end exact."""
    one_round = plain_round
    src = GuestMemory("64M")
    dst = GuestMemory("64M", dirty_tracking="soft")
    if not dst.core.segments[0].receives_huge:
        pytest.skip("this host offers no transparent huge pages (/sys/kernel/mm/transparent_hugepage/enabled)")
    fill_random(src, 5 * PAGE_SIZE, 1, seed=1)  # one page, inside the first 2 MiB region
    assert one_round(src, dst)["data_pages"] == 1
    fill_random(src, 0, 4096, seed=2)  # 16 MiB from 0: every region whole, the first one not fresh
    assert one_round(src, dst)["data_pages"] == 4096
    assert dst.huge_pages() == 0 and dst.installed_pages() > 0
    np.testing.assert_array_equal(src.view("lowmem"), dst.view("lowmem"))
    assert dst.commit_digest() == src.commit_digest()


def test_memory_populated_while_waiting_is_received_straight_into_place_and_zero_pages_go_back():
    """A destination's memory populated ahead (``start_prefault``, as ``vmmrun -R`` does while it
    waits): every batch finds its pages there, so none is installed or advised for huge pages;
    the bytes and the digest end exact, and the pages that came as zero are given back, so the
    destination ends no bigger than the source's touched memory."""
    src = GuestMemory("64M")
    fill_random(src, 0, 4096, seed=3)  # 16 MiB
    fill_random(src, 32 * MiB, 100, seed=4)
    dst = GuestMemory("64M", dirty_tracking="soft")
    tracker = dst.digest_tracker()
    assert dst.start_prefault() == 64 * MiB
    deadline = time.monotonic() + 20
    while dst.mapped_pages() < dst.memsize // PAGE_SIZE and time.monotonic() < deadline:
        time.sleep(0.005)
    done = dst.stop_prefault()
    assert done["bytes"] == done["target_bytes"] == 64 * MiB and not done["stopped"], done
    got = plain_round(src, dst, all_pages=True)
    assert got["data_pages"] == 4196 and got["zero_pages"] == 16384 - 4196
    assert dst.installed_pages() == 0 and dst.huge_pages() == 0
    # (Asked before anything reads the memory: a read maps the shared zero page.)
    assert dst.mapped_pages() == 4196, "every page that came as zero was given back"
    np.testing.assert_array_equal(src.view("lowmem"), dst.view("lowmem"))
    assert tracker.digest() == src.commit_digest() == dst.commit_digest()


@pytest.mark.parametrize("streams", [0, 17, -1, 2**64, True, 2.0, "2"])
def test_a_share_of_a_round_with_no_streams_or_too_many_is_refused(streams):
    from vmmpy.memory import PageBudget
    dst = GuestMemory("4M")
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError, match=re.escape(f"streams is {streams!r}; a round has 1 to 16")):
        dst.recv_share(b.fileno(), budget=PageBudget(16), compressed=False, streams=streams)
