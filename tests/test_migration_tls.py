"""Migration over mutual TLS 1.3: guests arrive exact, every kind of wrong certificate or wrong
mode is refused before any state moves and the source runs on, the shared key composes with TLS,
and a byte altered on the wire is caught by TLS itself."""

import re
import socket
import threading

import pytest

from tools.bench.scenarios import records_cipher
from vmmpy.migration import Destination, MigrationHandle, MigrationParams, migrate
from vmmpy.migration.tls import TlsConfig
from vmmpy.units import MiB

from .migration_guest import FakeGuest
from .migration_helpers import KEY
from .migration_proxy import Proxy
from .test_migration_engine import assert_arrived_exact
from .test_migration_failures import assert_source_kept_guest
from .tls_pki import Pki


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path / "pki")


class TlsDestination:
    """A Destination (optionally TLS) on an ephemeral loopback port, receiving in a thread."""

    def __init__(self, adapter, *, tls=None, key=None, params=None, cancel=None, host="127.0.0.1") -> None:
        self.dest = Destination(adapter, host, 0, key=key, params=params, cancel=cancel, tls=tls)
        self.host, self.port = self.dest.address[:2]
        self.stats = None
        self.thread = threading.Thread(target=self._run, name="tls-destination", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.stats = self.dest.run(accept_timeout=30)

    def stop_waiting(self):
        """A source refused in TLS is a stranger: the destination waits on for the real one."""
        self.dest.stop_waiting()
        return self.join()

    def join(self, timeout: float = 60.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "destination did not finish"
        return self.stats


def assert_nothing_received(dst: FakeGuest, dstats) -> None:
    assert dstats.status in ("failed", "cancelled") and dst.discarded and "start_running" not in dst.calls
    assert dstats.state_bytes == 0 and dstats.rounds == [] and "restore_sections" not in dst.calls
    assert dstats.bytes_total == 0, "no frame was read from a source that did not pass TLS"


@pytest.mark.parametrize("live", [
    pytest.param(False, id="warm", marks=pytest.mark.covers(operation="migrate-warm", guest="writer", via="engine", tls=True)),
    pytest.param(True, id="live", marks=pytest.mark.covers(operation="migrate-live", guest="writer", via="engine", tls=True,
                                                           bandwidth="capped")),
])
def test_migration_over_tls_arrives_exact(guests, pki, live):
    src = guests("64M", work_pages=2048, rate=None if not live else 6000)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)
    d = TlsDestination(dst, tls=pki.destination())
    params = MigrationParams(downtime_target_ms=10, bandwidth_cap=32 * MiB, policy="switch-over") if live else None
    stats = migrate(src, d.host, d.port, live=live, tls=pki.source(), params=params)
    dstats = d.join()
    assert stats.status == "completed", stats.error
    assert dstats.status == "completed", dstats.error
    if live:
        assert len(stats.rounds) >= 2
    assert any(n.startswith("encrypted with TLSv1.3") and "127.0.0.1" in n for n in stats.notes), stats.notes
    assert any(n.startswith("encrypted with TLSv1.3") and "source.migration.test" in n for n in dstats.notes), dstats.notes
    # Each end names the library that seals its records and what it timed both at when it chose.
    chosen = re.compile(r"records by (ring|aws-lc-rs) \((\d+\.\d+) GiB/s a core here, (aws-lc-rs|ring) (\d+\.\d+)\)")
    for notes in (stats.notes, dstats.notes):
        found = [m for m in map(chosen.search, notes) if m]
        assert len(found) == 1 and found[0][1] != found[0][3], notes
        assert float(found[0][2]) >= float(found[0][4]) > 0, notes
        assert records_cipher(notes) == found[0][0].removeprefix("records by "), "the bench reads the note as written"
    dst.wait_for_progress(500)
    assert_arrived_exact(src, dst)


@pytest.mark.covers(operation="migrate-warm", guest="writer", via="engine", tls=True, key=True)
def test_the_shared_key_and_tls_together(guests, pki):
    src = guests("64M", work_pages=1024)
    dst = guests("64M", work_pages=1024, running=False)
    src.wait_for_progress(1024)
    d = TlsDestination(dst, tls=pki.destination(), key=KEY)
    stats = migrate(src, d.host, d.port, live=False, key=KEY, tls=pki.source())
    assert stats.status == "completed", stats.error
    assert d.join().status == "completed"
    assert_arrived_exact(src, dst)


def test_a_wrong_key_inside_tls_is_still_refused(guests, pki):
    src = guests("64M", work_pages=256)
    dst = guests("64M", work_pages=256, running=False)
    d = TlsDestination(dst, tls=pki.destination(), key=KEY)
    stats = migrate(src, d.host, d.port, live=True, key=b"w" * 32, tls=pki.source())
    dstats = d.stop_waiting()  # a wrong key proves nothing: the destination waits on
    assert stats.status == "failed" and "the source's proof does not match this destination's key" in stats.error, stats.error
    assert dstats.status == "cancelled" and dstats.rounds == [] and dst.discarded
    assert_source_kept_guest(src)


def test_a_destination_certificate_from_another_ca_is_not_trusted(guests, pki):
    src = guests("64M", work_pages=256)
    dst = guests("64M", work_pages=256, running=False)
    # The destination's certificate is signed by a CA the source does not trust.
    d = TlsDestination(dst, tls=pki.config("impostor", "127.0.0.1", ca=pki.other_ca))
    stats = migrate(src, d.host, d.port, live=True, tls=pki.source())
    dstats = d.stop_waiting()
    assert stats.status == "failed", stats.error
    assert "the destination's TLS certificate is not trusted" in stats.error, stats.error
    assert stats.page_bytes == 0 and "pause" not in src.calls
    assert_nothing_received(dst, dstats)
    assert_source_kept_guest(src)


# How a source can fail mutual TLS, what it is told, and what the destination says: every case is
# refused in the handshake, before a frame is read.
SOURCE_CERTIFICATE_REFUSALS = {
    "no certificate": (lambda pki: pki.source_without_certificate(), "certificate required", "did not return a certificate"),
    "another CA": (lambda pki: pki.config("stranger", "source.migration.test", ca=pki.other_ca),  # trusts the right CA
                   "unknown ca", "the source's tls certificate is not trusted"),
    "expired": (lambda pki: pki.config("expired", "source.migration.test", expired=True),
                "certificate expired", "certificate has expired"),
}


def _plain(message: str | None) -> str:
    return (message or "").replace("_", " ").lower()


@pytest.mark.parametrize("case", list(SOURCE_CERTIFICATE_REFUSALS))
def test_a_source_without_a_valid_certificate_is_refused_before_any_state(guests, pki, case):
    make, source_told, destination_says = SOURCE_CERTIFICATE_REFUSALS[case]
    src = guests("64M", work_pages=256)
    dst = guests("64M", work_pages=256, running=False)
    d = TlsDestination(dst, tls=pki.destination())
    stats = migrate(src, d.host, d.port, live=True, tls=make(pki))
    # A source that fails TLS proved nothing: the destination waits on for its real source.
    dstats = d.stop_waiting()
    assert stats.status == "failed" and source_told in _plain(stats.error), stats.error
    assert any(destination_says in _plain(n) for n in dstats.notes), dstats.notes
    assert stats.page_bytes == 0 and "pause" not in src.calls
    assert_nothing_received(dst, dstats)
    assert_source_kept_guest(src)


def test_the_destination_name_is_checked_and_can_be_named(guests, pki):
    src = guests("64M", work_pages=256)
    dst = guests("64M", work_pages=256, running=False)
    named = pki.config("named", "dest.migration.test")  # no IP address in it
    d = TlsDestination(dst, tls=named)
    stats = migrate(src, d.host, d.port, live=False, tls=pki.source())
    assert stats.status == "failed" and "--tls-hostname" in stats.error and "127.0.0.1" in stats.error, stats.error
    # A source that fails TLS proved nothing: the destination waits on for its real source (until
    # its accept_timeout, 30 s, if not told to stop).
    assert_nothing_received(dst, d.stop_waiting())

    dst2 = guests("64M", work_pages=256, running=False)
    d2 = TlsDestination(dst2, tls=named)
    source = pki.source()
    stats = migrate(src, d2.host, d2.port, live=False, tls=TlsConfig(source.cert, source.key, source.ca, "dest.migration.test"))
    assert stats.status == "completed", stats.error
    assert d2.join().status == "completed"


def test_a_plaintext_source_is_refused_by_a_tls_destination(guests, pki):
    src = guests("64M", work_pages=256)
    dst = guests("64M", work_pages=256, running=False)
    d = TlsDestination(dst, tls=pki.destination())
    stats = migrate(src, d.host, d.port, live=True)
    dstats = d.stop_waiting()
    assert stats.status == "failed" and "this destination requires TLS" in stats.error, stats.error
    assert any("the source speaks plaintext" in n for n in dstats.notes), dstats.notes
    assert_nothing_received(dst, dstats)
    assert_source_kept_guest(src)


def test_a_tls_source_is_refused_by_a_plaintext_destination(guests, pki):
    src = guests("64M", work_pages=256)
    dst = guests("64M", work_pages=256, running=False)
    d = TlsDestination(dst)
    stats = migrate(src, d.host, d.port, live=True, tls=pki.source())
    dstats = d.stop_waiting()
    assert stats.status == "failed" and "the destination does not speak TLS" in stats.error, stats.error
    assert "the source started a TLS handshake, but this destination does not use TLS" in stats.error
    assert_nothing_received(dst, dstats)
    assert_source_kept_guest(src)


@pytest.mark.parametrize("damage,named", [
    pytest.param({"flip_at": 700_000}, "the stream was altered on the way", id="a byte altered"),
    pytest.param({"flip_at": 700_000, "garbage": 4096}, "TLS: ", id="garbage in place of records"),
    pytest.param({"cut_after": 700_003}, "without ending TLS (close_notify)", id="cut inside a record"),
])
def test_a_damaged_tls_stream_is_named_and_the_source_keeps_its_guest(guests, pki, damage, named):
    # Inside round 0's page data: the destination's core reads it, and TLS names what is wrong.
    src = guests("64M", work_pages=2048)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)
    params = MigrationParams(handshake_timeout=5, io_timeout=5)
    d = TlsDestination(dst, tls=pki.destination(), params=params)
    proxy = Proxy((d.host, d.port), **damage)
    stats = migrate(src, "127.0.0.1", proxy.port, live=False, tls=pki.source(), params=params)
    dstats = d.join()
    assert stats.status == "failed" and dstats.status == "failed", (stats.error, dstats.error)
    assert named in dstats.error, dstats.error
    assert dst.discarded and "start_running" not in dst.calls
    assert_source_kept_guest(src)


def test_cancel_during_a_tls_migration_leaves_the_source_running(guests, pki):
    src = guests("64M", work_pages=2048)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)
    d = TlsDestination(dst, tls=pki.destination())
    in_round = threading.Event()
    handle = MigrationHandle(src, d.host, d.port, live=True, tls=pki.source(), params=MigrationParams(bandwidth_cap=2 * MiB),
                             on_phase=lambda p: in_round.set() if p == "round 0" else None)
    assert in_round.wait(10)
    handle.cancel()
    stats = handle.wait(10)
    assert stats.status == "cancelled" and "round 0" in stats.error, stats.error
    dstats = d.join()
    assert dstats.status == "failed" and dst.discarded
    assert_source_kept_guest(src)


@pytest.mark.parametrize("mangle,message", [
    (lambda c, d: TlsConfig(str(d / "missing.crt"), c.key, c.ca), "--tls-cert"),
    (lambda c, d: TlsConfig(c.cert, c.cert, c.ca), "--tls-key"),
    (lambda c, d: TlsConfig(c.key, c.key, c.ca), "no PEM certificate"),
    (lambda c, d: TlsConfig(c.cert, c.key, c.key), "--tls-ca"),
])
def test_unreadable_or_wrong_files_are_named(pki, tmp_path, mangle, message):
    good = pki.source()
    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        mangle(good, tmp_path)


def test_a_key_of_another_certificate_is_named(pki):
    a, b = pki.source(), pki.destination()
    with pytest.raises(ValueError, match="is not the private key of the certificate"):
        TlsConfig(a.cert, b.key, a.ca)


@pytest.mark.covers(operation="migrate-warm", guest="writer", via="engine", tls=True, network="ipv6")
def test_migration_over_tls_on_ipv6_loopback(guests, pki):
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    src = guests("64M", work_pages=256)
    dst = guests("64M", work_pages=256, running=False)
    d = TlsDestination(dst, tls=pki.destination(), host="::1")
    stats = migrate(src, "::1", d.port, live=False, tls=pki.source())
    assert stats.status == "completed", stats.error
    assert d.join().status == "completed"
    assert_arrived_exact(src, dst)


def test_cancel_during_the_tls_handshake_with_a_silent_destination(guests, pki):
    src = guests("64M", work_pages=256)
    silent = socket.create_server(("127.0.0.1", 0))
    # Without the cancel the handshake would wait 600 s for a ServerHello.
    handle = MigrationHandle(src, "127.0.0.1", silent.getsockname()[1], live=True, tls=pki.source(),
                             params=MigrationParams(handshake_timeout=600))
    silent.settimeout(10)
    conn, _ = silent.accept()
    conn.settimeout(10)
    assert conn.recv(1, socket.MSG_PEEK) == b"\x16", "the source sent its ClientHello and waits for an answer"
    accepted = [(conn, None)]
    handle.cancel()
    stats = handle.wait(60)
    assert stats.status == "cancelled", stats.error
    silent.close()
    for conn, _ in accepted:
        conn.close()
    assert_source_kept_guest(src)
