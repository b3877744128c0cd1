"""Live figures within a round and progress bars (issue 15, "Status and progress like
query-migrate"): the memory core's progress meter read while a round's pages go, the progress
callback fired within a round, a stopped migration's record saying how far it got, and the bar
both tools draw on a terminal and never into a pipe."""

import io
import json
import os
import pty
import re
import select
import subprocess
import sys
import threading
import time

from vmmpy.cli.progressbar import ProgressBar
from vmmpy.migration import MigrationParams
from vmmpy.migration.source import migrate
from vmmpy.progress import TICK_S, ProgressMeter, Ticker
from vmmpy.units import MiB

from .migration_helpers import DestinationThread
from .procs import free_port, start_vmmrun, stop, vmmctl, vmmrun_cmd, wait_for_listener, wait_for_socket
from .test_migration_processes import abtest_args


def test_a_ticker_ticks_while_its_block_runs_and_never_after():
    calls = []
    with Ticker(lambda: calls.append(1), interval=0.01) as ticker:
        for _ in range(500):  # bounded: until a few ticks came, at most 5 s
            if len(calls) >= 3:
                break
            threading.Event().wait(0.01)
    after = len(calls)
    threading.Event().wait(0.05)
    assert after >= 3 and len(calls) == after == ticker.ticks, "no tick after the block"

    def boom():
        raise OSError("the terminal went away")

    with Ticker(boom, interval=0.01) as failing:
        threading.Event().wait(0.1)
    assert isinstance(failing.error, OSError) and failing.ticks == 0, "a failing tick stops ticking, never the work"


def test_tickers_share_one_thread_and_a_tick_in_progress_is_waited_for():
    """A ticker's block starts no thread (a migration's final round is such a block, inside the
    downtime); tickers of different intervals tick side by side; the end of a block waits for
    its tick in progress, so nothing runs after it."""
    fast, slow = [], []
    with Ticker(lambda: fast.append(1), interval=0.01), Ticker(lambda: slow.append(1), interval=0.03):
        for _ in range(500):  # bounded: at most 5 s
            if len(fast) >= 6 and len(slow) >= 2:
                break
            threading.Event().wait(0.01)
    assert len(fast) >= 6 and len(slow) >= 2
    tickers = [t for t in threading.enumerate() if t.name == "progress-ticker"]
    assert len(tickers) == 1
    before = threading.active_count()
    for _ in range(50):
        with Ticker(lambda: None, interval=0.5):
            pass
    assert threading.active_count() == before and [t for t in threading.enumerate() if t.name == "progress-ticker"] == tickers

    in_tick, ended = threading.Event(), []

    def slow_tick():
        in_tick.set()
        threading.Event().wait(0.2)
        ended.append(time.monotonic())

    with Ticker(slow_tick, interval=0.01) as ticker:
        assert in_tick.wait(5)
    left = time.monotonic()
    assert ended and ended[-1] <= left and ticker.ticks == len(ended), "the block ended after its tick, not during it"


def test_a_tick_due_in_a_pass_is_not_called_once_its_block_has_ended():
    """One pass of the ticker thread may find two tickers due; if the second's block ends while
    the first is being called, the second must not be called after its block. (The pass is run
    by hand here, on a ticker service with no thread of its own.)"""
    from vmmpy import progress

    service = progress._TickThread()
    service._thread = threading.current_thread()  # alive: add() starts no thread
    called = []
    second = Ticker(lambda: called.append("second"), interval=0.01)
    first = Ticker(lambda: (called.append("first"), service.remove(second)), interval=0.01)
    service.add(first)
    service.add(second)
    with service._cond:
        for ticker in (first, second):  # both were due when the pass began
            service._tick(ticker)
    assert called == ["first"] and first.ticks == 1 and second.ticks == 0


def test_a_tick_that_raises_anything_stops_only_its_own_ticker():
    """A Rust panic reaches Python as a BaseException: it must stop the ticker whose tick raised
    it (kept in ``error``), not the thread every other ticker is served by."""
    calls = []

    def panic():
        raise SystemExit("a panic in the core")

    with Ticker(lambda: calls.append(1), interval=0.01), Ticker(panic, interval=0.01) as failing:
        for _ in range(500):  # bounded: at most 5 s
            if failing.error is not None and len(calls) >= 5:
                break
            threading.Event().wait(0.01)
    assert isinstance(failing.error, SystemExit) and failing.ticks == 0
    assert len(calls) >= 5, "the other ticker kept ticking"


def test_a_child_forked_during_a_tick_can_end_that_tickers_block():
    """The child of a fork has no ticker thread: a tick the parent's was in the middle of must
    not keep the child waiting for ever at the end of that ticker's block."""
    in_tick, release = threading.Event(), threading.Event()

    def slow():
        in_tick.set()
        release.wait(10)

    ticker = Ticker(slow, interval=0.01)
    ticker.__enter__()
    try:
        assert in_tick.wait(5)
        pid = os.fork()
        if pid == 0:  # the child: end the block, and say so by the exit status
            ticker.__exit__(None, None, None)
            os._exit(7)
        for _ in range(500):  # bounded: 5 s
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            threading.Event().wait(0.01)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the child hung ending the ticker's block")
        assert os.waitstatus_to_exitcode(status) == 7
    finally:
        release.set()
        ticker.__exit__(None, None, None)


def test_the_progress_callback_fires_within_a_single_warm_round_with_live_figures(guests):
    """A warm migration is one round: without live figures its progress callback said nothing
    until it was over. Capped at 4 MiB/s, its 8 MiB of data take about 2 s."""
    src = guests("64M", work_pages=2048)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)
    d = DestinationThread(dst, params=MigrationParams())
    seen, received = [], []

    def progress(stats):
        seen.append(stats.current_round)
        record = d.dest.record
        if record is not None and record.current_round is not None:
            received.append(record.current_round)

    stats = migrate(src, d.host, d.port, live=False, params=MigrationParams(bandwidth_cap=4 * MiB), progress=progress)
    dstats = d.join()
    assert stats.status == "completed" and dstats.status == "completed", (stats.error, dstats.error)
    assert len(stats.rounds) == 1 and stats.current_round is None and dstats.current_round is None
    moving = [c for c in seen if c is not None and c.bytes > 0]
    assert len(moving) >= 2, f"the callback fired {len(moving)} times with figures inside the round"
    assert all(c.round == 0 and c.final for c in moving)
    assert [c.bytes for c in moving] == sorted(c.bytes for c in moving), "bytes sent only grow"
    assert [c.remaining_bytes for c in moving] == sorted((c.remaining_bytes for c in moving), reverse=True)
    assert moving[-1].bytes > moving[0].bytes and moving[-1].remaining_bytes < moving[0].remaining_bytes
    pages = dst.memory.memsize // 4096
    assert all(c.pages_total == pages and 0 <= c.pages_done <= pages for c in moving)
    assert all(c.rate > 0 and c.eta_s is not None and c.expected_downtime_ms is not None for c in moving)
    assert all(c.dirty_rate is None for c in moving), "a warm round runs with the guest paused"
    # The destination's record has the same round arriving.
    assert received and all(c.round == 0 and c.pages_total == pages for c in received)
    assert max(c.bytes for c in received) > 0


def test_a_live_migration_reports_nothing_as_its_final_round_begins(guests):
    """The final round of a live migration is the downtime: the report a round begins with (the
    statistics as JSON to vmmctl, 0.2-0.4 ms) is left out there. Every earlier round still says
    at once that it has begun; a final round that lasts a tick is reported by the ticker."""
    src = guests("64M", work_pages=512, rate=200)
    dst = guests("64M", work_pages=512, running=False)
    src.wait_for_progress(512)
    d = DestinationThread(dst, params=MigrationParams())
    begun = []

    def progress(stats):
        if stats.current_round is not None and stats.current_round.pages_done == 0:
            begun.append((stats.current_round.round, stats.current_round.final))

    stats = migrate(src, d.host, d.port, live=True, params=MigrationParams(), progress=progress)
    dstats = d.join()
    assert stats.status == "completed" and dstats.status == "completed", (stats.error, dstats.error)
    final = stats.rounds[-1]
    assert final.final and len(stats.rounds) >= 2
    assert [r for r, is_final in begun if not is_final] == list(range(len(stats.rounds) - 1)), begun
    if final.duration_ms < TICK_S * 1000:
        assert not any(is_final for _, is_final in begun), f"reported inside the downtime: {begun}"


def test_a_cancelled_migration_says_how_far_it_got(guests):
    """Cancelled inside round 0: the record names the phase, the rounds done (none), and how far
    round 0 got (pages of how many, bytes), and those bytes count in bytes_total."""
    src = guests("64M", work_pages=2048, rate=2000)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)
    d = DestinationThread(dst, params=MigrationParams())
    cancel = threading.Event()

    def progress(stats):
        if stats.current_round is not None and stats.current_round.pages_done > 0:
            cancel.set()

    stats = migrate(src, d.host, d.port, live=True, params=MigrationParams(bandwidth_cap=4 * MiB), progress=progress, cancel=cancel)
    dstats = d.join()
    assert stats.status == "cancelled" and stats.owner == "source", stats.error
    assert stats.stopped_in == "round 0" and stats.rounds == [] and stats.current_round is None
    got = stats.interrupted_round
    assert got is not None and got.round == 0 and not got.final
    assert 0 < got.pages_done < got.pages_total == src.memory.memsize // 4096
    assert 0 < got.bytes <= stats.bytes_total
    assert "stopped in round 0 after 0 complete rounds; round 0 had moved" in stats.summary()
    record = stats.to_dict()
    assert record["interrupted_round"]["pages_done"] == got.pages_done and record["stopped_in"] == "round 0"
    # The destination's record says it too.
    assert dstats.status in ("failed", "cancelled") and dstats.stopped_in and dstats.stopped_in.startswith("state ")
    assert dstats.interrupted_round is not None and dstats.interrupted_round.round == 0
    assert "pause" not in src.calls and "stop_for_good" not in src.calls, "the guest ran on at the source throughout"


def test_a_progress_meter_starts_empty():
    assert ProgressMeter().read() == (0, 0, 0, 0, 0)


# ---- the tools: vmmctl --migrate-status during a round, and after a cancel --------------------
def _status(run_dir, name):
    from vmmpy.runtime.control import ControlClient, ControlError

    try:
        return ControlClient(name, run_dir, timeout=10).request("migrate-status")
    except ControlError:
        return None


def _start_pair(tmp_path, sweeps=100_000):
    port = free_port()
    dest = start_vmmrun(tmp_path, "-m", "32M", "-l", f"com1,{tmp_path / 'dst.log'}", "-R", f"127.0.0.1:{port}",
                        "--accept-timeout=60", "dst0")
    source = start_vmmrun(tmp_path, *abtest_args(sweeps), "-l", f"com1,{tmp_path / 'src.log'}", "src0")
    wait_for_listener("127.0.0.1", port, dest)
    wait_for_socket(tmp_path, "src0", source)
    return port, source, dest


def _rising(readings, *, remaining=True):
    """Pairs of readings of round 0 in which bytes went up and (with ``remaining``) what remains
    went down."""
    if remaining:
        readings = [r for r in readings if r["remaining_bytes"] is not None]
    return [(a, b) for a, b in zip(readings, readings[1:])
            if b["bytes"] > a["bytes"] and (not remaining or b["remaining_bytes"] < a["remaining_bytes"])]


def test_migrate_status_during_a_warm_round_shows_it_advance_on_both_ends(tmp_path):
    """--bandwidth 16M makes the one round of a warm migration of abtest's 30 MiB last about 2 s:
    polled meanwhile, both ends' --migrate-status show that round's bytes rise (and, at the
    source, what remains fall) before it ends. vmmctl's progress goes to a pipe here: one line per
    round, nothing bar-like."""
    port, source, dest = _start_pair(tmp_path)
    ctl = subprocess.Popen([sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={tmp_path}", "--vm=src0", "--migrate",
                            "127.0.0.1", str(port), "--bandwidth", "16M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sent, received = [], []
        for _ in range(600):  # bounded: at most about 60 s
            if ctl.poll() is not None:
                break
            for name, into in (("src0", sent), ("dst0", received)):
                record = _status(tmp_path, name)
                current = (record or {}).get("current_round")
                if current and (not into or current["bytes"] != into[-1]["bytes"]):
                    into.append(current)
            if _rising(sent) and _rising(received, remaining=False):
                break
            time.sleep(0.1)
        out, err = ctl.communicate(timeout=120)
        assert ctl.returncode == 0, err
        assert _rising(sent), f"the source's round 0 did not show bytes rising and remaining falling: {sent}"
        assert _rising(received, remaining=False), f"the destination's round 0 did not show bytes rising: {received}"
        last = sent[-1]
        assert last["round"] == 0 and last["final"] and last["pages_total"] == 32 * MiB // 4096
        assert all(r["rate"] >= 0 for r in sent) and any(r["eta_s"] is not None and r["expected_downtime_ms"] for r in sent)
        assert all(r["round"] == 0 and r["pages_total"] == 32 * MiB // 4096 for r in received)
        assert out.startswith("migration completed (warm)")
        # In a pipe: the round's one line, no bar and no redrawing.
        assert err.count("round 0") == 1 and "\r" not in err and "[#" not in err and "[." not in err, err
        record = json.loads(vmmctl(tmp_path, "--vm=dst0", "--migrate-status", "--json").stdout)
        assert record["status"] == "completed" and record["current_round"] is None, "no round runs any more"
    finally:
        stop(ctl)
        stop(source)
        stop(dest)


def test_migrate_status_after_migrate_cancel_says_how_far_it_got(tmp_path):
    port, source, dest = _start_pair(tmp_path)
    ctl = subprocess.Popen([sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={tmp_path}", "--vm=src0", "--migrate-live",
                            "127.0.0.1", str(port), "--bandwidth", "4M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # bounded: until round 0 has moved some pages, at most about 60 s
            current = (_status(tmp_path, "src0") or {}).get("current_round")
            if current and current["pages_done"] > 0:
                break
            assert ctl.poll() is None, ctl.communicate()
            time.sleep(0.1)
        cancelled = vmmctl(tmp_path, "--vm=src0", "--migrate-cancel", "--json")
        assert json.loads(cancelled.stdout) == {"cancelled": True, "status": "cancelled", "state": "running"}, cancelled.stderr
        ctl.communicate(timeout=60)
        record = json.loads(vmmctl(tmp_path, "--vm=src0", "--migrate-status", "--json").stdout)
        assert record["status"] == "cancelled" and record["stopped_in"] == "round 0" and record["round_count"] == 0
        got = record["interrupted_round"]
        assert got["round"] == 0 and 0 < got["pages_done"] < got["pages_total"] == 32 * MiB // 4096
        assert 0 < got["bytes"] <= record["bytes_total"] and record["current_round"] is None
        human = vmmctl(tmp_path, "--vm=src0", "--migrate-status").stdout
        assert human.startswith("migration cancelled (live)")
        assert f"stopped in round 0 after 0 complete rounds; round 0 had moved {got['pages_done']} of {got['pages_total']} pages" in human
        assert source.poll() is None, "the guest runs on at the source"
    finally:
        stop(ctl)
        stop(source)
        stop(dest)


# ---- the bar: drawn on a terminal, never into a pipe -----------------------------------------
class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_the_bar_draws_on_a_terminal_and_writes_nothing_to_a_pipe():
    term, pipe = FakeTerminal(), io.StringIO()
    for stream in (term, pipe):
        b = ProgressBar(stream)
        b.phase({"phase": "checkpoint", "done_bytes": 8 * MiB, "total_bytes": 32 * MiB, "rate": 16 * MiB, "eta_s": 1.5})
        b.phase({"phase": "paused", "seconds": 0.01})  # not a progress figure: nothing to draw
        b.phase({"phase": "estimate", "seconds": 0.5, "window_s": 1.0})
        b.close()
    assert pipe.getvalue() == ""
    lines = term.getvalue().split("\r\x1b[K")[1:]
    assert lines[0] == "checkpoint [######..................]  25% 8 MiB of 32 MiB, 16 MiB/s, ETA 1.5 s"
    assert lines[1] == "estimate [############............]  50% 0.5 of 1 s\n"


def _read_pty(master, until, proc, timeout=60):
    """What a process wrote to the terminal ``master`` until ``until`` shows in it or it exits
    (bounded)."""
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and until not in got:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the other end closed (EIO)
                break
            got += chunk
        elif proc.poll() is not None:
            break
    return got.decode(errors="replace")


def _on_terminal(*args):
    """Run vmmctl with its stderr on a terminal; returns (exit status, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    try:
        ctl = subprocess.Popen([sys.executable, "-m", "vmmpy.cli.vmmctl", *args], stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        drawn = _read_pty(master, b"\n", ctl)
        out, _ = ctl.communicate(timeout=60)
    finally:
        os.close(master)
    return ctl.returncode, out, drawn


def test_checkpoint_estimate_and_restore_draw_a_bar_on_a_terminal_and_nothing_in_a_pipe(tmp_path):
    """vmmctl --checkpoint/--suspend draws the memory write's bar on its terminal, --estimate its
    measuring window's; vmmrun -r draws the eager read's on its own. Into a pipe (logs, scripts)
    none of them writes anything bar-like."""
    console = tmp_path / "c.log"
    source = start_vmmrun(tmp_path, *abtest_args(100_000, "64M"), "-l", f"com1,{console}", "vm0")
    restored = []
    try:
        wait_for_socket(tmp_path, "vm0", source)
        piped = vmmctl(tmp_path, "--vm=vm0", "--checkpoint", str(tmp_path / "a.ckp"))
        assert piped.returncode == 0 and piped.stdout.startswith("checkpointed to") and piped.stderr == "", piped.stderr
        estimate = ("--vm=vm0", "--migrate-live", "127.0.0.1", "9", "--bandwidth", "100M", "--estimate", "--estimate-window", "1")
        piped = vmmctl(tmp_path, *estimate)
        assert piped.returncode == 0 and "live migration to 127.0.0.1:9" in piped.stdout and piped.stderr == "", piped.stderr
        status, out, drawn = _on_terminal(f"--run-dir={tmp_path}", *estimate)
        assert status == 0 and "live migration to 127.0.0.1:9" in out, out
        assert drawn.startswith("\r\x1b[Kestimate [") and "100% 1.0 of 1 s" in drawn and drawn.endswith("\n"), drawn
        status, out, drawn = _on_terminal(f"--run-dir={tmp_path}", "--vm=vm0", "--suspend", str(tmp_path / "b.ckp"))
        assert status == 0 and out.startswith("suspended to"), out
        assert drawn.startswith("\r\x1b[Ksuspend [") and "100% 64 MiB of 64 MiB" in drawn and drawn.endswith("\n"), drawn
        source.wait(timeout=30)

        master, slave = pty.openpty()
        restored.append(subprocess.Popen(vmmrun_cmd(f"--run-dir={tmp_path}", "-r", str(tmp_path / "b.ckp"), "-l",
                                                    f"com1,{tmp_path / 'r.log'}", "vm1"),
                                         stdout=subprocess.DEVNULL, stderr=slave))
        os.close(slave)
        drawn = _read_pty(master, b"100%", restored[-1])
        assert drawn.startswith("\r\x1b[Krestore [") and re.search(r"100% [0-9.]+ MiB of [0-9.]+ MiB", drawn), drawn
        for _ in range(300):  # bounded: until it serves (its stderr is the terminal, read here)
            if vmmctl(tmp_path, "--vm=vm1", "--status").returncode == 0 or restored[-1].poll() is not None:
                break
            time.sleep(0.1)
        assert vmmctl(tmp_path, "--vm=vm1", "--destroy").returncode == 0
        restored[-1].wait(timeout=30)
        os.close(master)

        restored.append(start_vmmrun(tmp_path, "-r", str(tmp_path / "a.ckp"), "-l", f"com1,{tmp_path / 'p.log'}", "vm2"))
        wait_for_socket(tmp_path, "vm2", restored[-1])
        assert vmmctl(tmp_path, "--vm=vm2", "--destroy").returncode == 0
        _, err = restored[-1].communicate(timeout=60)
        assert "restore" not in err and "\r" not in err and "[#" not in err, err
    finally:
        stop(source)
        for proc in restored:
            stop(proc)


def test_the_migration_status_line_on_a_terminal_shows_the_running_round():
    from vmmpy.cli import vmmctl as ctl

    term = FakeTerminal()
    printer = ctl._ProgressPrinter(term)
    current = {"round": 0, "final": True, "elapsed_ms": 900.0, "pages_done": 4096, "pages_total": 16384, "bytes": 16 * MiB,
               "remaining_bytes": 48 * MiB, "rate": 8 * MiB, "dirty_rate": None, "expected_downtime_ms": 6900.0, "eta_s": 6.0}
    printer({"migration": {"live": False, "status": "paused", "rounds": [], "bytes_total": 400, "current_round": current}})
    printer({"migration": {"live": False, "status": "paused", "rounds": [], "bytes_total": 400, "current_round": None}})
    printer.done()
    first, second = term.getvalue().split("\r\x1b[K")[1:]
    assert first == "warm paused | round 0 [######..................]  25% 16 MiB (48 MiB left) at 8 MiB/s, ETA 6.0 s | 16.0 MiB in all"
    assert second == "warm paused | round 0 | 400 B in all\n"


def test_a_meter_reading_counts_the_data_when_the_call_knows_it():
    from vmmpy.progress import MeterReading

    # An eager restore knows its data pages: holes do not make the bar jump ahead.
    restore = MeterReading(pages_total=16384, data_pages_total=1024, pages_done=15872, data_pages_done=512, bytes_done=2 * MiB,
                           seconds=1.0).as_progress("restore")
    assert (restore["done_bytes"], restore["total_bytes"], restore["rate"], restore["eta_s"]) == (2 * MiB, 4 * MiB, 2 * MiB, 1.0)
    # A checkpoint write learns its data as it goes: the image's pages stand for the work.
    write = MeterReading(16384, 0, 4096, 100, 400 * 4096, 0.5).as_progress("checkpoint")
    assert (write["done_bytes"], write["total_bytes"], write["eta_s"]) == (16 * MiB, 64 * MiB, 1.5)


def test_migrate_status_shows_the_new_migration_from_its_start_not_the_last_one(tmp_path):
    """While a second migration connects and shakes hands (here with a listener that never
    answers), --migrate-status shows it (setup, its peer), not the first one's failed record."""
    import socket

    source = start_vmmrun(tmp_path, *abtest_args(100_000), "-l", f"com1,{tmp_path / 'c.log'}", "src0")
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        wait_for_socket(tmp_path, "src0", source)
        first = vmmctl(tmp_path, "--vm=src0", "--migrate", "127.0.0.1", str(free_port()))
        assert first.returncode == 1 and "the guest keeps running here" in first.stderr
        assert json.loads(vmmctl(tmp_path, "--vm=src0", "--migrate-status", "--json").stdout)["status"] == "failed"
        port = silent.getsockname()[1]
        ctl = subprocess.Popen([sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={tmp_path}", "--vm=src0", "--migrate",
                                "127.0.0.1", str(port), "--io-timeout", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        record = None
        for _ in range(100):  # bounded: until the new migration is the one shown, at most about 10 s
            record = _status(tmp_path, "src0")
            if record and record.get("peer") == f"127.0.0.1:{port}":
                break
            time.sleep(0.1)
        assert record["peer"] == f"127.0.0.1:{port}" and record["status"] == "setup" and record["error"] is None, record
        assert record["current_round"] is None and record["round_count"] == 0
        silent.close()
        ctl.communicate(timeout=60)
        assert ctl.returncode == 1
    finally:
        silent.close()
        stop(source)


def test_what_populating_a_destination_did_is_said_in_words():
    from vmmpy.migration.stats import MigrationStats, populate_text

    assert populate_text(None) is None
    whole = {"bytes": 1 << 30, "target_bytes": 1 << 30, "seconds": 0.19, "cpu_seconds": 0.18, "stopped": False,
             "refused": None, "short_of_memory": None}
    assert populate_text(whole) == "populated 1 GiB of 1 GiB of guest memory while waiting, in 0.19 s (0.18 CPU-s)"
    # A record that says which pages the thread chose (it times both and takes the cheaper) says it too.
    chosen = dict(whole, huge_bytes=64 << 20, huge_cheaper=False)
    assert populate_text(chosen) == ("populated 1 GiB of 1 GiB of guest memory while waiting, in 0.19 s "
                                     "(0.18 CPU-s; 64 MiB on huge pages)")
    assert populate_text(dict(chosen, huge_bytes=0)) == populate_text(whole), "none on huge pages: not said"
    cut = dict(whole, bytes=256 << 20, stopped=True)
    assert populate_text(cut).endswith("of guest memory while waiting, in 0.19 s (0.18 CPU-s), stopped when the source came")
    short = dict(cut, short_of_memory=900 << 20)
    assert populate_text(short).endswith(", stopped with 900 MiB of host memory left available")
    refused = dict(cut, refused=12)
    assert populate_text(refused).endswith(", then the kernel refused: Cannot allocate memory")
    error = {"error": "populating 64 GiB of guest memory ahead would leave the host less than 1.2 GiB"}
    assert populate_text(error) == f"memory not populated while waiting: {error['error']}"
    stats = MigrationStats(role="destination", populate=whole)
    assert stats.summary().endswith("; populated 1 GiB of 1 GiB of guest memory while waiting, in 0.19 s (0.18 CPU-s)")
