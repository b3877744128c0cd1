"""The TLS relay on its own (vmmpy.migration.tls.wrap_tls): the socket it returns behaves as a
plain TCP stream would for the migration engine: bytes cross exactly both ways, end of stream
and shutdown pass through in both directions, a peer that dies or stalls wakes a blocked caller,
timeouts set on the socket hold, the handshake is bounded, and closing leaves nothing behind."""

import hashlib
import os
import socket
import ssl
import struct
import threading

import pytest

from vmmpy.migration import MigrationTimeout, ProtocolError
from vmmpy.migration.net import CancelWatcher, set_io_timeout
from vmmpy.migration.tls import TlsSocket, wrap_tls

from .tls_pki import Pki

MiB = 1 << 20


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path / "pki")


def tcp_pair():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname()[:2], timeout=10)
    server, _ = listener.accept()
    listener.close()
    return client, server


def relay_pair(pki, *, linger=5.0):
    """(client end, server end): two relays joined by mutual TLS over loopback TCP."""
    client_raw, server_raw = tcp_pair()
    out = {}

    def serve():
        out["server"] = wrap_tls(server_raw, pki.destination().context(server_side=True), server_side=True, timeout=10, linger=linger)

    t = threading.Thread(target=serve)
    t.start()
    client = wrap_tls(client_raw, pki.source().context(server_side=False), server_side=False, server_hostname="127.0.0.1",
                      timeout=10, linger=linger)
    t.join(15)
    assert "server" in out, "the server side did not finish its handshake"
    return client, out["server"]


def read_all(sock, limit=1 << 30):
    digest, total = hashlib.sha256(), 0
    buf = bytearray(MiB)
    while total < limit:
        n = sock.recv_into(buf)
        if n == 0:
            break
        digest.update(buf[:n])
        total += n
    return total, digest.hexdigest()


def relay_threads():
    return [t for t in threading.enumerate() if t.name.startswith("migration-tls-")]


def test_bytes_cross_exactly_in_both_directions_at_once(pki):
    client, server = relay_pair(pki)
    up, down = os.urandom(24 * MiB), os.urandom(16 * MiB)
    got = {}

    def receive(name, sock):
        got[name] = read_all(sock)

    readers = [threading.Thread(target=receive, args=("server", server)), threading.Thread(target=receive, args=("client", client))]
    for r in readers:
        r.start()
    writer = threading.Thread(target=lambda: (server.sendall(down), server.shutdown(socket.SHUT_WR)))
    writer.start()
    client.sendall(up)
    client.shutdown(socket.SHUT_WR)
    for t in (writer, *readers):
        t.join(60)
        assert not t.is_alive()
    assert got["server"] == (len(up), hashlib.sha256(up).hexdigest())
    assert got["client"] == (len(down), hashlib.sha256(down).hexdigest())
    client.close()
    server.close()


def test_end_of_stream_passes_each_way_and_the_other_way_stays_open(pki):
    client, server = relay_pair(pki)
    client.sendall(b"last words")
    client.shutdown(socket.SHUT_WR)
    assert read_all(server)[0] == len(b"last words"), "the server reads the data, then end of stream"
    server.sendall(b"reply after the client's end")  # TLS 1.3 close_notify closes one direction only
    server.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := client.recv(100):
        data += chunk
    assert data == b"reply after the client's end"
    client.close()
    server.close()
    assert relay_threads() == []


def test_closing_one_end_gives_the_other_end_of_stream(pki):
    client, server = relay_pair(pki)
    server.sendall(b"x" * 1000)
    server.close()  # passes the bytes on, then close_notify and FIN
    assert read_all(client) == (1000, hashlib.sha256(b"x" * 1000).hexdigest())
    client.close()


def test_a_peer_that_dies_mid_stream_wakes_the_blocked_reader_and_the_writer(pki):
    # The peer is Python's own ssl.SSLSocket: the relay speaks standard TLS.
    client_raw, server_raw = tcp_pair()
    ctx = pki.source().context(server_side=False)
    result = {}
    t = threading.Thread(target=lambda: result.update(peer=ctx.wrap_socket(client_raw, server_hostname="127.0.0.1")))
    t.start()
    server = wrap_tls(server_raw, pki.destination().context(server_side=True), server_side=True, timeout=10)
    t.join(10)
    peer = result["peer"]
    peer.sendall(b"a" * 100_000)
    set_io_timeout(server, 30)
    assert server.recv(10) == b"a" * 10
    blocked = {}

    def read_until_end():
        data = b""
        while chunk := server.recv(MiB):
            data += chunk
        blocked["read"] = data

    reader = threading.Thread(target=read_until_end)
    reader.start()
    # Die with a reset, as a killed process's kernel may: no close_notify, no FIN.
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    reader.join(20)
    assert not reader.is_alive(), "the blocked reader woke up"
    # Whatever arrived before the reset is delivered in order (a reset may discard what the
    # peer's kernel had not sent yet), then the end of the stream.
    assert blocked["read"] == b"a" * len(blocked["read"]) and len(blocked["read"]) <= 100_000 - 10
    with pytest.raises(OSError):
        for _ in range(1000):  # bounded: the pair's buffers hold a few MiB at most
            server.sendall(b"z" * MiB)
    assert server.relay_error is not None
    server.close()
    assert relay_threads() == []


def test_timeouts_set_on_the_relay_socket_hold(pki):
    client, server = relay_pair(pki, linger=0.5)
    set_io_timeout(server, 0.2)
    with pytest.raises((BlockingIOError, TimeoutError)):
        server.recv(10)  # the client sends nothing
    # The client never reads: the server's sends fill the buffers and then time out (EAGAIN),
    # which the engine reports as "the destination (ADDR) took nothing for N s".
    with pytest.raises((BlockingIOError, TimeoutError)):
        for _ in range(4096):
            server.sendall(b"s" * MiB)
    server.close()  # bounded: the pump cannot hand its backlog to a peer that does not read
    client.close()
    assert relay_threads() == []


def test_a_cancel_watcher_shutting_the_socket_down_wakes_a_blocked_receive(pki):
    client, server = relay_pair(pki)
    cancel = threading.Event()
    watcher = CancelWatcher(cancel)
    watcher.watch(server)
    got = {}
    reader = threading.Thread(target=lambda: got.update(data=server.recv(10)))
    reader.start()
    cancel.set()
    reader.join(10)
    watcher.close()
    assert not reader.is_alive() and got["data"] == b""
    assert read_all(client)[0] == 0, "the peer sees the end of the stream too"
    client.close()
    server.close()


def test_a_silent_client_times_the_handshake_out(pki):
    client_raw, server_raw = tcp_pair()
    with pytest.raises(MigrationTimeout, match="TLS handshake"):
        wrap_tls(server_raw, pki.destination().context(server_side=True), server_side=True, timeout=0.3)
    assert server_raw.fileno() == -1, "a failed handshake closes the socket"
    client_raw.close()


def test_a_client_offering_only_tls_1_2_is_refused(pki):
    client_raw, server_raw = tcp_pair()
    ctx = pki.source().context(server_side=False)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    def refused() -> None:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(client_raw, server_hostname="127.0.0.1")

    t = threading.Thread(target=refused)
    t.start()
    with pytest.raises(ProtocolError, match="TLS 1.3"):
        wrap_tls(server_raw, pki.destination().context(server_side=True), server_side=True, timeout=5)
    t.join(10)
    client_raw.close()


def test_closing_leaves_no_thread_or_descriptor_behind(pki):
    def fds():
        return len(os.listdir("/proc/self/fd"))

    client, server = relay_pair(pki)  # warm up whatever OpenSSL loads once
    client.close()
    server.close()
    before = fds()
    for _ in range(5):
        client, server = relay_pair(pki)
        assert isinstance(client, TlsSocket) and len(relay_threads()) == 2
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"
        client.close()
        server.close()
    assert relay_threads() == []
    assert fds() == before
