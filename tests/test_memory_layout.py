"""Guest memory is laid out as bhyve's vm_setup_memory lays it out, and says so when asked."""

import errno
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vmmpy import GuestMemory, GuestMemoryError, parse_size
from vmmpy.memory import HIGHMEM_BASE
from vmmpy.units import GiB, MiB, format_size

from .smaps import host_offers_huge_pages, smaps_kib


@pytest.mark.parametrize(
    "memsize, expected",
    [
        ("512M", [("lowmem", 0, 512 * MiB)]),
        ("3G", [("lowmem", 0, 3 * GiB)]),
        ("5G", [("lowmem", 0, 3 * GiB), ("highmem", 4 * GiB, 2 * GiB)]),
        (3 * GiB + 4096, [("lowmem", 0, 3 * GiB), ("highmem", 4 * GiB, 4096)]),
    ],
)
def test_layout_splits_lowmem_and_highmem_at_3_gib(memsize, expected):
    mem = GuestMemory(memsize)
    assert [(s.name, s.gpa, s.size) for s in mem.segments] == expected
    assert mem.memsize == sum(size for _, _, size in expected)


def test_lowmem_limit_can_be_lowered():
    mem = GuestMemory("8M", lowmem_limit="2M")
    assert [(s.name, s.gpa, s.size) for s in mem.segments] == [("lowmem", 0, 2 * MiB), ("highmem", HIGHMEM_BASE, 6 * MiB)]


@pytest.mark.parametrize("text, size", [("512M", 512 * MiB), ("4g", 4 * GiB), ("64GiB", 64 * GiB), ("4096", 4096), ("2 KB", 2048)])
def test_sizes_read_like_bhyve_options(text, size):
    assert parse_size(text) == size
    assert parse_size("512", default_unit=MiB) == 512 * MiB


@pytest.mark.parametrize("bad", ["", "12Q", "-5M", "1.5G", "G"])
def test_bad_sizes_are_refused_with_the_text(bad):
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(bad)


def test_sizes_print_for_people():
    assert format_size(3 * GiB) == "3 GiB"
    assert format_size(1536 * MiB) == "1.5 GiB"


@pytest.mark.parametrize("bad, message", [(0, "positive multiple of 4 KiB"), (4097, "positive multiple of 4 KiB")])
def test_memory_sizes_that_cannot_be_laid_out_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        GuestMemory(bad)


def test_reads_and_writes_round_trip_in_both_segments():
    mem = GuestMemory("5G")
    mem.write(0x1234, b"low")
    mem.write(HIGHMEM_BASE + 0x5678, bytearray(b"high"))
    mem.write(3 * GiB - 3, memoryview(b"end"))  # the last bytes of lowmem
    assert mem.read(0x1234, 3) == b"low"
    assert mem.read(HIGHMEM_BASE + 0x5678, 4) == b"high"
    assert mem.read(3 * GiB - 3, 3) == b"end"


def test_the_3_to_4_gib_hole_is_not_memory():
    mem = GuestMemory("5G")
    with pytest.raises(GuestMemoryError, match="0xe0000000") as err:
        mem.read(0xE000_0000, 8)
    assert err.value.errno == errno.EFAULT
    with pytest.raises(GuestMemoryError, match="0x180000000"):
        mem.write(6 * GiB, b"past the end")


def test_an_access_crossing_a_segment_end_names_address_and_segment():
    mem = GuestMemory("5G")
    with pytest.raises(GuestMemoryError, match=r"0xbffffffc .*'lowmem'") as err:
        mem.write(3 * GiB - 4, b"12345678")
    assert err.value.errno == errno.EFAULT
    assert mem.dirty_count() == 0, "a refused write must not mark anything dirty"


def test_a_64_gib_unwired_guest_costs_nothing_until_touched():
    mem = GuestMemory("64G")
    assert [s.name for s in mem.segments] == ["lowmem", "highmem"]
    assert mem.resident_pages() == 0
    top = HIGHMEM_BASE + mem.highmem.size - 8
    mem.write(top, b"topbyte!")
    assert mem.read(top, 8) == b"topbyte!"
    assert mem.resident_pages() == 1


def test_wired_memory_is_populated_up_front():
    mem = GuestMemory("8M", wired=True)
    assert all(s.wired for s in mem.segments)
    assert mem.resident_pages() == 8 * MiB // 4096


def test_wired_memory_is_populated_in_steps_on_the_kind_of_page_timed_cheaper_and_locked_whole():
    """Wiring populates 2 MiB at a time, each whole region on huge pages or small ones, whichever
    it times cheaper (two steps of each kind first), then locks all of it. An unwired guest's
    first touches stay 4 KiB (a sparse guest must not grow by 2 MiB a touch)."""
    wired = GuestMemory("64M", wired=True)
    wiring = wired.wiring()
    assert wiring["bytes"] == wiring["target_bytes"] == 64 * MiB
    assert not wiring["stopped"] and wiring["refused"] is None
    assert wiring["huge_bytes"] % (2 * MiB) == 0 and isinstance(wiring["huge_cheaper"], bool)
    address = wired.view().__array_interface__["data"][0]
    assert smaps_kib(address, "Locked") == 64 * 1024
    # What the kernel put on huge pages is at most what wiring advised for them.
    assert smaps_kib(address, "AnonHugePages") * 1024 <= wiring["huge_bytes"]
    if host_offers_huge_pages():
        assert wiring["huge_bytes"] >= 2 * 2 * MiB, "the chooser times two whole steps on huge pages first"
    else:
        assert wiring["huge_bytes"] == 0
    unwired = GuestMemory("64M")
    assert unwired.wiring() is None
    unwired.write(0, bytes(64 * MiB))  # every page touched, through the API
    assert smaps_kib(unwired.view().__array_interface__["data"][0], "AnonHugePages") == 0


def test_a_signal_handler_that_raises_stops_wiring_and_its_exception_comes_out():
    """Wiring on the main thread runs Python's signal handlers about every 64 MiB: one that
    raises stops it there and its own exception comes out (Ctrl-C's KeyboardInterrupt, with the
    core's words on how far it got); nothing is left pending, so the next wiring completes."""
    import signal

    class Alarm(Exception):
        pass

    def raise_alarm(signum, frame):
        raise Alarm("the alarm went off")

    before, before_int = signal.signal(signal.SIGALRM, raise_alarm), signal.getsignal(signal.SIGINT)
    try:
        for raised, handler_for_sigint in ((Alarm, None), (KeyboardInterrupt, signal.default_int_handler)):
            if handler_for_sigint is not None:
                signal.signal(signal.SIGINT, handler_for_sigint)
                signal.signal(signal.SIGALRM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
            signal.setitimer(signal.ITIMER_REAL, 0.01)  # well inside wiring 3 GiB, which takes 0.4 s or more
            with pytest.raises(raised) as caught:
                GuestMemory(3 * GiB, wired=True)
            signal.setitimer(signal.ITIMER_REAL, 0)
            if raised is KeyboardInterrupt:
                assert re.fullmatch(r"wiring 3 GiB for segment 'lowmem' was interrupted after [0-9.]+ [MG]iB", str(caught.value))
            else:
                assert str(caught.value) == "the alarm went off"
        signal.signal(signal.SIGALRM, raise_alarm)
        mem = GuestMemory(128 * MiB, wired=True)  # no alarm now: it wires whole, nothing left pending
        assert mem.wiring()["bytes"] == 128 * MiB
        mem.close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)
        signal.signal(signal.SIGINT, before_int)


def test_wired_memory_larger_than_the_host_is_refused_before_mapping():
    with pytest.raises(ValueError, match="cannot be wired: the host has"):
        GuestMemory("100T", wired=True)


def test_wiring_failure_names_rlimit_memlock_size_and_errno():
    # Root wires past RLIMIT_MEMLOCK through CAP_IPC_LOCK, so drop the capability (setpriv) and
    # lower the limit in a child process, as an unprivileged bhyve -S would meet them.
    child = textwrap.dedent(
        """
        import resource
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (64 * 1024, 64 * 1024))
        from vmmpy import GuestMemory, GuestMemoryError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            GuestMemory("256M", wired=True)
        except GuestMemoryError as err:
            grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            print(grew, err.errno, err.strerror)
        else:
            print("WIRED")
        """
    )
    cmd = [sys.executable, "-c", child]
    try:
        subprocess.run(["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-all", "true"], check=True, capture_output=True)
        cmd = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-all", *cmd]
    except (OSError, subprocess.CalledProcessError):
        pass  # not root, or no setpriv: the lowered limit alone applies
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "WIRED" not in out.stdout, "wiring 256 MiB under a 64 KiB RLIMIT_MEMLOCK must fail"
    grew_kib, code, message = out.stdout.strip().split(" ", 2)
    # Refused before a page was touched: the process's peak resident size did not grow by it.
    assert int(grew_kib) < 32 * 1024, f"the refused wiring touched {grew_kib} KiB first"
    assert int(code) in (errno.ENOMEM, errno.EPERM, errno.EAGAIN)
    assert "cannot wire 256 MiB" in message
    assert "RLIMIT_MEMLOCK is 64 KiB" in message
    assert ("ENOMEM" in message) or ("EPERM" in message) or ("EAGAIN" in message)
    assert "os error" not in message, "the errno is named once, with its text"


class TestZeroCopyViews:
    def test_numpy_view_aliases_guest_memory_without_copy(self):
        mem = GuestMemory("1M")
        view = np.frombuffer(mem.lowmem, dtype=np.uint8)
        assert view.size == 1 * MiB
        mem.write(4096 * 7 + 1, b"\xaa\xbb")
        # The array was made before the write and still sees it: it is the guest's memory.
        assert view[4096 * 7 + 1] == 0xAA and view[4096 * 7 + 2] == 0xBB
        assert np.shares_memory(view, mem.view("lowmem"))

    def test_views_are_read_only(self):
        mem = GuestMemory("1M")
        view = mem.view()
        assert not view.flags.writeable
        with pytest.raises(ValueError):
            view[0] = 1
        with pytest.raises(ValueError):
            view.setflags(write=True)
        mv = memoryview(mem.lowmem)
        assert mv.readonly and mv.format == "B" and mv.nbytes == 1 * MiB
        with pytest.raises(TypeError):
            mv[0] = 1

    def test_asking_for_a_writable_buffer_is_refused(self):
        import ctypes

        mem = GuestMemory("1M")
        with pytest.raises(TypeError, match="not writable"):
            ctypes.c_char.from_buffer(mem.lowmem)

    def test_memory_cannot_be_unmapped_while_views_exist(self):
        mem = GuestMemory("1M")
        view = mem.view()
        mv = memoryview(mem.lowmem)
        assert mem.lowmem.exports == 2
        with pytest.raises(BufferError, match="2 exported view"):
            mem.close()
        assert mem.read(0, 4) == b"\0\0\0\0", "a refused close leaves memory usable"
        del view
        mv.release()
        mem.close()
        with pytest.raises(GuestMemoryError, match="closed"):
            mem.read(0, 4)
