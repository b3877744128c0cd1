"""TLS for migration connections: mutual TLS 1.3, ended in a relay thread.

The memory core writes and reads page batches with sendmsg/readv on a raw file descriptor, which
an ``ssl.SSLSocket`` cannot give it: its bytes on the descriptor are ciphertext. So TLS ends in a
relay. ``wrap_tls`` runs the handshake on the TCP socket, then starts one pump thread that moves
bytes between the TLS connection (an ``ssl.SSLObject`` over in-memory BIOs, fed from and drained
to the TCP socket) and one end of a ``socket.socketpair()``; the caller gets the other end, a
plain blocking stream socket (``TlsSocket``). Frames, Rust page batches, SO_RCVTIMEO/SO_SNDTIMEO
timeouts and the cancel watcher's ``shutdown`` all work on it as on TCP.

One thread drives both directions (OpenSSL forbids using one connection from two threads at
once); the cryptography itself runs with the GIL released. Backpressure is the kernel's: the pump
reads a chunk only when the previous one has been handed on, so a peer that stops reading fills
the socket buffers and the caller's send times out, as on plain TCP.

Owns: ``TlsConfig`` (certificate files -> contexts, with errors naming the file), the handshake
(deadline, errors for an untrusted peer, a refused certificate and a peer that does not speak
TLS), the relay (both directions, end of stream and failures passed on, a bounded close). Does not
own: what travels (protocol.py), the stream's timeouts (the caller sets them on the returned
socket), the shared-key authentication (protocol.py), which still runs inside TLS when given.
"""

from __future__ import annotations

import fcntl
import logging
import select
import socket
import ssl
import struct
import termios
import threading
import time
from dataclasses import dataclass

from . import protocol as P
from .errors import AuthenticationError, ConnectionLost, MigrationError, MigrationTimeout, ProtocolError, Refused
from .net import shutdown_quietly

log = logging.getLogger("vmmpy.migration.tls")

#: Bytes the pump moves per step in each direction (read from one side, en- or decrypted, written
#: to the other). Small steps cost Python overhead per step; 1 MiB keeps that under a few percent.
RELAY_CHUNK = 1 << 20
#: Kernel buffers asked for on the socketpair between the caller and the pump.
PAIR_BUFFER_BYTES = 4 << 20
#: How long closing the returned socket waits for the pump to pass the last bytes, close_notify
#: and FIN on and for the peer's kernel to acknowledge them, before it cuts the connection.
CLOSE_LINGER = 5.0

_TLS_HANDSHAKE_RECORD = 0x16  # the first byte of a ClientHello
_PLAINTEXT_MAGIC = P.MAGIC  # the first bytes of a plaintext vmmpy frame


# -- certificates -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS for one side of a migration: the certificate this side presents, its private
    key, and the CA that must have signed the peer's certificate. ``hostname`` (source only) is
    the name the destination's certificate must carry; by default the host connected to."""

    cert: str
    key: str
    ca: str
    hostname: str | None = None

    def __post_init__(self) -> None:
        self.context(server_side=False)  # refuse unreadable or mismatched files now, naming them

    def to_dict(self) -> dict[str, str | None]:
        return {"cert": self.cert, "key": self.key, "ca": self.ca, "hostname": self.hostname}

    @classmethod
    def from_dict(cls, d: dict) -> TlsConfig:
        unknown = set(d) - {"cert", "key", "ca", "hostname"}
        if unknown:
            raise ValueError(f"tls: unknown fields {', '.join(sorted(unknown))}")
        missing = [name for name in ("cert", "key", "ca") if not isinstance(d.get(name), str)]
        if missing:
            raise ValueError(f"tls: mutual TLS needs a certificate, its key and a CA; missing {', '.join(missing)}")
        return cls(d["cert"], d["key"], d["ca"], d.get("hostname"))

    def context(self, *, server_side: bool) -> ssl.SSLContext:
        """A TLS 1.3-only context that presents ``cert`` and requires a peer certificate signed
        by ``ca`` (and, as a client, carrying the expected name)."""
        cert_text = _read_pem(self.cert, "--tls-cert", "a certificate")
        key_text = _read_pem(self.key, "--tls-key", "a private key")
        ca_text = _read_pem(self.ca, "--tls-ca", "a CA certificate")
        if "-----BEGIN CERTIFICATE-----" not in cert_text:
            raise ValueError(f"--tls-cert {self.cert}: no PEM certificate in it (expected '-----BEGIN CERTIFICATE-----')")
        if "PRIVATE KEY-----" not in key_text:
            raise ValueError(f"--tls-key {self.key}: no PEM private key in it (expected '-----BEGIN ... PRIVATE KEY-----')")
        if "-----BEGIN CERTIFICATE-----" not in ca_text:
            raise ValueError(f"--tls-ca {self.ca}: no PEM certificate in it (expected '-----BEGIN CERTIFICATE-----')")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as err:
            if "KEY_VALUES_MISMATCH" in str(err) or "key values mismatch" in str(err):
                raise ValueError(f"--tls-key {self.key} is not the private key of the certificate in --tls-cert {self.cert}") from None
            raise ValueError(f"--tls-cert {self.cert} / --tls-key {self.key}: OpenSSL cannot load them ({_reason(err)}); "
                             "an encrypted key is not supported") from None
        try:
            ctx.load_verify_locations(cafile=self.ca)
        except ssl.SSLError as err:
            raise ValueError(f"--tls-ca {self.ca}: OpenSSL cannot load it ({_reason(err)})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED  # the server side too: mutual TLS
        if server_side:
            # The source learns its certificate was accepted from the first ticket (wrap_tls).
            ctx.num_tickets = 1
        return ctx


def _read_pem(path: str, option: str, what: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as err:
        raise ValueError(f"{option} {path}: cannot read {what}: {err.strerror or err}") from None
    return data.decode("ascii", errors="replace")


def _reason(err: ssl.SSLError) -> str:
    return getattr(err, "verify_message", None) or err.reason or str(err)


# -- the socket the caller gets ------------------------------------------------------------------
class TlsSocket(socket.socket):
    """The caller's end of the relay: a plain blocking stream socket (one end of a socketpair).
    Closing it passes the last bytes on, sends TLS close_notify, and closes the TCP connection
    (bounded by ``CLOSE_LINGER``)."""

    relay: _Relay | None = None

    @property
    def relay_error(self) -> str | None:
        """Why the relay stopped early (a TLS alert, a reset), or None."""
        return self.relay.error if self.relay is not None else None

    def tls_summary(self) -> str:
        """For the statistics' notes: protocol, cipher, and whose certificate the peer showed."""
        relay = self.relay
        return relay.summary if relay is not None else "closed"

    def close(self) -> None:
        super().close()
        relay, self.relay = self.relay, None
        if relay is not None:
            relay.close()


# -- the handshake -------------------------------------------------------------------------------
def wrap_tls(sock: socket.socket, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None,
             timeout: float = 10.0, chunk: int = RELAY_CHUNK, linger: float = CLOSE_LINGER) -> TlsSocket:
    """Run a TLS handshake on the connected TCP ``sock`` (within ``timeout`` s) and return the
    plain end of a relay to it. ``sock`` belongs to the relay from now on: closing the returned
    socket closes it, and a failed handshake closes it at once (closing it again is harmless).

    The client's handshake ends only when the server has accepted its certificate: TLS 1.3 lets a
    client finish before the server has looked at the client's certificate, so the client waits
    for the server's first message after the handshake (a session ticket, sent only once the
    certificate was verified) or its alert. Failures raise the engine's errors: AuthenticationError
    (the peer's certificate is not trusted), Refused (the peer refused ours), ProtocolError (the
    peer does not speak TLS, or not 1.3), MigrationTimeout, ConnectionLost."""
    peer_role = "source" if server_side else "destination"
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        sslobj = context.wrap_bio(incoming, outgoing, server_side=server_side,
                                  server_hostname=None if server_side else server_hostname)
        hs = _Handshake(sock, sslobj, incoming, outgoing, time.monotonic() + timeout, timeout, peer_role)
        if server_side:
            hs.refuse_plaintext_source()
        hs.run()
        early = b"" if server_side else hs.wait_for_acceptance()
    except BaseException:
        shutdown_quietly(sock)
        sock.close()
        raise
    sock.settimeout(None)
    inner, outer = socket.socketpair()
    app = TlsSocket(fileno=outer.detach())
    for s in (inner, app):
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, PAIR_BUFFER_BYTES)
            except OSError:
                pass
    app.relay = _Relay(sock, inner, sslobj, incoming, outgoing, early, chunk=chunk, linger=linger, peer_role=peer_role)
    return app


class _Handshake:
    def __init__(self, sock, sslobj, incoming, outgoing, deadline, timeout, peer_role) -> None:
        self.sock, self.sslobj, self.incoming, self.outgoing = sock, sslobj, incoming, outgoing
        self.deadline, self.timeout, self.peer_role = deadline, timeout, peer_role
        self.received = bytearray()  # the first raw bytes, to recognise a plaintext answer

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self._settimeout()
            try:
                self.sock.sendall(data)
            except TimeoutError:
                raise MigrationTimeout(f"TLS handshake: the {self.peer_role} took nothing for {self.timeout:g} s") from None
            except OSError as err:
                raise ConnectionLost(f"TLS handshake: connection lost while sending: {err.strerror or err}") from None

    def _settimeout(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise MigrationTimeout(f"TLS handshake with the {self.peer_role} did not finish within {self.timeout:g} s")
        self.sock.settimeout(left)

    def _receive(self) -> None:
        self._settimeout()
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise MigrationTimeout(f"TLS handshake with the {self.peer_role} did not finish within {self.timeout:g} s") from None
        except OSError as err:
            raise ConnectionLost(f"TLS handshake: connection lost: {err.strerror or err}") from None
        if not data:
            self._plaintext_answer()
            raise ConnectionLost(f"the {self.peer_role} closed the connection during the TLS handshake")
        if len(self.received) < 4096:
            self.received += data[:4096]
        self.incoming.write(data)

    def refuse_plaintext_source(self) -> None:
        """Server side: a plaintext vmmpy source sends HELLO at once; say what is wrong (the
        destination's ABORT then reaches the source in the plaintext it speaks)."""
        self._settimeout()
        try:
            first = self.sock.recv(4, socket.MSG_PEEK)
        except TimeoutError:
            raise MigrationTimeout(f"TLS handshake: the source sent nothing within {self.timeout:g} s") from None
        except OSError as err:
            raise ConnectionLost(f"TLS handshake: connection lost: {err.strerror or err}") from None
        if first and _PLAINTEXT_MAGIC.startswith(first):
            why = ("the source speaks plaintext, but this destination requires TLS "
                   "(give vmmctl --tls-cert, --tls-key and --tls-ca)")
            _drain(self.sock)  # read its HELLO, so that closing does not reset the connection under the ABORT
            try:
                self.sock.settimeout(1.0)
                self.sock.sendall(P.encode_frame(P.MessageType.ABORT, P.encode_abort(why)))
            except OSError:
                pass
            raise ProtocolError(why)

    def run(self) -> None:
        while True:
            try:
                self.sslobj.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                self._receive()
            except ssl.SSLError as err:
                try:
                    self._flush()  # the alert tells the peer why
                except MigrationError:
                    pass
                self._plaintext_answer()
                raise self._explain(err) from None

    def wait_for_acceptance(self) -> bytes:
        """Client side, after the handshake: read until the server's first post-handshake record
        has been processed (session ticket: accepted) or an alert arrives (refused)."""
        early = bytearray()
        buf = bytearray(16384)
        while True:
            try:
                while True:
                    n = self.sslobj.read(len(buf), buf)
                    if n == 0:
                        raise ConnectionLost(f"the {self.peer_role} closed TLS right after the handshake")
                    early += buf[:n]
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                raise ConnectionLost(f"the {self.peer_role} closed TLS right after the handshake") from None
            except ssl.SSLError as err:
                raise self._explain(err) from None
            session = self.sslobj.session
            if early or (session is not None and session.has_ticket):
                return bytes(early)
            self._flush()
            self._receive()

    def _plaintext_answer(self) -> None:
        """Client side: a plaintext vmmpy destination answers a ClientHello with ABORT."""
        if self.peer_role != "destination" or not self.received.startswith(_PLAINTEXT_MAGIC):
            return
        reason = "it answered in plaintext"
        try:
            head = bytes(self.received[:P.HEADER_SIZE])
            msg_type, length, _ = P.decode_header(head)
            payload = bytes(self.received[P.HEADER_SIZE:P.HEADER_SIZE + length])
            if msg_type is P.MessageType.ABORT and len(payload) == length:
                reason = f"it answered in plaintext: {P.decode_abort(payload)}"
        except MigrationError:
            pass
        raise ProtocolError(f"the destination does not speak TLS (started without --tls-cert?); {reason}")

    def _explain(self, err: ssl.SSLError) -> MigrationError:
        why = _reason(err)
        if isinstance(err, ssl.SSLCertVerificationError):
            if self.peer_role == "destination":
                hint = " (or name the certificate's host with --tls-hostname)" if "mismatch" in why.lower() else ""
                return AuthenticationError(f"the destination's TLS certificate is not trusted: {why}; it must be signed by "
                                           f"the CA in --tls-ca and name the host connected to{hint}")
            return Refused(f"the source's TLS certificate is not trusted: {why}; it must be signed by this destination's --tls-ca")
        alert = str(err.reason or err).lower().replace("_", " ")
        if "alert" in alert and any(word in alert for word in ("unknown ca", "bad certificate", "certificate unknown",
                                                              "certificate required", "decrypt error")):
            return Refused(f"the {self.peer_role} refused this host's TLS certificate ({why}): it must be signed by the CA "
                           f"the {self.peer_role} trusts (its --tls-ca)")
        if "unsupported protocol" in alert or "protocol version" in alert:
            return ProtocolError(f"TLS handshake with the {self.peer_role} failed: {why} (vmmpy requires TLS 1.3)")
        if "wrong version number" in alert or "http request" in alert or "unexpected eof" in alert or "record layer" in alert:
            return ProtocolError(f"TLS handshake with the {self.peer_role} failed: {why}; does the {self.peer_role} use TLS?")
        return ProtocolError(f"TLS handshake with the {self.peer_role} failed: {why}")


def _subject(sslobj: ssl.SSLObject) -> str:
    cert = sslobj.getpeercert() or {}
    names = [f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    alt = [v for kind, v in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    issuer = [v for rdn in cert.get("issuer", ()) for k, v in rdn if k == "commonName"]
    text = ", ".join(names + alt) or "no names"
    return text + (f" (issued by {issuer[0]})" if issuer else "")


def _drain(sock: socket.socket, limit: int = 1 << 16) -> None:
    try:
        sock.settimeout(0.2)
        got = 0
        while got < limit and (data := sock.recv(4096)):
            got += len(data)
            sock.settimeout(0.0)
    except OSError:
        pass
    finally:
        sock.settimeout(None)


def reject_tls_client(sock: socket.socket) -> None:
    """For a destination without TLS: when the source's first byte opens a TLS handshake, refuse
    it by name (ProtocolError) instead of reporting a bad frame. ``sock`` is blocking with
    SO_RCVTIMEO, as the engine sets it."""
    try:
        first = sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, TimeoutError):
        raise MigrationTimeout("timed out waiting for the source's HELLO (0 bytes arrived)") from None
    except OSError as err:
        raise ConnectionLost(f"connection lost while reading the source's HELLO: {err.strerror or err}") from None
    if first and first[0] == _TLS_HANDSHAKE_RECORD:
        _drain(sock)
        raise ProtocolError("the source started a TLS handshake, but this destination does not use TLS "
                            "(give vmmrun -R --tls-cert, --tls-key and --tls-ca, or migrate without them)")


# -- the relay -----------------------------------------------------------------------------------
class _Relay:
    """One pump thread between ``raw`` (TCP, carrying TLS records) and ``inner`` (the pump's end
    of the socketpair). The app->peer direction ends when the caller shuts down or closes its end
    (close_notify, then FIN); the peer->app direction ends at the peer's close_notify or FIN
    (the caller then reads end of stream). A failure (reset, bad record, alert) shuts both ends
    down, so a blocked caller wakes with end of stream or EPIPE."""

    POLL_MS = 200  # how often an idle pump looks at the stop flag

    def __init__(self, raw, inner, sslobj, incoming, outgoing, early: bytes, *, chunk: int, linger: float, peer_role: str) -> None:
        self.raw, self.inner = raw, inner
        self.sslobj, self.incoming, self.outgoing = sslobj, incoming, outgoing
        self.chunk = chunk
        self.linger = linger
        self.peer_role = peer_role
        self.error: str | None = None
        self.clean_end = False  # the peer's close_notify arrived
        cipher = sslobj.cipher()
        self.summary = f"encrypted with {sslobj.version()} ({cipher[0] if cipher else '?'}); the {peer_role}'s certificate: {_subject(sslobj)}"
        self._early = early
        self._stop = threading.Event()
        self._sent_all = threading.Event()  # close_notify and FIN handed to TCP, or the pump ended
        self._thread = threading.Thread(target=self._run, name=f"migration-tls-{peer_role}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._pump()
        except ssl.SSLError as err:
            why = _reason(err).replace("_", " ").lower()
            if "bad record mac" in why or "decryption failed" in why:
                why += ": the stream was altered on the way"
            self.error = f"TLS: {why}"
        except OSError as err:
            self.error = f"connection to the {self.peer_role}: {err.strerror or err}"
        except Exception as err:
            self.error = f"TLS relay: {type(err).__name__}: {err}"
        finally:
            self._sent_all.set()
            if self.error is not None:
                log.info("migration TLS relay stopped: %s", self.error)
            shutdown_quietly(self.inner)
            shutdown_quietly(self.raw)

    def _pump(self) -> None:
        raw, inner, sslobj = self.raw, self.inner, self.sslobj
        raw.setblocking(False)
        inner.setblocking(False)
        up_buf, down_buf, raw_buf = bytearray(self.chunk), bytearray(self.chunk), bytearray(self.chunk)
        up_view, down_view, raw_view = memoryview(up_buf), memoryview(down_buf), memoryview(raw_buf)
        to_raw = memoryview(b"")  # ciphertext not yet taken by TCP
        to_app = memoryview(bytes(self._early))  # plaintext not yet taken by the caller's end
        up_open = True  # still reading the caller's end
        down_open = True  # still reading the peer
        notify_due = False  # the caller's end ended: close_notify as soon as it is safe
        fin_due = False  # close_notify is queued: FIN once to_raw is out
        app_told = False  # the caller has been given end of stream (or has closed its end)
        raw_eof = False
        poller = select.poll()
        while not self._stop.is_set():
            # CPython's unwrap() calls SSL_shutdown twice; the second call reads the peer's
            # records waiting for its close_notify and throws application data away. So send
            # ours only when OpenSSL holds no unread record: nothing then is lost.
            if notify_due and (not down_open or (not self.incoming.pending and not sslobj.pending())):
                try:
                    sslobj.unwrap()
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    pass
                to_raw = _append(to_raw, self.outgoing.read())
                notify_due, fin_due = False, True
            if fin_due and not to_raw:
                shutdown_quietly(raw, socket.SHUT_WR)
                fin_due = False
                self._sent_all.set()
            if not down_open and not to_app and not app_told:
                shutdown_quietly(inner, socket.SHUT_WR)
                app_told = True
            if not up_open and not notify_due and not fin_due and not to_raw and not down_open and app_told:
                return
            # Decrypt what has arrived before waiting for more.
            if down_open and not to_app and (self.incoming.pending or sslobj.pending() or raw_eof):
                n, down_open = self._decrypt(down_buf, down_view, raw_eof)
                to_app = down_view[:0] if app_told else down_view[:n]
                if self.outgoing.pending:  # a post-handshake message to answer
                    to_raw = _append(to_raw, self.outgoing.read())
                if n or not down_open:
                    continue
            raw_events = (select.POLLIN if down_open and not to_app and not raw_eof else 0) | (select.POLLOUT if to_raw else 0)
            app_events = (select.POLLIN if up_open and not to_raw else 0) | (select.POLLOUT if to_app else 0)
            for sock, events in ((raw, raw_events), (inner, app_events)):
                if events:
                    poller.register(sock, events)
                else:
                    try:
                        poller.unregister(sock)
                    except KeyError:
                        pass
            ready = dict(poller.poll(self.POLL_MS))
            if not ready:
                continue
            rev, aev = ready.get(raw.fileno(), 0), ready.get(inner.fileno(), 0)
            if to_raw and rev:
                try:
                    to_raw = to_raw[raw.send(to_raw):]
                except BlockingIOError:
                    pass
            if rev and down_open and not to_app and not raw_eof:
                try:
                    n = raw.recv_into(raw_buf)
                except BlockingIOError:
                    n = -1
                except OSError as err:
                    # Reset: what was decrypted still reaches the caller, then end of stream;
                    # nothing more can be sent, so its writes fail (EPIPE).
                    self.error = f"connection to the {self.peer_role}: {err.strerror or err}"
                    n = 0
                    up_open = notify_due = fin_due = False
                    to_raw = memoryview(b"")
                    shutdown_quietly(inner, socket.SHUT_RD)
                if n == 0:
                    raw_eof = True
                    self.incoming.write_eof()
                elif n > 0:
                    self.incoming.write(raw_view[:n])
            if to_app and aev:
                try:
                    to_app = to_app[inner.send(to_app):]
                except BlockingIOError:
                    pass
                except OSError:  # the caller closed its end: read the peer to its end, drop the data
                    to_app = memoryview(b"")
                    app_told = True
            if up_open and not to_raw and aev & ~select.POLLOUT:
                try:
                    n = inner.recv_into(up_buf)
                except BlockingIOError:
                    n = -1
                except OSError:
                    n = 0
                if n == 0:
                    up_open = False
                    notify_due = True
                elif n > 0:
                    sslobj.write(up_view[:n])
                    to_raw = _append(to_raw, self.outgoing.read())

    def _decrypt(self, buf: bytearray, view: memoryview, raw_eof: bool) -> tuple[int, bool]:
        """Plaintext from what has arrived into ``buf``; returns (bytes, whether the peer->app
        direction is still open)."""
        got = 0
        try:
            while got < len(buf):
                n = self.sslobj.read(len(buf) - got, view[got:])
                if n == 0:  # the peer's close_notify (CPython returns 0 rather than raising)
                    self.clean_end = True
                    return got, False
                got += n
        except ssl.SSLWantReadError:
            if raw_eof:
                return got, False
        except ssl.SSLZeroReturnError:
            self.clean_end = True
            return got, False
        except ssl.SSLEOFError:
            if self.error is None:
                self.error = f"the {self.peer_role} closed the connection without ending TLS (close_notify)"
            return got, False
        return got, True

    def close(self) -> None:
        """Called once the caller's end is closed. Waits (at most ``linger`` s in all) until the
        pump has handed the last bytes, close_notify and FIN to TCP and the peer's kernel has
        acknowledged every byte; then stops the pump and closes. It never waits for the peer to
        close its side: once acknowledged, the bytes reach the peer even if this end resets."""
        deadline = time.monotonic() + self.linger
        self._sent_all.wait(self.linger)
        for _ in range(int(self.linger / 0.005) + 1):  # bounded: linger in 5 ms steps
            if not self._thread.is_alive() or _unacknowledged(self.raw) == 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.005)
        self._stop.set()
        shutdown_quietly(self.raw)
        shutdown_quietly(self.inner)
        self._thread.join(2.0)
        for s in (self.inner, self.raw):
            try:
                s.close()
            except OSError:
                pass


def with_relay_error(message: str, sock: socket.socket | None) -> str:
    """``message`` with the TLS relay's reason added, when the relay is why the stream ended
    (an alert, a record that failed its check, a reset): the engine saw only end of stream."""
    why = getattr(sock, "relay_error", None)
    return f"{message} ({why})" if why and why not in message else message


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes in the TCP send queue not yet acknowledged by the peer (SIOCOUTQ)."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    except (OSError, ValueError):
        return 0


def _append(pending: memoryview, data: bytes) -> memoryview:
    if not pending:
        return memoryview(data)
    return memoryview(bytes(pending) + data)
