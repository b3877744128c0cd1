"""Local migration between real vmmrun processes on one host (issue 19): the source's memfd
memory is handed over on a Unix socket (SCM_RIGHTS), never copied, and the guest ends exactly
as a run that was never migrated, across a chain of migrations with the guest running, with a
disk doing I/O, and with either side killed (SIGKILL) at each step."""

from __future__ import annotations

import json
import os
import signal
import stat
import time

import pytest

from .procs import start_vmmrun, stop, vmmctl, wait_for_socket, wait_for_state

MiB = 1 << 20


def abtest(sweeps: int, memory: str = "32M") -> list[str]:
    return ["--guest", "abtest", "--guest-arg", f"sweeps={sweeps}", "--guest-arg", f"report={sweeps // 4}", "-m", memory]


def expected_abtest(sweeps: int, pages: int) -> str:
    step = sweeps // 4
    lines = "".join(f"abtest: sweep {n}\n" for n in range(step, sweeps + 1, step))
    return lines + f"abtest: done {sweeps} sweeps over {pages} pages, all counters {sweeps}\n"


def wait_for_path(path, proc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vmmrun exited {proc.returncode} before listening: {proc.stderr.read()}")
        if os.path.exists(path):
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on {path} after {timeout} s")


class Hops:
    """A guest started memfd-backed as hop0, then handed to hop1, hop2, ... each a new vmmrun
    waiting with -R unix:PATH; every hop's console is its own file, read in order at the end."""

    def __init__(self, tmp_path, guest_args: list[str], *, slots: tuple[str, ...] = (), pause_at: int | None = None,
                 backing: str = "memfd") -> None:
        self.dir = tmp_path
        self.slots = list(slots)
        self.memory = guest_args[guest_args.index("-m") + 1]
        self.procs = []
        self.consoles = []
        extra = [f"--pause-at={pause_at}"] if pause_at is not None else []
        first = start_vmmrun(tmp_path, *guest_args, *self.slots, "--memory-backing", backing, *extra,
                             "-l", f"com1,{self.console(0)}", "hop0")
        self.procs.append(first)
        wait_for_socket(tmp_path, "hop0", first)

    def console(self, n: int):
        path = self.dir / f"hop{n}.log"
        if len(self.consoles) <= n:
            self.consoles.append(path)
        return path

    @property
    def current(self) -> int:
        return len(self.procs) - 1

    def start_destination(self, *extra: str):
        n = len(self.procs)
        sock = self.dir / f"hop{n}.mig"
        dest = start_vmmrun(self.dir, "-m", self.memory, *self.slots, "-l", f"com1,{self.console(n)}",
                            "-R", f"unix:{sock}", "--accept-timeout", "60", *extra, f"hop{n}")
        self.procs.append(dest)
        wait_for_path(sock, dest)
        return dest, sock

    def migrate(self, sock, *extra: str):
        return vmmctl(self.dir, f"--vm=hop{self.current - 1}", "--migrate-local", f"unix:{sock}", "--json", *extra, timeout=120)

    def hop(self):
        """One local migration from the current vmmrun to a new one; its statistics."""
        dest, sock = self.start_destination()
        result = self.migrate(sock)
        assert result.returncode == 0, result.stderr
        assert self.procs[-2].wait(timeout=60) == 0, "the source vmmrun exits 0 once the new one runs the guest"
        return json.loads(result.stdout)

    def finish(self, timeout: float = 180) -> int:
        try:
            return self.procs[-1].wait(timeout=timeout)
        finally:
            self.stop()

    def stop(self) -> None:
        for proc in self.procs:
            stop(proc)

    def console_text(self) -> str:
        return "".join(path.read_text() if path.exists() else "" for path in self.consoles)


def test_a_chain_of_local_migrations_of_a_running_guest_ends_exactly(tmp_path):
    # About 7 s of guest time here; the five hops take about 3 s, so the guest runs through them.
    sweeps = 50_000
    hops = Hops(tmp_path, abtest(sweeps))
    try:
        downtimes = []
        for _ in range(5):
            stats = hops.hop()
            assert stats["status"] == "completed" and stats["bytes_total"] < 64 * 1024, "memory is handed over, not sent"
            assert stats["downtime_breakdown"].get("memory_ms") is not None and not stats["rounds"]
            downtimes.append(stats["downtime_ms"])
        assert hops.finish() == 1
    finally:
        hops.stop()
    assert "done" not in hops.consoles[0].read_text(), "the guest was still running when it was first migrated"
    assert hops.console_text() == expected_abtest(sweeps, (32 * MiB - 2 * MiB) // 4096)


def test_the_hash_guest_handed_over_prints_the_reference_hash(tmp_path):
    from vmmpy.guest.programs.hash import reference_hash

    # Paused at its first instruction: the whole run is the new vmmrun's, each page read 121 times
    # and written 120, so the rounds only set how long it runs (and how long the reference, in
    # Python, takes: about 10 ms a round).
    rounds = 120
    hops = Hops(tmp_path, ["--guest", "hash", "--guest-arg", f"rounds={rounds}", "--guest-arg", "end=12M", "-m", "16M"],
                pause_at=1)
    try:
        wait_for_state(tmp_path, "hop0", "paused")
        hops.hop()  # the new vmmrun runs it (as after any migration)
        assert hops.finish() == 1
    finally:
        hops.stop()
    assert hops.console_text() == f"hash: 0x{reference_hash(2 * MiB, 12 * MiB, rounds=rounds, seed=0):016x}\n"


def test_a_guest_mid_disk_io_is_handed_over_and_finishes_with_the_reference_digest(tmp_path):
    from vmmpy.guest.programs import blktest

    from .guest_points import pause_in_write_pass

    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    slots = ("-s", "0,hostbridge", "-s", "1,lpc", "-s", f"3,virtio-blk,{img}")
    probe = tmp_path / "probe.img"
    probe.write_bytes(bytes(1 << 20))
    at, first_line = pause_in_write_pass("blktest", [s.replace(str(img), str(probe)) for s in slots[1::2]])
    hops = Hops(tmp_path, ["--guest", "blktest", "-m", "8M"], slots=slots, pause_at=at)
    try:
        wait_for_state(tmp_path, "hop0", "paused")
        hops.hop()
        assert hops.finish() == 1
    finally:
        hops.stop()
    sectors = (1 << 20) // 512
    assert hops.consoles[0].read_text() == first_line, "handed over halfway through the write pass"
    assert f"all match, digest 0x{blktest.reference_digest(1, sectors):016x}\n" in hops.console_text()
    assert img.read_bytes() == blktest.reference_image(1, sectors)


def test_an_anonymous_memory_guest_is_refused_naming_the_option_and_runs_on(tmp_path):
    sweeps = 4000
    hops = Hops(tmp_path, abtest(sweeps), backing="anon", pause_at=4_000_001)
    try:
        wait_for_state(tmp_path, "hop0", "paused")
        dest, sock = hops.start_destination()
        result = hops.migrate(sock)
        assert result.returncode == 1
        assert "must be memfd-backed" in result.stderr and "--memory-backing memfd" in result.stderr, result.stderr
        assert "the guest stays here, paused (vmmctl --resume runs it)" in result.stderr, result.stderr
        stop(dest)
        assert vmmctl(tmp_path, "--vm=hop0", "--resume").returncode == 0
        assert hops.procs[0].wait(timeout=60) == 1
    finally:
        hops.stop()
    assert hops.consoles[0].read_text() == expected_abtest(sweeps, (32 * MiB - 2 * MiB) // 4096)


def test_the_unix_socket_is_the_owners_only_and_a_live_one_is_not_taken(tmp_path):
    sock = tmp_path / "mig.sock"
    first = start_vmmrun(tmp_path, "-m", "8M", "-R", f"unix:{sock}", "--accept-timeout", "30", "d0")
    try:
        wait_for_path(sock, first)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        second = start_vmmrun(tmp_path, "-m", "8M", "-R", f"unix:{sock}", "--accept-timeout", "30", "d1")
        assert second.wait(timeout=60) == 4
        err = second.stderr.read()
        assert f"cannot listen on unix:{sock}: another process listens there" in err, err
        assert first.poll() is None, "the first destination keeps waiting"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert sock.exists(), "kill -9 leaves the socket behind"
        third = start_vmmrun(tmp_path, "-m", "8M", "-R", f"unix:{sock}", "--accept-timeout", "1", "d2")
        assert third.wait(timeout=60) == 4
        assert f"no source connected to unix:{sock} within 1 s" in third.stderr.read(), "a stale socket is replaced"
        assert not sock.exists(), "the destination removes its socket when it ends"
        plain = tmp_path / "plain"
        plain.write_text("not a socket")
        fourth = start_vmmrun(tmp_path, "-m", "8M", "-R", f"unix:{plain}", "d3")
        assert fourth.wait(timeout=60) == 4
        assert "the path exists and is not a socket" in fourth.stderr.read()
        assert plain.read_text() == "not a socket"
    finally:
        stop(first)


def test_a_destination_listens_before_its_control_socket_answers(tmp_path):
    """Whoever finds a `vmmrun -R` through its control socket (the README's walk-through waits
    for `vmmctl --status`, then migrates at once) finds it listening: it listens first, numpy's
    import and all, and only then serves its control socket."""
    sock, ctl = tmp_path / "mig.sock", tmp_path / "d0.ctl"
    proc = start_vmmrun(tmp_path, "-m", "8M", "-R", f"unix:{sock}", "--accept-timeout", "30", "d0")
    try:
        deadline = time.monotonic() + 60
        while not ctl.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no control socket within 60 s"
            time.sleep(0.001)
        assert sock.exists(), "the control socket is there but the destination does not listen yet"
        wait_for_socket(tmp_path, "d0", proc)
    finally:
        stop(proc)


def test_vmmctl_migrate_local_wants_a_unix_address(tmp_path):
    result = vmmctl(tmp_path, "--vm=nothere", "--migrate-local", "127.0.0.1:5000")
    assert result.returncode != 0 and "expected unix:PATH" in result.stderr, result.stderr


DEST_KILLS = [
    ("s2d", "LOCAL_MEMORY", "before the memory is sent"),
    ("s2d", "COMMIT_REQUEST", "after the descriptors and the state were taken, before the commit"),
]


@pytest.mark.parametrize("direction,message,step", DEST_KILLS, ids=[k[1] for k in DEST_KILLS])
def test_the_destination_killed_before_it_confirms_leaves_the_source_running_with_all_its_memory(tmp_path, direction,
                                                                                                  message, step):
    from vmmpy.migration import protocol as P

    from .unix_proxy import UnixKillProxy

    sweeps = 8000
    hops = Hops(tmp_path, abtest(sweeps), pause_at=4_000_001)
    try:
        wait_for_state(tmp_path, "hop0", "paused")
        dest, sock = hops.start_destination()
        proxy = UnixKillProxy(tmp_path / "proxy.sock", sock, kill=(direction, P.MessageType[message], dest))
        result = hops.migrate(tmp_path / "proxy.sock")
        proxy.close()
        # The relay reaps the killed process before it sets `fired`; vmmctl can return first.
        assert proxy.fired.wait(30), f"the kill point ({step}) was reached"
        assert result.returncode == 1, result.stdout
        assert "the guest stays here, paused (vmmctl --resume runs it)" in result.stderr, result.stderr
        assert dest.returncode == -signal.SIGKILL
        assert vmmctl(tmp_path, "--vm=hop0", "--resume").returncode == 0
        assert hops.procs[0].wait(timeout=120) == 1
    finally:
        hops.stop()
    assert hops.consoles[1].read_text() == "", "the killed destination never ran the guest"
    assert hops.consoles[0].read_text() == expected_abtest(sweeps, (32 * MiB - 2 * MiB) // 4096)


def migrate_killing_the_source(hops: Hops, direction: str, message: str):
    """Migrate hop0 (paused) to a new destination through the relay, which kills hop0 at
    ``message`` going ``direction``; returns the destination."""
    from vmmpy.migration import protocol as P

    from .unix_proxy import UnixKillProxy

    wait_for_state(hops.dir, "hop0", "paused")
    dest, sock = hops.start_destination()
    proxy = UnixKillProxy(hops.dir / "proxy.sock", sock, kill=(direction, P.MessageType[message], hops.procs[0]))
    hops.migrate(hops.dir / "proxy.sock")
    # The relay reaps the killed source before it sets `fired`, and vmmctl, whose control
    # connection to that source broke, can return first.
    assert proxy.fired.wait(30), f"the kill point ({direction} {message}) was reached"
    return dest


def test_the_source_killed_after_the_descriptors_the_destination_discards_and_never_runs_it(tmp_path):
    hops = Hops(tmp_path, abtest(8000), pause_at=4_000_001)
    try:
        dest = migrate_killing_the_source(hops, "s2d", "STATE")
        assert dest.wait(timeout=60) == 4
        assert "incoming migration" in dest.stderr.read()
    finally:
        hops.stop()
    assert hops.consoles[1].read_text() == "", "a destination the source never committed to never runs the guest"
    assert not (tmp_path / "hop1.mig").exists()


def test_the_source_killed_after_the_confirmation_changes_nothing(tmp_path):
    sweeps = 8000
    hops = Hops(tmp_path, abtest(sweeps), pause_at=4_000_001)
    try:
        migrate_killing_the_source(hops, "d2s", "RESUMED")
        assert hops.finish() == 1, "the destination runs the guest to its end"
    finally:
        hops.stop()
    assert hops.console_text() == expected_abtest(sweeps, (32 * MiB - 2 * MiB) // 4096)


def hand_over_here(tmp_path, src, dst_handle):
    """A warm local migration between two machines of this process over a Unix socket, the
    destination on a thread: (the source's statistics, the destination's)."""
    import threading

    from vmmpy.migration import Destination, migrate
    from vmmpy.runtime.guest_handle import MachineHandle

    path = tmp_path / "mig.sock"
    dest = Destination(dst_handle, f"unix:{path}", 0)
    received = {}
    thread = threading.Thread(target=lambda: received.update(stats=dest.run(30)))
    thread.start()
    stats = migrate(MachineHandle(src), f"unix:{path}", 0, live=False)
    thread.join(60)
    assert not thread.is_alive(), "the destination did not end"
    return stats, received["stats"]


def test_the_dirty_pages_carry_over_so_the_next_harvest_is_exact(tmp_path):
    """In one process: a paused guest with known dirty pages handed over on a Unix socket; the new
    machine maps the same memory and harvests exactly the pages the old one had dirty."""

    from vmmpy.guest.programs import load_into
    from vmmpy.memory import HIGHMEM_BASE
    from vmmpy.runtime.commands import build_machine
    from vmmpy.runtime.config import VmConfig
    from vmmpy.runtime.guest_handle import MachineHandle

    src_config = VmConfig(name="src", memsize=5 << 30, memory_backing="memfd", guest="abtest")
    src = build_machine(src_config, load=lambda m: load_into(m, "abtest", {"sweeps": "10"}, memsize=src_config.memsize))
    dst = build_machine(VmConfig(name="dst", memsize=5 << 30))

    class Harvesting(MachineHandle):
        """Harvests the new machine's dirty pages the moment before its guest runs again."""

        def start_running(self) -> None:
            self.harvest = list(self.memory.get_and_clear_dirty())
            super().start_running()

    handle = Harvesting(dst)
    try:
        memory = src.vm.memory
        memory.get_and_clear_dirty()
        memory.write(3 * 4096, b"low")
        memory.write(HIGHMEM_BASE + 5 * 4096 - 2, b"span")
        expected = list(memory.get_and_clear_dirty())
        memory.write(3 * 4096, b"low")
        memory.write(HIGHMEM_BASE + 5 * 4096 - 2, b"span")
        stats, dstats = hand_over_here(tmp_path, src, handle)
        assert stats.status == "completed", stats.error
        assert dstats.status == "completed", dstats.error
        new = dst.vm.memory
        assert new.backing == "memfd" and new.read(3 * 4096, 3) == b"low"
        assert handle.harvest == expected == [3, (HIGHMEM_BASE >> 12) + 4, (HIGHMEM_BASE >> 12) + 5]
        assert stats.bytes_total < 64 * 1024, "nothing of the 5 GiB was copied"
    finally:
        from vmmpy.vmm.ioctl import SuspendHow

        if dst.vm.memory is not None and dst.exit_status is None:
            dst.suspend(SuspendHow.POWEROFF)  # the guest runs there now: stop it before closing
            dst.wait(10)
        dst.close()
        src.close()


def test_the_destination_starts_its_vcpus_held_once_it_acknowledged_the_commit(tmp_path):
    """The vCPU threads are not started by the state restore (whose time is before COMMIT_ACK) but
    while COMMITTED is on its way, held at the pause: the guest runs only from start_running."""
    import threading

    from vmmpy.guest.programs import load_into
    from vmmpy.migration import protocol as P
    from vmmpy.migration import source as source_module
    from vmmpy.runtime.commands import build_machine
    from vmmpy.runtime.config import VmConfig
    from vmmpy.runtime.guest_handle import MachineHandle
    from vmmpy.vmm.ioctl import SuspendHow

    def vcpu_threads() -> int:
        return sum(t.name == "dst/vcpu0" for t in threading.enumerate())

    config = VmConfig(name="src", memsize=64 * MiB, memory_backing="memfd", guest="abtest")
    src = build_machine(config, load=lambda m: load_into(m, "abtest", {"sweeps": "10"}, memsize=config.memsize))
    dst = build_machine(VmConfig(name="dst", memsize=64 * MiB))
    seen = {}

    class Watching(MachineHandle):
        def section_loader(self, *, what):
            loader = super().section_loader(what=what)
            restore = loader.restore

            def watched():
                restore()
                seen["after restore"] = vcpu_threads()
            loader.restore = watched
            return loader

        def prepare_to_run(self):
            super().prepare_to_run()
            seen["after prepare"] = vcpu_threads()
            seen["retired"] = self.machine.vm.vcpus[0].instructions_retired

        def start_running(self):
            time.sleep(0.2)  # held: the started thread must not run the guest meanwhile
            seen["retired at start"] = self.machine.vm.vcpus[0].instructions_retired
            super().start_running()

    try:
        stats, dstats = hand_over_here(tmp_path, src, Watching(dst))
        assert stats.status == "completed", stats.error
        assert dstats.status == "completed", dstats.error
        assert seen["after restore"] == 0 and seen["after prepare"] == 1
        # Protocol 9: the state came in parts where this host has the CPUs for it (state_in_parts).
        sections = len(MachineHandle(dst).spec()["devices"])
        in_parts = len(os.sched_getaffinity(0)) >= source_module.PARTS_ON_ONE_HOST_CPUS
        assert sections > P.STATE_PART_SECTIONS and dstats.protocol_version == max(P.PROTOCOL_VERSIONS)
        assert dstats.state_parts == stats.state_parts == (-(-sections // P.STATE_PART_SECTIONS) if in_parts else 1)
        assert seen["retired at start"] == seen["retired"] == 0
        assert dst.wait(30) is not None and dst.vm.vcpus[0].instructions_retired > 0, "it ran once started"
    finally:
        for machine in (dst, src):
            if machine.vm.memory is not None and machine.exit_status is None:
                machine.suspend(SuspendHow.POWEROFF)
                machine.wait(10)
            machine.close()


def test_a_checkpoint_after_a_hand_over_restores_exactly(tmp_path):
    sweeps = 8000
    hops = Hops(tmp_path, abtest(sweeps), pause_at=4_000_001)
    try:
        wait_for_state(tmp_path, "hop0", "paused")
        hops.hop()
        ckp = tmp_path / "vm.ckp"
        result = vmmctl(tmp_path, "--vm=hop1", "--suspend", str(ckp))
        assert result.returncode == 0, result.stderr
        assert hops.procs[-1].wait(timeout=60) == 0
        restored = start_vmmrun(tmp_path, "-r", str(ckp), "-l", f"com1,{tmp_path / 'restored.log'}", "hop9")
        hops.procs.append(restored)
        assert restored.wait(timeout=120) == 1, restored.stderr.read()
    finally:
        hops.stop()
    text = hops.console_text() + (tmp_path / "restored.log").read_text()
    assert text == expected_abtest(sweeps, (32 * MiB - 2 * MiB) // 4096)


def _holder_pid(run_dir, name):
    from vmmpy.runtime.control import ControlClient

    holder = ControlClient(name, run_dir).name_holder()
    return None if holder is None else holder[2]


def test_a_live_update_keeps_the_guest_its_name_and_its_console(tmp_path):
    # About 5 s of guest time; the three updates take about 2 s, so the guest runs through them.
    sweeps = 36_000
    console = tmp_path / "vm0.log"
    first = start_vmmrun(tmp_path, *abtest(sweeps), "--memory-backing", "memfd", "-l", f"com1,{console}", "vm0")
    try:
        wait_for_socket(tmp_path, "vm0", first)
        pids = [first.pid]
        for _ in range(3):
            result = vmmctl(tmp_path, "--vm=vm0", "--live-update", "--json", timeout=120)
            assert result.returncode == 0, result.stderr
            stats = json.loads(result.stdout)
            assert stats["status"] == "completed" and stats["successor_pid"] not in pids
            assert _holder_pid(tmp_path, "vm0") == stats["successor_pid"], "the new vmmrun holds the name"
            status = json.loads(vmmctl(tmp_path, "--vm=vm0", "--status", "--json").stdout)
            assert status["state"] in ("running", "halted", "powered off"), status
            pids.append(stats["successor_pid"])
        assert first.wait(timeout=60) == 0, "the first vmmrun exits 0 once its successor runs the guest"
        assert "done" not in console.read_text(), "the guest was still running through the updates"
        deadline = time.monotonic() + 180
        while (tmp_path / "vm0.ctl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not (tmp_path / "vm0.ctl").exists(), "the last vmmrun ended with the guest"
    finally:
        stop(first)
        for pid in pids[1:]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert console.read_text() == expected_abtest(sweeps, (32 * MiB - 2 * MiB) // 4096)
    assert not list(tmp_path.glob("*.mig")), "no hand-over socket is left behind"


def test_a_live_update_that_cannot_happen_says_why_and_the_guest_runs_on(tmp_path):
    sweeps = 8000
    console = tmp_path / "vm0.log"
    proc = start_vmmrun(tmp_path, *abtest(sweeps), "--pause-at=4000001", "-l", f"com1,{console}", "vm0")
    try:
        wait_for_socket(tmp_path, "vm0", proc)
        wait_for_state(tmp_path, "vm0", "paused")
        result = vmmctl(tmp_path, "--vm=vm0", "--live-update")
        assert result.returncode == 1 and "must be memfd-backed" in result.stderr and "--memory-backing memfd" in result.stderr
        notexec = tmp_path / "vmmrun-new"
        notexec.write_text("#!/bin/sh\n")
        result = vmmctl(tmp_path, "--vm=vm0", "--live-update", "--exec", str(notexec))
        assert result.returncode == 1 and f"--exec {notexec}: not an executable file" in result.stderr, result.stderr
        assert _holder_pid(tmp_path, "vm0") == proc.pid
        assert vmmctl(tmp_path, "--vm=vm0", "--resume").returncode == 0
        assert proc.wait(timeout=120) == 1
    finally:
        stop(proc)
    assert console.read_text() == expected_abtest(sweeps, (32 * MiB - 2 * MiB) // 4096)


def test_a_successor_that_fails_to_start_is_reported_and_the_guest_runs_on(tmp_path):
    sweeps = 8000
    console = tmp_path / "vm0.log"
    broken = tmp_path / "vmmrun-broken"
    broken.write_text("#!/bin/sh\necho 'vmmrun-broken: cannot start' >&2\nexit 4\n")
    broken.chmod(0o755)
    proc = start_vmmrun(tmp_path, *abtest(sweeps), "--memory-backing", "memfd", "--pause-at=4000001", "-l", f"com1,{console}", "vm0")
    try:
        wait_for_socket(tmp_path, "vm0", proc)
        wait_for_state(tmp_path, "vm0", "paused")
        result = vmmctl(tmp_path, "--vm=vm0", "--live-update", "--exec", str(broken))
        assert result.returncode == 1
        assert "the new vmmrun exited 4 before it listened" in result.stderr, result.stderr
        # Paused before the update, the guest stays paused, and the message says so.
        assert "the guest stays here, paused (vmmctl --resume runs it)" in result.stderr, result.stderr
        assert json.loads(vmmctl(tmp_path, "--vm=vm0", "--status", "--json").stdout)["state"] == "paused"
        assert vmmctl(tmp_path, "--vm=vm0", "--resume").returncode == 0
        assert proc.wait(timeout=120) == 1
    finally:
        stop(proc)
    assert console.read_text() == expected_abtest(sweeps, (32 * MiB - 2 * MiB) // 4096)


def test_vmmctl_reports_a_local_migration_as_local_without_a_wire_rate(capsys):
    from vmmpy.cli import vmmctl as ctl

    record = {"status": "completed", "live": False, "peer": "unix:/run/x.mig", "total_time_ms": 20.0, "downtime_ms": 8.3,
              "round_count": 0, "bytes_total": 4300, "pages_sent": 0, "zero_pages": 0}
    ctl._print_migration(record)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("migration completed (local), total 20 ms, downtime 8.3 ms"), line
    assert "/s" not in line, line  # 4 KiB of state over 20 ms is no link's rate
    ctl._print_migration({**record, "peer": "10.0.0.2:7000", "total_time_ms": 1000.0, "bytes_total": 1 << 20})
    assert "(warm)" in capsys.readouterr().out


def _pipe_fd() -> int:
    read_end, write_end = os.pipe()
    os.close(write_end)
    return read_end


def _small_memfd() -> int:
    fd = os.memfd_create("too-small")
    os.ftruncate(fd, 4096)
    return fd


@pytest.mark.parametrize("bad", ["too-small", "a-pipe", "one-missing", "runs-out-of-range"])
def test_a_bad_hand_over_is_refused_by_the_destination_and_the_source_keeps_its_guest(tmp_path, monkeypatch, bad):
    """A source that hands over the wrong descriptors (too small, not memory, one short) or dirty
    runs beyond the guest: the destination refuses with a clear error and never runs the guest;
    the source's guest keeps its memory and runs on."""

    from vmmpy.guest.programs import load_into
    from vmmpy.memory import GuestMemory
    from vmmpy.runtime.commands import build_machine
    from vmmpy.runtime.config import VmConfig
    from vmmpy.runtime.guest_handle import MachineHandle
    from vmmpy.vmm.ioctl import SuspendHow

    config = VmConfig(name="src", memsize=64 * MiB, memory_backing="memfd", guest="abtest")
    src = build_machine(config, load=lambda m: load_into(m, "abtest", {"sweeps": "10"}, memsize=config.memsize))
    dst = build_machine(VmConfig(name="dst", memsize=64 * MiB))
    real_fds, real_runs = GuestMemory.memfds, GuestMemory.peek_dirty_runs
    made: list[int] = []

    def memfds(self) -> list[int]:
        fds = real_fds(self)
        if bad == "too-small":
            made.append(_small_memfd())
            return [made[-1], *fds[1:]]
        if bad == "a-pipe":
            made.append(_pipe_fd())
            return [made[-1], *fds[1:]]
        return fds[:-1] if bad == "one-missing" else fds

    def runs(self) -> bytes:
        # One run far past the guest's last page, in the wire's own encoding of the real runs.
        if bad != "runs-out-of-range":
            return real_runs(self)
        self.write(0, b"x")
        encoded = real_runs(self)
        return encoded.replace((0).to_bytes(8, "little"), (1 << 40).to_bytes(8, "little"), 1)

    monkeypatch.setattr(GuestMemory, "memfds", memfds)
    monkeypatch.setattr(GuestMemory, "peek_dirty_runs", runs)
    try:
        src.vm.memory.write(0x2000, b"kept")
        stats, dstats = hand_over_here(tmp_path, src, MachineHandle(dst))
        assert dstats.status == "failed" and stats.status == "failed", (dstats.error, stats.error)
        assert "LOCAL_MEMORY" in dstats.error or "map the source's memory" in dstats.error, dstats.error
        assert stats.owner == "source", stats.owner
        assert src.vm.memory.read(0x2000, 4) == b"kept", "the source keeps its memory"
        assert src.exit_status is None, "the source's guest was not stopped"
    finally:
        for fd in made:
            os.close(fd)
        for machine in (src, dst):
            if machine.vm.memory is not None and machine.exit_status is None:
                machine.suspend(SuspendHow.POWEROFF)
                machine.wait(10)
            machine.close()
