"""TLS ended in the memory core, on its own (vmmpy.migration.tls.wrap_tls): the socket it returns
behaves as a plain TCP stream would for the migration engine: bytes cross exactly both ways, end
of stream and shutdown pass through in both directions, a peer that dies or stalls wakes a
blocked caller, timeouts set on the socket hold, the handshake is bounded, bad input after the
handshake (garbage, a record cut short, a peer that closes without ending TLS) is a clear error,
the core speaks standard TLS (Python's ssl is the peer), and closing leaves nothing behind."""

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


def tls_pair(pki):
    """(client end, server end): two core TLS sockets joined by mutual TLS over loopback TCP."""
    client_raw, server_raw = tcp_pair()
    out = {}

    def serve():
        out["server"] = wrap_tls(server_raw, pki.destination(), server_side=True, timeout=10)

    t = threading.Thread(target=serve)
    t.start()
    client = wrap_tls(client_raw, pki.source(), server_side=False, server_hostname="127.0.0.1", timeout=10)
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


def python_peer(pki, *, tls12=False):
    """(Python ssl client, core TLS server end) over loopback TCP."""
    client_raw, server_raw = tcp_pair()
    ctx = ssl_client_context(pki.source())
    if tls12:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    result = {}
    t = threading.Thread(target=lambda: result.update(peer=ctx.wrap_socket(client_raw, server_hostname="127.0.0.1")))
    t.start()
    server = wrap_tls(server_raw, pki.destination(), server_side=True, timeout=10)
    t.join(10)
    return result["peer"], server


def ssl_client_context(config) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(config.cert, config.key)
    ctx.load_verify_locations(cafile=config.ca)
    return ctx


def tls_threads():
    return [t for t in threading.enumerate() if "tls" in t.name]


def test_bytes_cross_exactly_in_both_directions_at_once(pki):
    client, server = tls_pair(pki)
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
    client, server = tls_pair(pki)
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
    assert tls_threads() == []


def test_closing_one_end_gives_the_other_end_of_stream(pki):
    client, server = tls_pair(pki)
    server.sendall(b"x" * 1000)
    server.close()  # passes the bytes on, then close_notify and FIN
    assert read_all(client) == (1000, hashlib.sha256(b"x" * 1000).hexdigest())
    client.close()


def test_a_peer_that_dies_mid_stream_wakes_the_blocked_reader_and_the_writer(pki):
    # The peer is Python's own ssl.SSLSocket: the core speaks standard TLS.
    peer, server = python_peer(pki)
    peer.sendall(b"a" * 100_000)
    set_io_timeout(server, 30)
    assert server.recv(10) == b"a" * 10
    blocked = {}

    def read_until_end():
        data = b""
        try:
            while chunk := server.recv(MiB):
                data += chunk
        except ConnectionResetError:  # as on plain TCP
            pass
        blocked["read"] = data

    reader = threading.Thread(target=read_until_end)
    reader.start()
    # Die with a reset, as a killed process's kernel may: no close_notify, no FIN.
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    reader.join(20)
    assert not reader.is_alive(), "the blocked reader woke up"
    # Whatever arrived before the reset is delivered in order (a reset may discard what the
    # peer's kernel had not sent yet), then the reset or the end of the stream.
    assert blocked["read"] == b"a" * len(blocked["read"]) and len(blocked["read"]) <= 100_000 - 10
    with pytest.raises(OSError):
        for _ in range(1000):  # bounded: the pair's buffers hold a few MiB at most
            server.sendall(b"z" * MiB)
    assert server.tls_error is not None
    server.close()
    assert tls_threads() == []


def test_timeouts_set_on_the_tls_socket_hold(pki):
    client, server = tls_pair(pki)
    set_io_timeout(server, 0.2)
    with pytest.raises((BlockingIOError, TimeoutError)):
        server.recv(10)  # the client sends nothing
    # The client never reads: the server's sends fill the buffers and then time out (EAGAIN),
    # which the engine reports as "the destination (ADDR) took nothing for N s".
    with pytest.raises((BlockingIOError, TimeoutError)):
        for _ in range(4096):
            server.sendall(b"s" * MiB)
    server.close()  # bounded: close_notify cannot reach a peer that does not read
    client.close()
    assert tls_threads() == []


def test_a_cancel_watcher_shutting_the_socket_down_wakes_a_blocked_receive(pki):
    client, server = tls_pair(pki)
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
        wrap_tls(server_raw, pki.destination(), server_side=True, timeout=0.3)
    assert server_raw.fileno() == -1, "a failed handshake closes the socket"
    client_raw.close()


def test_a_client_offering_only_tls_1_2_is_refused(pki):
    client_raw, server_raw = tcp_pair()
    ctx = ssl_client_context(pki.source())
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    def refused() -> None:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(client_raw, server_hostname="127.0.0.1")

    t = threading.Thread(target=refused)
    t.start()
    with pytest.raises(ProtocolError, match="TLS 1.3"):
        wrap_tls(server_raw, pki.destination(), server_side=True, timeout=5)
    t.join(10)
    client_raw.close()


def test_closing_leaves_no_thread_or_descriptor_behind(pki):
    def fds():
        return len(os.listdir("/proc/self/fd"))

    client, server = tls_pair(pki)  # warm up whatever loads once
    client.close()
    server.close()
    before = fds()
    for _ in range(5):
        client, server = tls_pair(pki)
        assert isinstance(client, TlsSocket) and tls_threads() == [], "no relay thread: TLS ends in the core"
        client.sendall(b"ping")
        assert server.recv(4) == b"ping"
        client.close()
        server.close()
    assert tls_threads() == []
    assert fds() == before


def test_garbage_after_the_handshake_is_a_clear_error(pki):
    peer, server = python_peer(pki)
    set_io_timeout(server, 10)
    peer.sendall(b"fine")
    assert server.recv(4) == b"fine"
    os.write(peer.fileno(), b"GET / HTTP/1.1\r\n\r\n" * 4)  # straight onto TCP, around TLS
    with pytest.raises(ConnectionError) as err:
        server.recv(100)
    assert "TLS" in str(err.value) and server.tls_error is not None, err.value
    peer.close()
    server.close()


def test_a_record_cut_short_reads_as_an_end_without_close_notify(pki):
    # A peer whose TLS records are written by hand: the last one loses its second half.
    client_raw, server_raw = tcp_pair()
    ctx = ssl_client_context(pki.source())
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    done = threading.Event()

    def client_handshake():
        client_raw.settimeout(10)
        for _ in range(20):  # bounded: TLS 1.3 takes two flights
            try:
                obj.do_handshake()
                client_raw.sendall(outgoing.read())
                done.set()
                return
            except ssl.SSLWantReadError:
                client_raw.sendall(outgoing.read())
                incoming.write(client_raw.recv(65536))

    t = threading.Thread(target=client_handshake)
    t.start()
    server = wrap_tls(server_raw, pki.destination(), server_side=True, timeout=10)
    t.join(10)
    assert done.is_set()
    set_io_timeout(server, 10)
    obj.write(b"w" * 10_000)
    record = outgoing.read()
    client_raw.sendall(record[: len(record) // 2])
    client_raw.shutdown(socket.SHUT_WR)
    assert server.recv(20_000) == b""
    assert "without ending TLS" in server.tls_error, server.tls_error
    client_raw.close()
    server.close()


def test_a_peer_that_closes_mid_stream_without_ending_tls_is_named(pki):
    peer, server = python_peer(pki)
    set_io_timeout(server, 10)
    peer.sendall(b"p" * 50_000)
    peer.shutdown(socket.SHUT_WR)  # FIN on TCP, no close_notify
    assert read_all(server) == (50_000, hashlib.sha256(b"p" * 50_000).hexdigest())
    assert "without ending TLS (close_notify)" in server.tls_error
    peer.close()
    server.close()


def test_a_clean_close_is_no_failure(pki):
    client, server = tls_pair(pki)
    set_io_timeout(server, 10)
    client.sendall(b"bye")
    client.close()
    assert read_all(server) == (3, hashlib.sha256(b"bye").hexdigest())
    assert server.tls_error is None
    server.close()


def test_peeked_bytes_are_read_again_and_seen_as_pending(pki):
    client, server = tls_pair(pki)
    set_io_timeout(server, 10)
    client.sendall(b"header-and-rest")
    assert server.recv(6, socket.MSG_PEEK) == b"header"
    assert server.pending() >= 6
    assert server.recv(15) == b"header-and-rest"
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
        server.recv(10)
    client.close()
    server.close()


def test_records_the_core_seals_and_opens_are_standard_tls_both_ways(pki):
    # The core seals and opens TLS 1.3 records itself after rustls's handshake: Python's ssl
    # (OpenSSL) on the other end must read every byte it sends, in records of every size up to
    # the largest and across its 1 MiB sends, and it must read every byte OpenSSL sends.
    peer, core = python_peer(pki)
    data = os.urandom(3 * MiB + 12345)
    out = {}

    def openssl_reads():
        got = bytearray()
        while len(got) < len(data):
            chunk = peer.recv(MiB)
            if not chunk:
                break
            got += chunk
        out["got"] = bytes(got)
        peer.sendall(data[::-1])  # and back, sealed by OpenSSL

    reader = threading.Thread(target=openssl_reads)
    reader.start()
    set_io_timeout(core, 30)
    core.sendall(data[:1])  # a one-byte record
    core.sendall(data[1:])
    reader.join(30)
    assert not reader.is_alive() and out["got"] == data, "OpenSSL read exactly what the core sealed"
    back = bytearray()
    while len(back) < len(data):
        chunk = core.recv(MiB)
        assert chunk, "the core read to the end of what OpenSSL sent"
        back += chunk
    assert bytes(back) == data[::-1], "the core opened exactly what OpenSSL sealed"
    peer.close()
    core.close()
