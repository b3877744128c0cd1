"""memfd-backed guest memory from Python: lowmem and highmem, wired and unwired, the descriptors a
second mapping shares, dirty runs carried over, zero pages that read as zero after a receive
(MADV_DONTNEED alone would leave a memfd's bytes), a lazy restore into memfd memory, and the
vmmrun option that picks it."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from vmmpy.cli import vmmrun
from vmmpy.memory import HIGHMEM_BASE, GuestMemory, GuestMemoryError, PageBudget
from vmmpy.migration import protocol as P
from vmmpy.runtime.config import ConfigError

MiB = 1 << 20


def memfd_memory(**kw) -> GuestMemory:
    return GuestMemory(8 * MiB, lowmem_limit=4 * MiB, backing="memfd", **kw)


@pytest.mark.parametrize("wired", [False, True])
def test_memfd_memory_has_both_segments_and_their_descriptors(wired):
    with memfd_memory(wired=wired, dirty_tracking="soft") as mem:
        assert mem.backing == "memfd"
        assert [s.name for s in mem.segments] == ["lowmem", "highmem"]
        assert all(s.backing == "memfd" and s.wired == wired for s in mem.segments)
        fds = mem.memfds()
        assert len(set(fds)) == 2 and all(os.fstat(fd).st_size == 4 * MiB for fd in fds)
    with GuestMemory(4 * MiB) as anon:
        assert anon.backing == "anon" and anon.lowmem.memfd is None
        with pytest.raises(ValueError, match="anonymous: it has no memfd to hand over"):
            anon.memfds()


@pytest.mark.parametrize("tracking", ["soft", "auto"])
def test_a_second_mapping_shares_the_pages_and_takes_the_dirty_runs(tracking):
    with memfd_memory(dirty_tracking=tracking) as src:
        src.get_and_clear_dirty()
        src.write(5 * 4096, b"five")
        src.write(HIGHMEM_BASE + 9 * 4096, b"x" * 8192)
        runs = src.peek_dirty_runs()
        assert src.dirty_count() == 3, "peeking clears nothing"
        dst = GuestMemory.from_fds(src.memfds(), src.memsize, lowmem_limit=src.lowmem_limit, dirty_tracking=tracking)
        with dst:
            assert dst.backing == "memfd"
            assert [s.memfd_identity for s in dst.segments] == [s.memfd_identity for s in src.segments]
            assert dst.read(5 * 4096, 4) == b"five"
            assert dst.dirty_count() == 0
            dst.mark_dirty_runs(runs)
            assert list(dst.get_and_clear_dirty()) == [5, (HIGHMEM_BASE >> 12) + 9, (HIGHMEM_BASE >> 12) + 10]
            dst.write(7 * 4096, b"seven")
            assert src.read(7 * 4096, 5) == b"seven"


def test_descriptors_that_do_not_fit_the_layout_are_refused_by_segment():
    with memfd_memory() as src:
        with pytest.raises(ValueError, match=r"the memfd received for segment 'lowmem' of 4 MiB .* does not match the "
                                                  r"segment's size of 2 MiB"):
            GuestMemory.from_fds(src.memfds(), src.memsize, lowmem_limit=2 * MiB)
        with pytest.raises(GuestMemoryError, match=r"1 memory descriptor\(s\).*lowmem, highmem"):
            GuestMemory.from_fds(src.memfds()[:1], src.memsize, lowmem_limit=src.lowmem_limit)
        with pytest.raises(GuestMemoryError, match="outside|not backed|crosses"):
            src.mark_dirty_runs((HIGHMEM_BASE // 4096 - 1).to_bytes(8, "little") + (1).to_bytes(8, "little"))


def test_zero_pages_received_into_memfd_memory_read_as_zero():
    """A receive drops zero ranges: on a memfd that must free the pages, not just unmap them."""
    with GuestMemory(8 * MiB, lowmem_limit=4 * MiB) as src, memfd_memory() as dst:
        src.write(0, b"data")
        for gpa in (3 * 4096, HIGHMEM_BASE + 4096):
            dst.write(gpa, b"stale bytes the source does not have")
        a, b = socket.socketpair()
        with a, b:
            got = {}
            budget = PageBudget(sum(seg.pages for seg in dst.segments))
            receiver = threading.Thread(target=lambda: got.update(dst.recv_share(b, budget=budget, compressed=False)))
            receiver.start()
            src.send_all_pages(a)
            a.sendall(P.end_of_round_batch(0))
            receiver.join(30)
        assert got["zero_pages"] > 0
        assert dst.read(0, 4) == b"data"
        assert dst.read(3 * 4096, 8) == bytes(8)
        assert dst.read(HIGHMEM_BASE + 4096, 8) == bytes(8)
        assert dst.digest() == src.digest()


def test_vmmrun_takes_the_backing_from_the_option_or_a_config_variable(tmp_path):
    args = vmmrun.build_parser().parse_args(["--guest", "abtest", "--memory-backing", "memfd", "vm0"])
    assert vmmrun.config_from_args(args).memory_backing == "memfd"
    args = vmmrun.build_parser().parse_args(["--guest", "abtest", "-o", "memory.backing=memfd", "vm0"])
    vmmrun.vmmrun_config.apply(args, vmmrun.vmmrun_config.read_sources(args.config_sources))
    assert vmmrun.config_from_args(args).memory_backing == "memfd"
    assert vmmrun.config_from_args(vmmrun.build_parser().parse_args(["--guest", "abtest", "vm0"])).memory_backing == "anon"
    args = vmmrun.build_parser().parse_args(["--guest", "abtest", "-o", "memory.backing=shm", "vm0"])
    with pytest.raises(ConfigError, match="-o memory.backing=shm: memory.backing must be one of anon, memfd, got 'shm'"):
        vmmrun.vmmrun_config.apply(args, vmmrun.vmmrun_config.read_sources(args.config_sources))


def test_a_lazy_restore_into_memfd_memory_loads_verified_chunks_and_can_be_handed_over(tmp_path):
    from vmmpy import _core

    path = tmp_path / "mem"
    with GuestMemory(8 * MiB, lowmem_limit=4 * MiB) as src:
        src.write(4096, b"low")
        src.write(HIGHMEM_BASE + 3 * MiB, b"high")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _core.write_memory_file(src.core, fd, chunk_size=MiB)
        finally:
            os.close(fd)
        hashes = _core.memory_chunk_hashes(src.core, chunk_size=MiB)
        lazy = GuestMemory.restore_lazy(path, 8 * MiB, hashes, MiB, 4 * MiB, backing="memfd")
        with lazy:
            assert lazy.lazy and lazy.backing == "memfd"
            assert lazy.read(HIGHMEM_BASE + 3 * MiB, 4) == b"high"
            lazy.load_all()
            other = GuestMemory.from_fds(lazy.memfds(), lazy.memsize, lowmem_limit=lazy.lowmem_limit)
            with other:
                assert other.read(4096, 3) == b"low" and other.digest() == src.digest()
