"""Every way a migration can fail before the commit leaves the guest running on the source with
all its memory, the destination discards, and the reason reaches the person at the source."""

import re
import socket
import threading
import time

import pytest

from vmmpy.migration import MigrationHandle, MigrationParams, migrate
from vmmpy.units import MiB

from .migration_guest import FakeGuest
from .migration_helpers import KEY, DestinationThread, migrate_pair
from .migration_proxy import Proxy


def assert_source_kept_guest(src: FakeGuest) -> None:
    """Running, writer progressing, memory exactly what its own counters say."""
    assert src.running and not src.stopped
    if "pause" in src.calls:
        assert src.calls.count("pause") == src.calls.count("resume")
        assert src.digest_at_resume == src.digest_at_pause, "memory changed while the failed migration held it"
    assert src.throttle_fraction == 0.0
    src.wait_for_progress(200)
    src.stop_writer()
    assert src.bad_pages() == []


REFUSALS = [
    ({"page_size": 16384}, "page size differs: source 4096, destination 16384"),
    ({"vendor": "amd"}, "vCPU vendor differs: the source has --vendor intel, this destination --vendor amd"),
    ({"memsize": "128M"}, "memory differs: the source has -m 64M, this destination -m 128M"),
    ({"devices": {"cpu0": 1}}, "devices missing on the destination: fakeguest"),
    ({"devices": {"cpu0": 1, "fakeguest": 0}}, "device 'fakeguest' state version 1 is newer than the destination reads (0)"),
    ({"devices": {"cpu0": 1, "fakeguest": 1, "virtio-net": 1}}, "devices only on the destination: virtio-net"),
]


@pytest.mark.parametrize("live", [False, True])
@pytest.mark.parametrize("dst_kwargs,reason", REFUSALS)
def test_spec_mismatch_is_refused_with_the_reason_and_guest_untouched(guests, dst_kwargs, reason, live):
    dst_kwargs = dict(dst_kwargs)
    memsize = dst_kwargs.pop("memsize", "64M")
    src = guests("64M", work_pages=1024)
    dst = guests(memsize, work_pages=1024, running=False, **dst_kwargs)
    src.wait_for_progress(100)
    stats, dstats = migrate_pair(src, dst, live=live)
    assert stats.status == "failed" and "destination refused the migration (spec)" in stats.error
    assert reason in stats.error, stats.error
    assert "pause" not in src.calls and stats.page_bytes == 0, "nothing moved before the refusal"
    # A source that proved nothing (no key here) does not spend the destination: it waited on
    # (until the test stopped it) with the refusal in its record.
    assert dstats.status == "cancelled" and dst.discarded and "restore_sections" not in dst.calls
    assert any(reason in n for n in dstats.notes), dstats.notes
    assert_source_kept_guest(src)


def test_a_state_larger_than_max_state_is_stopped_by_the_source_part_way_and_the_guest_runs_on(guests, monkeypatch):
    # One section a part: the fake guest's first section goes, the second would pass the bound.
    from vmmpy.migration import protocol as P
    from vmmpy.migration import source as source_module
    from vmmpy.state import encode_sections

    monkeypatch.setattr(P, "STATE_PART_SECTIONS", 1)
    monkeypatch.setattr(source_module, "state_in_parts", lambda sock: True)  # whatever this host's CPUs
    src = guests("64M", work_pages=256)
    dst = guests("64M", work_pages=256, running=False)
    src.wait_for_progress(100)
    first, second = (len(encode_sections([section])) for section in src.save_sections())
    # Each part fits (with room for the counters to grow a digit), the two together do not.
    bound = max(first, second) + 8
    assert first + second > bound + 8
    stats, dstats = migrate_pair(src, dst, live=True, params=MigrationParams(max_state_bytes=bound))
    assert stats.status == "failed" and stats.owner == "source", stats.error
    assert re.search(rf"device state is \d+ bytes up to section 'fakeguest', more than max_state_bytes={bound}$", stats.error), stats.error
    assert dstats.status == "failed" and dst.discarded and "restore_sections" not in dst.calls, dstats.error
    assert_source_kept_guest(src)


@pytest.mark.parametrize("src_key,dst_key,reason", [
    (b"w" * 32, KEY, "authentication failed: the source's proof does not match this destination's key"),
    (None, KEY, "this destination requires a migration key and the source sent none"),
    (KEY, None, "the destination runs without a key but this migration has one"),
])
def test_wrong_or_missing_key_is_refused_before_any_state(guests, src_key, dst_key, reason):
    src = guests("64M", work_pages=256)
    dst = guests("64M", work_pages=256, running=False)
    stats, dstats = migrate_pair(src, dst, live=True, key=src_key, dst_key=dst_key)
    assert stats.status == "failed" and reason in stats.error, stats.error
    # Neither a wrong key nor none proves anything: the destination waited on for its source.
    assert dstats.status == "cancelled" and dst.discarded
    assert dstats.state_bytes == 0 and dstats.rounds == [] and "restore_sections" not in dst.calls
    if dst_key is not None:
        assert any(reason in n for n in dstats.notes), dstats.notes
    assert dstats.bytes_total < 512, "the destination read only HELLO and AUTH"
    assert_source_kept_guest(src)


def test_destination_not_listening_fails_fast(guests):
    src = guests("64M", work_pages=256)
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    t = time.monotonic()
    stats = migrate(src, "127.0.0.1", port, live=True)
    assert time.monotonic() - t < 2.0
    assert stats.status == "failed" and "connection refused" in stats.error
    assert_source_kept_guest(src)


@pytest.mark.parametrize("live", [False, True])
def test_destination_closing_mid_stream_resumes_source_and_discards(guests, live):
    src = guests("64M", work_pages=2048)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)  # 8 MiB of written pages: the stream is longer than the cut
    d = DestinationThread(dst)
    proxy = Proxy((d.host, d.port), cut_after=1 * MiB)
    stats = migrate(src, "127.0.0.1", proxy.port, live=live, params=MigrationParams(io_timeout=5))
    dstats = d.join()
    # Whichever end notices first names it: the source's connection breaking, or the
    # destination's abort over a stream that ended early.
    assert stats.status == "failed" and re.search(r"connection|closed|aborted|truncated|ended", stats.error), stats.error
    assert dstats.status == "failed" and dst.discarded and "start_running" not in dst.calls
    assert_source_kept_guest(src)


@pytest.mark.parametrize("offset,where", [(10, "frame flags"), (17, "frame checksum"), (200, "handshake"), (700_000, "page data")])
def test_corrupted_stream_is_caught_and_nothing_is_lost(guests, offset, where):
    src = guests("64M", work_pages=2048)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)
    d = DestinationThread(dst, params=MigrationParams(handshake_timeout=3, io_timeout=3))
    proxy = Proxy((d.host, d.port), flip_at=offset)
    stats = migrate(src, "127.0.0.1", proxy.port, live=False, params=MigrationParams(handshake_timeout=3, io_timeout=3))
    # Before its SPEC is accepted a corrupted source is a stranger: the destination waits on.
    dstats = d.stop_waiting()
    assert stats.status == "failed", where
    assert dstats.status in ("failed", "cancelled") and dst.discarded and "start_running" not in dst.calls
    notes = "\n".join(dstats.notes)
    if where == "page data":
        assert "memory digest mismatch" in dstats.error and "memory digest mismatch" in stats.error
    elif where != "handshake":  # offset 200 is past the SPEC: the migration had begun
        assert dstats.status == "cancelled" and dstats.rounds == [], (where, dstats.error)
    if where == "frame flags":
        assert "HELLO: unknown frame flags 0xff0000" in notes, notes
        assert stats.error == "destination aborted: HELLO: unknown frame flags 0xff0000"
    if where == "frame checksum":
        assert "HELLO: frame checksum mismatch" in notes and "HELLO: frame checksum mismatch" in stats.error
    assert_source_kept_guest(src)


# -- cancel in every state ------------------------------------------------------------------------


def test_cancel_during_handshake_with_a_silent_destination(guests):
    src = guests("64M", work_pages=256)
    silent = socket.create_server(("127.0.0.1", 0))
    accepted = []
    threading.Thread(target=lambda: accepted.append(silent.accept()), daemon=True).start()
    in_handshake = threading.Event()
    handle = MigrationHandle(src, "127.0.0.1", silent.getsockname()[1], live=True,
                             on_phase=lambda p: in_handshake.set() if p == "handshake" else None)
    assert in_handshake.wait(5)
    time.sleep(0.1)  # blocked waiting for CHALLENGE
    t = time.monotonic()
    handle.cancel()
    stats = handle.wait(5)
    assert time.monotonic() - t < 1.0
    assert stats.status == "cancelled" and "handshake" in stats.error
    silent.close()
    for conn, _ in accepted:
        conn.close()
    assert_source_kept_guest(src)


def test_cancel_during_round_0_while_the_link_is_busy(guests):
    src = guests("64M", work_pages=2048)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)
    d = DestinationThread(dst)
    in_round = threading.Event()
    handle = MigrationHandle(src, d.host, d.port, live=True, params=MigrationParams(bandwidth_cap=2 * MiB),
                             on_phase=lambda p: in_round.set() if p == "round 0" else None)
    assert in_round.wait(5)
    time.sleep(0.3)  # 8 MiB at 2 MiB/s: well inside round 0
    t = time.monotonic()
    handle.cancel()
    stats = handle.wait(5)
    assert time.monotonic() - t < 1.0
    assert stats.status == "cancelled" and "round 0" in stats.error
    dstats = d.join()
    assert dstats.status == "failed" and dst.discarded
    assert_source_kept_guest(src)


@pytest.mark.parametrize("phase", ["round 2", "pause", "final", "state", "commit"])
def test_cancel_in_each_later_state_leaves_source_running(guests, phase):
    src = guests("64M", work_pages=2048, rate=6000)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)
    cancel = threading.Event()
    params = MigrationParams(downtime_target_ms=10, bandwidth_cap=32 * MiB, policy="switch-over")
    phases = []

    def on_phase(p):
        phases.append(p)
        if p == phase:
            cancel.set()

    stats, dstats = migrate_pair(src, dst, live=True, params=params, cancel=cancel, on_phase=on_phase)
    assert phase in phases
    assert stats.status == "cancelled", (stats.status, stats.error)
    assert dstats.status in ("failed", "cancelled") and dst.discarded and "start_running" not in dst.calls
    assert_source_kept_guest(src)


def test_cancelling_the_destination_while_it_listens(guests):
    dst = guests("64M", work_pages=256, running=False)
    cancel = threading.Event()
    d = DestinationThread(dst, cancel=cancel)
    time.sleep(0.1)
    cancel.set()
    dstats = d.join(5)
    assert dstats.status == "cancelled" and dst.discarded


class _TrickleLink:
    """Two connected ends (``here``, ``there``) through a relay on loopback, plain or with mutual
    TLS 1.3 between them; once ``slow`` is set the relay passes what ``there`` sends one byte
    every 50 ms (bounded: 200 bytes), until ``stop``."""

    def __init__(self, tmp_path, tls: bool) -> None:
        self.slow, self.stop = threading.Event(), threading.Event()
        with socket.create_server(("127.0.0.1", 0)) as near, socket.create_server(("127.0.0.1", 0)) as far:
            here_raw = socket.create_connection(near.getsockname()[:2], timeout=10)
            relay_in, _ = near.accept()
            relay_out = socket.create_connection(far.getsockname()[:2], timeout=10)
            there_raw, _ = far.accept()
        self.socks = [here_raw, relay_in, relay_out, there_raw]
        threading.Thread(target=self._relay, args=(relay_out, relay_in, True), daemon=True).start()
        threading.Thread(target=self._relay, args=(relay_in, relay_out, False), daemon=True).start()
        if not tls:
            self.here, self.there = here_raw, there_raw
            return
        from vmmpy.migration.tls import wrap_tls

        from .tls_pki import Pki

        pki = Pki(tmp_path / "pki")
        done = {}
        server = threading.Thread(target=lambda: done.update(s=wrap_tls(there_raw, pki.destination(), server_side=True, timeout=10)))
        server.start()
        self.here = wrap_tls(here_raw, pki.source(), server_side=False, server_hostname="127.0.0.1", timeout=10)
        server.join(15)
        self.there = done["s"]

    def _relay(self, src, dst, may_trickle: bool) -> None:
        try:
            for _ in range(10_000):  # bounded: 10 000 reads
                data = src.recv(65536)
                if not data:
                    return
                if may_trickle and self.slow.is_set():
                    for byte in data[:200]:
                        if self.stop.wait(0.05):
                            return
                        dst.send(bytes([byte]))
                else:
                    dst.sendall(data)
        except OSError:
            return

    def close(self) -> None:
        self.stop.set()
        for sock in (self.here, self.there, *self.socks):
            try:
                sock.close()
            except OSError:
                pass


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_the_look_for_a_waiting_abort_reads_it_and_ends_on_time_however_its_bytes_trickle(tmp_path, tls):
    """A failed source reads an ABORT the destination may have left (``waiting_abort``): one that
    is there is read, and a hostile peer that passes one byte every 50 ms cannot hold the look
    past its deadline, not even inside a TLS record, where a plain receive timeout restarts with
    every byte. A socket already closed says nothing."""
    from vmmpy.migration import protocol as P
    from vmmpy.migration.source import waiting_abort

    frame = P.encode_frame(P.MessageType.ABORT, P.encode_abort("round 0, stream 1: reset"))
    link = _TrickleLink(tmp_path, tls)
    try:
        link.there.sendall(frame)
        assert waiting_abort(link.here, 5.0) == "round 0, stream 1: reset"
        link.slow.set()
        link.there.sendall(frame)
        start = time.monotonic()
        assert waiting_abort(link.here, 0.25) is None
        took = time.monotonic() - start
    finally:
        link.close()
    assert took < 1.5, f"the look took {took:.2f} s, past its 0.25 s deadline (one byte at a time lasts 5 s)"
    assert waiting_abort(link.here, 0.25) is None, "a socket already closed has nothing to say, and raises nothing"
