"""A peer that stops: the side still moving bytes gives up after ``io_timeout``, with or without
a bandwidth cap, on one stream or several, and says which peer stopped and for how long; the
source guest runs on with all its memory.

A proxy between the two forwards the first bytes of one connection and then holds it open
forwarding nothing (the peer is alive, just silent), as a stopped (SIGSTOP) or wedged host is.
"""

import re
import socket
import threading
import time

import pytest

from vmmpy.migration import MigrationParams, migrate
from vmmpy.units import MiB

from .migration_helpers import DestinationThread
from .migration_proxy import StreamProxy
from .test_migration_failures import assert_source_kept_guest

STALL = 2.0  # the io_timeout of the side that must notice


def _migrate_through_stalled_proxy(guests, *, src_params, dst_params, victim=0):
    src = guests("64M", work_pages=8192)
    dst = guests("64M", work_pages=8192, running=False)
    src.wait_for_progress(8192)
    d = DestinationThread(dst, params=dst_params)
    proxy = StreamProxy((d.host, d.port), victim=victim, cut_after=2 * MiB, stall=True)
    try:
        stats = migrate(src, "127.0.0.1", proxy.port, live=True, params=src_params)
        failed_at = time.monotonic()
    finally:
        proxy.close()  # the held connection ends: a destination still waiting sees it at once
    dstats = d.join()
    return src, dst, proxy, stats, dstats, failed_at


@pytest.mark.parametrize("cap", [None, 50 * MiB], ids=["uncapped", "capped"])
@pytest.mark.parametrize("streams", [1, 2])
def test_a_destination_that_takes_nothing_fails_the_source_after_io_timeout(guests, cap, streams):
    # The destination would wait far longer: the stall is the source's to notice.
    src_params = MigrationParams(io_timeout=STALL, handshake_timeout=STALL, bandwidth_cap=cap, streams=streams, compress="off")
    dst_params = MigrationParams(io_timeout=60, handshake_timeout=STALL, streams=streams)
    src, dst, proxy, stats, dstats, failed_at = _migrate_through_stalled_proxy(
        guests, src_params=src_params, dst_params=dst_params, victim=streams - 1)
    assert stats.status == "failed", stats.error
    assert f"timed out: the destination (127.0.0.1:{proxy.port}) took nothing for 2 s during round 0's page batches" in stats.error, stats.error
    # The timeout counts from the last byte the destination took: a send that sleeps in the
    # kernel waits it again after each partial copy (three times over through the pacing relay),
    # so without that the source gave up only after 2-3 timeouts. Bounded, not a speed figure.
    assert proxy.stalled_at is not None and failed_at - proxy.stalled_at < 2 * STALL, failed_at - proxy.stalled_at
    assert dst.discarded and "start_running" not in dst.calls
    assert_source_kept_guest(src)


@pytest.mark.parametrize("streams", [1, 2])
def test_a_source_that_sends_nothing_fails_the_destination_naming_it(guests, streams):
    # Here the destination notices first; the source's own (longer, by 2 s) timeout ends its
    # side, waited out in full.
    src_params = MigrationParams(io_timeout=STALL + 2, handshake_timeout=STALL, streams=streams, compress="off")
    dst_params = MigrationParams(io_timeout=STALL, handshake_timeout=STALL, streams=streams)
    src, dst, proxy, stats, dstats, _ = _migrate_through_stalled_proxy(
        guests, src_params=src_params, dst_params=dst_params, victim=streams - 1)
    assert dstats.status == "failed" and dst.discarded, dstats.error
    on = " (stream 1)" if streams == 2 else ""
    assert re.search(rf"timed out: the source \(127\.0\.0\.1:\d+\) sent nothing for 2 s during round 0's page batches{re.escape(on)}",
                     dstats.error), dstats.error
    assert "non-blocking" not in dstats.error
    assert stats.status == "failed"
    assert_source_kept_guest(src)


@pytest.mark.parametrize("cap", [None, 50 * MiB], ids=["uncapped", "capped"])
def test_a_frame_the_destination_does_not_take_is_named_with_the_peer_and_seconds(cap):
    """The source's frames (not only its page batches) time out in the user's terms, through the
    pacing relay or straight on TCP."""
    import socket

    from vmmpy.migration import MigrationError
    from vmmpy.migration import protocol as P
    from vmmpy.migration.net import Channel, set_io_timeout

    listener = socket.create_server(("127.0.0.1", 0))
    sock = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()  # never reads
    set_io_timeout(sock, 0.5)
    chan = Channel(sock, cap)
    try:
        with pytest.raises(MigrationError) as failed:
            for _ in range(200):  # bounded: the buffers hold a few MiB
                P.send_bytes(chan.out, bytes(1 << 20), "STATE")
        error = chan.translate(failed.value, "STATE")
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        assert str(error) == f"timed out: the destination ({address}) took nothing for 0.5 s during the STATE message"
    finally:
        chan.close()
        peer.close()
        listener.close()


def test_a_silent_peer_during_the_handshake_is_named_with_the_seconds(guests):
    # A destination that accepts and then says nothing: the source's frame read times out, and
    # the message names the peer, the seconds and what was awaited.
    src = guests("16M", work_pages=64)
    silent = socket.create_server(("127.0.0.1", 0))
    held = []
    threading.Thread(target=lambda: held.append(silent.accept()), daemon=True).start()
    stats = migrate(src, "127.0.0.1", silent.getsockname()[1], live=False, params=MigrationParams(handshake_timeout=1))
    silent.close()
    for conn, _ in held:
        conn.close()
    assert stats.status == "failed" and src.running, stats.error
    assert re.search(r"timed out: the peer 127\.0\.0\.1:\d+ sent nothing for 1 s while a frame header from the "
                     r"destination during handshake was awaited \(0 of 24 bytes arrived\)", stats.error), stats.error
