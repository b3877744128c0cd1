"""A live round ends when the destination has taken it, not when its bytes are in this host's
send buffer, so the pause for the final round never waits behind the destination's backlog:
protocol version 8's ROUND_DONE, and with an older destination ``net.await_delivery`` (the
connection's unacknowledged bytes, SIOCOUTQ, drained within a bound)."""

from __future__ import annotations

import socket
import time

import vmmpy.migration.destination as destination_module
import vmmpy.migration.source as source_module
from vmmpy.migration import MigrationParams
from vmmpy.migration import protocol as P
from vmmpy.migration.net import await_delivery, unacknowledged
from vmmpy.units import MiB

from .migration_helpers import migrate_pair
from .test_migration_failures import assert_source_kept_guest

# A link slower than the writer dirties memory: several live rounds before the switch.
SEVERAL_ROUNDS = MigrationParams(downtime_target_ms=10, bandwidth_cap=32 * MiB, max_rounds=6, policy="switch-over")


def _live_migration_timeline(guests, monkeypatch):
    """A live migration of a writing guest, with when the destination finished each round and
    when the source paused the guest (one clock: both ends run in this process)."""
    taken, paused = {}, []
    receive_round, pause = destination_module._Receiver._receive_round, source_module._Source._pause

    def timed_receive_round(self, memory):
        receive_round(self, memory)
        taken[memory.round] = time.monotonic()

    def timed_pause(self):
        paused.append(time.monotonic())
        return pause(self)

    monkeypatch.setattr(destination_module._Receiver, "_receive_round", timed_receive_round)
    monkeypatch.setattr(source_module._Source, "_pause", timed_pause)
    src = guests("64M", work_pages=2048, rate=6000)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)
    stats, dstats = migrate_pair(src, dst, live=True, params=SEVERAL_ROUNDS)
    assert stats.status == dstats.status == "completed", (stats.error, dstats.error)
    assert len(stats.rounds) >= 3 and stats.rounds[-1].final, [r.round for r in stats.rounds]
    return stats, dstats, taken, paused


def test_the_source_pauses_only_once_the_destination_has_taken_every_round(guests, monkeypatch):
    stats, dstats, taken, (paused,) = _live_migration_timeline(guests, monkeypatch)
    assert stats.protocol_version == dstats.protocol_version == P.ROUND_DONE_VERSION
    final = stats.rounds[-1].round
    assert sorted(taken) == list(range(final + 1))
    assert all(taken[r] < paused for r in range(final)), "every round before the final was taken before the pause"


def test_an_older_destination_without_round_done_still_migrates_exactly(guests, monkeypatch):
    monkeypatch.setattr(destination_module._Receiver, "versions", (P.POSTCOPY_VERSION,))
    stats, dstats, taken, _ = _live_migration_timeline(guests, monkeypatch)
    assert stats.protocol_version == dstats.protocol_version == P.POSTCOPY_VERSION
    assert sorted(taken) == [r.round for r in stats.rounds], "every round arrived (memory checked byte for byte)"


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
