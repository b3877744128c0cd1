"""The bench compares like with like (issue 16): these tests pin the settings that make a row and
QEMU's figure beside it the same work, and the rule that a row is judged only against figures of
its own run. No QEMU process is started and no timing is asserted."""

import itertools
import os
import subprocess
import time
import types
from pathlib import Path

import pytest

from tools.bench import limits, qemu, run, scenarios
from tools.bench.stats import Figure, Row


class Recorded(Exception):
    pass


def record_vms(monkeypatch, stop_after):
    """Replace QemuVm with a recorder of (name, memory, extra) that stops the run at the
    ``stop_after``-th VM, so the settings a measurement would start QEMU with can be read."""
    seen = []

    def fake(binary, work, name, *, memory, size, extra, start_timeout=0.0):
        seen.append((name, memory, extra))
        if len(seen) == stop_after:
            raise Recorded()
        return types.SimpleNamespace(name=name, stop=lambda: None)

    monkeypatch.setattr(qemu, "QemuVm", fake)
    return seen


def test_qemu_source_memory_is_populated_before_the_timer_and_never_written_back(monkeypatch, tmp_path):
    bench = qemu.QemuBench("qemu-system-x86_64", tmp_path, str(tmp_path), 1)
    monkeypatch.setattr(bench, "_random_file", lambda gib: str(tmp_path / "ram"))
    seen = record_vms(monkeypatch, stop_after=2)
    with pytest.raises(Recorded):
        bench.migrate_once(1 << 20, 1, prealloc=False)
    (dst, dst_memory, dst_extra), (src, src_memory, _) = seen
    assert (dst, src) == ("dst", "src")
    # the source: a private mapping of the random file, copied in before anything is timed
    assert src_memory.split(",")[0] == "memory-backend-file"
    assert {"share=off", "prealloc=on", f"mem-path={tmp_path / 'ram'}"} <= set(src_memory.split(","))
    # the destination: as the row says (here not preallocated, as vmmrun -R's default)
    assert dst_memory == "memory-backend-ram" and "-incoming" in dst_extra


def test_qemu_destination_is_preallocated_exactly_when_the_row_says(monkeypatch, tmp_path):
    bench = qemu.QemuBench("qemu-system-x86_64", tmp_path, str(tmp_path), 1)
    monkeypatch.setattr(bench, "_random_file", lambda gib: str(tmp_path / "ram"))
    for prealloc, expected in ((True, "memory-backend-ram,prealloc=on"), (False, "memory-backend-ram")):
        seen = record_vms(monkeypatch, stop_after=1)
        with pytest.raises(Recorded):
            bench.migrate_once(1 << 20, 1, prealloc=prealloc)
        assert seen[0][1] == expected
        seen = record_vms(monkeypatch, stop_after=1)
        with pytest.raises(Recorded):
            bench.restore_once(1 << 20, str(tmp_path / "img"), prealloc=prealloc)
        assert seen[0][1] == expected


def test_qemu_migration_is_not_capped_and_multifd_gets_the_rows_channel_count():
    calls = []
    vm = types.SimpleNamespace(execute=lambda command, arguments=None: calls.append((command, arguments)))
    qemu._prepare(vm, 4, downtime_ms=10)
    params = dict(calls)["migrate-set-parameters"]
    assert params["max-bandwidth"] >= 10**11 and params["multifd-channels"] == 4 and params["downtime-limit"] == 10
    caps = {c["capability"]: c["state"] for c in dict(calls)["migrate-set-capabilities"]["capabilities"]}
    assert caps == {"events": True, "multifd": True}


def test_the_rows_compared_with_qemu_name_the_qemu_work_of_the_same_kind():
    # unwired rows against a destination not preallocated, wired ones against a preallocated one
    calls = {}
    fake = types.SimpleNamespace(warm=lambda *a, **k: calls.setdefault("warm", []).append((a, k)),
                                 warm_cpu=lambda *a, **k: calls.setdefault("cpu", []).append(a))
    for name in ("warm-1g", "warm-4g", "warm-1g-wired", "warm-1g-streams4", "warm-1g-wired-streams4", "warm-1g-cpu"):
        qemu.WORK[name](fake, None)
    (one, unwired), (four, unwired4), (wired_args, wired), (_, streams), (_, wired_streams) = calls["warm"]
    assert one == (1,) and unwired == {"prealloc": False, "also_preallocated": True}
    assert four == (4,) and unwired4 == unwired
    assert wired_args == (1,) and wired == {}
    assert streams == {"channels": 4, "prealloc": False, "compare": 1, "also_preallocated": True}
    assert wired_streams == {"channels": 4, "compare": 1}
    assert calls["cpu"] == [(1,)]


@pytest.fixture
def ctx(tmp_path, monkeypatch):
    c = scenarios.Context(work=tmp_path, shm=str(tmp_path), disk=str(tmp_path), runs=2, quick=True, deadline=float("inf"))
    c.limits = {name: Figure([4.0, 4.0], "GiB/s") for name in scenarios.LIMITS}
    monkeypatch.setattr(scenarios, "random_image", lambda *a, **k: "image")
    stats = {"downtime_ms": 5.0, "bytes_total": 1 << 30, "downtime_breakdown": {}, "cpu_seconds": 1.5,
             "rounds": [{"stream_bytes": [1]}], "streams": 4, "source_settled_s": 0.2}
    monkeypatch.setattr(scenarios, "_warm", lambda *a, **k: ([0.5, 0.5], [stats, stats]))
    return c


def test_warm_rows_carry_issue_16s_targets_against_qemu_and_no_recorded_figure(ctx):
    unwired, cpu = scenarios.warm_random(1)(ctx)
    assert unwired.qemu_min == 1.2 and unwired.qemu_also == {qemu.PREALLOCATED: 1.0}
    assert cpu.scenario == "warm-1g-cpu" and cpu.figure.values == [1.5, 1.5] and cpu.qemu_min == 1.0
    (wired,) = scenarios.warm_random(1, wired=True)(ctx)
    assert wired.qemu_min == 1.0 and not wired.qemu_also
    (streams,) = scenarios.warm_streams(4)(ctx)
    assert streams.qemu_min == 1.0 and streams.target == "" and streams.met is None
    assert streams.qemu_also == {"multifd 4 channels, dst preallocated": 1.0}
    (wired_streams,) = scenarios.warm_streams(4, wired=True)(ctx)
    assert wired_streams.qemu_min == 1.0 and not wired_streams.qemu_also
    for row in (unwired, wired, streams, wired_streams):
        assert not any("anchor" in note for note in row.notes), row.notes
        assert row.extra["source_settled_s"] == [0.2, 0.2]  # how long each source took to settle
    assert "the source timed once started" in unwired.notes[0]


def judged(ours, theirs, busy=False, **targets):
    row = Row("warm-1g", "w", Figure([ours], "GiB/s"), target=">= 0.85 x loopback TCP", met=True, **targets)
    result = None if theirs is None else qemu.QemuFigure(Figure([theirs], "GiB/s"), "how", {qemu.PREALLOCATED: Figure([2.0], "GiB/s")})
    run.judge_qemu(row, result, busy=busy)
    return row


def test_a_row_is_judged_against_qemu_in_the_same_run_only():
    assert judged(1.3, 1.0, qemu_min=1.2).met is True
    assert judged(1.1, 1.0, qemu_min=1.2).met is False
    # the other QEMU figure of the same work (preallocated: 2.0 GiB/s) must be matched too
    row = judged(1.3, 1.0, qemu_min=1.2, qemu_also={qemu.PREALLOCATED: 1.0})
    assert row.met is False and "x QEMU (one channel, dst preallocated): 0.65" in row.notes
    assert ">= 1.2 x QEMU; >= 1 x QEMU (one channel, dst preallocated)" in row.target
    # on a busy host each QEMU target is 0.9 of itself
    assert judged(1.1, 1.0, busy=True, qemu_min=1.2).met is True
    # no QEMU figure: not judged, and it says so; the row's own target is kept in the notes
    row = judged(5.0, None, qemu_min=1.2)
    assert row.met is None and "QEMU not measured in this run: the row is not judged" in row.notes
    assert "the targets other than QEMU's were met" in row.notes
    # the row's own target still counts when QEMU is beaten
    row = Row("w", "w", Figure([1.3], "GiB/s"), met=False, qemu_min=1.2)
    run.judge_qemu(row, qemu.QemuFigure(Figure([1.0], "GiB/s"), "how"))
    assert row.met is False


def test_the_loopback_limit_is_a_native_two_process_ceiling():
    assert scenarios.LIMITS["loopback TCP"].__code__.co_names.count("loopback_ceiling") == 1
    binary = limits.ceiling_binary()
    assert binary is not None, "cargo could not build examples/tcp_ceiling.rs"
    # both ways of waiting move every byte, over one stream and several (the binary checks the
    # receiver got them all, and fails otherwise)
    for streams in (1, 3):
        for wake in limits.CEILING_WAKES:
            assert limits.native_loopback(binary, (8 << 20) + 12345, streams, 0, wake) > 0
    # every buffer setting the ceiling tries moves every byte, the send buffer alone ("N/auto",
    # vmmpy's since session 38) too; a setting that is no size is refused
    for buffer in limits.CEILING_BUFFERS:
        assert limits.native_loopback(binary, (8 << 20) + 12345, 2, buffer, "whole") > 0
    assert f"{limits.MIB}/auto" in limits.CEILING_BUFFERS
    with pytest.raises(RuntimeError, match="usage"):
        limits.native_loopback(binary, 8 << 20, 1, "lots/auto")
    fig = limits.loopback_ceiling(8 << 20, 1)
    assert fig.how.startswith("native, two processes") and "SO_RCVLOWAT" in fig.how and len(fig.values) == 1
    # the senders may read more memory than one MiB (a span that is not whole MiB is rounded
    # up; each stream starts in its own part of it and wraps): every byte still arrives
    for streams, span in ((1, 3 << 20), (3, (4 << 20) + 1), (2, 64 << 20)):
        assert limits.native_loopback(binary, (8 << 20) + 12345, streams, 0, "whole", span=span) > 0
    # a way of waiting the binary does not know is refused, not taken for the default, by the
    # sender and by the receiving child alike; so is a span that is no size
    with pytest.raises(RuntimeError, match="usage"):
        limits.native_loopback(binary, 8 << 20, 1, 0, "sometimes")
    for span in ("0", "lots"):
        out = subprocess.run([binary, str(8 << 20), "1", "0", "whole", span], capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and "SPAN" in out.stderr
    # the span is memory the sender really maps and fills: its peak resident size grows with it
    peaks = {}
    for span in (limits.MIB, 96 << 20):
        out = subprocess.run([binary, str(8 << 20), "1", "0", "whole", str(span)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        peaks[span] = int(out.stdout.split("sender_peak_kib=")[1].split()[0]) << 10
    assert peaks[96 << 20] >= 96 << 20 and peaks[limits.MIB] < 32 << 20, peaks
    out = subprocess.run([binary, "receive", "1", "0", "sometimes"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "receive STREAMS BUFFER" in out.stderr


def test_each_run_of_the_ceiling_is_the_best_of_every_buffer_and_way_of_waiting(monkeypatch):
    tried = []

    def fake(binary, size, streams, buffer, wake="any"):
        tried.append((buffer, wake))
        return 5.0 if (buffer, wake) == (f"{limits.MIB}/auto", "whole") else 1.0

    monkeypatch.setattr(limits, "ceiling_binary", lambda: "tcp_ceiling")
    monkeypatch.setattr(limits, "native_loopback", fake)
    fig = limits.loopback_ceiling(limits.GIB, 2, streams=4)
    assert sorted(tried) == sorted(list(itertools.product(limits.CEILING_BUFFERS, limits.CEILING_WAKES)) * 2)
    assert {"any", "whole"} <= set(limits.CEILING_WAKES)
    assert fig.values == [5.0, 5.0]


def test_the_from_memory_ceiling_reads_as_much_memory_as_it_sends_and_is_reported_beside_the_row(monkeypatch):
    # measured as a limit of the run, and noted beside every one-stream warm row (1 and 4 GiB,
    # wired or not), under the name the rows look it up by
    assert scenarios.LIMITS["loopback TCP from memory"].__code__.co_names.count("loopback_from_memory") == 1
    for gib, wired in ((1, False), (1, True), (4, False), (4, True)):
        assert "from_memory" in scenarios.warm_random(gib, wired).__code__.co_names
    tried = []

    def fake(binary, size, streams, buffer, wake="any", span=limits.MIB):
        tried.append((streams, span, buffer, wake))
        return 4.0 if (buffer, wake) == ("0", "whole") else 2.0

    monkeypatch.setattr(limits, "ceiling_binary", lambda: "tcp_ceiling")
    monkeypatch.setattr(limits, "native_loopback", fake)
    fig = limits.loopback_from_memory(limits.GIB, 2)
    # one stream, the sender reading the whole size once, each run the best of every way
    assert sorted(tried) == sorted([(1, limits.GIB, b, w) for b in limits.CEILING_BUFFERS for w in limits.CEILING_WAKES] * 2)
    assert fig.values == [4.0, 4.0] and "reading 1024 MiB of memory once" in fig.how
    # beside a one-stream row: its ratio to this ceiling, in the notes and the report
    ctx = scenarios.Context(work=Path("."), shm=".", disk=".", runs=2, quick=False, deadline=0.0)
    ctx.limits["loopback TCP from memory"] = fig
    row = Row("warm-1g", "w", Figure([3.0, 3.0], "GiB/s"))
    scenarios.from_memory(ctx, row, row.figure)
    assert row.extra["loopback_from_memory"]["median"] == 4.0
    assert any(n.endswith("(4.00 [4.00-4.00] GiB/s): 0.75") for n in row.notes), row.notes
    # where the native ceiling cannot be built there is nothing to say beside the row
    monkeypatch.setattr(limits, "ceiling_binary", lambda: None)
    bare = Row("warm-1g", "w", Figure([3.0], "GiB/s"))
    scenarios.from_memory(ctx, bare, bare.figure)
    assert bare.notes == [] and "loopback_from_memory" not in bare.extra
    with pytest.raises(RuntimeError, match="cargo"):
        limits.loopback_from_memory(limits.GIB, 1)


def test_without_cargo_the_python_figure_stands_in_and_says_it_is_no_ceiling(monkeypatch):
    monkeypatch.setattr(limits, "_ceiling_binary", [None])
    fig = limits.loopback_ceiling(8 << 20, 1, streams=2)
    assert "NOT a ceiling" in fig.how and len(fig.values) == 1


def test_busy_mode_runs_a_neighbour_pinned_to_one_cpu_and_stops_it():
    proc = run.start_neighbour()
    try:
        for _ in range(200):  # bounded: the child pins itself as its first statement
            allowed = os.sched_getaffinity(proc.pid)
            if len(allowed) == 1:
                break
            proc.poll()
            assert proc.returncode is None
            time.sleep(0.01)
        assert allowed == {max(os.sched_getaffinity(0))}
    finally:
        proc.kill()
        proc.wait(10)


def test_the_bench_compiles_vmmpys_bytecode_before_timing_as_an_installed_wheel_has_it(tmp_path):
    """A row that times vmmrun from the command must not count compiling vmmpy's modules, which
    an installed vmmpy never does (on a host with PYTHONDONTWRITEBYTECODE set every process would)."""
    import importlib.util
    import struct

    package = tmp_path / "vmmpy"
    (package / "sub").mkdir(parents=True)
    sources = [package / "__init__.py", package / "sub" / "mod.py"]
    for source in sources:
        source.write_text("VALUE = 1\n")
    assert run.compile_bytecode(package) == run.COMPILED
    for source in sources:
        header = open(importlib.util.cache_from_source(str(source)), "rb").read(16)
        # The cache is current, so the import system uses it instead of compiling the source:
        # by the source's mtime, or by its hash where SOURCE_DATE_EPOCH asks for hash-based caches.
        if struct.unpack("<I", header[4:8])[0] == 0:
            assert struct.unpack("<I", header[8:12])[0] == int(source.stat().st_mtime) & 0xFFFFFFFF
        else:
            assert header[8:16] == importlib.util.source_hash(source.read_bytes())
    (package / "broken.py").write_text("def (:\n")
    assert run.compile_bytecode(package).startswith("compiling failed")
    assert run.compile_bytecode(tmp_path / "elsewhere").startswith("not compiled")


def test_live_idle_times_the_span_qemu_s_stop_and_resume_bound(monkeypatch, tmp_path):
    """vmmpy's downtime in live-idle is the source's pause to the destination running, both on the
    host clock, as QEMU's STOP and RESUME events: not the source's estimate, which takes half a
    handshake round trip off the RESUMED reply's arrival."""
    runs = iter([(1.5, {"downtime_ms": 2.0, "paused_at": 100.0, "destination": {"running_at": 100.0031}}),
                 (1.4, {"downtime_ms": 2.5, "paused_at": 200.0, "destination": {"running_at": 200.0029}})])
    monkeypatch.setattr(scenarios, "migrate", lambda *a, **k: next(runs))
    monkeypatch.setattr(scenarios, "random_image", lambda ctx, gib: "image")
    ctx = types.SimpleNamespace(work=tmp_path, runs=2, results={})
    (row,) = scenarios.live_idle(ctx)
    assert row.figure.values == pytest.approx([3.1, 2.9])
    assert scenarios.host_downtime_ms({"paused_at": 1.0, "destination": None}) is None
    ctx.runs, runs = 1, iter([(1.0, {"downtime_ms": 2.0, "paused_at": 1.0, "destination": None})])
    with pytest.raises(RuntimeError, match="no destination record"):
        scenarios.live_idle(ctx)


def scripted_clock(monkeypatch, cpu_per_window):
    """Run ``procs.wait_settled`` on a fake clock: each sleep advances it, and the process's CPU
    seconds grow by the next of ``cpu_per_window`` (the last repeating) at each reading after
    the first."""
    from tools.bench import procs

    now = [0.0]
    used = [0.0]
    steps = iter(cpu_per_window)
    last_step = [cpu_per_window[-1]]

    def cpu(pid):
        return used[0]

    def sleep(seconds):
        now[0] += seconds
        last_step[0] = next(steps, last_step[0])
        used[0] += last_step[0]

    monkeypatch.setattr(procs, "process_cpu_seconds", cpu)
    monkeypatch.setattr(procs, "time", types.SimpleNamespace(monotonic=lambda: now[0], sleep=sleep))
    return procs


def test_a_source_is_timed_once_it_has_finished_starting(monkeypatch):
    """vmmrun imports the migration engine and numpy on a thread once its guest runs: a source
    is timed once that is done (QEMU's is done when it answers QMP), and one that stays busy is
    waited for a bounded time only."""
    tick = 0.01
    # busy for three windows (importing), then idle: settled in the fourth
    procs = scripted_clock(monkeypatch, [0.09, 0.1, 0.08, 0.0])
    assert procs.wait_settled(1, limit=3.0) == pytest.approx(4 * procs.SETTLE_WINDOW_S)
    # a guest running flat out never settles: the wait ends at the limit
    procs = scripted_clock(monkeypatch, [0.1])
    assert procs.wait_settled(1, limit=3.0) == pytest.approx(3.0)
    # one tick a window (an idle guest's timer) is quiet; two ticks, even one computed a hair
    # under 0.02 in floating point, are not
    procs = scripted_clock(monkeypatch, [tick])
    assert procs.wait_settled(1, limit=3.0) == pytest.approx(procs.SETTLE_WINDOW_S)
    procs = scripted_clock(monkeypatch, [0.35 - 0.33, 0.0])
    assert procs.wait_settled(1, limit=3.0) == pytest.approx(2 * procs.SETTLE_WINDOW_S)


def test_migrate_lets_the_source_settle_before_the_timer_and_its_cpu_baseline(monkeypatch, tmp_path):
    from tools.bench import procs

    events = []

    class FakeVmmrun:
        def __init__(self, run_dir, name, *args):
            self.role = "dest" if "-R" in args else "source"
            self.proc = types.SimpleNamespace(pid={"dest": 1, "source": 2}[self.role])

        def wait_listening(self, port):
            pass

        def wait_state(self):
            events.append("source started")

        def cpu_seconds(self):
            events.append(f"{self.role} cpu")
            return 0.0

        def client(self, timeout=None):
            return types.SimpleNamespace(request=lambda cmd, **kw: events.append(cmd) or {})

        def wait_exit(self, timeout):
            pass

        def stop(self):
            pass

    monkeypatch.setattr(procs, "Vmmrun", FakeVmmrun)
    monkeypatch.setattr(procs, "wait_settled", lambda pid: events.append(f"settle {pid}") or 0.25)
    monkeypatch.setattr(procs, "_destination_record", lambda dest: None)
    _, stats = procs.migrate(tmp_path, "s", source_args=[], dest_args=[], live=False)
    assert events.index("settle 2") > events.index("source started")
    assert events.index("settle 2") < events.index("source cpu") < events.index("migrate")
    assert "settle 1" not in events  # the destination populates while it waits, as designed
    assert stats["source_settled_s"] == 0.25


def record_order(monkeypatch, module, events):
    monkeypatch.setattr(module, "wait_settled", lambda pid: events.append(f"settle {pid}") or 0.2)


def test_qemu_sources_settle_before_the_timer_as_vmmpys_do(monkeypatch, tmp_path):
    events = []

    class FakeQemu:
        def __init__(self, binary, work, name, *, memory, size, extra, start_timeout=0.0):
            self.name = name
            self.proc = types.SimpleNamespace(pid={"dst": 1, "src": 2, "save": 3}[name])

        def execute(self, command, arguments=None):
            if command == "migrate":
                events.append(f"{self.name} migrate")
                raise Recorded()

        def cpu_seconds(self):
            events.append(f"{self.name} cpu")
            return 0.0

        def stop(self):
            pass

    monkeypatch.setattr(qemu, "QemuVm", FakeQemu)
    record_order(monkeypatch, qemu, events)
    bench = qemu.QemuBench("qemu-system-x86_64", tmp_path, str(tmp_path), 1)
    monkeypatch.setattr(bench, "_random_file", lambda gib: str(tmp_path / "ram"))
    with pytest.raises(Recorded):
        bench.migrate_once(1 << 20, 1)
    assert events.index("settle 2") < events.index("src cpu") < events.index("src migrate")
    assert "settle 1" not in events
    events.clear()
    with pytest.raises(Recorded):
        bench.save_once(1 << 20, 1, str(tmp_path / "image"))
    assert events == ["settle 3", "save migrate"]


def test_checkpoint_rows_time_a_source_that_has_finished_starting(monkeypatch, tmp_path):
    events = []

    class FakeVmmrun:
        def __init__(self, run_dir, name, *args):
            self.proc = types.SimpleNamespace(pid=7)

        def wait_state(self):
            events.append("started")

        def client(self, timeout=None):
            def request(cmd, **kw):
                events.append(cmd)
                raise Recorded()
            return types.SimpleNamespace(request=request)

        def stop(self):
            pass

    monkeypatch.setattr(scenarios, "Vmmrun", FakeVmmrun)
    monkeypatch.setattr(scenarios, "random_image", lambda ctx, gib: "image")
    record_order(monkeypatch, scenarios, events)
    ctx = types.SimpleNamespace(work=tmp_path, disk=str(tmp_path), shm=str(tmp_path), runs=1, results={})
    with pytest.raises(Recorded):
        scenarios.checkpoint("tmpfs")(ctx)
    assert events == ["started", "settle 7", "checkpoint"]


def test_the_settle_ends_at_once_for_a_process_that_is_gone(monkeypatch):
    """A source killed before it is timed: the wait ends, and the request after it names the
    failure (the bench's own check), instead of a traceback from /proc."""
    procs = scripted_clock(monkeypatch, [0.1])
    calls = []

    def gone(pid):
        calls.append(pid)
        if len(calls) > 2:
            raise FileNotFoundError(f"/proc/{pid}/stat")
        return 0.1 * len(calls)

    monkeypatch.setattr(procs, "process_cpu_seconds", gone)
    assert procs.wait_settled(1, limit=3.0) == pytest.approx(2 * procs.SETTLE_WINDOW_S)
    assert len(calls) == 3
