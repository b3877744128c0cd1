"""Live checkpoints (issue #18): the guest pauses only to freeze its state and arm copy-before-write,
runs on while its memory is written, and the file holds memory exactly as it was at that pause
(the fake guest's writer proves it page for page); a failed live checkpoint leaves no file and a
guest running with all its memory, unprotected; --suspend and --diff with --live are refused."""

import json
import os
import resource

import pytest

from vmmpy import _core
from vmmpy.snapshot import CheckpointError, read_checkpoint
from vmmpy.snapshot.checkpoint import checkpoint_guest, restore_guest

from .test_checkpoint_diff import restore_exactly
from .test_checkpoint_handle import BASIC, FAKE_SECTIONS

PAGE = 4096


def live_checkpoint(src, path, *, written_after_pause=600, **kwargs):
    """A live checkpoint of ``src`` during which its writer writes at least ``written_after_pause``
    pages after the pause, before the memory write starts (so those pages must be copied out)."""
    def progress(message):
        if message["phase"] == "paused":
            assert src.running, "the guest runs again before its memory is written"
            src.wait_for_progress(written_after_pause)

    return checkpoint_guest(src, path, basic=BASIC, live=True, progress=progress, **kwargs)


@pytest.mark.covers(operation="checkpoint", guest="writer", via="engine", live=True)
@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_a_live_checkpoint_holds_memory_as_at_its_pause_while_the_writer_runs(tmp_path, guests, mode):
    src = guests("64M", work_pages=4096)  # as fast as it goes
    src.wait_for_progress(5000)
    path = tmp_path / "live"
    result = live_checkpoint(src, path)
    assert result["live"] and not result["suspended"]
    assert src.calls == ["pause", "resume"] and src.running
    assert result["copied_before_write_pages"] >= 600, result
    assert src.progress() > sum(src.state_at_pause) + 600, "the guest wrote on while its memory was written"
    meta = json.loads((tmp_path / "live.meta").read_text())
    assert meta["format_version"] == 1, "a live checkpoint is an ordinary full checkpoint"
    live = meta["live"]
    assert live["copied_before_write_pages"] == result["copied_before_write_pages"]
    assert live["bytes_written"] == result["bytes_written"] > 0 and live["write_us"] > 0 and live["pause_us"] > 0
    assert live["peak_held_pages"] >= 600
    # The file is memory at the pause: same pages, same digest, and so the same chunk hashes a
    # stopped checkpoint would have.
    dst = guests("64M", work_pages=4096, running=False)
    restore_guest(dst, read_checkpoint(path, FAKE_SECTIONS), mode=mode)
    assert (dst.sweeps, dst.position) == src.state_at_pause
    assert dst.bad_pages(*src.state_at_pause) == [], "memory is the paused guest's, page for page"
    assert dst.memory.digest() == src.digest_at_pause
    dst.start_running()
    dst.wait_for_progress(300)
    dst.stop_writer()
    assert dst.bad_pages() == []


def test_a_keyed_live_checkpoint_restores_with_its_key(tmp_path, guests):
    src = guests("16M", work_pages=2048)
    src.wait_for_progress(3000)
    key = b"k" * 32
    live_checkpoint(src, tmp_path / "live", written_after_pause=300, key=key)
    meta = json.loads((tmp_path / "live.meta").read_text())
    assert meta["format_version"] == 2 and "live" in meta
    dst = guests("16M", work_pages=2048, running=False)
    restore_guest(dst, read_checkpoint(tmp_path / "live", FAKE_SECTIONS, key=key), mode="eager")
    assert dst.bad_pages(*src.state_at_pause) == [] and dst.memory.digest() == src.digest_at_pause


def test_a_diff_after_a_live_checkpoint_carries_the_pages_written_while_it_was_written(tmp_path, guests):
    src = guests("16M", work_pages=2048)
    src.wait_for_progress(3000)
    live_checkpoint(src, tmp_path / "live", written_after_pause=700)
    src.wait_for_progress(100)
    checkpoint_guest(src, tmp_path / "d1", basic=BASIC, diff=True)
    restore_exactly(guests, tmp_path / "d1", src.state_at_pause, src.digest_at_pause)


@pytest.mark.parametrize("flags, message", [
    ({"suspend": True}, r"--live goes with --checkpoint only: a suspend ends the guest"),
    ({"diff": True}, r"--live and --diff together are not supported"),
    ({"live_copy_limit": 100}, r"the live copy limit must be at least one page \(4096 bytes\), got 100"),
])
def test_a_live_checkpoint_with_a_bad_combination_is_refused_and_nothing_stops(tmp_path, guests, flags, message):
    src = guests("16M", work_pages=256)
    checkpoint_guest(src, tmp_path / "full", basic=BASIC)
    calls = list(src.calls)
    with pytest.raises(CheckpointError, match=message):
        checkpoint_guest(src, tmp_path / "ck", basic=BASIC, live=True, **flags)
    assert src.calls == calls, "refused before the guest was paused"
    assert sorted(os.listdir(tmp_path)) == ["full", "full.kern", "full.meta"]
    src.wait_for_progress(100)


@pytest.fixture
def file_size_limit():
    """Lower RLIMIT_FSIZE for this process (Python ignores SIGXFSZ, so a write past it fails with
    EFBIG, as a full disk fails with ENOSPC); restored after the test."""
    saved = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(nbytes):
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, saved[1]))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, saved)


def test_a_live_checkpoint_that_fails_mid_write_leaves_no_file_and_lifts_the_protection(tmp_path, guests, file_size_limit):
    src = guests("16M", work_pages=2048)
    src.wait_for_progress(3000)
    file_size_limit(4 << 20)  # the work area (1 to 9 MiB) does not fit: the memory write fails a part in
    with pytest.raises(CheckpointError, match=r"checkpoint '.*live': writing failed, nothing was left behind: "
                                              r".*writing the memory file at offset 0x400000 .*File too large"):
        live_checkpoint(src, tmp_path / "live", written_after_pause=300)
    file_size_limit(resource.RLIM_INFINITY)
    assert os.listdir(tmp_path) == [], "no file, not even a temporary one"
    assert src.calls == ["pause", "resume"] and src.running
    # Protection is lifted: the guest writes freely (a capture would hold copies), and a new live
    # checkpoint can be armed and is exact.
    capture = _core.LiveCapture(src.memory.core, 1)
    capture.finish()
    src.wait_for_progress(3000)
    live_checkpoint(src, tmp_path / "again", written_after_pause=300)
    restore_exactly(guests, tmp_path / "again", src.state_at_pause, src.digest_at_pause)


def test_a_writer_beyond_the_copy_limit_waits_for_the_memory_write_and_the_file_is_still_exact(tmp_path, guests):
    src = guests("16M", work_pages=2048)
    src.wait_for_progress(3000)

    def progress(message):
        if message["phase"] == "paused":
            # The writer fills the 64-page side store and must wait for the memory write, which
            # has not started: it makes no progress past the limit until it does.
            before = src.progress()
            with pytest.raises(AssertionError, match="made no progress"):
                src.wait_for_progress(64 * 3, timeout=0.5)
            assert src.progress() - before <= 128, "at most the limit's pages, plus the chunk under way"

    result = checkpoint_guest(src, tmp_path / "live", basic=BASIC, live=True, progress=progress, live_copy_limit=64 * PAGE)
    assert result["peak_held_pages"] <= 64 and result["throttled_writes"] >= 1, result
    restore_exactly(guests, tmp_path / "live", src.state_at_pause, src.digest_at_pause)


def test_no_path_writes_memory_behind_copy_before_write_while_a_live_checkpoint_runs():
    """Every write vmmpy makes goes through the hook (the Rust tests prove each path); the only ways
    around it are refused: views are read-only, and memfds are not handed out while armed."""
    import errno

    import numpy as np

    from vmmpy import GuestMemory

    with GuestMemory("8M", backing="memfd", dirty_tracking="soft") as memory:
        view = np.frombuffer(memory.lowmem, np.uint8)
        assert not view.flags.writeable
        del view
        with pytest.raises(TypeError, match="read-only"):
            memoryview(memory.lowmem).cast("B")[0:1] = b"x"
        capture = _core.LiveCapture(memory.core, 16)
        assert memory.lowmem.live_armed
        with pytest.raises(OSError, match="a live checkpoint is writing this guest's memory") as caught:
            memory.memfds()
        assert caught.value.errno == errno.EBUSY
        memory.write(0, b"new")  # through the hook: its old bytes are copied out first
        assert capture.copied_pages == 1 and capture.held_pages == 1
        capture.finish()
        assert not memory.lowmem.live_armed and capture.held_pages == 0
        assert len(memory.memfds()) == 1
