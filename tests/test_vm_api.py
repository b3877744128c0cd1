"""The library's entry, ``vmmpy.Vm``: a guest built, run, saved, restored and migrated in the
obvious order; errors a caller can catch; memory released by ``close``.

The proof of correctness is the guest's: abtest (instruction TSC, unpaced) is deterministic, so a
run carried through a checkpoint, a lazy restore and a live migration must end exactly as an
uninterrupted run does: the same console (the pieces each Vm printed, joined), the same final
memory and the same instruction count.
"""

from __future__ import annotations

import gc
import hashlib
import time

import pytest

import vmmpy
from vmmpy import CheckpointError, ConfigError, MigrationError, SectionError, Vm, VmmpyError, VmStateError
from vmmpy.runtime.control import ControlError
from vmmpy.state.kernel import KERNEL_SECTIONS

GUEST = "abtest"
# Long enough that a live migration started a third of the way in finishes well before the guest
# (about 100 M instructions; a loaded machine only makes the guest slower).
ARGS = {"sweeps": 4000, "report": 500}
MEMORY = "32M"
PAUSE_AT = 30_000_000  # instructions: where the chained run is checkpointed


def final_state(vm: Vm) -> tuple[int, str, int]:
    """Exit status, SHA-256 of lowmem and vCPU 0's instruction count of a guest that has stopped."""
    status = vm.wait(120)
    assert status is not None, "the guest did not stop in time"
    memory = vm.machine.vm.memory
    view = memory.view("lowmem")
    try:
        digest = hashlib.sha256(view).hexdigest()
    finally:
        del view
    return status, digest, vm.machine.vm.vcpus[0].instructions_retired


@pytest.mark.covers(operation="checkpoint", guest="abtest", via="api", restore="lazy", key=True)
@pytest.mark.covers(operation="migrate-live", guest="abtest", via="api")
def test_a_guest_checkpointed_restored_lazily_and_migrated_live_ends_as_an_uninterrupted_run(tmp_path):
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm:
        vm.start()
        expected = final_state(vm)
        expected_console = vm.console
    assert expected[0] == 1 and "all counters 4000" in expected_console

    path = tmp_path / "vm.ckp"
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm0:
        vm0.start(pause_at=PAUSE_AT)
        vm0.wait_paused(60)
        assert vm0.state == "paused"
        written = vm0.checkpoint(path, key=b"k" * 16)
        assert written["keyed"] and (tmp_path / "vm.ckp.kern").is_file()
        first = vm0.console
    assert "done" not in first, "the checkpoint was to be taken mid-run"

    with Vm.restore(path, mode="lazy", key=b"k" * 16) as vm1, Vm.receive(memory=MEMORY) as vm2:
        assert vm1.config.memsize == 32 << 20 and vm1.state == "created"
        assert vm2.state == "incoming"
        vm1.start()
        stats = vm1.migrate(*vm2.address, live=True, params={"max_rounds": 3, "policy": "switch-over"})
        assert stats.status == "completed" and stats.live and stats.rounds
        assert vm2.received(60).status == "completed"
        assert vm1.wait(10) == 0 and "migrat" in vm1.exit_reason  # bhyve exits 0 after a migration
        second = vm1.console
        got = final_state(vm2)
        third = vm2.console
    assert got == expected
    assert first + second + third == expected_console


@pytest.mark.covers(operation="migrate-warm", guest="abtest", via="api")
@pytest.mark.parametrize("destination", ["newest", "version-8"])
def test_a_warm_migration_sends_the_state_in_parts_to_a_destination_that_reads_them(monkeypatch, destination):
    """Protocol 9 sends the state in parts (STATE_PART ... STATE) and the guest ends exactly as an
    uninterrupted run; a version 8 destination gets it in one STATE, and the guest ends the same."""
    from vmmpy.migration import destination as destination_module
    from vmmpy.migration import protocol as P
    from vmmpy.migration import source as source_module

    # Both ends share this host: parts whatever its CPUs (state_in_parts decides that).
    monkeypatch.setattr(source_module, "state_in_parts", lambda sock: True)
    if destination == "version-8":
        monkeypatch.setattr(destination_module._Receiver, "versions", tuple(v for v in P.PROTOCOL_VERSIONS if v <= 8))
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm:
        vm.start()
        expected = final_state(vm)
        expected_console = vm.console
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm1, Vm.receive(memory=MEMORY) as vm2:
        vm1.start(pause_at=PAUSE_AT)
        vm1.wait_paused(60)
        stats = vm1.migrate(*vm2.address, live=False)
        received = vm2.received(60)
        assert stats.status == received.status == "completed", (stats.error, received.error)
        sections = len(vm2.machine.devices) + len(KERNEL_SECTIONS)
        if destination == "newest":
            assert received.protocol_version == max(P.PROTOCOL_VERSIONS)
            assert received.state_parts == -(-sections // P.STATE_PART_SECTIONS) > 1, (received.state_parts, sections)
        else:
            assert received.protocol_version == 8 and received.state_parts == 1
        first = vm1.console
        got = final_state(vm2)
        second = vm2.console
    assert got == expected
    assert first + second == expected_console


@pytest.mark.covers(operation="checkpoint", guest="abtest", via="api", live=True)
def test_a_live_checkpoint_of_a_running_guest_changes_nothing_and_restores_to_the_same_end(tmp_path):
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm:
        vm.start()
        expected = final_state(vm)
        expected_console = vm.console
    path = tmp_path / "live.ckp"
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm:
        vm.start()
        deadline = time.monotonic() + 60
        while "sweep 500" not in vm.console:  # mid-run, abtest rewriting its pages flat out
            assert time.monotonic() < deadline and vm.state == "running", vm.console
            time.sleep(0.01)
        written = vm.checkpoint(path, live=True)
        assert written["live"] and written["bytes_written"] > 0
        assert final_state(vm) == expected, "the guest the live checkpoint was taken of ends as an uninterrupted run"
        assert vm.console == expected_console
    with Vm.restore(path) as vm:
        vm.start()
        assert final_state(vm) == expected
        assert expected_console.endswith(vm.console) and "all counters 4000" in vm.console


@pytest.mark.covers(operation="suspend", guest="abtest", via="api")
def test_suspend_stops_the_guest_and_a_restore_runs_it_to_the_same_end(tmp_path):
    with Vm(GUEST, args={"sweeps": 300, "report": 0}, memory="16M") as vm:
        vm.start()
        expected = final_state(vm)
    with Vm(GUEST, args={"sweeps": 300, "report": 0}, memory="16M") as vm:
        vm.start(pause_at=2_000_000)
        vm.wait_paused(60)
        vm.suspend(tmp_path / "s.ckp")
        assert vm.wait(10) == 0 and vm.state == "stopped"
        with pytest.raises(VmStateError, match="has stopped"):
            vm.checkpoint(tmp_path / "again.ckp")
    with Vm.restore(tmp_path / "s.ckp") as vm:
        vm.start()
        assert final_state(vm) == expected
        assert vm.console == "abtest: done 300 sweeps over 3584 pages, all counters 300\n"


def test_a_failed_migration_raises_with_its_statistics_and_the_guest_runs_on(tmp_path):
    with Vm(GUEST, args={"sweeps": 0}, memory="16M") as vm, Vm.receive(memory="32M") as dst:
        vm.start()
        with pytest.raises(MigrationError, match="failed") as caught:
            vm.migrate(*dst.address, live=False)
        assert caught.value.stats is not None and caught.value.stats.status == "failed"
        assert "memory" in caught.value.stats.error or "lowmem" in caught.value.stats.error
        assert isinstance(caught.value, VmmpyError)
        assert vm.state == "running"
        # A refused source does not end the destination's wait (vmmrun -R waits on too).
        assert dst.state == "incoming"
        with pytest.raises(TimeoutError, match="still under way"):
            dst.received(0.1)
    assert vm.state == "closed" and dst.state == "closed"  # close ended the wait at once
    with Vm.receive(memory="16M", accept_timeout=0.5) as lonely:
        with pytest.raises(MigrationError, match="no source connected") as incoming:
            lonely.received(30)
        assert incoming.value.stats.status == "failed"
        assert lonely.wait(10) == 4  # the empty guest is discarded, as vmmrun -R exits 4


def test_errors_share_one_root_and_keep_their_old_bases(tmp_path):
    for error, base in ((ConfigError, ValueError), (SectionError, ValueError), (ControlError, OSError),
                        (CheckpointError, Exception), (MigrationError, Exception), (VmStateError, RuntimeError)):
        assert issubclass(error, VmmpyError) and issubclass(error, base), error
    from vmmpy.cli.report import ReportError
    from vmmpy.migration import ProtocolError, Refused

    assert issubclass(ReportError, VmmpyError) and issubclass(ProtocolError, vmmpy.MigrationError)
    assert issubclass(Refused, VmmpyError)
    with pytest.raises(ConfigError, match="-c 0"):
        Vm(GUEST, cpus=0)
    with pytest.raises(ConfigError, match="memory .lots. is not a size"):
        Vm(GUEST, memory="lots")
    with pytest.raises(ConfigError, match="no guest program"):
        Vm(None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="lpc device 'com9'"):
        Vm(GUEST, lpc={"com9": None})
    with pytest.raises(ConfigError, match="restore mode 'later'"):
        Vm.restore(tmp_path / "x.ckp", mode="later")
    with pytest.raises(ConfigError, match="restore page_cache 'drop': choose auto or keep"):
        Vm.restore(tmp_path / "x.ckp", page_cache="drop")  # refused before the file is looked at
    with pytest.raises(CheckpointError, match="x.ckp"):
        Vm.restore(tmp_path / "x.ckp")
    err = ControlError(2, "no such guest")
    assert err.errno == 2 and isinstance(err, VmmpyError)


def test_calls_out_of_order_say_what_to_do_first():
    vm = Vm(GUEST, args={"sweeps": 1}, memory="8M")
    with pytest.raises(VmStateError, match="never started"):
        vm.wait(1)
    with pytest.raises(VmStateError, match="no pause point"):
        vm.wait_paused(1)
    vm.start()
    with pytest.raises(VmStateError, match="already started"):
        vm.start()
    assert vm.wait(60) == 1
    vm.close()
    vm.close()  # twice is harmless
    assert repr(vm) == "<Vm closed>" and vm.state == "closed"
    with pytest.raises(VmStateError, match="closed"):
        vm.start()


def _rss_mib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_close_releases_guest_memory_at_once_without_the_cycle_collector():
    """A 256 MiB guest that touched all its memory: after close, the process's resident memory
    falls by (nearly) that much with the cycle collector off, which it did not before (the
    machine, its VM and devices hold each other in reference cycles)."""
    gc.collect()
    gc.disable()
    try:
        vm = Vm(GUEST, args={"sweeps": 1, "report": 0}, memory="256M")
        vm.start()
        assert vm.wait(120) == 1
        touched = _rss_mib()
        vm.close()
        released = touched - _rss_mib()
    finally:
        gc.enable()
    assert released >= 200, f"close released {released} MiB of a guest that touched 254 MiB"


def test_a_migration_in_doubt_raises_holds_the_guest_and_resolve_migration_settles_it():
    """The destination's COMMIT_ACK is cut and the destination made unreachable: the source
    cannot know whether its COMMITTED arrived, so migrate() raises "in doubt" with the guest held
    paused here; resolve_migration("ask") reaches the destination and the guest runs there."""
    from .fault_proxy import FaultProxy
    from .migration_helpers import KEY

    params = {"handshake_timeout": 3, "io_timeout": 3, "commit_timeout": 1.0, "resolve_timeout": 1.0}

    def pair() -> tuple[Vm, Vm]:
        return Vm(GUEST, args={"sweeps": 0}, memory="16M"), Vm.receive(memory="16M", key=KEY, params=params)

    src, dst = pair()  # a dry run finds the COMMIT_ACK on the wire
    with src, dst, FaultProxy(dst.address) as proxy:
        src.start()
        src.migrate("127.0.0.1", proxy.port, live=False, key=KEY, params=params)
        dst.received(30)
        assert proxy.wait_quiet(10)
        ack = next(m for m in proxy.log if m.kind == "COMMIT_ACK" and m.connection == 0)
    src, dst = pair()
    with src, dst:
        proxy = FaultProxy(dst.address, direction="d2s", after_message=ack.index, action="reset", accept_many=False)
        src.start()
        with pytest.raises(MigrationError, match="in doubt.*resolve_migration") as caught:
            src.migrate("127.0.0.1", proxy.port, live=False, key=KEY, params=params)
        proxy.close()
        assert caught.value.stats.status == "in-doubt"
        assert src.state == "in-doubt" and src.machine.paused
        with pytest.raises(TimeoutError):
            dst.received(0.5)  # held in doubt there too: neither side runs it
        # The operator asks again; the source's record names the proxy's address, which is gone,
        # so (as test_migration_ownership does) the test points the source at the destination.
        src._migration._source.port = dst.address[1]
        stats = src.resolve_migration("ask", timeout=5)
        assert stats.status == "completed", stats.error
        assert dst.received(30).status == "completed" and dst.state == "running"
        assert src.wait(10) == 0
        with pytest.raises(VmStateError, match="no migration .* is in doubt"):
            src.resolve_migration()


@pytest.mark.covers(operation="checkpoint", guest="blktest", device="virtio-blk", via="api")
def test_a_guest_with_a_disk_restores_with_its_slots_and_is_refused_without_them(tmp_path):
    """``slots`` are vmmrun's -s options: blktest drives a virtio-blk disk through a checkpoint
    taken halfway and ends as an uninterrupted run; a restore that leaves the devices out is
    refused, naming the file, the device and the option that adds it, with nothing started."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(256 * 1024)
    slots = ["0,hostbridge", "1,lpc", f"3,virtio-blk,{image},ser=disk-7"]
    options = {"args": {"mode": "poll", "seed": "5"}, "memory": "16M", "slots": slots}
    with Vm("blktest", **options) as vm:
        vm.start()
        assert vm.wait(60) == 1
        expected, total = vm.console, vm.machine.vm.vcpus[0].instructions_retired
    assert "read back 512 sectors, all match" in expected, expected
    with Vm("blktest", **options) as vm:
        vm.start(pause_at=total // 2)
        vm.wait_paused(60)
        vm.checkpoint(tmp_path / "blk.ckp")
        first = vm.console
    assert "read back" not in first, "the checkpoint was to be taken halfway"
    with pytest.raises(VmmpyError) as refused:
        Vm.restore(tmp_path / "blk.ckp")
    assert str(refused.value) == (f"checkpoint '{tmp_path / 'blk.ckp'}': device 'hostbridge@pci.0.0.0' was saved but is "
                                  "not configured here (add its -s option)")
    assert isinstance(refused.value, (CheckpointError, SectionError))
    with Vm.restore(tmp_path / "blk.ckp", slots=slots) as vm:
        vm.start()
        assert vm.wait(60) == 1
        assert first + vm.console == expected


def test_bad_migration_params_are_a_config_error_naming_the_parameter():
    with Vm("abtest", memory="16M") as vm:
        with pytest.raises(ConfigError, match=r"^params: got an unexpected keyword argument 'downtime_ms' \(known: downtime_target_ms, "):
            vm.migrate("127.0.0.1", 9, params={"downtime_ms": 5})
        with pytest.raises(ConfigError, match=r"^params: streams must be a whole number from 1 to 16, got 99$"):
            vm.migrate("127.0.0.1", 9, params={"streams": 99})
