"""Ownership through the commit (protocol version 5): a cut anywhere leaves exactly one guest.

In-process (fake guests, real sockets) so every message boundary of a migration can be tried in
seconds: ``FaultProxy`` cuts, resets or stalls the main connection after the k-th message of
either direction, and the test checks the one invariant that matters, whatever the point:

* never two running: the source never resumes once the destination may run the guest, and the
  destination never runs it unless the source committed;
* never none: a guest the protocol cannot settle by itself is held paused on a side that can be
  told to run it (in doubt), and settling it makes exactly one run, with its memory exact.

Process-level cases (vmmrun, vmmctl, kill -9) are in test_migration_ownership_processes.py.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from vmmpy.migration import Destination, MigrationHandle, MigrationParams, migrate
from vmmpy.migration import protocol as P

from .fault_cases import FaultPoint, fault_points
from .fault_proxy import FaultProxy
from .migration_helpers import KEY, DestinationThread

# Short waits: an unanswered commit is noticed in 1 s, and the source keeps asking for 5 s.
PARAMS = MigrationParams(handshake_timeout=3, io_timeout=3, commit_timeout=1.0, resolve_timeout=5.0)


def ran(guest) -> bool:
    """The guest runs (or ran) on this side after the migration began."""
    if "stop_for_good" in guest.calls or "discard" in guest.calls:
        return False
    return guest.running


def settle_pair(src, dst, handle: MigrationHandle, d: DestinationThread) -> tuple:
    """Wait for both ends; settle a migration left in doubt through the source's resolve (the
    destination still listens). Returns both records."""
    stats = handle.wait(60)
    if stats.status == "in-doubt":
        stats = handle.resolve("ask", timeout=10)
    dstats = d.join(60)
    return stats, dstats


def assert_exactly_one_runs(src, dst, stats, dstats, label: str) -> None:
    src_runs, dst_runs = ran(src), ran(dst)
    assert src_runs != dst_runs, f"{label}: source runs={src_runs}, destination runs={dst_runs} ({stats.error} / {dstats.error})"
    if dst_runs:
        assert stats.status == "completed" and dstats.status == "completed", (label, stats.error, dstats.error)
        assert src.calls.count("stop_for_good") == 1 and "resume" not in src.calls[src.calls.index("pause"):], label
        assert dst.digest_at_start == src.digest_at_pause, f"{label}: destination memory differs"
        assert dst.state_at_start == src.state_at_pause, label
        dst.stop_writer()
        assert dst.bad_pages() == [], label
    else:
        assert stats.status in ("failed", "cancelled"), (label, stats.status, stats.error)
        assert dstats.status in ("failed", "cancelled"), (label, dstats.status, dstats.error)
        assert "start_running" not in dst.calls, label
        src.wait_for_progress(100)
        src.stop_writer()
        assert src.bad_pages() == [], label


def busy_pair(guests):
    """A source guest writing its work area and an empty destination guest."""
    src = guests("16M", work_pages=64, rate=2000)
    dst = guests("16M", work_pages=64, running=False)
    src.wait_for_progress(64)
    return src, dst


def first(log, kind: str):
    return next(m for m in log if m.kind == kind and m.connection == 0)


def recorded_log(guests) -> list:
    src = guests("16M", work_pages=64, rate=2000)
    dst = guests("16M", work_pages=64, running=False)
    d = DestinationThread(dst, key=KEY, params=PARAMS)
    with FaultProxy((d.host, d.port)) as proxy:
        stats = migrate(src, "127.0.0.1", proxy.port, live=False, key=KEY, params=PARAMS)
        dstats = d.join(30)
        assert stats.status == dstats.status == "completed", (stats.error, dstats.error)
        assert proxy.wait_quiet(10)
        assert proxy.errors == []
        return proxy.log


def commit_window_points(guests) -> list:
    """Every fault point from COMMIT_REQUEST on, in both directions, with every action: the
    window the other fault tests (test_migration_failures) do not reach."""
    log = recorded_log(guests)
    kinds = [m.kind for m in log if m.connection == 0]
    assert kinds[-5:] == ["COMMIT_REQUEST", "COMMIT_ACK", "COMMITTED", "RESUMED", "RELEASED"], kinds
    start = {"s2d": None, "d2s": None}
    for m in log:
        if m.connection == 0 and m.kind == "COMMIT_REQUEST":
            start["s2d"] = m.index - 1
        if m.connection == 0 and m.kind == "COMMIT_ACK":
            start["d2s"] = m.index - 1
    # After the last message of a direction there is nothing left to break: the session is over.
    last = {d: max(m.index for m in log if m.connection == 0 and m.direction == d) for d in ("s2d", "d2s")}
    points = [p for p in fault_points(log) if p.inside_bytes is None and start[p.direction] <= p.after_message < last[p.direction]]
    # And each message of the commit cut after its first byte: sent, but not whole at the peer.
    for m in log:
        if m.connection == 0 and m.kind in ("COMMIT_REQUEST", "COMMIT_ACK", "COMMITTED", "RESUMED", "RELEASED"):
            for action in ("cut", "reset"):
                points.append(FaultPoint(m.direction, m.index - 1, 1, action, f"{action} at byte 1 of {m.direction} {m.index} {m.kind}"))
    return points


def test_a_cut_after_every_message_of_the_commit_leaves_exactly_one_guest(guests):
    points = commit_window_points(guests)
    assert len(points) >= 15, points
    for point in points:
        src, dst = busy_pair(guests)
        d = DestinationThread(dst, key=KEY, params=PARAMS)
        with FaultProxy((d.host, d.port), **point.proxy_args()) as proxy:
            if point.action == "stall":
                # A stall longer than every timeout, released once both ends gave up waiting.
                threading.Timer(4.0, proxy.release).start()
            handle = MigrationHandle(src, "127.0.0.1", proxy.port, live=False, key=KEY, params=PARAMS)
            try:
                stats, dstats = settle_pair(src, dst, handle, d)
            except AssertionError as err:
                raise AssertionError(f"{point.label}: {err} (destination {d.dest.state}, source calls {src.calls}, "
                                     f"destination calls {dst.calls})") from None
            assert proxy.fired, point.label
        assert_exactly_one_runs(src, dst, stats, dstats, point.label)
        src.close()
        dst.close()


def test_the_issue_case_committed_replaced_by_a_reset_completes_by_reconnecting(guests):
    # The proxy relays everything, then resets both connections in place of COMMITTED: the
    # destination never reads it. The source must not stop for good on a guess, the destination
    # must not discard: the source reconnects and the guest runs there, once.
    src, dst = busy_pair(guests)
    ack = first(recorded_log(guests), "COMMIT_ACK")
    d = DestinationThread(dst, key=KEY, params=PARAMS)
    # COMMIT_ACK reaches the source; then both connections are reset: COMMITTED goes nowhere.
    with FaultProxy((d.host, d.port), direction="d2s", after_message=ack.index, action="reset") as proxy:
        stats = migrate(src, "127.0.0.1", proxy.port, live=False, key=KEY, params=PARAMS)
        dstats = d.join(30)
        assert proxy.fired
    assert stats.status == "completed" and stats.owner == "destination", (stats.status, stats.error, stats.notes)
    assert any(n.startswith("in doubt:") for n in stats.notes), stats.notes
    assert any("confirmed it runs the guest (reconnecting)" in n for n in stats.notes), stats.notes
    assert dstats.status == "completed" and dstats.owner == "destination", (dstats.error, dstats.notes)
    assert any("committed by the source's RESOLVE" in n for n in dstats.notes), dstats.notes
    assert_exactly_one_runs(src, dst, stats, dstats, "reset in place of COMMITTED")


def test_unreachable_destination_leaves_both_in_doubt_until_the_operator_asks_again(guests):
    src, dst = busy_pair(guests)
    ack = first(recorded_log(guests), "COMMIT_ACK")
    d = DestinationThread(dst, key=KEY, params=PARAMS)
    # The source reconnects to the proxy's address: a proxy that takes one connection only
    # makes the destination unreachable for the source's automatic tries.
    proxy = FaultProxy((d.host, d.port), direction="d2s", after_message=ack.index, action="reset", accept_many=False)
    params = MigrationParams(handshake_timeout=3, io_timeout=3, commit_timeout=1.0, resolve_timeout=1.0)
    handle = MigrationHandle(src, "127.0.0.1", proxy.port, live=False, key=KEY, params=params)
    stats = handle.wait(30)
    proxy.close()
    assert stats.status == "in-doubt" and stats.owner == "in doubt", (stats.status, stats.error)
    assert handle.in_doubt and not src.running and "stop_for_good" not in src.calls and "resume" not in src.calls
    time.sleep(0.5)
    assert d.dest.state == "in-doubt" and "start_running" not in dst.calls and not dst.discarded
    # A second source cannot take a destination in doubt, nor can a RESOLVE for another session.
    other = guests("16M", work_pages=64, running=False)
    refused = migrate(other, d.host, d.port, live=False, key=KEY, params=PARAMS)
    assert refused.status == "failed" and "in-doubt" in refused.error, refused.error
    # The operator asks again, straight to the destination this time (the proxy is gone: the
    # source's record names its address; a test reaches the destination's own).
    handle._source.port = d.port
    stats = handle.resolve("ask", timeout=5)
    dstats = d.join(30)
    assert stats.status == "completed" and dstats.status == "completed", (stats.error, dstats.error)
    assert_exactly_one_runs(src, dst, stats, dstats, "in doubt, then asked again")


def test_source_gone_the_destination_operator_runs_the_guest_with_force(guests):
    src, dst = busy_pair(guests)
    ack = first(recorded_log(guests), "COMMIT_ACK")
    d = DestinationThread(dst, key=KEY, params=PARAMS)
    # COMMIT_ACK never reaches the source whole: it aborts (resumes) and tries to tell the
    # destination; the proxy takes no second connection, so the destination stays in doubt.
    proxy = FaultProxy((d.host, d.port), direction="d2s", after_message=ack.index - 1, inside_bytes=1, action="cut",
                       accept_many=False)
    stats = migrate(src, "127.0.0.1", proxy.port, live=False, key=KEY,
                    params=MigrationParams(handshake_timeout=3, io_timeout=3, commit_timeout=1.0, resolve_timeout=1.0))
    proxy.close()
    assert stats.status == "failed" and stats.owner == "source" and src.running, stats.error
    deadline = time.monotonic() + 10
    while d.dest.state != "in-doubt" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.dest.state == "in-doubt"
    with pytest.raises(ValueError, match="needs --force"):
        d.dest.resolve("run-here")
    # Here the source runs the guest, so the destination's operator discards its copy.
    info = d.dest.resolve("discard-here", force=True)
    assert info["state"] == "discarded"
    dstats = d.join(10)
    assert dstats.status == "failed" and dst.discarded and "start_running" not in dst.calls
    assert_exactly_one_runs(src, dst, stats, dstats, "abort not delivered, destination operator discards")


def test_an_abort_after_commit_ack_is_delivered_so_the_destination_lets_its_copy_go(guests):
    src, dst = busy_pair(guests)
    ack = first(recorded_log(guests), "COMMIT_ACK")
    d = DestinationThread(dst, key=KEY, params=PARAMS)
    # The destination sent COMMIT_ACK (so it may be in doubt); the source gets one byte of it.
    with FaultProxy((d.host, d.port), direction="d2s", after_message=ack.index - 1, inside_bytes=1, action="reset") as proxy:
        stats = migrate(src, "127.0.0.1", proxy.port, live=False, key=KEY, params=PARAMS)
        dstats = d.join(30)
        assert proxy.fired
    assert any("told the destination" in n and "discarded its copy" in n for n in stats.notes), stats.notes
    assert "aborted by the source's RESOLVE" in dstats.error, dstats.error
    assert_exactly_one_runs(src, dst, stats, dstats, "COMMIT_ACK lost")


# -- strangers cannot spend a waiting destination ----------------------------------------------


def _garbage(addr):
    with socket.create_connection(addr) as s:
        s.sendall(b"\x00" * 64 + b"GET / HTTP/1.0\r\n\r\n")
        s.settimeout(5)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass


def _truncated_hello(addr):
    hello = P.encode_frame(P.MessageType.HELLO, P.encode_hello(P.Hello(P.PROTOCOL_VERSIONS, b"n" * P.NONCE_SIZE)))
    with socket.create_connection(addr) as s:
        s.sendall(hello[:30])
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        try:
            s.recv(4096)
        except OSError:
            pass


def test_strangers_do_not_end_the_wait_and_a_slow_one_is_cut_at_the_handshake_deadline(guests):
    src, dst = busy_pair(guests)
    params = MigrationParams(handshake_timeout=1.5, io_timeout=3, commit_timeout=3)
    d = DestinationThread(dst, key=KEY, params=params, accept_timeout=30)
    addr = (d.host, d.port)
    # A slow loris: one byte of HELLO every 0.3 s would take 20 s; the whole handshake has 1.5 s.
    hello = P.encode_frame(P.MessageType.HELLO, P.encode_hello(P.Hello(P.PROTOCOL_VERSIONS, b"n" * P.NONCE_SIZE)))
    loris = socket.create_connection(addr)
    cut_after = []

    def drip():
        t = time.monotonic()
        try:
            for byte in hello:
                loris.send(bytes([byte]))
                time.sleep(0.3)
        except OSError:
            cut_after.append(time.monotonic() - t)

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    silent = [socket.create_connection(addr) for _ in range(3)]
    _garbage(addr)
    _truncated_hello(addr)
    wrong_key = migrate(guests("16M", work_pages=64, running=False), *addr, live=False, key=b"w" * 32, params=params)
    assert wrong_key.status == "failed" and "authentication failed" in wrong_key.error
    # The real source, while the loris and the silent ones still hang on.
    stats = migrate(src, *addr, live=False, key=KEY, params=params)
    dstats = d.join(30)
    dripper.join(10)
    for s in silent:
        s.close()
    loris.close()
    assert stats.status == "completed" and dstats.status == "completed", (stats.error, dstats.error)
    assert cut_after and cut_after[0] < 5.0, "the slow HELLO was not cut at the handshake deadline"
    notes = "\n".join(dstats.notes)
    assert "did not become the migration" in notes and "authentication failed" in notes, notes
    assert "bad frame magic" in notes or "frame" in notes, notes
    # The loris and the silent ones were cut by the destination, at their handshake deadline or
    # when the wait ended, and it says so rather than that they closed the connection.
    cut = [n for n in dstats.notes if "so this destination cut it" in n]
    assert len(cut) == 4 and all(("its handshake did not finish within 1.5 s," in n or "its handshake was still going when the wait "
                                  "ended," in n) for n in cut), notes


def test_a_cut_handshake_is_blamed_for_what_a_shutdown_causes_and_not_for_a_refusal():
    """The timer that cuts a handshake may fire while a connection is already on its way out
    for a reason of its own: the note blames the cut only for what a shutdown can cause."""
    from vmmpy.migration.destination import HandshakeDeadline
    from vmmpy.migration.errors import ConnectionLost, ProtocolError, Refused

    a, b = socket.socketpair()
    with a, b:
        timer = HandshakeDeadline(a, 60)
        lost = ConnectionLost("peer closed the connection while sending a frame header")
        assert timer.why(lost, str(lost)) == str(lost), "blamed on a cut that never came"
        timer.cut("did not finish within 1.5 s")
        timer.cancel()
        assert b.recv(1) == b"", "the cut did not shut the connection down"
        blamed = "its handshake did not finish within 1.5 s, so this destination cut it ({})"
        for err in (lost, ProtocolError("peer closed the TLS connection during the handshake")):
            assert timer.why(err, str(err)) == blamed.format(err)
        # What the destination raises for a wrong key, and for a second source.
        for err in (Refused("refused the source (auth): authentication failed: the source's proof does not match this destination's key"),
                    Refused("refused the source (spec): another source is already migrating to this destination")):
            assert timer.why(err, str(err)) == str(err)


def test_too_many_pending_connections_are_closed_unread_and_the_source_still_gets_through(guests):
    from vmmpy.migration import destination

    src = guests("16M", work_pages=64, rate=2000)
    dst = guests("16M", work_pages=64, running=False)
    params = MigrationParams(handshake_timeout=2, io_timeout=3, commit_timeout=3)
    d = DestinationThread(dst, params=params, accept_timeout=30)
    crowd = [socket.create_connection((d.host, d.port)) for _ in range(destination.MAX_PENDING + 4)]
    time.sleep(0.3)
    # Over the limit: closed at once (EOF), not held.
    closed = 0
    for s in crowd:
        s.settimeout(0.05)
        try:
            if s.recv(1) == b"":
                closed += 1
        except OSError:
            pass
    assert closed >= 4, closed
    # Once the silent ones' deadline passes, the real source migrates.
    time.sleep(params.handshake_timeout + 0.5)
    stats = migrate(src, d.host, d.port, live=False, params=params)
    dstats = d.join(30)
    for s in crowd:
        s.close()
    assert stats.status == "completed" and dstats.status == "completed", (stats.error, dstats.error)
    assert any(f"{destination.MAX_PENDING} connections were already being served" in n for n in dstats.notes), dstats.notes


def test_a_resolve_for_a_session_the_destination_does_not_hold_changes_nothing(guests):
    dst = guests("16M", work_pages=64, running=False)
    d = Destination(dst, "127.0.0.1", 0, params=PARAMS)
    # The destination waits on after the RESOLVE until accept_timeout runs out (waited out in
    # full); the one connection below comes at once.
    t = threading.Thread(target=lambda: d.run(accept_timeout=2.5), daemon=True)
    t.start()
    with socket.create_connection(d.address) as s:
        s.settimeout(5)
        hello = P.encode_frame(P.MessageType.HELLO, P.encode_hello(P.Hello(P.PROTOCOL_VERSIONS, b"n" * P.NONCE_SIZE)))
        s.sendall(hello)
        P.read_frame(s)  # CHALLENGE
        s.sendall(P.encode_frame(P.MessageType.AUTH, P.encode_auth(b"")))
        P.read_frame(s)  # ACCEPT
        s.sendall(P.encode_frame(P.MessageType.RESOLVE, P.encode_resolve(P.Resolve(b"x" * 16, P.Decision.ABORT))))
        answer = P.decode_resolved(P.read_frame(s).payload)
    assert answer.outcome is P.Outcome.UNKNOWN
    assert d.state == "waiting" and "discard" not in dst.calls
    t.join(10)
