"""Checkpoints see a guest only through the guest handle (state.handle.GuestHandle), as migration
does: the fake migration guest (real memory, a writer thread) is checkpointed and restored with
no VM anywhere, and the orchestration keeps the ownership rule (a failed checkpoint resumes the
guest; a suspend stops it for good; a refused restore touches nothing)."""

import os

import pytest

from vmmpy.snapshot import CheckpointError, read_checkpoint
from vmmpy.snapshot.checkpoint import checkpoint_guest, restore_guest
from vmmpy.state import Section, SectionRegistry
from vmmpy.state.handle import GuestHandle

FAKE_SECTIONS = SectionRegistry({"cpu0": 1, "fakeguest": 1})
BASIC = {"ncpus": 1, "vmname": "fake"}


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_a_checkpoint_of_any_guest_handle_restores_into_another_exactly(tmp_path, guests, mode):
    src = guests("16M", work_pages=256)
    assert isinstance(src, GuestHandle)
    src.wait_for_progress(300)
    path = tmp_path / "ck"
    phases = []
    result = checkpoint_guest(src, path, basic=BASIC, progress=lambda p: phases.append(p["phase"]))
    # paused, then the memory write's figures (every half second, and once when it is all written), then written
    writing = len(phases) - 2
    assert writing >= 1 and phases == ["paused", *["checkpoint"] * writing, "written"], phases
    assert result["path"] == str(path) and not result["suspended"]
    assert src.calls == ["pause", "resume"] and not src.stopped, "a checkpoint keeps the guest running"
    src.wait_for_progress(300)  # it runs on after the checkpoint

    dst = guests("16M", work_pages=256, running=False)
    restore_guest(dst, read_checkpoint(path, FAKE_SECTIONS), mode=mode)
    assert dst.calls == ["check_sections", "adopt_memory", "restore_sections"]
    assert (dst.sweeps, dst.position) == src.state_at_pause
    assert dst.bad_pages(*src.state_at_pause) == [], "memory is the paused guest's, page for page"
    assert dst.memory.digest() == src.digest_at_pause
    dst.start_running()
    dst.wait_for_progress(300)  # the restored guest runs on its restored memory
    dst.stop_writer()
    assert dst.bad_pages() == []


def test_a_suspend_stops_the_guest_for_good_naming_the_files(tmp_path, guests):
    src = guests("16M", work_pages=256)
    src.wait_for_progress(100)
    path = tmp_path / "suspended"
    result = checkpoint_guest(src, path, basic=BASIC, suspend=True)
    assert result["suspended"] and src.stopped and src.stop_reason == f"suspended to {path}"
    assert "resume" not in src.calls, "a suspended guest never runs again here"


def test_a_checkpoint_that_cannot_be_written_resumes_the_guest_and_leaves_no_file(tmp_path, guests):
    src = guests("16M", work_pages=256)
    path = tmp_path / "no-such-directory" / "ck"
    with pytest.raises(CheckpointError) as caught:
        checkpoint_guest(src, path, basic=BASIC)
    assert str(path.parent) in str(caught.value)
    assert src.calls == ["pause", "resume"] and src.running and not src.stopped
    assert not path.parent.exists() and os.listdir(tmp_path) == []
    src.wait_for_progress(100)  # still running


def test_a_restore_the_guest_refuses_touches_nothing(tmp_path, guests):
    src = guests("16M", work_pages=256)
    src.save_sections = lambda: [Section("cpu0", 1, {"rip": 0})]  # a guest that lost a section
    path = tmp_path / "ck"
    checkpoint_guest(src, path, basic=BASIC)
    dst = guests("16M", work_pages=256, running=False)
    own_memory = dst.memory
    with pytest.raises(ValueError, match=rf"checkpoint '{path}.kern': state lacks sections \['fakeguest'\]"):
        restore_guest(dst, read_checkpoint(path, FAKE_SECTIONS))
    assert dst.calls == ["check_sections"] and dst.memory is own_memory, "refused before any memory was restored"
