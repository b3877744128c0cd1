"""Parallel page streams (``MigrationParams.streams``, ``--streams N``, protocol version 2): a guest
moved over several connections arrives exactly; a data connection must prove it belongs to the
session before anything it carries is read; any stream failing leaves the guest on the source."""

import ipaddress
import json
import os
import socket
import threading
import time

import numpy as np
import pytest

from vmmpy.devices.uart import CaptureConsole
from vmmpy.guest import assemble
from vmmpy.migration import (
    Aborted,
    ConnectionLost,
    Destination,
    MigrationHandle,
    MigrationParams,
    MigrationTimeout,
    migrate,
    net,
    serve_connection,
)
from vmmpy.migration import protocol as P
from vmmpy.migration.net import CancelWatcher
from vmmpy.migration.streams import JoinWindow
from vmmpy.runtime.config import VmConfig
from vmmpy.runtime.guest_handle import MachineHandle
from vmmpy.runtime.process import EXIT_POWEROFF, Machine
from vmmpy.units import MiB

from .inproc import run_to_end, wait_paused
from .migration_helpers import KEY, DestinationThread, migrate_pair
from .migration_proxy import StreamProxy
from .procs import write_key
from .test_machine import BUSY, final_state
from .test_migration_engine import assert_arrived_exact
from .test_migration_failures import assert_source_kept_guest

# -- a real machine, in-process: the end is an unmigrated run's -------------------------------------

BALLAST_GPA, BALLAST = 8 * MiB, 56 * MiB  # data the guest never touches: several batches' worth of pages to spread


def _ballast() -> np.ndarray:
    return np.random.default_rng(8).integers(0, 256, BALLAST, dtype=np.uint8)


def _compressible_ballast() -> np.ndarray:
    """Half random pages, half a pattern LZ4 shrinks: compression must pay on some batches and
    be passed over on others."""
    data = _ballast()
    data[BALLAST // 2:] = (np.arange(BALLAST // 2) % 251 + 1).astype(np.uint8)
    return data


# Long enough (800 timer ticks) that a live migration started at its beginning ends before it does.
LONG_BUSY = BUSY.replace("        cmp r15, 40\n", "        cmp r15, 800\n")
assert LONG_BUSY != BUSY


def _boot_with_ballast(name: str, program: str, pause_at=None, ballast=_ballast):
    console = CaptureConsole()
    machine = Machine(VmConfig(name=name, memsize=64 << 20), consoles={"com1": console})
    machine.setup_memory()
    machine.vm.memory.write(BALLAST_GPA, ballast())
    machine.load_program(assemble(program))
    machine.pause_at = pause_at
    machine.start(serve_control=False)
    if pause_at is not None:
        wait_paused(machine)
    return machine, console


def _move_machine_over_streams(tag: str, live: bool, params: MigrationParams, ballast=_ballast):
    """Run the busy guest to its end unmigrated, then again migrated (warm or live) with
    ``params``; the migrated run must end exactly as the unmigrated one, its console split
    between source and destination. Returns the source's and destination's records."""
    program = LONG_BUSY if live else BUSY
    reference, ref_console = _boot_with_ballast(f"{tag}-ref", program, ballast=ballast)
    assert run_to_end(reference, timeout=120) == EXIT_POWEROFF
    expected = final_state(reference)
    # Paused early; a live migration lets it run again right as the migration starts.
    source, src_console = _boot_with_ballast(f"{tag}-src", program, pause_at=1_000_001 if live else 2_000_001, ballast=ballast)
    dst_console = CaptureConsole()
    target = Machine(VmConfig(name=f"{tag}-dst", memsize=64 << 20), consoles={"com1": dst_console})
    target.setup_memory()
    try:
        d = DestinationThread(MachineHandle(target), key=KEY)
        if live:
            source.resume()
        stats = migrate(MachineHandle(source), d.host, d.port, live=live, key=KEY, params=params)
        dstats = d.join()
        assert stats.status == "completed", stats.error
        assert dstats.status == "completed", dstats.error
        assert stats.streams == dstats.streams == params.streams and stats.protocol_version >= P.STREAMS_VERSION
        # Over loopback, with no cap, no more streams send at once than this process has CPUs.
        assert stats.streams_at_once == min(params.streams, len(os.sched_getaffinity(0))), stats.streams_at_once
        round0 = stats.rounds[0]
        assert len(round0.stream_bytes) == params.streams and sum(round0.stream_bytes) == round0.bytes
        assert sum(1 for b in round0.stream_bytes if b > 4 * MiB) >= 2, f"round 0 was not spread: {round0.stream_bytes}"
        assert [r.stream_bytes for r in dstats.rounds] == [r.stream_bytes for r in stats.rounds]
        assert source.wait(10) == 0, "the source machine stops once the guest lives on the destination"
        assert run_to_end(target, timeout=120) == EXIT_POWEROFF
        assert final_state(target) == expected
        assert bytes(src_console.output) + bytes(dst_console.output) == ref_console.output
        return stats, dstats
    finally:
        source.close()
        target.close()


@pytest.mark.covers(operation="migrate-{live}", guest="busy", via="machine", streams="{streams}", key=True)
@pytest.mark.parametrize("streams", [2, 4])
@pytest.mark.parametrize("live", [False, True], ids=["warm", "live"])
def test_a_machine_moved_over_parallel_streams_ends_as_an_unmigrated_run(live, streams):
    _move_machine_over_streams(f"st{streams}", live, MigrationParams(streams=streams))


@pytest.mark.covers(operation="migrate-{live}", guest="busy", via="machine", streams=2, key=True, compress="lz4")
@pytest.mark.parametrize("live", [False, True], ids=["warm", "live"])
def test_a_machine_moved_over_streams_with_compression_ends_as_an_unmigrated_run(live):
    stats, dstats = _move_machine_over_streams("stz", live, MigrationParams(streams=2, compress="lz4"),
                                               ballast=_compressible_ballast)
    assert stats.compression == dstats.compression == "lz4", stats.notes
    round0 = stats.rounds[0]
    assert round0.compressed_batches > 0 and round0.saved_bytes > 8 * MiB, (round0.compressed_batches, round0.saved_bytes)
    assert round0.bytes < BALLAST, "what compression saved did not go on the wire"
    assert [r.compressed_batches for r in dstats.rounds] == [r.compressed_batches for r in stats.rounds]


# -- the migration test guest: exact over several live rounds ---------------------------------------


@pytest.mark.covers(operation="migrate-live", guest="writer", via="engine", streams="{streams}", key=True, bandwidth="capped")
@pytest.mark.parametrize("streams", [2, 4])
def test_live_rounds_over_parallel_streams_keep_every_page_exact(guests, streams):
    src = guests("64M", work_pages=8192, rate=12000)
    dst = guests("64M", work_pages=8192, running=False)
    src.wait_for_progress(8192)
    # A capped link (shared out among the streams) and a tight target force real iterations.
    params = MigrationParams(streams=streams, downtime_target_ms=10, bandwidth_cap=64 * MiB, max_rounds=20, policy="switch-over")
    stats, dstats = migrate_pair(src, dst, live=True, key=KEY, dst_key=KEY, params=params)
    assert stats.status == "completed", stats.error
    assert dstats.status == "completed", dstats.error
    assert len([r for r in stats.rounds if not r.final]) >= 2, [(r.round, r.pages) for r in stats.rounds]
    for rnd, drnd in zip(stats.rounds, dstats.rounds, strict=True):
        assert len(rnd.stream_bytes) == streams and sum(rnd.stream_bytes) == rnd.bytes
        assert (drnd.pages_sent, drnd.zero_pages, drnd.bytes) == (rnd.pages_sent, rnd.zero_pages, rnd.bytes)
    assert_arrived_exact(src, dst)


def test_stream_messages_round_trip_and_a_stream_count_out_of_bounds_is_refused():
    with pytest.raises(ValueError, match=r"streams must be a whole number from 1 to 16, got 0"):
        MigrationParams(streams=0)
    with pytest.raises(ValueError, match=r"streams must be a whole number from 1 to 16, got 17"):
        MigrationParams(streams=17)
    with pytest.raises(P.ProtocolError, match="STREAMS: 1 streams; 2 to 16 may be asked for"):
        P.encode_streams(1)
    with pytest.raises(P.ProtocolError, match="STREAMS: 99 streams"):
        P.decode_streams((99).to_bytes(2, "little"))
    grant = P.StreamsToken(4, b"t" * 32)
    assert P.decode_streams_token(P.encode_streams_token(grant)) == grant
    join = P.Join(3, b"t" * 32, b"m" * 32)
    assert P.decode_join(P.encode_join(join)) == join
    with pytest.raises(P.ProtocolError, match="JOIN: MAC length 7"):
        P.decode_join((1).to_bytes(2, "little") + b"t" * 32 + bytes([7]) + b"m" * 7)


def test_a_source_asking_for_streams_is_refused_by_a_destination_without_a_listener(guests):
    src = guests("64M", work_pages=512)
    dst = guests("64M", work_pages=512, running=False)
    listener = socket.create_server(("127.0.0.1", 0))
    result = []

    def serve():
        listener.settimeout(10)
        conn, _ = listener.accept()
        listener.close()
        with conn:
            result.append(serve_connection(dst, conn))

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    stats = migrate(src, "127.0.0.1", listener.getsockname()[1], live=True, params=MigrationParams(streams=2))
    server.join(10)
    assert stats.status == "failed"
    assert "destination refused the migration (streams): this destination was handed one connection" in stats.error
    assert result and result[0].status == "failed" and dst.discarded
    assert stats.page_bytes == 0
    assert_source_kept_guest(src)


def test_streams_need_a_destination_that_speaks_protocol_3(guests):
    """A version 2 destination (played here frame by frame) never sees STREAMS: the source stops
    before any page moves and says what to do."""
    src = guests("64M", work_pages=512)
    listener = socket.create_server(("127.0.0.1", 0))
    seen = []

    def version_1_destination():
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            P.read_frame(conn)
            conn.sendall(_frame(P.MessageType.CHALLENGE, P.encode_challenge(P.Challenge(2, False, b"d" * 32))))
            P.read_frame(conn)
            conn.sendall(_frame(P.MessageType.ACCEPT, P.encode_accept(P.Accept(P.Stage.AUTH))))
            P.read_frame(conn)
            conn.sendall(_frame(P.MessageType.ACCEPT, P.encode_accept(P.Accept(P.Stage.SPEC))))
            seen.append(P.read_frame(conn).type)

    server = threading.Thread(target=version_1_destination, daemon=True)
    server.start()
    stats = migrate(src, "127.0.0.1", listener.getsockname()[1], live=False, params=MigrationParams(streams=2))
    server.join(10)
    listener.close()
    assert stats.status == "failed" and stats.protocol_version == 2
    assert "the destination speaks migration protocol 2, which has no parallel streams (they need 3)" in stats.error
    assert "migrate with one stream (--streams 1)" in stats.error
    assert seen == [P.MessageType.ABORT] and stats.page_bytes == 0
    assert_source_kept_guest(src)


# -- joining: only the session's own connections ------------------------------------------------------


def _frame(msg_type, payload=b""):
    return P.encode_frame(msg_type, payload)


def _answer(sock: socket.socket) -> P.Frame | None:
    sock.settimeout(5)
    try:
        return P.read_frame(sock)
    except (P.ProtocolError, OSError, Exception):
        return None


STRANGERS = {
    "wrong token": _frame(P.MessageType.JOIN, P.encode_join(P.Join(1, os.urandom(32), os.urandom(32)))),
    "a HELLO instead of a JOIN": _frame(P.MessageType.HELLO, P.encode_hello(P.Hello((2, 3), b"n" * 32))),
    "random bytes": os.urandom(200),
}


@pytest.mark.parametrize("stranger", list(STRANGERS))
def test_a_stranger_joining_is_refused_and_the_migration_completes(guests, stranger):
    src = guests("64M", work_pages=4096)
    dst = guests("64M", work_pages=4096, running=False)
    src.wait_for_progress(4096)
    d = DestinationThread(dst, key=KEY)
    answers = []

    def intrude(phase):
        if phase != "streams":
            return
        # Connected before the source asks for streams: the destination meets it inside the window.
        conn = socket.create_connection((d.host, d.port), timeout=5)
        conn.sendall(STRANGERS[stranger])

        def talk():
            with conn:
                answers.append(_answer(conn))

        threading.Thread(target=talk, daemon=True).start()

    stats = migrate(src, d.host, d.port, live=False, key=KEY, params=MigrationParams(streams=3), on_phase=intrude)
    dstats = d.join()
    assert stats.status == "completed", stats.error
    assert dstats.status == "completed", dstats.error
    assert_arrived_exact(src, dst)
    deadline = time.monotonic() + 10
    while not answers and time.monotonic() < deadline:
        time.sleep(0.01)
    refusals = [n for n in dstats.notes if n.startswith("refused a data connection")]
    assert len(refusals) == 1, dstats.notes
    if stranger == "wrong token":
        assert refusals[0].endswith("JOIN: wrong session token")
        assert answers[0] is not None and answers[0].type is P.MessageType.REFUSE
        refusal = P.decode_refuse(answers[0].payload)
        assert (refusal.stage, refusal.reason) == (P.Stage.JOIN, "JOIN: wrong session token")
    elif stranger == "a HELLO instead of a JOIN":
        assert refusals[0].endswith("expected JOIN on a data connection, got HELLO")
    # After the window the listener is gone: a late joiner is refused by the kernel.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((d.host, d.port), timeout=5).close()


def _window(count=3, key=KEY, timeout=10.0):
    listener = socket.create_server(("127.0.0.1", 0))
    main_here, main_there = socket.socketpair()
    token = os.urandom(32)
    hello, challenge = b"HELLO-frame", b"CHALLENGE-frame"
    notes = []
    window = JoinWindow(listener, main_here, count=count, token=token, key=key, hello=hello, challenge=challenge,
                        timeout=timeout, watcher=CancelWatcher(None), notes=notes)
    return window, listener, (main_here, main_there), token, hello, challenge, notes


def test_the_join_window_takes_only_proven_joins_of_this_session_each_once():
    window, listener, mains, token, hello, challenge, notes = _window()
    got = []
    runner = threading.Thread(target=lambda: got.append(window.run()), daemon=True)
    runner.start()
    port = listener.getsockname()[1]

    def join(index, *, tok=token, mac=None):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        mac = P.join_proof(KEY, hello, challenge, index, tok) if mac is None else mac
        frame = _frame(P.MessageType.JOIN, P.encode_join(P.Join(index, tok, mac)))
        sock.sendall(frame)
        return sock, frame, _answer(sock)

    def refused(answer, reason):
        assert answer is not None and answer.type is P.MessageType.REFUSE, answer
        assert P.decode_refuse(answer.payload).reason == reason

    kept = []
    try:
        sock, _, answer = join(5)
        refused(answer, "JOIN: stream index 5 is out of range: this session has data streams 1 to 2")
        sock.close()
        sock, frame, answer = join(1)
        assert answer.type is P.MessageType.ACCEPT
        accept = P.decode_accept(answer.payload)
        assert accept.stage is P.Stage.JOIN and accept.proof == P.joined_proof(KEY, hello, challenge, frame)
        kept.append(sock)
        sock, _, answer = join(1)
        refused(answer, "JOIN: stream 1 has already joined")
        sock.close()
        sock, _, answer = join(2, mac=b"\x00" * 32)
        refused(answer, "JOIN: authentication failed: the proof does not match this destination's key")
        sock.close()
        sock, _, answer = join(2, mac=b"")
        refused(answer, "JOIN: this destination requires a key and the JOIN carries no proof")
        sock.close()
        sock, _, answer = join(2)
        assert answer.type is P.MessageType.ACCEPT
        kept.append(sock)
        runner.join(10)
        assert got and len(got[0]) == 2
        assert len(notes) == 4, notes
        # The accepted sockets carry on as data streams: a byte sent on stream 2 arrives on got[0][1].
        kept[1].sendall(b"x")
        got[0][1].settimeout(5)
        assert got[0][1].recv(1) == b"x"
    finally:
        for s in kept + (got[0] if got else []) + list(mains):
            s.close()
        listener.close()


def test_a_join_window_that_closes_before_every_stream_joined_fails_the_migration():
    window, listener, mains, *_ = _window(count=3, timeout=0.5)
    try:
        with pytest.raises(MigrationTimeout, match=r"only 0 of 2 data streams joined within 0.5 s"):
            window.run()
    finally:
        for s in mains:
            s.close()
        listener.close()


def test_an_abort_on_the_main_connection_ends_the_join_window_at_once():
    window, listener, (main_here, main_there), *_ = _window(count=3)
    try:
        main_there.sendall(_frame(P.MessageType.ABORT, P.encode_abort("operator cancelled")))
        with pytest.raises(Aborted, match="source aborted: operator cancelled"):
            window.run()
    finally:
        for s in (main_here, main_there):
            s.close()
        listener.close()


# -- failure: any stream, any time, and the guest stays on the source --------------------------------


@pytest.mark.parametrize("live", [False, True], ids=["warm", "live"])
@pytest.mark.parametrize("victim", [0, 2], ids=["main", "data"])
def test_a_stream_cut_mid_round_leaves_the_guest_running_on_the_source(guests, live, victim, monkeypatch):
    import vmmpy.migration.source as source_module

    # Every stream sends whenever it is free, as to another host: through the proxy the
    # destination is on this host, where the streams past its CPUs would stand down.
    monkeypatch.setattr(source_module, "streams_at_once", lambda sock, streams, capped: streams)
    # 96 MiB of pages: six 16 MiB batches, so every stream takes at least one in round 0.
    src = guests("128M", work_pages=24576)
    dst = guests("128M", work_pages=24576, running=False)
    src.wait_for_progress(24576)
    params = MigrationParams(streams=3, io_timeout=5, handshake_timeout=5)
    d = DestinationThread(dst, key=KEY, params=params)
    # Connection 0 is the main one, 1 and 2 the data streams; a data stream's cut lands in its pages.
    proxy = StreamProxy((d.host, d.port), victim=victim, cut_after=3 * MiB)
    try:
        stats = migrate(src, "127.0.0.1", proxy.port, live=live, key=KEY, params=params)
        dstats = d.join()
    finally:
        proxy.close()
    assert stats.status == "failed", stats.error
    assert dstats.status == "failed" and dst.discarded and "start_running" not in dst.calls
    assert_source_kept_guest(src)


@pytest.mark.parametrize("live", [False, True], ids=["warm", "live"])
def test_a_stream_that_stood_down_and_is_cut_fails_the_round_and_the_guest_stays(guests, live):
    """On this host, with no cap, a round is carried by as many streams as the source has CPUs,
    and the others stand down, sending only the end of their share (rust/wire/streams.rs). Cut
    such a stream one byte into what it sends after its JOIN: its end of round 0 (on a host with 3
    CPUs or more it carries pages, and the cut is in those)."""
    src = guests("128M", work_pages=24576)
    dst = guests("128M", work_pages=24576, running=False)
    src.wait_for_progress(24576)
    params = MigrationParams(streams=3, io_timeout=5, handshake_timeout=5)
    d = DestinationThread(dst, key=KEY, params=params)
    join = P.encode_frame(P.MessageType.JOIN, P.encode_join(P.Join(2, bytes(P.TOKEN_SIZE), bytes(P.MAC_SIZE))))
    proxy = StreamProxy((d.host, d.port), victim=2, cut_after=len(join) + 1)  # the JOIN and one byte after
    try:
        stats = migrate(src, "127.0.0.1", proxy.port, live=live, key=KEY, params=params)
        dstats = d.join()
    finally:
        proxy.close()
    assert stats.status == "failed" and "stream 2" in (stats.error or "") + (dstats.error or ""), (stats.error, dstats.error)
    assert dstats.status == "failed" and dst.discarded and "start_running" not in dst.calls
    assert_source_kept_guest(src)


def test_a_stalled_stream_times_out_and_the_source_runs_on(guests):
    src = guests("64M", work_pages=8192)
    dst = guests("64M", work_pages=8192, running=False)
    src.wait_for_progress(8192)
    params = MigrationParams(streams=2, io_timeout=2, handshake_timeout=2)
    # The destination waits longer, so the stall is the source's to notice: its send times out.
    d = DestinationThread(dst, params=MigrationParams(streams=2, io_timeout=8, handshake_timeout=2))
    proxy = StreamProxy((d.host, d.port), victim=1, cut_after=2 * MiB, stall=True)
    try:
        stats = migrate(src, "127.0.0.1", proxy.port, live=True, params=params)
        dstats = d.join()
    finally:
        proxy.close()
    assert stats.status == "failed" and "timed out" in stats.error, stats.error
    # The destination's main stream had its share: it saw the ABORT there without waiting out its own timeout.
    assert dstats.status == "failed" and dstats.error.startswith("source aborted: timed out"), dstats.error
    assert dst.discarded
    assert_source_kept_guest(src)


def _lose_stream_1_at_the_destination(guests, size: str, pages: int, sink: float, live: bool = True, src=None,
                                      hold_others: bool = False):
    """A migration (live unless said) on two streams whose data stream 1 breaks at the destination's end only
    (``StreamProxy``'s sink, after its first MiB): the source's sends on it go on and never fail.
    With ``hold_others``, the other connections carry nothing more until that break, so the source
    is still sending on them when the destination closes them. Both ends fail, the destination
    naming stream 1; returns both records and the proxy."""
    src = src or guests(size, work_pages=pages)
    dst = guests(size, work_pages=pages, running=False)
    src.wait_for_progress(pages)
    params = MigrationParams(streams=2, io_timeout=10, handshake_timeout=5)
    d = DestinationThread(dst, params=params)
    proxy = StreamProxy((d.host, d.port), victim=1, cut_after=1 * MiB, sink=sink, hold_others=hold_others)
    try:
        stats = migrate(src, "127.0.0.1", proxy.port, live=live, params=params)
        dstats = d.join()
    finally:
        proxy.close()
    where = f"(the proxy reset stream 1 at {proxy.reset_at}, having taken {proxy.sunk} bytes after the cut)"
    assert not proxy.hold_timed_out, f"the other connections were held 10 s and stream 1 was never cut {where}"
    assert dstats.status == "failed" and dstats.error.startswith("round 0, stream 1: "), (dstats.error, where)
    assert stats.status == "failed", (stats.error, where)
    assert dst.discarded
    assert_source_kept_guest(src)
    return stats, dstats, proxy


def test_a_stream_lost_only_at_the_destination_is_named_to_the_source_by_its_abort(guests):
    """The source has sent its whole round and waits for ROUND_DONE when the destination's end of
    data stream 1 breaks: the main connection is still up, so the destination says ABORT there,
    naming the stream, instead of closing with nothing said (the source then saw only "peer
    closed the connection", as in a CI run where the sends of a reset stream all fit in buffers)."""
    # The reset comes once the source has sent nothing on stream 1 for 3 s: it has sent its whole
    # round by then, well within io_timeout.
    stats, _, proxy = _lose_stream_1_at_the_destination(guests, "64M", 8192, sink=3.0)
    assert proxy.reset_at is not None and proxy.sunk > 0, "the source's share went on past the cut, into the sink"
    assert stats.error.startswith("destination aborted: round 0, stream 1: "), stats.error
    assert "ROUND_DONE" in stats.error, "the source had sent its round and was waiting for the answer"


def test_a_source_whose_send_fails_after_the_destination_lost_a_stream_reports_the_abort(guests):
    """The destination's end of data stream 1 breaks while the source still sends its round: the
    destination closes every connection, so the source's own failure is a send on another one (a
    consequence). The ABORT that names the cause is already on the main connection: the source
    reads it and reports both."""
    # 96 MiB of pages in 16 MiB batches, and the proxy holds stream 0 after its first MiB until the
    # destination's end of stream 1 is reset: the source is still sending on stream 0 when the
    # destination closes it (a CI run once saw the sends all done first). Linux hands over what had
    # arrived (the ABORT) before it reports the reset.
    stats, _, _ = _lose_stream_1_at_the_destination(guests, "128M", 24576, sink=0, hold_others=True)
    assert stats.error.startswith("destination aborted: round 0, stream 1: "), stats.error
    assert "(here: connection lost while sending round 0's page batches: stream 0: " in stats.error, stats.error


def test_a_paused_source_runs_its_guest_again_before_it_looks_for_the_abort(guests, monkeypatch):
    """Warm: the guest is paused when the destination loses stream 1. The look for the
    destination's ABORT may wait (0.25 s at most) and the guest does not wait with it: it runs
    again first."""
    import vmmpy.migration.source as source_module

    src = guests("128M", work_pages=24576)
    looked = []
    look = source_module.waiting_abort

    def recorded(sock, seconds):
        looked.append(src.calls.count("resume") == src.calls.count("pause") >= 1)
        return look(sock, seconds)

    monkeypatch.setattr(source_module, "waiting_abort", recorded)
    # The source's send on stream 0 fails (held, as in the test above), not a read of the ABORT.
    stats, _, _ = _lose_stream_1_at_the_destination(guests, "128M", 24576, sink=0, live=False, src=src, hold_others=True)
    assert looked == [True], f"the guest was still paused when the source looked: {src.calls}"
    assert stats.error.startswith("destination aborted: round 0, stream 1: "), stats.error


@pytest.mark.parametrize("phase", ["streams", "round 0"])
def test_cancel_while_streams_join_or_carry_pages_leaves_the_source_running(guests, phase):
    src = guests("64M", work_pages=8192)
    dst = guests("64M", work_pages=8192, running=False)
    src.wait_for_progress(8192)
    d = DestinationThread(dst)
    reached = threading.Event()
    handle = MigrationHandle(src, d.host, d.port, live=True, params=MigrationParams(streams=4, bandwidth_cap=4 * MiB),
                             on_phase=lambda p: reached.set() if p == phase else None)
    assert reached.wait(10)
    time.sleep(0.2)
    handle.cancel()
    stats = handle.wait(10)
    dstats = d.join()
    assert stats.status == "cancelled", (stats.status, stats.error)
    assert dstats.status in ("failed", "cancelled") and dst.discarded
    assert_source_kept_guest(src)


def test_a_destination_cancelled_while_streams_join_discards(guests):
    dst = guests("64M", work_pages=256, running=False)
    cancel = threading.Event()
    dest = Destination(dst, "127.0.0.1", 0, cancel=cancel)
    result = []
    runner = threading.Thread(target=lambda: result.append(dest.run(accept_timeout=10)), daemon=True)
    runner.start()
    main = socket.create_connection(dest.address, timeout=5)
    try:
        main.sendall(_frame(P.MessageType.HELLO, P.encode_hello(P.Hello((2, 3), b"n" * 32))))
        assert P.read_frame(main).type is P.MessageType.CHALLENGE
        main.sendall(_frame(P.MessageType.AUTH, P.encode_auth(b"")))
        assert P.read_frame(main).type is P.MessageType.ACCEPT
        main.sendall(_frame(P.MessageType.SPEC, P.encode_spec(P.Spec.from_dict(dst.spec(), live=True))))
        assert P.read_frame(main).type is P.MessageType.ACCEPT
        main.sendall(_frame(P.MessageType.STREAMS, P.encode_streams(2)))
        assert P.read_frame(main).type is P.MessageType.STREAMS_TOKEN
        cancel.set()  # nobody joins: the cancel ends the window
        runner.join(10)
    finally:
        main.close()
    assert result and result[0].status == "cancelled" and dst.discarded


# -- the command line, with real vmmrun and vmmctl processes -------------------------------------------


@pytest.mark.covers(operation="migrate-live", guest="abtest", via="cli", streams=3, key=True)
def test_vmmctl_streams_moves_a_guest_between_processes_exactly(tmp_path):
    from .procs import vmmctl
    from .test_migration_processes import expected_console, finish
    from .test_migration_processes import migrate_pair as migrate_processes

    key = tmp_path / "mig.key"
    write_key(key, os.urandom(32).hex().encode())
    sweeps = 2000
    result, _source, dest, src_status, src_console, dst_console = migrate_processes(
        tmp_path, live=True, sweeps=sweeps, pause_at=4_000_001, dest_key=key,
        ctl_extra=["--key-file", str(key), "--streams", "3"])
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["status"] == "completed" and stats["streams"] == 3 and stats["protocol_version"] >= P.STREAMS_VERSION
    assert all(len(r["stream_bytes"]) == 3 for r in stats["rounds"])
    assert src_status == 0
    assert finish(dest) == 1
    pages = (32 * MiB - 2 * MiB) // 4096
    assert src_console.read_text() + dst_console.read_text() == expected_console(sweeps, pages)

    bad = vmmctl(tmp_path, "--vm=src0", "--migrate", "127.0.0.1", "1", "--streams", "17")
    assert bad.returncode == 2 and "--streams must be 1 to 16 connections, got 17" in bad.stderr
    assert "--streams N" in vmmctl(tmp_path, "--help").stdout


# -- with mutual TLS: every connection is TLS ----------------------------------------------------------


@pytest.mark.covers(operation="migrate-live", guest="writer", via="engine", streams=3, tls=True, key=True, compress="lz4")
def test_parallel_streams_over_mutual_tls_arrive_exact_and_a_plaintext_joiner_is_refused(guests, tmp_path):
    from .test_migration_tls import TlsDestination
    from .tls_pki import Pki

    pki = Pki(tmp_path / "pki")
    src = guests("64M", work_pages=8192)
    dst = guests("64M", work_pages=8192, running=False)
    src.wait_for_progress(8192)
    d = TlsDestination(dst, tls=pki.destination(), key=KEY)

    def intrude(phase):
        if phase == "streams":  # a plaintext JOIN cannot pass the TLS handshake in front of it
            conn = socket.create_connection((d.host, d.port), timeout=5)
            conn.sendall(STRANGERS["wrong token"])
            threading.Thread(target=lambda: (_answer(conn), conn.close()), daemon=True).start()

    stats = migrate(src, d.host, d.port, live=True, key=KEY, tls=pki.source(),
                    params=MigrationParams(streams=3, max_rounds=5, compress="lz4"), on_phase=intrude)
    dstats = d.join()
    assert stats.status == "completed", stats.error
    assert dstats.status == "completed", dstats.error
    assert stats.streams == dstats.streams == 3 and stats.compression == "lz4"
    assert sum(1 for n in dstats.notes if n.startswith("encrypted with TLSv1.3")) == 1, dstats.notes
    refusals = [n for n in dstats.notes if n.startswith("refused a data connection")]
    # Refused at its TLS handshake: failed there, or, where the three real streams joined before
    # the intruder's handshake thread ran, still in it when the join window ended (the window then
    # ends the handshake; either way nothing it sent was read as a JOIN).
    assert len(refusals) == 1 and ("TLS handshake failed" in refusals[0]
                                   or "TLS handshake was not done when the join window ended" in refusals[0]), dstats.notes
    dst.wait_for_progress(500)
    assert_arrived_exact(src, dst)


class _Connected:
    """A stand-in for a connected TCP socket with the given ends."""

    def __init__(self, mine: str, theirs: str, family: int = socket.AF_INET) -> None:
        self.family, self._mine, self._theirs = family, mine, theirs

    def getsockname(self):
        return (self._mine, 24983)

    def getpeername(self):
        return (self._theirs, 40000)


def test_a_connection_within_this_host_gets_the_local_buffers_and_one_to_another_host_keeps_its_own(monkeypatch):
    asked = []
    monkeypatch.setattr(net, "set_send_buffer", lambda sock, size=net.SOCKET_BUFFER_BYTES: asked.append((sock, size)))
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as near:
        far = _Connected("192.0.2.10", "198.51.100.7")
        # A dual-stack listener sees an IPv4 peer on loopback as ::ffff:127.0.0.1.
        mapped = _Connected("2001:db8::5", "::ffff:127.0.0.1", socket.AF_INET6)
        for sock in (near, far, _Connected("192.0.2.10", "192.0.2.10"), _Connected("::1", "::1", socket.AF_INET6), mapped):
            net.fit_send_buffer(sock)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
            assert not net.peer_on_this_host(unix)
    assert not net.peer_on_this_host(far), "another host's address"
    assert not net.peer_on_this_host(_Connected("2001:db8::5", "::ffff:198.51.100.7", socket.AF_INET6))
    assert [size for _, size in asked] == [net.LOCAL_SOCKET_BUFFER_BYTES] * 4
    assert [sock for sock, _ in asked][0] is near and far not in [sock for sock, _ in asked]
    assert net.LOCAL_SOCKET_BUFFER_BYTES < net.SOCKET_BUFFER_BYTES


def test_migration_sockets_leave_the_receive_buffer_to_the_kernel():
    """Both ends size their send buffers and never the receive buffer: setting SO_RCVBUF locks it,
    and a locked buffer on Linux 6.18 is advertised almost whole as the window, so a reader that
    falls behind loses segments and waits out the sender's retransmission timer (session 38). A
    socket whose receive buffer was never set reports the kernel's starting figure, not twice a
    size asked for."""
    with socket.socket() as fresh:
        default = fresh.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        # What asking for the local send buffer gives on this host (net.core.wmem_max caps it).
        fresh.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, net.LOCAL_SOCKET_BUFFER_BYTES)
        local_send = fresh.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    listener = net.listen("127.0.0.1", 0)
    with listener, net.connect("127.0.0.1", listener.getsockname()[1], timeout=5) as source:
        conn, _ = listener.accept()
        with conn:
            net.fit_send_buffer(conn)
            for sock in (source, conn):
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == default
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == local_send


def test_no_migration_socket_asks_for_a_receive_buffer_on_any_path(guests, monkeypatch):
    """The same, over a whole migration: the listener, the main connection and every data stream
    the destination accepts, and the source's connections."""
    asked = {socket.SO_RCVBUF: 0, socket.SO_SNDBUF: 0}
    setsockopt = socket.socket.setsockopt

    def recording(sock, level, option, *value):
        if level == socket.SOL_SOCKET and option in asked:
            asked[option] += 1
        return setsockopt(sock, level, option, *value)

    monkeypatch.setattr(socket.socket, "setsockopt", recording)
    src = guests("32M", work_pages=2048)
    dst = guests("32M", work_pages=2048, running=False)
    stats, dstats = migrate_pair(src, dst, live=False, key=KEY, dst_key=KEY, params=MigrationParams(streams=3))
    assert stats.status == dstats.status == "completed", (stats.error, dstats.error)
    assert stats.streams == dstats.streams == 3
    assert asked[socket.SO_SNDBUF] >= 7, asked  # the listener and three connections a side: the recorder saw them
    assert asked[socket.SO_RCVBUF] == 0, asked


@pytest.mark.parametrize("cpus", [2, 3, 4, 8])
def test_the_state_goes_in_parts_to_another_host_and_within_this_one_only_with_cpus_to_spare(monkeypatch, cpus):
    from vmmpy.migration import source as source_module

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    spare = cpus >= 4  # the documented rule (docs/migration-protocol.md, version 9)
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as near:
        assert source_module.state_in_parts(near) is spare
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert source_module.state_in_parts(a) is spare, "a local migration's Unix socket is this host"
    assert source_module.state_in_parts(_Connected("192.0.2.10", "192.0.2.10")) is spare, "this host's own address"
    assert source_module.state_in_parts(_Connected("192.0.2.10", "198.51.100.7")) is True, "another host"


@pytest.mark.parametrize("cpus", [1, 2, 3, 8])
def test_streams_take_turns_on_this_host_up_to_its_cpus_and_all_send_to_another_host_or_capped(monkeypatch, cpus):
    from vmmpy.migration import source as source_module

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    at_once = source_module.streams_at_once
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as near:
        assert [at_once(near, n, capped=False) for n in (1, 2, 4, 16)] == [min(n, cpus) for n in (1, 2, 4, 16)]
        assert at_once(near, 4, capped=True) == 4, "each capped stream is paced to its share: all must send"
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert at_once(a, 4, capped=False) == min(4, cpus), "a Unix socket is this host"
    assert at_once(_Connected("192.0.2.10", "192.0.2.10"), 4, capped=False) == min(4, cpus), "this host's own address"
    assert at_once(_Connected("192.0.2.10", "198.51.100.7"), 4, capped=False) == 4, "another host: streams are for the network"


@pytest.mark.parametrize("at_once", [None, 2], ids=["all", "two"])
def test_a_rounds_link_rate_stays_what_the_streams_measured_round_after_round(at_once):
    """The source feeds each round's ``link_rate`` (its streams' compressors' rates, added) to the
    next. In small rounds, where no stream writes enough to measure the link, it must come back as
    given, however many streams carried the round or stood down, not shrink or grow each round."""
    from vmmpy.memory import GuestMemory, PageBudget

    src, dst = GuestMemory(8 * MiB, dirty_tracking="soft"), GuestMemory(8 * MiB)
    pairs = [socket.socketpair() for _ in range(4)]
    rate = 1e9
    try:
        for round_number in range(4):
            src.write(round_number * 4096, bytes([round_number + 1]) * 4096)  # one dirty page: one small batch
            budget = PageBudget(2048)
            got: list[dict] = []
            readers = [threading.Thread(target=lambda b=b: got.append(dst.recv_share(b, budget=budget, compressed=True, streams=4)),
                                        daemon=True) for _, b in pairs]
            for t in readers:
                t.start()
            sent = src.send_pages_multi([a for a, _ in pairs], all_pages=False, compress="auto", link_rate=rate, at_once=at_once)
            for t in readers:
                t.join(10)
            assert len(got) == 4 and sum(g["data_pages"] for g in got) == 1, got
            assert sent["data_pages"] == 1 and len(sent["streams"]) == 4, sent
            assert sent["link_rate"] == pytest.approx(1e9, rel=1e-9), f"round {round_number}: {sent['link_rate']}"
            rate = sent["link_rate"]
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_an_address_written_out_connects_without_a_name_lookup_and_a_name_still_resolves(monkeypatch):
    """A process's first getaddrinfo() costs milliseconds (the C library reads its configuration),
    inside a source's migration setup: an IPv4 or IPv6 address is connected to as it is."""
    looked_up = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: looked_up.append(host) or real(host, *a, **k))
    for host, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        try:
            listener = socket.create_server((host, 0), family=family)
        except OSError:
            continue  # no IPv6 loopback here
        with listener:
            with net.connect(host, listener.getsockname()[1], timeout=5) as sock:
                assert sock.family == family and sock.getpeername()[:2] == listener.getsockname()[:2]
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) and sock.gettimeout() == 5
    assert looked_up == []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with net.connect("localhost", listener.getsockname()[1], timeout=5) as sock:
            assert sock.getpeername()[0] in ("127.0.0.1", "::1")
    assert looked_up == ["localhost"]
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
    with pytest.raises(ConnectionLost, match=f"cannot connect to 127.0.0.1:{port}: connection refused"):
        net.connect("127.0.0.1", port, timeout=5)
    # An address with a zone takes the lookup, which alone puts the scope in the socket address
    # (without it a link-local address is refused: EINVAL). Loopback ignores the scope.
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        return  # no IPv6 loopback here
    with listener, net.connect("::1%1", listener.getsockname()[1], timeout=5) as sock:
        assert sock.getpeername()[0] == "::1"
    assert looked_up == ["localhost", "::1%1"]


def test_a_link_local_address_with_its_zone_connects():
    """``fe80::...%eth0`` (what vmmctl --migrate [fe80::...%eth0]:PORT gives): the zone must reach
    the socket address, or the kernel refuses the connection (EINVAL)."""
    try:
        with open("/proc/net/if_inet6") as f:
            rows = [line.split() for line in f]
    except OSError:
        pytest.skip("no /proc/net/if_inet6: no IPv6 here")
    link_local = [(r[0], int(r[1], 16), r[5]) for r in rows if len(r) == 6 and r[0].startswith("fe80") and int(r[3], 16) == 0x20]
    if not link_local:
        pytest.skip("no interface here has an IPv6 link-local address")
    raw, index, name = link_local[0]
    address = str(ipaddress.IPv6Address(bytes.fromhex(raw)))
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as listener:
        listener.bind((address, 0, 0, index))
        listener.listen(1)
        port = listener.getsockname()[1]
        host, port = net.parse_address(f"[{address}%{name}]:{port}")
        with net.connect(host, port, timeout=5) as sock:
            assert sock.getpeername()[0].split("%")[0] == address
