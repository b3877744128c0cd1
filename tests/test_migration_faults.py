"""Faults during a live migration between real vmmrun processes: kill -9 either end, stall the
destination, corrupt a byte on the wire, cancel. Each test ends with the abtest guest's own
verdict ("all counters K") on the one side that runs: never both, and never neither unless the
source itself was killed.

The guest is busy through the rounds: it starts paused (--pause-at=1) and is resumed right before
the migration starts. The migration is kept in its rounds on purpose (a downtime target it cannot
meet, a bandwidth cap, many rounds allowed) so the fault lands mid-round.
"""

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from vmmpy.runtime.control import ControlClient, ControlError

from .migration_proxy import Proxy
from .procs import free_port, start_vmmrun, stop, vmmctl, wait_for_listener, wait_for_socket, wait_for_state
from .test_migration_processes import abtest_args, expected_console

MiB = 1 << 20
# About 3.5 s of a 32 MiB abtest at full speed (about 7000 sweeps a second on the 2-core CI
# machine; each of these tests waits for all of them, once the fault has let the guest run on).
# That outlasts a fault landing after two rounds of at least 0.3 s each at the bandwidth cap,
# about 1 s after the resume, even on a loaded machine. The tests whose fault waits on more (a
# vmmctl process to start, or a stall to outlast --io-timeout 1: about 2 s) run LONG_SWEEPS. A
# guest that ended first would fail the test, not pass it: the migration's error and the
# source's console are checked.
SWEEPS = 24_000
LONG_SWEEPS = 36_000
PAGES = (32 * MiB - 2 * MiB) // 4096
# Never converges (the guest rewrites its 30 MiB every sweep), rounds of ~0.3 s at the cap.
# Uncompressed: abtest's counter pages shrink a hundredfold, which at this cap would make the
# rounds milliseconds long and the 60 of them over before a fault could land.
IN_ROUNDS = {"downtime_target_ms": 0.001, "bandwidth_cap": 100 * MiB, "max_rounds": 60, "compress": "off"}
IN_ROUNDS_FLAGS = ["--downtime-ms", "0.001", "--bandwidth", "100M", "--max-rounds", "60", "--compress", "off"]


class Pair:
    """A busy abtest source (src0) and an empty destination (dst0) listening on loopback."""

    def __init__(self, tmp_path, *, sweeps=SWEEPS, listen_port=None, source_args=("--pause-at=1",), dest_args=()):
        self.tmp = tmp_path
        self.sweeps = sweeps
        self.port = listen_port or free_port()
        self.src_console, self.dst_console = tmp_path / "src.log", tmp_path / "dst.log"
        self.dest = start_vmmrun(tmp_path, "-m", "32M", "-l", f"com1,{self.dst_console}", "-R", f"127.0.0.1:{self.port}",
                                 "--accept-timeout=30", *dest_args, "dst0")
        self.source = start_vmmrun(tmp_path, *abtest_args(sweeps), "-l", f"com1,{self.src_console}", *source_args, "src0")
        self.result: dict | ControlError | None = None
        self.thread: threading.Thread | None = None
        wait_for_listener("127.0.0.1", self.port, self.dest)
        wait_for_socket(tmp_path, "src0", self.source)
        if "--pause-at=1" in source_args:
            wait_for_state(tmp_path, "src0", "paused")

    def start_live(self, *, port=None, params=None):
        """Resume the guest and start a live migration at once, from a thread of this process."""
        client = ControlClient("src0", self.tmp, timeout=None)
        request = {"host": "127.0.0.1", "port": port or self.port, "live": True, "params": dict(params or IN_ROUNDS)}

        def run():
            try:
                self.result = client.request("migrate", **request)
            except ControlError as err:
                self.result = err

        client.request("resume")
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait_in_rounds(self, rounds=1, timeout=60, status_is="active") -> dict:
        """Until the running migration has finished ``rounds`` rounds (bounded) with its status
        ``status_is`` ("paused" for a warm one's stop-and-copy); returns its record."""
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            try:
                status = ControlClient("src0", self.tmp, timeout=10).request("migrate-status")
            except ControlError:
                status = None
            if status and status.get("status") == status_is and status.get("round_count", 0) >= rounds:
                return status
            time.sleep(0.02)
        raise AssertionError(f"the migration did not reach {rounds} rounds within {timeout} s (last status {status})")

    def migration_error(self, timeout=30) -> str:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the migration request did not return"
        assert isinstance(self.result, ControlError), f"the migration should have failed, got {self.result}"
        return str(self.result)

    def assert_source_finishes_alone(self):
        """The source guest runs on to its own verdict; the destination does not run it."""
        assert self.source.wait(timeout=60) == 1, self.source.stderr.read()
        assert self.src_console.read_text() == expected_console(self.sweeps, PAGES), "the source guest ran on, unchanged"
        assert not self.dst_console.exists() or self.dst_console.read_text() == "", "the destination never ran the guest"

    def close(self):
        stop(self.source)
        stop(self.dest)


@pytest.fixture
def pair(tmp_path):
    made = []

    def make(**kwargs):
        p = Pair(tmp_path, **kwargs)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_destination_killed_mid_round_leaves_the_source_running(pair):
    p = pair()
    p.start_live()
    p.wait_in_rounds(2)
    p.dest.send_signal(signal.SIGKILL)
    error = p.migration_error()
    assert "the guest keeps running here" in error
    assert "connection" in error.lower() or "broken pipe" in error.lower(), error
    assert p.dest.wait(timeout=30) == -signal.SIGKILL
    p.assert_source_finishes_alone()


def test_source_killed_mid_round_the_destination_discards_and_cleans_up(pair, tmp_path):
    p = pair()
    p.start_live()
    p.wait_in_rounds(2)
    p.source.send_signal(signal.SIGKILL)
    assert p.dest.wait(timeout=30) == 4, "the destination discards a half-received guest: exit status 4"
    assert "incoming migration failed" in p.dest.stderr.read()
    assert not (tmp_path / "dst0.ctl").exists(), "the destination removed its control socket"
    assert not p.dst_console.exists() or p.dst_console.read_text() == "", "the destination never ran the guest"
    # kill -9 leaves the source no chance to remove its socket: vmmctl names it stale.
    listed = vmmctl(tmp_path, "--list")
    assert "src0\tstale socket" in listed.stdout and "dst0" not in listed.stdout
    assert p.source.wait(timeout=30) == -signal.SIGKILL


def test_a_stalled_destination_times_out_and_the_source_resumes(pair, tmp_path):
    p = pair(sweeps=LONG_SWEEPS)
    cmd = [sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={tmp_path}", "--vm=src0", "--migrate-live", "127.0.0.1",
           str(p.port), "--io-timeout", "1", *IN_ROUNDS_FLAGS]
    assert vmmctl(tmp_path, "--vm=src0", "--resume").returncode == 0
    ctl = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        p.wait_in_rounds(1)
        p.dest.send_signal(signal.SIGSTOP)
        out, err = ctl.communicate(timeout=30)
    finally:
        if ctl.poll() is None:
            ctl.kill()
            ctl.wait(timeout=10)
        p.dest.send_signal(signal.SIGKILL)
    assert ctl.returncode == 1, out + err
    # The source notices while it sends the round, or, where the round fit in the stopped
    # destination's receive buffer (the kernel's to size: up to net.ipv4.tcp_rmem's largest),
    # while it waits for the destination to confirm it.
    sending = f"timed out: the destination (127.0.0.1:{p.port}) took nothing for 1 s during round "
    confirming = f"timed out: the peer 127.0.0.1:{p.port} sent nothing for 1 s while a frame header from the destination during round "
    assert sending in err or (confirming in err and ": ROUND_DONE)" in err), err
    assert "the guest keeps running here" in err
    # stderr is a pipe, not a terminal: one plain line per round before the failure.
    assert "round 0: " in err and "expected downtime" in err
    assert p.dest.wait(timeout=30) == -signal.SIGKILL
    p.assert_source_finishes_alone()


def test_a_stalled_source_times_out_a_destination_given_io_timeout_and_the_source_runs_on(pair):
    """vmmrun -R --io-timeout sets the destination's waits as vmmctl's sets the source's: a source
    stopped mid-round (SIGSTOP) fails the migration on the destination after 1 s of nothing, not
    the default 30; once the source goes on, its migration fails too and its guest runs on."""
    p = pair(sweeps=LONG_SWEEPS, dest_args=("--io-timeout", "1"))
    p.start_live()
    p.wait_in_rounds(1)
    p.source.send_signal(signal.SIGSTOP)
    try:
        status = p.dest.wait(timeout=15)  # within the default io_timeout of 30 s, so it was 1 s
    finally:
        p.source.send_signal(signal.SIGCONT)
    err = p.dest.stderr.read()
    assert status == 4, err
    assert "incoming migration failed" in err and "for 1 s" in err, err
    assert "the guest keeps running here" in p.migration_error()
    p.assert_source_finishes_alone()


@pytest.mark.parametrize("where,flip_at", [("handshake", 40), ("page data", 3 * MiB)])
def test_a_corrupted_byte_is_refused_and_the_source_runs_on(pair, where, flip_at):
    # Page data: the guest has run (no --pause-at), so all its 30 MiB are touched and go as data.
    p = pair(source_args=("--pause-at=1",) if where == "handshake" else ())
    proxy = Proxy(("127.0.0.1", p.port), flip_at=flip_at)
    if where == "handshake":
        p.start_live(port=proxy.port)
    else:
        # Warm: page bytes sent once are never resent, so the corruption must reach the commit,
        # where the memory digests differ. (Live rounds could overwrite the damaged page.)
        client = ControlClient("src0", p.tmp, timeout=None)
        p.thread = threading.Thread(target=lambda: setattr(p, "result", _catch(client, proxy.port)), daemon=True)
        p.thread.start()
    error = p.migration_error()
    assert proxy.forwarded > flip_at, "the damaged byte reached the destination"
    assert "the guest keeps running here" in error
    expected = "checksum mismatch" if where == "handshake" else "memory digest mismatch"
    assert expected in error, error
    if where == "handshake":
        # A HELLO that fails its checksum proves nothing: the destination waits on for its source.
        time.sleep(0.3)
        assert p.dest.poll() is None
        p.dest.terminate()
    assert p.dest.wait(timeout=30) == 4
    p.assert_source_finishes_alone()


def _catch(client, port):
    try:
        return client.request("migrate", host="127.0.0.1", port=port, live=False, params={})
    except ControlError as err:
        return err


def test_cancel_during_the_rounds_leaves_the_source_running(pair, tmp_path):
    p = pair(sweeps=LONG_SWEEPS)
    p.start_live()
    running = p.wait_in_rounds(2)
    # --migrate-status shows the record while the migration runs.
    shown = vmmctl(tmp_path, "--vm=src0", "--migrate-status", "--json")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["status"] == "active" and record["live"] is True and record["role"] == "source"
    assert record["round_count"] >= running["round_count"] and record["downtime_target_ms"] == 0.001
    assert {"pages_sent", "zero_pages", "pages_dirtied_during", "expected_downtime_ms", "throughput"} <= set(record["rounds"][0])
    human = vmmctl(tmp_path, "--vm=src0", "--migrate-status")
    assert human.returncode == 0 and human.stdout.startswith("migration active (live)")

    cancelled = vmmctl(tmp_path, "--vm=src0", "--migrate-cancel", "--json")
    assert cancelled.returncode == 0, cancelled.stderr
    assert json.loads(cancelled.stdout) == {"cancelled": True, "status": "cancelled", "state": "running"}
    error = p.migration_error()
    assert "migration cancelled" in error and "the guest keeps running here" in error
    assert p.dest.wait(timeout=30) == 4
    p.assert_source_finishes_alone()


def test_a_destination_whose_disk_is_full_takes_the_guest_and_runs_it(tmp_path):
    """The destination writes nothing to disk while it receives; after the commit its guest's
    console output goes to a file that cannot take it (/dev/full: ENOSPC on every write). The
    guest must run to its own end there, its console output dropped with one warning."""
    from .test_migration_processes import migrate_pair

    sweeps = 2000
    result, source, dest, src_status, src_console, _ = migrate_pair(
        tmp_path, live=False, sweeps=sweeps, pause_at=4_000_001, dest_console="/dev/full")
    try:
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["status"] == "completed"
        assert src_status == 0, "the source hands the guest over and exits"
        assert dest.wait(timeout=120) == 1, "the guest ran to its normal end on the destination"
        assert "No space left on device" in dest.stderr.read()
        # What the source printed before the pause is intact; the rest went to /dev/full.
        assert expected_console(sweeps, PAGES).startswith(src_console.read_text())
    finally:
        stop(source)
        stop(dest)



@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, None], ids=["SIGTERM", "SIGINT", "destroy"])
def test_a_signal_ends_a_destination_waiting_for_its_source_at_once(tmp_path, signum):
    """The wait for a source (300 s by default) ends as soon as SIGTERM or SIGINT arrives, or
    vmmctl --destroy (which once left the process listening, its memory populated, until the
    timeout), with a message that says so, exit 4 (no guest was received) and the control
    socket removed."""
    port = free_port()
    dest = start_vmmrun(tmp_path, "-m", "16M", "-R", f"127.0.0.1:{port}", "dst0")
    try:
        wait_for_listener("127.0.0.1", port, dest)
        wait_for_socket(tmp_path, "dst0", dest)
        if signum is None:
            assert vmmctl(tmp_path, "--vm=dst0", "--destroy").returncode == 0
        else:
            dest.send_signal(signum)
        assert dest.wait(timeout=20) == 4
        err = dest.stderr.read()
        name = "vmmctl --destroy" if signum is None else signal.Signals(signum).name
        assert f"dst0: stopped by {name} while waiting on 127.0.0.1:{port} for a source to connect; no guest was received" in err, err
        assert "no source connected" not in err and "Traceback" not in err
        assert not (tmp_path / "dst0.ctl").exists() and not (tmp_path / "dst0.lock").exists()
    finally:
        stop(dest)


def test_sigterm_to_a_destination_mid_transfer_discards_and_the_source_runs_on(pair):
    p = pair()
    p.start_live()
    p.wait_in_rounds(1)
    p.dest.send_signal(signal.SIGTERM)
    assert p.dest.wait(timeout=30) == 4
    err = p.dest.stderr.read()
    assert "dst0: stopped by SIGTERM during the incoming migration from 127.0.0.1:" in err, err
    assert "the half-received guest is discarded" in err
    assert "the guest keeps running here" in p.migration_error()
    p.assert_source_finishes_alone()


def test_migrate_cancel_says_a_paused_guest_stays_paused(pair, tmp_path):
    """``vmmctl --migrate-cancel`` says where the guest is after it: a guest paused before a warm
    migration stays paused, and the words say how to run it."""
    p = pair(source_args=("--pause-at=20000000",))  # paused where its memory is written: about 3 s at 10 MB/s
    wait_for_state(tmp_path, "src0", "paused")
    ctl = subprocess.Popen([sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={tmp_path}", "--vm=src0", "--migrate",
                            "127.0.0.1", str(p.port), "--bandwidth", "10M", "--compress", "off"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        p.wait_in_rounds(0, status_is="paused")
        cancelled = vmmctl(tmp_path, "--vm=src0", "--migrate-cancel")
        out, err = ctl.communicate(timeout=90)
    finally:
        stop(ctl)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout == "migration cancelled; the guest stays here, paused (vmmctl --resume runs it)\n"
    assert ctl.returncode == 1 and "the guest stays here, paused (vmmctl --resume runs it)" in err, out + err
    assert p.dest.wait(timeout=30) == 4
    assert json.loads(vmmctl(tmp_path, "--vm=src0", "--status", "--json").stdout)["state"] == "paused"
    assert vmmctl(tmp_path, "--vm=src0", "--resume").returncode == 0
    p.assert_source_finishes_alone()


@pytest.mark.parametrize("paused", [False, True], ids=["running", "paused"])
def test_ctrl_c_on_vmmctl_cancels_the_migration_and_says_so(pair, tmp_path, paused):
    # Paused where its memory is written (30 MiB of data), migrated warm at 10 MB/s: about 3 s,
    # time enough to interrupt it.
    p = pair(source_args=("--pause-at=20000000",)) if paused else pair(sweeps=LONG_SWEEPS)
    if paused:
        wait_for_state(tmp_path, "src0", "paused")
        how = ["--migrate", "127.0.0.1", str(p.port), "--bandwidth", "10M", "--compress", "off"]
    else:
        how = ["--migrate-live", "127.0.0.1", str(p.port), *IN_ROUNDS_FLAGS]
        assert vmmctl(tmp_path, "--vm=src0", "--resume").returncode == 0
    cmd = [sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={tmp_path}", "--vm=src0", *how]
    # Started with SIGINT at its default, as a shell's foreground job is: a test run started in
    # the background of a non-interactive shell ignores SIGINT, and vmmctl (as any program)
    # keeps an ignored SIGINT ignored. A Python handler here becomes the default across exec.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ctl = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        p.wait_in_rounds(0, status_is="paused") if paused else p.wait_in_rounds(1)
        ctl.send_signal(signal.SIGINT)
        out, err = ctl.communicate(timeout=90)
    finally:
        if ctl.poll() is None:
            ctl.kill()
            ctl.wait(timeout=10)
    assert ctl.returncode == 130, out + err
    assert "vmmctl: interrupted: cancelling the migration" in err
    where = "the guest stays here, paused (vmmctl --resume runs it)" if paused else "the guest keeps running here"
    assert f"vmmctl: migration cancelled; {where}" in err, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    record = json.loads(vmmctl(tmp_path, "--vm=src0", "--migrate-status", "--json").stdout)
    assert record["status"] == "cancelled"
    assert p.dest.wait(timeout=30) == 4
    if paused:
        assert json.loads(vmmctl(tmp_path, "--vm=src0", "--status", "--json").stdout)["state"] == "paused"
        assert vmmctl(tmp_path, "--vm=src0", "--resume").returncode == 0
    p.assert_source_finishes_alone()
