"""A live round ends when the destination has taken it, not when its bytes are in this host's
send buffer, so the pause for the final round never waits behind the destination's backlog:
protocol version 8's ROUND_DONE, read once ``net.await_delivery`` has seen every byte taken (the
connection's unacknowledged bytes, SIOCOUTQ, drained while the peer keeps taking them); with an
older destination that wait alone."""

from __future__ import annotations

import socket
import struct
import time

import vmmpy.migration.destination as destination_module
import vmmpy.migration.source as source_module
from vmmpy.migration import MigrationParams, migrate
from vmmpy.migration import protocol as P
from vmmpy.migration.net import await_delivery, unacknowledged
from vmmpy.units import MiB

from .migration_helpers import DestinationThread, assert_migrated_memory_exact, migrate_pair
from .migration_proxy import Proxy
from .test_migration_failures import assert_source_kept_guest

# A link slower than the writer dirties memory: several live rounds before the switch.
SEVERAL_ROUNDS = MigrationParams(downtime_target_ms=10, bandwidth_cap=32 * MiB, max_rounds=6, policy="switch-over")


def _live_migration_timeline(guests, monkeypatch):
    """A live migration of a writing guest, with when the destination said it had taken each
    round (just before its ROUND_DONE left), when the source paused the guest (one clock: both
    ends run in this process), and each wait of the source for its bytes to be taken."""
    taken, paused, waits = {}, [], []
    send, pause, await_delivery_ = destination_module._Receiver._send, source_module._Source._pause, source_module.await_delivery

    def timed_send(self, msg_type, payload=b""):
        if msg_type is P.MessageType.ROUND_DONE:
            taken[P.decode_round_done(payload)] = time.monotonic()
        return send(self, msg_type, payload)

    def timed_pause(self):
        paused.append(time.monotonic())
        return pause(self)

    def counted_wait(socks, timeout, stop=None):
        waits.append(len(socks))
        return await_delivery_(socks, timeout, stop)

    monkeypatch.setattr(destination_module._Receiver, "_send", timed_send)
    monkeypatch.setattr(source_module._Source, "_pause", timed_pause)
    monkeypatch.setattr(source_module, "await_delivery", counted_wait)
    src = guests("64M", work_pages=2048, rate=6000)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)
    stats, dstats = migrate_pair(src, dst, live=True, params=SEVERAL_ROUNDS)
    assert stats.status == dstats.status == "completed", (stats.error, dstats.error)
    assert len(stats.rounds) >= 3 and stats.rounds[-1].final, [r.round for r in stats.rounds]
    assert [r.round for r in dstats.rounds] == [r.round for r in stats.rounds], "every round arrived (memory checked byte for byte)"
    return stats, dstats, taken, paused, waits


def test_the_source_pauses_only_once_the_destination_has_taken_every_round(guests, monkeypatch):
    stats, dstats, taken, (paused,), waits = _live_migration_timeline(guests, monkeypatch)
    assert stats.protocol_version == dstats.protocol_version >= P.ROUND_DONE_VERSION
    final = stats.rounds[-1].round
    assert sorted(taken) == list(range(final)), "a ROUND_DONE for every round but the final"
    assert all(taken[r] < paused for r in range(final)), "every round before the final was taken before the pause"
    assert waits == [1] * final, "and before reading each, the source waited for its bytes to be taken"


def test_an_older_destination_without_round_done_still_waits_for_each_round_to_be_taken(guests, monkeypatch):
    monkeypatch.setattr(destination_module._Receiver, "versions", (P.POSTCOPY_VERSION,))
    stats, dstats, taken, _, waits = _live_migration_timeline(guests, monkeypatch)
    assert stats.protocol_version == dstats.protocol_version == P.POSTCOPY_VERSION
    assert taken == {}, "a version 7 destination sends no ROUND_DONE"
    assert waits == [1] * stats.rounds[-1].round, "the source waited for the bytes of every round but the final"


def test_a_round_done_naming_another_round_fails_the_migration_and_the_source_keeps_its_guest(guests, monkeypatch):
    encode = P.encode_round_done
    monkeypatch.setattr(P, "encode_round_done", lambda number: encode(number + 1))  # a destination that lies
    src = guests("64M", work_pages=2048, rate=6000)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)
    stats, dstats = migrate_pair(src, dst, live=True, params=SEVERAL_ROUNDS)
    assert stats.status == "failed" and stats.owner == "source"
    assert "ROUND_DONE names round 1, but round 0 was sent" in stats.error, stats.error
    assert dstats.status != "completed"
    assert_source_kept_guest(src)


def test_a_link_slower_than_the_backlog_in_its_buffers_within_io_timeout_still_completes(guests):
    # 2 MiB a round through a 2 MiB/s proxy: the source's send buffer and the proxy take the
    # round at once, and the destination has the last byte a second later, twice the
    # io_timeout. The wait for ROUND_DONE lasts while the destination keeps taking bytes, as a
    # send would.
    src = guests("64M", work_pages=512, rate=2000)
    dst = guests("64M", work_pages=512, running=False)
    src.wait_for_progress(512)
    params = MigrationParams(downtime_target_ms=300, max_rounds=2, policy="switch-over", io_timeout=0.5)
    d = DestinationThread(dst, params=params)
    proxy = Proxy((d.host, d.port), rate=2 * MiB)
    stats = migrate(src, "127.0.0.1", proxy.port, live=True, params=params)
    dstats = d.join(60)
    assert stats.status == dstats.status == "completed", (stats.error, dstats.error)
    assert stats.protocol_version >= P.ROUND_DONE_VERSION and len(stats.rounds) >= 2
    assert_migrated_memory_exact(src, dst)


# -- net.await_delivery, the wait itself -----------------------------------------------------------
def _pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.socket()
        # A small receive buffer, set before the connection exists so the window it advertises is
        # small too: what the reader does not read stays in the sender's queue, unacknowledged.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sender.connect(listener.getsockname())
        receiver, _ = listener.accept()
    return sender, receiver


def test_bytes_the_peer_has_not_taken_are_unacknowledged_until_it_reads_them():
    sender, receiver = _pair()
    with sender, receiver:
        assert unacknowledged(sender) == 0
        sender.setblocking(False)
        queued = 0
        for _ in range(4096):  # fill the path: the peer's window, then our send buffer
            try:
                queued += sender.send(bytes(64 << 10))
            except BlockingIOError:
                break
        assert queued > 0
        waiting = unacknowledged(sender)
        assert waiting is not None and waiting > 0, "the peer's small window holds most bytes back"
        started = time.monotonic()
        assert not await_delivery([sender], 0.05), "nothing read: not delivered"
        assert time.monotonic() - started < 2, "the wait keeps to its bound"
        receiver.settimeout(10)
        got = 0
        while got < queued:
            got += len(receiver.recv(1 << 20))
        assert await_delivery([sender], 5), "every byte read: delivered"
        assert unacknowledged(sender) == 0


def test_a_socket_the_kernel_cannot_say_for_does_not_hold_a_round_up():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.close()
    with b:
        assert unacknowledged(a) is None  # closed: no answer
        assert await_delivery([a], 0.01)




def _fill(sender: socket.socket) -> int:
    """Queue bytes on ``sender`` until its peer's window and its own send buffer are full."""
    sender.setblocking(False)
    queued = 0
    for _ in range(4096):
        try:
            queued += sender.send(bytes(64 << 10))
        except BlockingIOError:
            break
    assert queued > 0 and (unacknowledged(sender) or 0) > 0
    return queued


def test_a_peer_that_answers_or_hangs_up_ends_the_wait_at_once():
    # Its answer (an ABORT, say) or its reset is what the next read gives: waiting for bytes it
    # will never take would only delay that.
    for end in ("answers", "resets"):
        sender, receiver = _pair()
        with sender, receiver:
            _fill(sender)
            if end == "answers":
                receiver.sendall(b"x")
            else:
                receiver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                receiver.close()
            started = time.monotonic()
            assert await_delivery([sender], 30), end
            assert time.monotonic() - started < 10, f"the peer {end}: no stall timeout was waited out"
