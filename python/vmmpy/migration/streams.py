"""Parallel page streams (protocol version 3): the data connections beside the main one.

The main connection does the handshake, authentication and spec check, then asks for n streams
(STREAMS); the destination grants them with a random session token (STREAMS_TOKEN). The source
opens n-1 data connections to the same listener; each must prove, in its first frame (JOIN),
that it belongs to the authenticated session before the destination reads anything else from it:
the token, and with a key an HMAC bound to the session's nonces. The destination answers each with
its own proof, so the source never sends pages to a peer without the key either.

This module owns the join (both sides) and receiving a round on n streams at once, each stream's
share one call into the memory core (``GuestMemory.recv_share``, as the single stream's is).
Sending a round on n streams is one call into the memory core (``GuestMemory.send_pages_multi``). It does
not own the main connection's state machine (``source``, ``destination``).

The join window: the destination accepts data connections only between STREAMS_TOKEN and the
last JOIN, for at most ``handshake_timeout`` seconds, then closes its listener. A connection that
sends anything but a valid JOIN of this session (a stranger, a wrong token or proof, an index out
of range or already joined) is refused with a REFUSE naming why and closed; it does not end the
migration. The migration fails if the window closes before every stream has joined.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable

from ..memory import PageBatchError
from . import protocol as P
from .errors import (
    Aborted,
    AuthenticationError,
    Cancelled,
    ConnectionLost,
    MigrationError,
    MigrationTimeout,
    ProtocolError,
    Refused,
    receive_error,
)
from .net import CancelWatcher, buffered, connect, fit_send_buffer, format_address, set_io_timeout, shutdown_quietly

#: Data connections the destination holds at once while waiting for their JOIN; more are closed.
MAX_PENDING = 32
#: Refused data connections named in the destination's notes (the rest are counted).
MAX_NOTED = 8
_JOIN_FRAME_MAX = P.HEADER_SIZE + P.MAX_PAYLOAD[P.MessageType.JOIN]


# -- source ----------------------------------------------------------------------------------------


def open_data_streams(host: str, port: int, grant: P.StreamsToken, *, key: bytes | None, hello: bytes, challenge: bytes,
                      connect_timeout: float, handshake_timeout: float, watcher: CancelWatcher,
                      wrap: Callable[[socket.socket], socket.socket] | None = None) -> list[socket.socket]:
    """Connect streams 1..n-1 and have each accepted by the destination; returns the connected
    sockets (blocking, handshake timeout set). ``wrap`` (TLS: ``tls.wrap_tls``) runs on each
    connection before its JOIN, as on the main one. Raises, with every socket closed, if one fails."""
    socks: list[socket.socket] = []
    try:
        for index in range(1, grant.count):
            if watcher.cancelled():
                raise Cancelled(f"cancelled while opening data stream {index}")
            sock = connect(host, port, timeout=connect_timeout)
            watcher.watch(sock)
            if wrap is not None:
                sock = wrap(sock)  # on failure the TCP socket is closed by the handshake
            socks.append(sock)
            watcher.watch(sock)
            set_io_timeout(sock, handshake_timeout)
            mac = P.join_proof(key, hello, challenge, index, grant.token) if key is not None else b""
            frame = P.encode_frame(P.MessageType.JOIN, P.encode_join(P.Join(index, grant.token, mac)))
            P.send_bytes(sock, frame, f"JOIN on data stream {index}")
            reply = P.read_frame(sock, allowed=(P.MessageType.ACCEPT, P.MessageType.REFUSE), where=f" on data stream {index}")
            if reply.type is P.MessageType.REFUSE:
                refusal = P.decode_refuse(reply.payload)
                raise Refused(f"destination refused data stream {index}: {refusal.reason}")
            if reply.type is P.MessageType.ABORT:
                raise Aborted(f"destination aborted: {P.decode_abort(reply.payload)}")
            accept = P.decode_accept(reply.payload)
            if accept.stage is not P.Stage.JOIN:
                raise ProtocolError(f"expected the destination to accept data stream {index}, got an ACCEPT for {accept.stage.name}")
            if key is not None and not P.proofs_equal(accept.proof, P.joined_proof(key, hello, challenge, frame)):
                raise AuthenticationError(f"data stream {index}: the destination's proof does not match the key: "
                                      "it is not the destination that accepted the main connection")
        return socks
    except BaseException:
        for sock in socks:
            sock.close()
        raise


# -- destination: the join window ------------------------------------------------------------------


class JoinWindow:
    """Accepts data connections on ``listener`` until ``count - 1`` have joined the session.

    ``main`` is watched too: if the source speaks on it during the window (an ABORT, or it
    closed), the window ends at once with that. With ``wrap`` (TLS: a server-side ``wrap_tls``)
    each connection first completes that handshake, on a thread of its own so a slow or silent
    one holds up nobody; its JOIN is then read from the plain end it returns."""

    def __init__(self, listener: socket.socket, main: socket.socket, *, count: int, token: bytes, key: bytes | None,
                 hello: bytes, challenge: bytes, timeout: float, watcher: CancelWatcher, notes: list[str],
                 wrap: Callable[[socket.socket], socket.socket] | None = None) -> None:
        self.listener, self.main = listener, main
        self.count, self.token, self.key = count, token, key
        self.hello, self.challenge = hello, challenge
        self.timeout = timeout
        self.watcher = watcher
        self.notes = notes
        self.joined: dict[int, socket.socket] = {}
        self.refused = 0
        self._pending: dict[socket.socket, tuple[bytearray, str]] = {}
        self.wrap = wrap
        self._lock = threading.Lock()
        self._handshaking: dict[socket.socket, threading.Thread] = {}  # raw connection -> its TLS handshake
        self._handshaken: list[tuple[socket.socket | None, str, BaseException | None]] = []
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()

    def run(self) -> list[socket.socket]:
        """The data sockets in stream order (1..n-1), blocking. Raises MigrationTimeout when the
        window closes first, Aborted/ConnectionLost when the source gives up on ``main``."""
        deadline = time.monotonic() + self.timeout
        sel = selectors.DefaultSelector()
        self.listener.setblocking(False)
        sel.register(self.listener, selectors.EVENT_READ, "listener")
        sel.register(self.main, selectors.EVENT_READ, "main")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while len(self.joined) < self.count - 1:
                if self.watcher.cancelled():
                    raise Cancelled("cancelled while data streams joined")
                left = deadline - time.monotonic()
                if left <= 0:
                    why = f"; {self.refused} connection(s) refused" if self.refused else ""
                    raise MigrationTimeout(f"only {len(self.joined)} of {self.count - 1} data streams joined within "
                                           f"{self.timeout:g} s{why}")
                for key, _ in sel.select(min(left, 0.1)):
                    if key.data == "listener":
                        self._accept(sel)
                    elif key.data == "main":
                        self._main_spoke()
                    elif key.data == "wake":
                        self._take_handshaken(sel)
                    else:
                        self._read_join(sel, key.fileobj)
                self._read_buffered(sel)
            return [self.joined[i] for i in range(1, self.count)]
        except BaseException:
            for sock in self.joined.values():
                sock.close()
            raise
        finally:
            self._end_handshakes()
            for sock, (_, peer) in list(self._pending.items()):
                sock.close()
                self._note(peer, "closed when the join window ended, before it had sent a whole JOIN")
            self._pending.clear()
            sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        try:
            conn, peer = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            if self.watcher.fired:
                raise Cancelled("cancelled while data streams joined") from None
            raise MigrationError(f"accepting a data connection failed: {err.strerror or err}") from None
        if len(self._pending) + len(self._handshaking) >= MAX_PENDING:
            self._note(format_address(*peer[:2]), f"more than {MAX_PENDING} connections waiting to join")
            conn.close()
            return
        fit_send_buffer(conn)
        if self.wrap is not None:
            thread = threading.Thread(target=self._handshake, args=(conn, format_address(*peer[:2])), name="join-tls", daemon=True)
            with self._lock:
                self._handshaking[conn] = thread
            thread.start()
            return
        self._add_pending(sel, conn, format_address(*peer[:2]))

    def _add_pending(self, sel: selectors.BaseSelector, conn: socket.socket, peer: str) -> None:
        conn.setblocking(False)
        self._pending[conn] = (bytearray(), peer)
        sel.register(conn, selectors.EVENT_READ, "join")

    def _read_buffered(self, sel: selectors.BaseSelector) -> None:
        """Read the JOINs that already arrived with a TLS handshake: their plaintext waits in the
        TLS session, where select() does not see it (bounded: a JOIN is two reads)."""
        for _ in range(4):
            ready = [conn for conn in self._pending if buffered(conn)]
            if not ready:
                return
            for conn in ready:
                self._read_join(sel, conn)

    def _handshake(self, conn: socket.socket, peer: str) -> None:
        try:
            wrapped, error = self.wrap(conn), None
        except BaseException as err:
            wrapped, error = None, err
        with self._lock:
            self._handshaking.pop(conn, None)
            if self._closed:  # the window ended meanwhile
                if wrapped is not None:
                    wrapped.close()
                return
            self._handshaken.append((wrapped, peer, error))
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _take_handshaken(self, sel: selectors.BaseSelector) -> None:
        try:
            self._wake_r.recv(4096)
        except OSError:
            pass
        with self._lock:
            done, self._handshaken = self._handshaken, []
        for wrapped, peer, error in done:
            if wrapped is None:
                self._note(peer, f"TLS handshake failed: {error}")
            else:
                self._add_pending(sel, wrapped, peer)

    def _end_handshakes(self) -> None:
        """Handshakes still running when the window ends are cut short (their TCP shut down) and
        waited for; ones that finished unread are closed."""
        with self._lock:
            self._closed = True
            running = dict(self._handshaking)
            done, self._handshaken = self._handshaken, []
        for conn in running:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in running.values():
            thread.join(5)
            self._note("a data connection", "its TLS handshake was not done when the join window ended")
        for wrapped, _, _ in done:
            if wrapped is not None:
                wrapped.close()

    def _main_spoke(self) -> None:
        set_io_timeout(self.main, 1.0)
        try:
            frame = P.read_frame(self.main, allowed=(P.MessageType.ABORT,))
        except ProtocolError as err:
            raise ProtocolError(f"the source spoke on the main connection before every data stream joined: {err}") from None
        raise Aborted(f"source aborted: {P.decode_abort(frame.payload)}")

    def _read_join(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        buf, peer = self._pending[conn]
        want = (P.HEADER_SIZE if len(buf) < P.HEADER_SIZE else _JOIN_FRAME_MAX) - len(buf)
        try:
            chunk = conn.recv(max(want, 1))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._drop(sel, conn, peer, f"connection failed before its JOIN: {err.strerror or err}", answer=False)
            return
        if not chunk:
            self._drop(sel, conn, peer, f"closed after {len(buf)} bytes, before a complete JOIN", answer=False)
            return
        buf += chunk
        if len(buf) < P.HEADER_SIZE:
            return
        try:
            # Only a JOIN is read from a connection that has not joined: anything else is refused
            # from its header, and a JOIN's payload is at most 67 bytes.
            msg_type, length, _ = P.decode_header(bytes(buf[:P.HEADER_SIZE]))
            if msg_type is not P.MessageType.JOIN:
                raise ProtocolError(f"expected JOIN on a data connection, got {msg_type.name}")
            if len(buf) < P.HEADER_SIZE + length:
                return
            frame = P.decode_frame(bytes(buf[:P.HEADER_SIZE + length]))
            join = P.decode_join(frame.payload)
            self._check(join, frame.raw)
        except ProtocolError as err:
            self._drop(sel, conn, peer, str(err), answer=True)
            return
        sel.unregister(conn)
        del self._pending[conn]
        proof = P.joined_proof(self.key, self.hello, self.challenge, frame.raw) if self.key is not None else b""
        try:
            set_io_timeout(conn, 1.0)
            P.write_frame(conn, P.MessageType.ACCEPT, P.encode_accept(P.Accept(P.Stage.JOIN, proof)))
        except MigrationError as err:
            conn.close()
            self._note(peer, f"stream {join.index} joined but the ACCEPT could not be sent: {err}")
            return
        self.joined[join.index] = conn

    def _check(self, join: P.Join, raw: bytes) -> None:
        if not P.proofs_equal(join.token, self.token):
            raise ProtocolError("JOIN: wrong session token")
        if self.key is not None:
            if not join.mac:
                raise ProtocolError("JOIN: this destination requires a key and the JOIN carries no proof")
            if not P.proofs_equal(join.mac, P.join_proof(self.key, self.hello, self.challenge, join.index, join.token)):
                raise ProtocolError("JOIN: authentication failed: the proof does not match this destination's key")
        if not 1 <= join.index < self.count:
            raise ProtocolError(f"JOIN: stream index {join.index} is out of range: this session has data streams 1 to {self.count - 1}")
        if join.index in self.joined:
            raise ProtocolError(f"JOIN: stream {join.index} has already joined")

    def _drop(self, sel: selectors.BaseSelector, conn: socket.socket, peer: str, reason: str, *, answer: bool) -> None:
        sel.unregister(conn)
        del self._pending[conn]
        if answer:
            try:
                set_io_timeout(conn, 1.0)
                P.write_frame(conn, P.MessageType.REFUSE, P.encode_refuse(P.Refuse(P.Stage.JOIN, reason)))
            except MigrationError:
                pass
        conn.close()
        self._note(peer, reason)

    def _note(self, peer: str, reason: str) -> None:
        self.refused += 1
        if self.refused <= MAX_NOTED:
            self.notes.append(f"refused a data connection from {peer}: {reason}")


def new_token() -> bytes:
    return os.urandom(P.TOKEN_SIZE)


# -- destination: one round on n streams -----------------------------------------------------------


def receive_round(recv: Callable[[socket.socket], dict], socks: list[socket.socket], *, round_number: int,
                  cancelled: Callable[[], bool], join_timeout: float) -> list[dict[str, int]]:
    """Receive one round's share on every socket at once, one thread each; ``recv`` is
    ``GuestMemory.recv_share`` (the memory core reads a stream's batches until its empty one, GIL
    released, charging a budget the streams share). Returns its totals per stream, in ``socks``
    order. On the first failure the other streams' reads are shut down so the call returns at
    once; the first failure is raised, naming its stream (the source's ABORT on the main
    connection, seen while the others still read, explains the rest and comes first)."""
    lock = threading.Lock()
    failures: list[tuple[int, BaseException]] = []
    results: list[dict[str, int] | None] = [None] * len(socks)

    def one(index: int) -> None:
        try:
            if cancelled():
                raise Cancelled(f"cancelled during round {round_number}")
            results[index] = recv(socks[index])
        except BaseException as err:
            with lock:
                failures.append((index, err))
                first = len(failures) == 1
            if first:
                for other, sock in enumerate(socks):
                    if other != index:
                        shutdown_quietly(sock, socket.SHUT_RD)

    def fail_all(index: int, err: BaseException) -> None:
        # The source's ABORT on the main connection explains whatever the other streams saw.
        # The main connection looking closed does not, once a stream has failed: that stream's
        # failure shut the main connection's reads down itself.
        with lock:
            if isinstance(err, Aborted) or not failures:
                failures.insert(0, (index, err))
            else:
                failures.append((index, err))
        for sock in socks:
            shutdown_quietly(sock, socket.SHUT_RD)

    threads = [threading.Thread(target=one, args=(i,), name=f"migration-stream-{i}", daemon=True) for i in range(1, len(socks))]
    for thread in threads:
        thread.start()
    one(0)
    if not failures:
        _watch_main(socks[0], threads, fail_all)
    for thread in threads:
        thread.join(join_timeout)
        if thread.is_alive():
            # Cannot happen while every read has a timeout (SO_RCVTIMEO) shorter than join_timeout.
            failures.append((threads.index(thread) + 1, MigrationTimeout(f"round {round_number}: a stream's receive did not end within {join_timeout:g} s")))
            for sock in socks:
                shutdown_quietly(sock, socket.SHUT_RD)
    if failures:
        index, err = failures[0]
        raise receive_error(err, f"round {round_number}", stream=index) if isinstance(err, PageBatchError) else err
    return [r for r in results if r is not None]


def _watch_main(main: socket.socket, threads: list[threading.Thread], fail_all: Callable[[int, BaseException], None]) -> None:
    """While the other streams still read, watch the main connection, whose share of the round is
    in: if the source gives up there (an ABORT, or it closed), end the round now rather than after
    the other streams' receive timeout. Anything else on it (MEMORY_END, sent as soon as the
    source has written every batch) is left for the caller."""
    deadline = time.monotonic() + 3600  # bounded: the threads end by their own receive timeouts well before
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        readable = buffered(main) or select.select([main], [], [], 0.05)[0]
        if not readable:
            continue
        try:
            head = main.recv(P.HEADER_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as err:
            fail_all(0, ConnectionLost(f"connection lost while the other streams carried the round: {err.strerror or err}"))
            return
        if not head:
            fail_all(0, ConnectionLost("the source closed the main connection while the other streams carried the round"))
            return
        if len(head) < 8:
            time.sleep(0.005)  # the rest of the header is on its way
            continue
        if int.from_bytes(head[6:8], "little") != P.MessageType.ABORT:
            return
        try:
            frame = P.read_frame(main, allowed=(P.MessageType.ABORT,))
            fail_all(0, Aborted(f"source aborted: {P.decode_abort(frame.payload)}"))
        except MigrationError as err:
            fail_all(0, err)
        return


def measure_local_throughput_streams(host: str, streams: int, seconds: float = 0.3) -> float:
    """Bytes/s that ``streams`` TCP connections carry together from this process to listeners on
    ``host`` (an address of this machine): ``net.measure_local_throughput`` run ``streams`` times
    at once, the rates added. One stream is exactly that probe."""
    from .net import measure_local_throughput

    if not 1 <= streams <= P.MAX_STREAMS:
        raise ValueError(f"the probe uses 1 to {P.MAX_STREAMS} streams, got {streams}")
    if streams == 1:
        return measure_local_throughput(host, seconds)
    rates: list[float] = []
    failures: list[BaseException] = []
    lock = threading.Lock()

    def probe() -> None:
        try:
            rate = measure_local_throughput(host, seconds)
            with lock:
                rates.append(rate)
        except BaseException as err:
            with lock:
                failures.append(err)

    threads = [threading.Thread(target=probe, name=f"bandwidth-probe-{i}", daemon=True) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 15)
    if failures or len(rates) != streams:
        why = failures[0] if failures else "a probe did not finish"
        raise MigrationError(f"bandwidth probe over {streams} streams on {host} failed: {why}")
    return sum(rates)
