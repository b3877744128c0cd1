"""The destination side: listen, accept one connection, run the receiver state machine.

Nothing but HELLO and AUTH (each a few dozen bytes) is read before the source has proven it holds
the key (when this side has one); nothing but SPEC before it is accepted. Memory rounds go straight
into guest memory through the memory core; state is restored before the commit, and the guest
runs only after COMMITTED. Any other ending discards the guest (``adapter.discard()``), after
telling the source why when the connection still works.
"""

from __future__ import annotations

import enum
import os
import socket
import threading
import time

from ..memory import PageBatchError
from ..state import SectionError, decode_sections
from . import protocol as P
from .adapter import MigrationAdapter
from .convergence import MigrationParams
from .digest import InBackground
from .errors import Aborted, Cancelled, ConnectionLost, MigrationError, ProtocolError, Refused, receive_error
from .net import CancelWatcher, format_address, listen, set_io_timeout
from .stats import MigrationStats, RoundStats
from .streams import JoinWindow, new_token, receive_round
from .tls import TlsConfig, TlsSocket, reject_tls_client, with_relay_error, wrap_tls


class RxState(enum.Enum):
    AWAIT_HELLO = "await-hello"
    AWAIT_AUTH = "await-auth"
    AWAIT_SPEC = "await-spec"
    READY = "ready"
    JOINING = "joining"  # v3: data streams connecting after STREAMS
    RECEIVING = "receiving"
    HAVE_STATE = "have-state"
    AWAIT_COMMITTED = "await-committed"
    RUNNING = "running"
    DISCARDED = "discarded"


class Destination:
    """A listening destination. ``address`` is known as soon as it is built (port 0 picks one)."""

    def __init__(
        self,
        adapter: MigrationAdapter,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        key: bytes | None = None,
        params: MigrationParams | None = None,
        cancel: threading.Event | None = None,
        tls: TlsConfig | None = None,
    ) -> None:
        self.adapter = adapter
        self.key = key
        self.tls = tls
        self.params = params or MigrationParams()
        self.cancel = cancel
        self.listener = listen(host, port)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]

    def run(self, accept_timeout: float = 60.0) -> MigrationStats:
        """Wait for one source (at most ``accept_timeout`` s) and receive its guest."""
        watcher = CancelWatcher(self.cancel)
        watcher.watch(self.listener)
        try:
            self.listener.settimeout(accept_timeout)
            try:
                conn, peer = self.listener.accept()
            except (TimeoutError, socket.timeout):
                self.listener.close()
                stats = MigrationStats(role="destination")
                stats.finish("failed", f"no source connected to {format_address(*self.address)} within {accept_timeout:g} s")
                self.adapter.discard()
                return stats
            except OSError as err:
                self.listener.close()
                stats = MigrationStats(role="destination")
                status = "cancelled" if watcher.fired else "failed"
                stats.finish(status, "cancelled while listening" if watcher.fired else f"accept failed: {err}")
                self.adapter.discard()
                return stats
        except BaseException:
            self.listener.close()
            raise
        finally:
            watcher.close()
        # The listener stays open for the data streams a version 3 source may ask for; the
        # receiver closes it as soon as they have joined or the first round begins.
        try:
            return serve_connection(self.adapter, conn, key=self.key, params=self.params, cancel=self.cancel,
                                    peer=format_address(*peer[:2]), tls=self.tls, listener=self.listener)
        finally:
            conn.close()
            self.listener.close()

    def close(self) -> None:
        self.listener.close()


def receive(adapter: MigrationAdapter, host: str, port: int, key: bytes | None = None, *, params: MigrationParams | None = None,
            cancel: threading.Event | None = None, accept_timeout: float = 60.0, tls: TlsConfig | None = None) -> MigrationStats:
    """Listen on ``host:port``, accept one source, receive its guest; returns the statistics."""
    return Destination(adapter, host, port, key=key, params=params, cancel=cancel, tls=tls).run(accept_timeout)


def serve_connection(adapter: MigrationAdapter, conn: socket.socket, *, key: bytes | None = None,
                     params: MigrationParams | None = None, cancel: threading.Event | None = None,
                     peer: str | None = None, tls: TlsConfig | None = None,
                     listener: socket.socket | None = None) -> MigrationStats:
    """Run the receiver state machine on an accepted (or any stream) socket. With ``tls`` the
    source must first complete mutual TLS 1.3 on it (``vmmpy.migration.tls``); without, a source
    that opens a TLS handshake is refused by name. With ``listener`` (the one ``conn`` came from)
    a version 3 source may open parallel data streams on it; the receiver closes it when the join
    window ends. Without one, STREAMS is refused."""
    return _Receiver(adapter, conn, key, params or MigrationParams(), cancel, peer, tls, listener).run()


class _Receiver:
    #: The protocol versions this destination speaks (a test plays an older destination).
    versions: tuple[int, ...] = P.PROTOCOL_VERSIONS

    def __init__(self, adapter, conn, key, params, cancel, peer, tls=None, listener=None) -> None:
        if key is not None and len(key) < 16:
            raise ValueError(f"migration key must be at least 16 bytes, got {len(key)}")
        self.adapter = adapter
        self.memory = adapter.memory
        self.conn = conn
        self.key = key
        self.tls = tls
        self.params = params
        self.watcher = CancelWatcher(cancel)
        self.state = RxState.AWAIT_HELLO
        self.stats = MigrationStats(role="destination", peer=peer)
        self.total_pages = sum(seg.pages for seg in self.memory.segments)
        self.next_round = 0
        self.have_all_pages = False
        self.tracker = self.memory.digest_tracker()  # hashes (or marks) every page received: exact in both verify modes
        self.digest_job: InBackground[int] | None = None
        self.restored = False
        self.refused_reason: str | None = None
        self.listener = listener  # open only until the data streams have joined or round 0 begins
        self.data_conns: list[socket.socket] = []  # streams 1..n-1 (protocol v3)
        self.transcript: tuple[bytes, bytes] = (b"", b"")  # HELLO and CHALLENGE as sent: the JOIN proofs bind them
        self.version = P.PROTOCOL_VERSIONS[0]
        self.compression: str | None = None  # the codec agreed for page batches

    def run(self) -> MigrationStats:
        self.watcher.watch(self.conn)
        if self.listener is not None:
            self.watcher.watch(self.listener)
        try:
            set_io_timeout(self.conn, self.params.handshake_timeout)
            if self.tls is not None:
                # The relay owns the TCP socket from here; closing self.conn closes both.
                self.conn = wrap_tls(self.conn, self.tls.context(server_side=True), server_side=True,
                                     timeout=self.params.handshake_timeout)
                self.watcher.watch(self.conn)
                self.stats.notes.append(self.conn.tls_summary())
                set_io_timeout(self.conn, self.params.handshake_timeout)
            else:
                reject_tls_client(self.conn)
            self._receive()
        except BaseException as err:  # noqa: BLE001 - every failure discards the half-received guest
            self._fail(err)
            if not isinstance(err, Exception):
                raise
        finally:
            self.watcher.close()
            self._join_hashing()
            if isinstance(self.conn, TlsSocket):
                self.conn.close()
            self._close_listener()
            for sock in self.data_conns:
                sock.close()
        return self.stats

    def _join_hashing(self) -> None:
        """No hashing thread outlives the transfer (its error, after a failure, adds nothing)."""
        if self.digest_job is not None:
            self.digest_job.join()

    def _close_listener(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    # -- frames ----------------------------------------------------------------------------------
    def _read(self, *expected: P.MessageType) -> P.Frame:
        frame = P.read_frame(self.conn, max_state=self.params.max_state_bytes, allowed=expected,
                             where=f" in state {self.state.value}")
        self.stats.bytes_total += len(frame.raw)
        if frame.type is P.MessageType.ABORT:
            raise Aborted(f"source aborted: {P.decode_abort(frame.payload)}")
        return frame

    def _send(self, msg_type: P.MessageType, payload: bytes = b"") -> bytes:
        return P.write_frame(self.conn, msg_type, payload)

    def _refuse(self, stage: P.Stage, reason: str) -> None:
        self.refused_reason = reason
        try:
            self._send(P.MessageType.REFUSE, P.encode_refuse(P.Refuse(stage, reason)))
        except MigrationError:
            pass
        raise Refused(f"refused the source ({stage.name.lower()}): {reason}")

    # -- the state machine -----------------------------------------------------------------------
    def _receive(self) -> None:
        hello_frame = self._read(P.MessageType.HELLO)
        hello = P.decode_hello(hello_frame.payload)
        common = set(hello.versions) & set(self.versions)
        nonce = os.urandom(P.NONCE_SIZE)
        version = max(common) if common else self.versions[-1]
        challenge = self._send(P.MessageType.CHALLENGE, P.encode_challenge(P.Challenge(version, self.key is not None, nonce)))
        self.transcript = (hello_frame.raw, challenge)
        self.state = RxState.AWAIT_AUTH
        auth_frame = self._read(P.MessageType.AUTH)
        mac = P.decode_auth(auth_frame.payload)
        if not common:
            self._refuse(P.Stage.AUTH, f"no common protocol version: the source speaks {sorted(hello.versions)}, "
                                       f"this destination {sorted(self.versions)}")
        self.stats.protocol_version = version
        self.version = version
        proof = b""
        if self.key is not None:
            if not mac:
                self._refuse(P.Stage.AUTH, "this destination requires a migration key and the source sent none")
            if not P.proofs_equal(mac, P.source_proof(self.key, hello_frame.raw, challenge)):
                self._refuse(P.Stage.AUTH, "authentication failed: the source's proof does not match this destination's key")
            proof = P.destination_proof(self.key, hello_frame.raw, challenge, auth_frame.raw)
        self._send(P.MessageType.ACCEPT, P.encode_accept(P.Accept(P.Stage.AUTH, proof)))

        self.state = RxState.AWAIT_SPEC
        spec = P.decode_spec(self._read(P.MessageType.SPEC).payload, self.version)
        self.stats.live = spec.live
        try:
            self.adapter.check_spec(spec.to_dict())
        except Exception as err:  # noqa: BLE001 - the adapter's reason goes to the source as is
            self._refuse(P.Stage.SPEC, str(err) or type(err).__name__)
        # Take the source's first offered codec this side knows, unless told not to.
        if self.params.accept_compression:
            self.compression = next((c for c in spec.compression if c in P.CODECS), None)
        self.stats.compression = self.compression
        self._send(P.MessageType.ACCEPT, P.encode_accept(P.Accept(P.Stage.SPEC, compression=self.compression), self.version))
        self.stats.setup_time_ms = self.stats.elapsed_ms()
        self.stats.status = "active"
        set_io_timeout(self.conn, self.params.io_timeout)

        self.state = RxState.READY
        while True:
            allowed = (P.MessageType.MEMORY, P.MessageType.STATE) if self.state is RxState.READY else (P.MessageType.COMMIT_REQUEST,)
            if self._may_ask_streams():
                allowed = (*allowed, P.MessageType.STREAMS)
            frame = self._read(*allowed)
            if frame.type is P.MessageType.STREAMS and self._may_ask_streams():
                self._join_streams(P.decode_streams(frame.payload))
                continue
            self._close_listener()  # the join window is over for good
            if frame.type is P.MessageType.MEMORY and self.state is RxState.READY:
                if self.digest_job is not None:
                    raise ProtocolError("MEMORY after the final round: nothing may change memory once it is final")
                self._receive_round(P.decode_memory(frame.payload))
            elif frame.type is P.MessageType.STATE and self.state is RxState.READY:
                self._restore(frame.payload)
            elif frame.type is P.MessageType.COMMIT_REQUEST and self.state is RxState.HAVE_STATE:
                self._commit(P.decode_digest(frame.type, frame.payload))
                return
            else:
                raise ProtocolError(f"unexpected {frame.type.name} in state {self.state.value}")

    def _may_ask_streams(self) -> bool:
        return (self.state is RxState.READY and (self.stats.protocol_version or 1) >= P.STREAMS_VERSION
                and self.next_round == 0 and not self.data_conns)

    def _join_streams(self, count: int) -> None:
        """STREAMS: hand out a session token, then accept count-1 data connections that prove
        they belong to this session (``streams.JoinWindow``)."""
        if self.listener is None:
            self._refuse(P.Stage.STREAMS, "this destination was handed one connection, not a listener: it takes one stream only")
        token = new_token()
        self._send(P.MessageType.STREAMS_TOKEN, P.encode_streams_token(P.StreamsToken(count, token)))
        self.state = RxState.JOINING
        hello, challenge = self.transcript
        wrap = None
        if self.tls is not None:  # each data connection must pass mutual TLS too before its JOIN is read
            def wrap(sock: socket.socket) -> socket.socket:
                return wrap_tls(sock, self.tls.context(server_side=True), server_side=True, timeout=self.params.handshake_timeout)
        window = JoinWindow(self.listener, self.conn, count=count, token=token, key=self.key, hello=hello, challenge=challenge,
                            timeout=self.params.handshake_timeout, watcher=self.watcher, notes=self.stats.notes, wrap=wrap)
        try:
            socks = window.run()
        finally:
            self._close_listener()
        for sock in socks:
            self.watcher.watch(sock)
            set_io_timeout(sock, self.params.io_timeout)
        self.data_conns = socks
        self.stats.streams = count
        self.state = RxState.READY

    def _receive_round_streams(self, memory: P.Memory) -> tuple[int, int, int, int, list[int]]:
        """One round on every stream at once; returns (batches, data pages, zero pages, wire bytes
        with the end markers, wire bytes per stream)."""
        def recv(sock: socket.socket) -> dict[str, int]:
            got = self.memory.recv_pages(sock, tracker=self.tracker)
            if got["compressed_batches"] and self.compression is None:
                raise ProtocolError(f"round {memory.round}: the source sent a compressed page batch, but no compression was agreed")
            return got

        per = receive_round(recv, [self.conn, *self.data_conns], round_number=memory.round,
                            page_limit=self.total_pages, cancelled=self.watcher.cancelled,
                            join_timeout=self.params.io_timeout + 10)
        return (sum(s["batches"] for s in per), sum(s["data_pages"] for s in per), sum(s["zero_pages"] for s in per),
                sum(s["wire_bytes"] for s in per), [s["wire_bytes"] for s in per])

    def _receive_round(self, memory: P.Memory) -> None:
        if memory.round != self.next_round:
            raise ProtocolError(f"MEMORY announces round {memory.round}, expected round {self.next_round}")
        if memory.round == 0 and not memory.flags & P.MemoryFlags.ALL_PAGES:
            raise ProtocolError("round 0 must carry all pages (ALL_PAGES flag missing)")
        self.state = RxState.RECEIVING
        start = time.monotonic()
        batches = data_pages = zero_pages = wire = compressed = saved = 0
        stream_bytes: list[int] = []
        fd = self.conn.fileno()
        if self.data_conns:
            batches, data_pages, zero_pages, wire, stream_bytes = self._receive_round_streams(memory)
        while not self.data_conns:  # one stream: its batches, one at a time, until the empty one
            if self.watcher.cancelled():
                raise Cancelled(f"cancelled during round {memory.round}")
            try:
                got = self.memory.recv_pages(fd, tracker=self.tracker)
            except PageBatchError as err:
                raise receive_error(err, f"round {memory.round}") from None
            wire += got["wire_bytes"]
            if got["ranges"] == 0:
                break
            batches += 1
            data_pages += got["data_pages"]
            zero_pages += got["zero_pages"]
            if got["compressed_batches"] and self.compression is None:
                raise ProtocolError(f"round {memory.round}: the source sent a compressed page batch, but no compression was agreed")
            compressed += got["compressed_batches"]
            saved += got["saved_bytes"]
            # A round sends each page at most once: more is a broken or hostile source.
            if data_pages + zero_pages > self.total_pages:
                raise ProtocolError(f"round {memory.round} carried more pages ({data_pages + zero_pages}) than the guest has ({self.total_pages})")
        self.stats.bytes_total += wire
        end = P.decode_memory_end(self._read(P.MessageType.MEMORY_END).payload)
        ends = P.BATCH_HEADER_SIZE * (1 + len(self.data_conns))  # one end-of-round batch per stream
        mine = P.MemoryEnd(memory.round, batches, data_pages, zero_pages, wire - ends)
        if end != mine:
            raise ProtocolError(f"round {memory.round}: the source says it sent {end.batches} batches, {end.data_pages} data and "
                                f"{end.zero_pages} zero pages in {end.wire_bytes} bytes (round {end.round}); {batches}, "
                                f"{data_pages}, {zero_pages} and {mine.wire_bytes} arrived")
        if memory.flags & P.MemoryFlags.ALL_PAGES:
            if data_pages + zero_pages != self.total_pages:
                raise ProtocolError(f"round {memory.round} claims all pages but carried {data_pages + zero_pages} of {self.total_pages}")
            self.have_all_pages = True
        duration = time.monotonic() - start
        self.stats.add_round(RoundStats(
            round=memory.round, final=bool(memory.flags & P.MemoryFlags.FINAL), pages_dirtied=data_pages + zero_pages,
            pages_sent=data_pages, zero_pages=zero_pages, bytes=wire, duration_ms=duration * 1000,
            throughput=wire / duration if duration > 0 else 0.0, dirty_rate=0.0, throttle=0.0, stream_bytes=stream_bytes,
            compressed_batches=compressed, saved_bytes=saved))
        self.next_round += 1
        self.state = RxState.READY
        if memory.flags & P.MemoryFlags.FINAL:
            # No page changes after the final round, and every page was hashed as it arrived:
            # combine while the state and the commit request arrive.
            self.digest_job = InBackground(self.tracker.digest)

    def _restore(self, blob: bytes) -> None:
        if not self.have_all_pages:
            raise ProtocolError("STATE arrived before a round carrying all pages")
        try:
            sections = decode_sections(blob, what="migration stream")
        except SectionError as err:
            raise ProtocolError(str(err)) from None
        self.stats.state_bytes = len(blob)
        t = time.monotonic()
        try:
            self.adapter.restore_sections(sections)
        except Exception as err:  # noqa: BLE001 - named and sent to the source as the abort reason
            raise MigrationError(f"restoring the guest's state failed: {err}") from None
        self.restored = True
        self.stats.downtime_breakdown["restore_ms"] = (time.monotonic() - t) * 1000
        self.state = RxState.HAVE_STATE

    def _commit(self, source_digest: int) -> None:
        t = time.monotonic()
        mine = self.digest_job.result() if self.digest_job is not None else self.tracker.digest()
        self.stats.downtime_breakdown["digest_ms"] = (time.monotonic() - t) * 1000  # the wait not hidden by the transfer
        if mine != source_digest:
            raise MigrationError(f"memory digest mismatch: source {source_digest:#034x}, destination {mine:#034x}; "
                                 "the memory that arrived is not the source's")
        set_io_timeout(self.conn, self.params.commit_timeout)
        self._send(P.MessageType.COMMIT_ACK, P.encode_digest(mine))
        self.state = RxState.AWAIT_COMMITTED
        frame = self._read(P.MessageType.COMMITTED)
        P.decode_empty(frame.type, frame.payload)
        # From here the guest is ours whatever happens: the source has stopped for good.
        self.state = RxState.RUNNING
        t = time.monotonic()
        self.adapter.start_running()
        started = time.monotonic() - t
        self.stats.downtime_breakdown["start_ms"] = started * 1000
        try:
            # Tells the source when the downtime ended; the guest runs whether or not it arrives.
            self._send(P.MessageType.RESUMED, P.encode_resumed(int(started * 1e6)))
        except (MigrationError, OSError):
            self.stats.notes.append("could not tell the source the guest runs (RESUMED); it runs")
        self.stats.finish("completed")

    # -- failure ---------------------------------------------------------------------------------
    def _fail(self, err: BaseException) -> None:
        cancelled = isinstance(err, Cancelled) or self.watcher.fired
        if cancelled and not isinstance(err, Cancelled):
            message = f"cancelled in state {self.state.value}"
        elif isinstance(err, MigrationError):
            message = str(err)
        else:
            message = f"{type(err).__name__} in state {self.state.value}: {err}"
        if not cancelled:
            message = with_relay_error(message, self.conn)
        if self.state is RxState.RUNNING:
            self.stats.notes.append(f"after commit: {message}")
            self.stats.finish("completed")
            return
        if not isinstance(err, (Aborted, Refused, ConnectionLost)) and not self.watcher.fired:
            try:
                set_io_timeout(self.conn, 1.0)
                self._send(P.MessageType.ABORT, P.encode_abort(message))
            except (MigrationError, OSError):
                pass
        self.state = RxState.DISCARDED
        self._join_hashing()
        self.adapter.discard()
        self.stats.finish("cancelled" if cancelled else "failed", message)
