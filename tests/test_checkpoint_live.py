"""Live checkpoints (issue #18): the guest pauses only to freeze its state and arm copy-before-write,
runs on while its memory is written, and the file holds memory exactly as it was at that pause
(the fake guest's writer proves it page for page); a failed live checkpoint leaves no file and a
guest running with all its memory, unprotected; --suspend and --diff with --live are refused."""

import errno
import json
import os
import resource
import subprocess
import time

import pytest

from vmmpy import _core
from vmmpy.runtime.commands import read_checkpoint_offline
from vmmpy.snapshot import CheckpointError, read_checkpoint
from vmmpy.snapshot.checkpoint import checkpoint_guest, restore_guest

from .procs import start_vmmrun, stop, vmmctl, vmmrun_cmd, wait_for_socket, wait_for_state
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
def test_a_live_checkpoint_holds_memory_as_at_its_pause_while_the_writer_runs(tmp_path, guests, mode, tracking):
    src = guests("64M", work_pages=4096, dirty_tracking=tracking)  # as fast as it goes
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


def test_a_diff_after_a_live_checkpoint_carries_the_pages_written_while_it_was_written(tmp_path, guests, tracking):
    src = guests("16M", work_pages=2048, dirty_tracking=tracking)
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
        assert capture.stats().copied_pages == 1 and capture.held_pages == 1
        capture.finish()
        assert not memory.lowmem.live_armed and capture.held_pages == 0
        assert len(memory.memfds()) == 1


# ---- through vmmrun and vmmctl, proved by memtouch (a real vCPU writing as fast as it can) ----------

MEMTOUCH = ["--guest", "memtouch", "--guest-arg", "wss=16M", "--guest-arg", "pattern=random", "--guest-arg", "writes=12000000",
            "--guest-arg", "report=1000000", "-m", "64M", "--tsc", "instructions"]
#: Where the runs are compared, after the live checkpoint and before memtouch's end (about 35 instructions a write).
LATER = 150_000_000


def _paused_figures(run_dir, name):
    """(chunk hashes of a normal checkpoint taken now, every register) of a guest paused at --pause-at."""
    wait_for_state(run_dir, name, "paused", timeout=120)
    ckp = run_dir / f"{name}.at-pause"
    saved = vmmctl(run_dir, f"--vm={name}", f"--checkpoint={ckp}")
    assert saved.returncode == 0, saved.stderr
    registers = vmmctl(run_dir, f"--vm={name}", "--get-all", "--json")
    assert registers.returncode == 0, registers.stderr
    return json.loads((run_dir / f"{name}.at-pause.meta").read_text())["memory"]["chunk_hashes"], json.loads(registers.stdout)


def _run_to_the_end(run_dir, name, proc):
    assert vmmctl(run_dir, f"--vm={name}", "--resume").returncode == 0
    assert proc.wait(timeout=180) == 1, "memtouch powers off"


def _memory_file(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def memtouch_live(tmp_path_factory):
    """A live checkpoint of memtouch writing flat out, the figures at LATER of the guest it was taken
    from and of a run that never stopped (which must agree), and the consoles of both."""
    run_dir = tmp_path_factory.mktemp("memtouch-live")
    logs = {name: run_dir / f"{name}.log" for name in ("live", "plain", "at-n")}
    live = start_vmmrun(run_dir, *MEMTOUCH, "-l", f"com1,{logs['live']}", f"--pause-at={LATER}", "lv0")
    procs = [live]
    try:
        wait_for_socket(run_dir, "lv0", live)
        deadline = time.monotonic() + 60
        while "memtouch: 1000000 writes" not in (logs["live"].read_text() if logs["live"].exists() else ""):
            assert time.monotonic() < deadline, "memtouch did not start writing"
            time.sleep(0.02)
        idle = vmmctl(run_dir, "--vm=lv0", "--checkpoint-cancel")
        assert idle.returncode == 1 and "no live checkpoint is being written" in idle.stderr, idle.stderr
        ckp = run_dir / "lv0.ckp"
        taken = vmmctl(run_dir, "--vm=lv0", f"--checkpoint={ckp}", "--live", "--json")
        assert taken.returncode == 0, taken.stderr
        result = json.loads(taken.stdout)
        live_at_later = _paused_figures(run_dir, "lv0")  # the checkpointed guest ran on to LATER
        _run_to_the_end(run_dir, "lv0", live)
        # A run that never stopped, paused at LATER and run to its end.
        plain = start_vmmrun(run_dir, *MEMTOUCH, "-l", f"com1,{logs['plain']}", f"--pause-at={LATER}", "pl0")
        procs.append(plain)
        wait_for_socket(run_dir, "pl0", plain)
        plain_at_later = _paused_figures(run_dir, "pl0")
        _run_to_the_end(run_dir, "pl0", plain)
        # A run paused at the instruction the live checkpoint paused at, checkpointed normally.
        saved = read_checkpoint_offline(ckp)
        vcpu = next(s for s in saved.sections if s.name == "vmcx").payload["vcpus"][0]
        at_n = start_vmmrun(run_dir, *MEMTOUCH, "-l", f"com1,{logs['at-n']}", f"--pause-at={vcpu['instructions_retired']}", "pn0")
        procs.append(at_n)
        wait_for_socket(run_dir, "pn0", at_n)
        _paused_figures(run_dir, "pn0")
        vmmctl(run_dir, "--vm=pn0", "--destroy")
    finally:
        for proc in procs:
            stop(proc)
    return {"dir": run_dir, "ckp": ckp, "result": result, "live_at_later": live_at_later, "plain_at_later": plain_at_later,
            "at_n": run_dir / "pn0.at-pause", "logs": logs}


def test_a_live_checkpoint_of_memtouch_writing_flat_out_is_memory_at_its_pause(memtouch_live):
    ckp, result = memtouch_live["ckp"], memtouch_live["result"]
    meta = json.loads(ckp.with_name("lv0.ckp.meta").read_text())
    assert result["live"] and result["bytes_written"] >= 16 << 20
    assert meta["live"]["copied_before_write_pages"] == result["copied_before_write_pages"]
    # Byte for byte what a normal checkpoint of a run paused at the same instruction holds.
    at_n = memtouch_live["at_n"]
    assert json.loads(at_n.with_name(at_n.name + ".meta").read_text())["memory"]["chunk_hashes"] == meta["memory"]["chunk_hashes"]
    assert _memory_file(at_n) == _memory_file(ckp)
    # The live checkpoint changed nothing in the guest it was taken from: at LATER it has the
    # memory and registers of a run that never stopped, and the same console at its end.
    assert memtouch_live["live_at_later"] == memtouch_live["plain_at_later"]
    logs = memtouch_live["logs"]
    assert logs["live"].read_text() == logs["plain"].read_text()
    assert logs["plain"].read_text().endswith("memtouch: done 12000000 writes\n")


@pytest.mark.covers(operation="checkpoint", guest="memtouch", via="cli", restore="{mode}", live=True)
@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_a_restored_live_checkpoint_of_memtouch_runs_on_exactly(memtouch_live, mode):
    run_dir, name = memtouch_live["dir"], f"rs-{mode}"
    log = run_dir / f"{name}.log"
    restored = subprocess.Popen(vmmrun_cmd(f"--run-dir={run_dir}", "-r", str(memtouch_live["ckp"]), "--restore-mode", mode,
                                           "-l", f"com1,{log}", f"--pause-at={LATER}", name),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_socket(run_dir, name, restored)
        # Same memory and registers at LATER as the run that never stopped, and the same console to the end.
        assert _paused_figures(run_dir, name) == memtouch_live["plain_at_later"]
        _run_to_the_end(run_dir, name, restored)
    finally:
        stop(restored)
    plain = memtouch_live["logs"]["plain"].read_text()
    assert log.read_text().endswith("memtouch: done 12000000 writes\n") and plain.endswith(log.read_text())


def test_a_lazily_restored_guest_is_loaded_before_the_pause_and_checkpointed_live_exactly(tmp_path, guests):
    src = guests("16M", work_pages=2048)
    src.wait_for_progress(3000)
    checkpoint_guest(src, tmp_path / "full", basic=BASIC)
    dst = guests("16M", work_pages=2048, running=False)
    restore_guest(dst, read_checkpoint(tmp_path / "full", FAKE_SECTIONS), mode="lazy")
    assert not dst.memory.lazy_status().complete
    dst.start_running()
    live_checkpoint(dst, tmp_path / "live", written_after_pause=300)
    restore_exactly(guests, tmp_path / "live", dst.state_at_pause, dst.digest_at_pause)


@pytest.mark.parametrize("args, message", [
    (["--suspend=f", "--live"], "--live goes with --checkpoint, not --suspend: a suspend ends the guest"),
    (["--checkpoint=f", "--diff", "--live"], "--live and --diff together are not supported"),
    (["--status", "--live"], "--live goes with --checkpoint"),
])
def test_vmmctl_refuses_live_with_a_bad_combination_before_asking_anything(tmp_path, args, message):
    refused = vmmctl(tmp_path, "--vm=nobody", *args)  # no vmmrun: refused before any request
    assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and os.listdir(tmp_path) == []


def test_a_live_checkpoint_interrupted_before_its_write_lifts_the_protection(tmp_path, guests):
    src = guests("16M", work_pages=2048)
    src.wait_for_progress(3000)

    def interrupted(message):
        assert src.memory.lowmem.live_armed
        raise KeyboardInterrupt  # as a cancelled request would

    try:
        checkpoint_guest(src, tmp_path / "live", basic=BASIC, live=True, progress=interrupted)
        raise AssertionError("the interrupt was swallowed")
    except KeyboardInterrupt as err:
        assert err.__traceback__ is not None  # its frames, which held the capture, are alive
        assert not src.memory.lowmem.live_armed, "lifted at once, not when the capture is collected"
    assert os.listdir(tmp_path) == [] and src.running
    src.wait_for_progress(20000)  # more than the copy limit's 16384 pages: nothing holds the guest back


def test_a_cancelled_live_checkpoint_leaves_no_file_and_the_guest_runs_on_with_all_its_memory(tmp_path, guests):
    import threading

    src = guests("16M", work_pages=2048)
    src.wait_for_progress(3000)
    cancel = threading.Event()

    def progress(message):
        if message["phase"] == "paused":
            src.wait_for_progress(300)  # pages copied out, then the write is told to stop
            cancel.set()

    with pytest.raises(CheckpointError, match=r"writing failed, nothing was left behind: .*the live checkpoint was cancelled") as caught:
        checkpoint_guest(src, tmp_path / "live", basic=BASIC, live=True, progress=progress, cancel=cancel)
    assert caught.value.__cause__.errno == errno.ECANCELED
    assert os.listdir(tmp_path) == [] and src.running and not src.memory.lowmem.live_armed
    src.wait_for_progress(20000)
    src.stop_writer()
    assert src.bad_pages() == [], "the guest's memory is all its own"


def test_checkpoint_cancel_reaches_the_live_checkpoint_being_written_and_only_that(tmp_path):
    from vmmpy import Vm
    from vmmpy.runtime.commands import MachineCommands

    with Vm("abtest", args={"sweeps": 4000, "report": 0}, memory="32M") as vm:
        vm.start()
        commands = MachineCommands(vm.machine)
        with pytest.raises(OSError, match="no live checkpoint is being written") as idle:
            commands.checkpoint_cancel({}, None)
        assert idle.value.errno == errno.ENOENT
        answers = []

        def progress(message):
            if message["phase"] == "paused":
                answers.append(commands.checkpoint_cancel({}, None))

        with pytest.raises(OSError, match="the live checkpoint was cancelled") as caught:
            commands.checkpoint({"path": str(tmp_path / "live"), "live": True}, progress)
        assert caught.value.errno == errno.ECANCELED and answers == [{"cancelled": True}]
        assert os.listdir(tmp_path) == [] and vm.state == "running"
        written = commands.checkpoint({"path": str(tmp_path / "again"), "live": True}, lambda message: None)
        assert written["live"] and vm.state == "running"
        assert vm.wait(120) == 1 and "all counters 4000" in vm.console
    with Vm.restore(tmp_path / "again") as vm:
        vm.start()
        assert vm.wait(120) == 1 and "all counters 4000" in vm.console
