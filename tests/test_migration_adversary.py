"""Adversary's attacks on ownership through the commit (protocol version 5).

Each test is one attack, kept as a regression test. Four of them broke the first version of
the ownership code (SIGTERM or --resume in the commit window, SIGTERM while the source
reconnected, an abort lost to a destination slow to reach COMMIT_ACK); they pass since the fix.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

from vmmpy.migration import MigrationHandle, MigrationParams
from vmmpy.migration import protocol as P

from .fault_proxy import FaultProxy
from .migration_helpers import KEY, DestinationThread
from .procs import vmmctl
from .test_migration_ownership import PARAMS, assert_exactly_one_runs, busy_pair, first, ran, recorded_log
from .test_migration_ownership_processes import AFTER_COMMIT_ACK, pair  # noqa: F401 - the fixture

# -- processes: the commit window before the source's migration thread has ended -----------------

def test_resume_on_the_source_in_the_commit_window_is_refused(pair):
    p = pair()
    # Everything stops right after COMMIT_ACK for 4 s: the source has sent COMMITTED (held in the
    # proxy) and waits for RESUMED (commit_timeout 30 s); then the stall ends and it completes.
    results = {}

    def poke(proxy):
        results["resume"] = vmmctl(p.tmp, "--vm=src0", "--resume")
        results["status"] = vmmctl(p.tmp, "--vm=src0", "--status")
        proxy.release()

    with FaultProxy(("127.0.0.1", p.port), direction="d2s", after_message=AFTER_COMMIT_ACK, action="stall",
                    on_fault=poke) as proxy:
        result = p.migrate(proxy.port)
        assert proxy.fired
    assert result.returncode == 0, result.stderr
    resumed = results["resume"]
    assert resumed.returncode != 0 and "a migration is running" in resumed.stderr, (resumed.returncode, resumed.stdout,
                                                                                   results["status"].stdout)
    p.assert_one_guest_finished_exactly()


def test_sigterm_to_the_destination_in_the_commit_window_does_not_lose_the_guest(pair):
    p = pair()

    def term(proxy):
        p.dest.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # let it act on the signal
        proxy.release()

    with FaultProxy(("127.0.0.1", p.port), direction="d2s", after_message=AFTER_COMMIT_ACK, action="stall",
                    on_fault=term) as proxy:
        p.migrate(proxy.port)
        assert proxy.fired
    # Whatever the two ends decide, one guest must run to the end.
    p.assert_one_guest_finished_exactly()


def test_sigterm_to_the_source_while_it_reconnects_in_doubt_is_refused(pair):
    p = pair()
    # COMMITTED is replaced by a reset; the proxy takes no second connection, so the source keeps
    # reconnecting for its resolve timeout (5 s, waited out in full: the SIGTERM comes 1.5 s in).
    proxy = FaultProxy(("127.0.0.1", p.port), direction="d2s", after_message=AFTER_COMMIT_ACK, action="reset",
                       accept_many=False)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", p.migrate(proxy.port, "--resolve-timeout", "5")), daemon=True)
    t.start()
    assert proxy.wait_fired(60)
    time.sleep(1.5)  # the source is reconnecting now
    p.source.send_signal(signal.SIGTERM)
    t.join(60)
    proxy.close()
    try:
        alive = p.source.wait(timeout=3) is None
    except Exception:
        alive = True
    assert alive, (p.source.returncode, out["r"].returncode, out["r"].stderr)
    p.wait_state("src0", "in-doubt")
    p.wait_state("dst0", "in-doubt")
    assert vmmctl(p.tmp, "--vm=dst0", "--migrate-resolve=run-here", "--force").returncode == 0
    assert vmmctl(p.tmp, "--vm=src0", "--migrate-resolve=discard-here", "--force").returncode == 0
    p.assert_one_guest_finished_exactly()


# -- in-process: a pair held in doubt on both sides ------------------------------------------------

def in_doubt_pair(guests):
    """Both ends in doubt: COMMITTED replaced by a reset, and the source's reconnects find nobody
    (the proxy takes one connection). Returns (src, dst, handle, d); the handle's source is
    pointed at the destination's own address, so a resolve reaches it."""
    src, dst = busy_pair(guests)
    ack = first(recorded_log(guests), "COMMIT_ACK")
    d = DestinationThread(dst, key=KEY, params=PARAMS)
    proxy = FaultProxy((d.host, d.port), direction="d2s", after_message=ack.index, action="reset", accept_many=False)
    params = MigrationParams(handshake_timeout=3, io_timeout=3, commit_timeout=1.0, resolve_timeout=0.5)
    handle = MigrationHandle(src, "127.0.0.1", proxy.port, live=False, key=KEY, params=params)
    stats = handle.wait(30)
    proxy.close()
    assert stats.status == "in-doubt", (stats.status, stats.error)
    deadline = time.monotonic() + 10
    while d.dest.state != "in-doubt" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert d.dest.state == "in-doubt"
    handle._source.port = d.port
    return src, dst, handle, d


def _authenticate(addr, key: bytes | None) -> tuple[socket.socket, P.Frame]:
    """HELLO and AUTH (a MAC with ``key``, or none); returns the socket and the answer to AUTH."""
    s = socket.create_connection(addr)
    s.settimeout(5)
    hello = P.encode_frame(P.MessageType.HELLO, P.encode_hello(P.Hello(P.PROTOCOL_VERSIONS, b"n" * P.NONCE_SIZE)))
    s.sendall(hello)
    challenge = P.read_frame(s)
    mac = P.source_proof(key, hello, challenge.raw) if key else b""
    s.sendall(P.encode_frame(P.MessageType.AUTH, P.encode_auth(mac)))
    return s, P.read_frame(s, allowed=(P.MessageType.ACCEPT, P.MessageType.REFUSE))


def test_a_stranger_cannot_resolve_a_guest_in_doubt(guests):
    src, dst, handle, d = in_doubt_pair(guests)
    addr = (d.host, d.port)
    # Without the key, with the real session id: refused at AUTH, before any RESOLVE is read.
    for key in (None, b"w" * 32):
        s, answer = _authenticate(addr, key)
        with s:
            assert answer.type is P.MessageType.REFUSE, answer.type
            try:
                s.sendall(P.encode_frame(P.MessageType.RESOLVE, P.encode_resolve(P.Resolve(d.dest.session, P.Decision.ABORT))))
                s.recv(4096)
            except OSError:
                pass
    # With the key but another session (random ids, both decisions): "unknown", nothing changes.
    for decision in (P.Decision.ABORT, P.Decision.COMMIT):
        s, answer = _authenticate(addr, KEY)
        with s:
            assert answer.type is P.MessageType.ACCEPT
            s.sendall(P.encode_frame(P.MessageType.RESOLVE, P.encode_resolve(P.Resolve(bytes(16), decision))))
            assert P.decode_resolved(P.read_frame(s).payload).outcome is P.Outcome.UNKNOWN
    time.sleep(0.3)
    assert d.dest.state == "in-doubt" and not dst.discarded and "start_running" not in dst.calls
    stats, dstats = handle.resolve("ask", timeout=5), d.join(30)
    assert_exactly_one_runs(src, dst, stats, dstats, "strangers, then the source asks")


def test_a_flood_of_silent_and_garbage_connections_does_not_keep_the_source_from_resolving(guests):
    src, dst, handle, d = in_doubt_pair(guests)
    addr = (d.host, d.port)
    crowd = [socket.create_connection(addr) for _ in range(40)]
    for s in crowd[:10]:
        s.sendall(b"\x00garbage" * 8)
    stats = handle.resolve("ask", timeout=5)
    dstats = d.join(30)
    for s in crowd:
        s.close()
    assert_exactly_one_runs(src, dst, stats, dstats, "flooded, then the source asks")


def test_run_here_forced_on_both_sides_at_once_runs_one_when_they_can_talk(guests):
    src, dst, handle, d = in_doubt_pair(guests)
    results = {}

    def on_destination():
        try:
            results["dst"] = d.dest.resolve("run-here", force=True)
        except ValueError as err:  # the source's abort came first: it discarded
            results["dst"] = str(err)

    t = threading.Thread(target=on_destination)
    t.start()
    stats = handle.resolve("run-here", force=True, timeout=5)
    t.join(10)
    dstats = d.join(30)
    assert ran(src) != ran(dst), (results, stats.status, stats.notes, dstats.status)
    assert_exactly_one_runs(src, dst, stats, dstats, "run-here --force on both sides")


def test_a_slow_destination_is_told_of_the_abort(guests, monkeypatch):
    from vmmpy.migration import destination

    src, dst = busy_pair(guests)
    request = first(recorded_log(guests), "COMMIT_REQUEST")
    commit = destination._Receiver._commit

    def slow_commit(self, digest):
        time.sleep(1.5)  # descheduled (a loaded host) between reading COMMIT_REQUEST and answering it
        commit(self, digest)

    monkeypatch.setattr(destination._Receiver, "_commit", slow_commit)
    d = DestinationThread(dst, key=KEY, params=PARAMS)
    # COMMIT_REQUEST reaches the destination whole, then the link is cut.
    # The source's reconnects go straight to the destination (no proxy to accept them for it).
    holder = {}

    def straight(phase):
        if phase == "commit":
            holder["h"]._source.port = d.port

    with FaultProxy((d.host, d.port), direction="s2d", after_message=request.index, action="cut") as proxy:
        holder["h"] = MigrationHandle(src, "127.0.0.1", proxy.port, live=False, key=KEY, params=PARAMS, on_phase=straight)
        stats = holder["h"].wait(60)
        assert proxy.fired
    assert stats.status == "failed" and src.running, (stats.status, stats.error)
    deadline = time.monotonic() + 8
    while d.dest.state in ("migrating", "waiting") and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)  # the source's abort window (10 s) is long; give it some of it
    try:
        assert d.dest.state == "discarded", (d.dest.state, stats.notes)
    finally:
        if d.dest.state == "in-doubt":
            d.dest.resolve("discard-here", force=True)
        d.join(10)
