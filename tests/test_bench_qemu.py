"""The bench's QEMU comparison without QEMU: the QMP client against a scripted server, the
parsing of query-migrate and events, the speed-up, and the table with and without the QEMU
column. No QEMU process is started and no timing is asserted."""

import json
import socket
import sys
import threading
import types

import pytest

from tools.bench import qemu, run
from tools.bench.qmp import Qmp, QmpError, QmpTimeout, event_time, migrate_info, parse_message
from tools.bench.stats import Figure, Row

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 22}}, "capabilities": []}}

# query-migrate of a completed QEMU 7.2 migration (trimmed)
COMPLETED = {"status": "completed", "setup-time": 0, "downtime": 242, "total-time": 561,
             "ram": {"transferred": 1076049103, "normal": 262195, "duplicate": 79, "dirty-sync-count": 3,
                     "mbps": 15346.2, "remaining": 0, "total": 1074069504}}


def serve(path, script):
    """A one-connection QMP server: sends the greeting, then for each command it receives calls
    ``script(command) -> list of messages`` and sends them."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def loop():
        conn, _ = listener.accept()
        with conn, listener:
            conn.sendall(json.dumps(GREETING).encode() + b"\r\n")
            buffer = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    for message in script(json.loads(line)):
                        if message is None:
                            return  # hang up
                        conn.sendall(json.dumps(message).encode() + b"\n")

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def stamp(seconds, micro):
    return {"seconds": seconds, "microseconds": micro}


def test_query_migrate_reply_is_parsed_and_an_unfilled_completion_is_not_complete():
    info = migrate_info(COMPLETED)
    assert (info.status, info.total_time_ms, info.downtime_ms, info.transferred) == ("completed", 561, 242, 1076049103)
    assert (info.normal_pages, info.duplicate_pages, info.dirty_sync_count) == (262195, 79, 3)
    assert info.finished and info.complete
    assert not migrate_info({"status": "completed", "total-time": 0}).complete, "QEMU 7.2 reports 0 before filling in"
    assert migrate_info({}).status == "none" and not migrate_info({}).finished
    failed = migrate_info({"status": "failed", "error-desc": "Unable to write to command: Broken pipe"})
    assert failed.finished and not failed.complete and "Broken pipe" in failed.error
    with pytest.raises(QmpError, match="expected an object"):
        migrate_info([1, 2])


def test_messages_and_event_timestamps_are_parsed_or_refused_clearly():
    assert parse_message(b'{"return": {}}') == {"return": {}}
    with pytest.raises(QmpError, match="not a JSON message"):
        parse_message(b"{oops")
    with pytest.raises(QmpError, match="expected a JSON object"):
        parse_message(b"[1]")
    assert event_time({"event": "STOP", "timestamp": stamp(1700000000, 250000)}) == 1700000000.25
    with pytest.raises(QmpError, match="without a timestamp"):
        event_time({"event": "STOP"})


def test_client_negotiates_matches_replies_by_id_and_keeps_events(tmp_path):
    path = tmp_path / "q.sock"

    def script(cmd):
        name, ident = cmd["execute"], cmd.get("id")
        if name == "qmp_capabilities":
            return [{"return": {}, "id": ident}]
        if name == "migrate":
            return [{"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": stamp(10, 0)},
                    {"return": {}, "id": "stale"},  # a reply to some other command: skipped
                    {"return": {}, "id": ident},
                    {"event": "MIGRATION", "data": {"status": "completed"}, "timestamp": stamp(11, 500000)}]
        if name == "query-migrate":
            return [{"return": COMPLETED, "id": ident}]
        return [{"error": {"class": "CommandNotFound", "desc": f"The command {name} has not been found"}, "id": ident}]

    serve(path, script)
    qmp = Qmp(str(path), timeout=10)
    try:
        assert qmp.execute("migrate", {"uri": "tcp:127.0.0.1:1"}) == {}
        assert [e["data"]["status"] for e in qmp.events] == ["setup"], "the event before the reply is kept"
        done = qmp.wait_event("MIGRATION", lambda e: e["data"]["status"] == "completed", timeout=10)
        assert event_time(done) == 11.5
        assert migrate_info(qmp.execute("query-migrate")).complete
        with pytest.raises(QmpError, match="CommandNotFound: The command nonesuch has not been found"):
            qmp.execute("nonesuch")
        setup = qmp.wait_event("MIGRATION", timeout=1)
        assert setup["data"]["status"] == "setup" and qmp.events == []
    finally:
        qmp.close()


def test_client_gives_up_at_its_deadline_and_when_qemu_hangs_up(tmp_path):
    path = tmp_path / "q.sock"
    serve(path, lambda cmd: [{"return": {}, "id": cmd["id"]}] if cmd["execute"] == "qmp_capabilities"
          else ([] if cmd["execute"] == "silent" else [None]))
    qmp = Qmp(str(path), timeout=10)
    try:
        with pytest.raises(QmpTimeout, match="before the deadline"):
            qmp.execute("silent", timeout=0.2)
        with pytest.raises(QmpTimeout, match="no STOP event within 0.2 s"):
            qmp.wait_event("STOP", timeout=0.2)
        with pytest.raises(QmpError, match="closed the connection") as broken:
            qmp.execute("hang-up", timeout=5)
        assert not isinstance(broken.value, QmpTimeout), "a closed socket is not a quiet one"
    finally:
        qmp.close()
    with pytest.raises(QmpError, match="no QEMU listening"):
        Qmp(str(tmp_path / "nobody.sock"), timeout=0.1)


def test_a_qemu_that_exits_at_start_is_reported_and_leaves_no_files(tmp_path):
    # the Python interpreter stands in for a QEMU that refuses its command line at once
    with pytest.raises(QmpError, match="exited 2"):
        qemu.QemuVm(sys.executable, tmp_path, "t", memory="memory-backend-ram", size=1 << 20, extra=[], start_timeout=30)
    assert list(tmp_path.iterdir()) == []


def test_speedup_is_rate_over_rate_or_time_over_time():
    assert qemu.speedup(Figure([2.0], "GiB/s"), Figure([1.0], "GiB/s")) == 2.0
    assert qemu.speedup(Figure([20.0], "ms"), Figure([200.0], "ms")) == 10.0
    assert qemu.speedup(Figure([20.0], "ms"), Figure([1.0], "GiB/s")) is None
    assert qemu.speedup(Figure([], "ms"), Figure([1.0], "ms")) is None


def report(qemu_text):
    return {"date": "d", "machine": {"cpus": 2, "cpu": "c", "memory_gib": 1, "kernel": "k", "load_average": [0.1]},
            "runs": 3, "qemu": qemu_text}


def rows(with_qemu):
    warm = Row("warm-1g", "warm", Figure([2.0, 2.2, 1.8], "GiB/s"), "loopback TCP", Figure([4.0], "GiB/s"), 0.5)
    other = Row("harvest-clean-64g", "harvest", Figure([0.1], "ms"))
    if with_qemu:
        warm.qemu, warm.qemu_ratio = Figure([1.0, 1.1, 0.9], "GiB/s"), 2.0
        other.qemu_note = "no QEMU equivalent"
    return [warm, other]


def test_table_has_the_qemu_columns_only_when_qemu_was_measured(capsys):
    run.print_table(report("QEMU emulator version 7.2.22, measured in this run"), rows(True))
    out = capsys.readouterr().out
    header = out.splitlines()[1]
    assert "QEMU (same run)" in header and "x QEMU" in header
    warm = next(line for line in out.splitlines() if line.startswith("warm-1g "))
    assert "1.00 [0.90-1.10] GiB/s" in warm and "2.00" in warm
    assert "above 1 vmmpy is faster" in out

    run.print_table(report("not installed (apt-get install -y qemu-system-x86)"), rows(False))
    out = capsys.readouterr().out
    assert "QEMU" not in out.splitlines()[1]
    assert out.count("not installed") == 1 and "no QEMU column" in out.splitlines()[0]


def test_reports_round_trip_through_json_old_and_new():
    new = [run.row_from_dict(json.loads(json.dumps(r.to_dict()))) for r in rows(True)]
    assert new[0].qemu.values == [1.0, 1.1, 0.9] and new[0].qemu_ratio == 2.0 and new[1].qemu is None
    old = rows(False)[0].to_dict()
    old["qemu"] = "not installed"  # reports written before the QEMU column
    for key in ("qemu_ratio", "qemu_note", "qemu_detail"):
        del old[key]
    back = run.row_from_dict(old)
    assert back.qemu is None and back.qemu_note == "not installed"


def test_qemu_figures_land_beside_their_rows_and_a_failure_is_a_note(monkeypatch):
    def measured(bench, ctx):
        return qemu.QemuFigure(Figure([1.0], "GiB/s"), "how", {"multifd 4 channels": Figure([1.5], "GiB/s")})

    def broken(bench, ctx):
        raise QmpError("QEMU src exited 1: no")

    monkeypatch.setattr(qemu, "WORK", {"warm-1g": measured, "zero-1g": broken})
    ctx = types.SimpleNamespace(deadline=float("inf"), busy=False)
    warm = Row("warm-1g", "warm", Figure([2.0], "GiB/s"))
    zero = Row("zero-1g", "zero", Figure([20.0], "ms"))
    other = Row("vcpu-ips", "ips", Figure([300.0], "M instr/s"))
    run.attach_qemu(None, ctx, [warm, zero, other])
    assert warm.qemu.values == [1.0] and warm.qemu_ratio == 2.0 and "multifd 4 channels 1.50 GiB/s" in warm.notes[-1]
    assert warm.qemu_detail["how"] == "how"
    assert zero.qemu is None and zero.qemu_note.startswith("QEMU failed: QmpError")
    assert other.qemu_note == "no QEMU equivalent"
