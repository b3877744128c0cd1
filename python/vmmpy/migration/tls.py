"""TLS for migration connections: mutual TLS 1.3, ended in the memory core (rustls).

The memory core writes and reads page batches on the connection itself, so TLS ends where the
bytes are: ``wrap_tls`` runs the handshake in the core (``_core.TlsStream``) on the TCP socket and
returns it as a ``TlsSocket``, the same TCP socket whose sends and receives go through the core's
TLS session. The frames of protocol.py and the core's page batches (handed the session through
``TlsSocket.core_link``) share that one session: batches are encrypted straight from guest memory
and decrypted straight into it, with no relay thread and no copy beside the cipher's.
SO_RCVTIMEO/SO_SNDTIMEO timeouts and the cancel watcher's ``shutdown`` work on it as on TCP.

Owns: ``TlsConfig`` (certificate files -> the core's identity, with errors naming the file), the
handshake's errors in the user's terms (deadline, an untrusted peer, a refused certificate, a
peer that does not speak TLS), and the socket's close (close_notify, then FIN). Does not own: what
travels (protocol.py), the stream's timeouts (the caller sets them on the returned socket), the
shared-key authentication (protocol.py), which still runs inside TLS when given.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from .. import _core
from . import protocol as P
from .errors import AuthenticationError, ConnectionLost, MigrationError, MigrationTimeout, ProtocolError, Refused
from .net import send_timeout, set_io_timeout, shutdown_quietly

#: How long closing waits at most for close_notify to leave (a peer that stopped reading must not
#: hold a close for the whole send timeout).
CLOSE_NOTIFY_TIMEOUT = 1.0

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
        self.identity()  # refuse unreadable, malformed or mismatched files now, naming them

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

    def identity(self) -> _core.TlsIdentity:
        """The core's TLS 1.3 identity: ``cert`` presented with ``key``, and ``ca`` as the only
        authority a peer's certificate may lead to (mutual TLS: on both sides)."""
        cert_text = _read_pem(self.cert, "--tls-cert", "a certificate")
        key_text = _read_pem(self.key, "--tls-key", "a private key")
        ca_text = _read_pem(self.ca, "--tls-ca", "a CA certificate")
        if b"-----BEGIN CERTIFICATE-----" not in cert_text:
            raise ValueError(f"--tls-cert {self.cert}: no PEM certificate in it (expected '-----BEGIN CERTIFICATE-----')")
        if b"PRIVATE KEY-----" not in key_text:
            raise ValueError(f"--tls-key {self.key}: no PEM private key in it (expected '-----BEGIN ... PRIVATE KEY-----')")
        if b"ENCRYPTED PRIVATE KEY-----" in key_text:
            raise ValueError(f"--tls-key {self.key}: the key is encrypted; an encrypted key is not supported")
        if b"-----BEGIN CERTIFICATE-----" not in ca_text:
            raise ValueError(f"--tls-ca {self.ca}: no PEM certificate in it (expected '-----BEGIN CERTIFICATE-----')")
        try:
            return _core.TlsIdentity(cert_text, key_text, ca_text)
        except ValueError as err:
            part, _, why = str(err).partition(": ")
            if part == "ca":
                raise ValueError(f"--tls-ca {self.ca}: cannot use it ({why})") from None
            if part == "key" and ("mismatch" in why.lower() or "inconsistent" in why.lower()):
                raise ValueError(f"--tls-key {self.key} is not the private key of the certificate in --tls-cert {self.cert}") from None
            raise ValueError(f"--tls-cert {self.cert} / --tls-key {self.key}: cannot use them ({why})") from None


def _read_pem(path: str, option: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as err:
        raise ValueError(f"{option} {path}: cannot read {what}: {err.strerror or err}") from None


# -- the socket the caller gets ------------------------------------------------------------------
class TlsSocket(socket.socket):
    """The TCP socket of a TLS connection, whose sends and receives go through the core's TLS
    session (``tls``). Everything else (timeouts, shutdown, the peer's address) is the TCP
    socket's own. Closing it sends close_notify first."""

    tls: _core.TlsStream | None = None
    peer_role = "peer"

    @property
    def core_link(self) -> _core.TlsStream | None:
        """What the memory core writes page batches to and reads them from (``GuestMemory``)."""
        return self.tls

    @property
    def tls_error(self) -> str | None:
        """Why the TLS stream stopped early (a record that failed its check, an alert, a peer that
        closed without close_notify), or None."""
        return self.tls.failure if self.tls is not None else None

    def tls_summary(self) -> str:
        """For the statistics' notes: protocol, cipher, and whose certificate the peer showed."""
        if self.tls is None:
            return "closed"
        return f"{self.tls.summary}; the {self.peer_role}'s certificate: {self.tls.peer_names}"

    def pending(self) -> int:
        """Plaintext that arrived and is not read yet: a read takes it without waiting, and
        select() on the socket does not see it."""
        return self.tls.pending() if self.tls is not None else 0

    def sendall(self, data, flags: int = 0) -> None:
        if self.tls is None:
            raise OSError(errno.EBADF, "the TLS connection is closed")
        try:
            self.tls.sendall(bytes(data) if not isinstance(data, bytes) else data)
        except _core.PageBatchError as err:
            if err.errno == errno.EAGAIN:
                raise TimeoutError(errno.EAGAIN, str(err)) from None
            raise

    def send(self, data, flags: int = 0) -> int:
        self.sendall(data)
        return len(data)

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        if self.tls is None:
            raise OSError(errno.EBADF, "the TLS connection is closed")
        block = self.getblocking() and not flags & socket.MSG_DONTWAIT
        return self.tls.recv_into(buffer, nbytes, block=block, peek=bool(flags & socket.MSG_PEEK))

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        buf = bytearray(bufsize)
        n = self.recv_into(buf, bufsize, flags)
        return bytes(buf[:n])

    def close(self) -> None:
        tls, self.tls = self.tls, None
        if tls is not None and self.fileno() != -1:
            try:
                set_io_timeout(self, min(send_timeout(self) or CLOSE_NOTIFY_TIMEOUT, CLOSE_NOTIFY_TIMEOUT))
                tls.close_notify()
                shutdown_quietly(self, socket.SHUT_WR)
            except OSError:
                pass
            tls.detach()
        super().close()


# -- the handshake -------------------------------------------------------------------------------
def wrap_tls(sock: socket.socket, config: TlsConfig, *, server_side: bool, server_hostname: str | None = None,
             timeout: float = 10.0) -> TlsSocket:
    """Run a TLS handshake on the connected TCP ``sock`` (within ``timeout`` s) and return it as
    a ``TlsSocket``. ``sock`` is consumed: a failed handshake closes it.

    The client's handshake ends only when the server has accepted its certificate (the core waits
    for the server's session ticket or its alert). Failures raise the engine's errors:
    AuthenticationError (the peer's certificate is not trusted), Refused (the peer refused ours),
    ProtocolError (the peer does not speak TLS, or not 1.3), MigrationTimeout, ConnectionLost."""
    peer_role = "source" if server_side else "destination"
    try:
        identity = config.identity()
        if server_side:
            _refuse_plaintext_source(sock, timeout)
        sock.setblocking(True)
        stream = _core.TlsStream.handshake(sock.fileno(), identity, server_side=server_side,
                                           server_name=None if server_side else server_hostname, timeout=timeout)
    except _core.TlsHandshakeError as err:
        shutdown_quietly(sock)
        sock.close()
        raise _explain(err, peer_role, timeout, server_hostname) from None
    except BaseException:
        shutdown_quietly(sock)
        sock.close()
        raise
    wrapped = TlsSocket(fileno=sock.detach())
    wrapped.tls, wrapped.peer_role = stream, peer_role
    return wrapped


def _refuse_plaintext_source(sock: socket.socket, timeout: float) -> None:
    """Server side: a plaintext vmmpy source sends HELLO at once; say what is wrong (the
    destination's ABORT then reaches the source in the plaintext it speaks)."""
    sock.settimeout(timeout)
    try:
        first = sock.recv(4, socket.MSG_PEEK)
    except TimeoutError:
        raise MigrationTimeout(f"TLS handshake: the source sent nothing within {timeout:g} s") from None
    except OSError as err:
        raise ConnectionLost(f"TLS handshake: connection lost: {err.strerror or err}") from None
    if first and _PLAINTEXT_MAGIC.startswith(first):
        why = ("the source speaks plaintext, but this destination requires TLS "
               "(give vmmctl --tls-cert, --tls-key and --tls-ca)")
        _drain(sock)  # read its HELLO, so that closing does not reset the connection under the ABORT
        try:
            sock.settimeout(1.0)
            sock.sendall(P.encode_frame(P.MessageType.ABORT, P.encode_abort(why)))
        except OSError:
            pass
        raise ProtocolError(why)


def _plaintext_answer(received: bytes) -> ProtocolError | None:
    """Client side: a plaintext vmmpy destination answers a ClientHello with ABORT."""
    if not received.startswith(_PLAINTEXT_MAGIC):
        return None
    reason = "it answered in plaintext"
    try:
        msg_type, length, _ = P.decode_header(received[:P.HEADER_SIZE])
        payload = received[P.HEADER_SIZE:P.HEADER_SIZE + length]
        if msg_type is P.MessageType.ABORT and len(payload) == length:
            reason = f"it answered in plaintext: {P.decode_abort(payload)}"
    except MigrationError:
        pass
    return ProtocolError(f"the destination does not speak TLS (started without --tls-cert?); {reason}")


def _explain(err: _core.TlsHandshakeError, peer_role: str, timeout: float, host: str | None) -> MigrationError:
    kind, why = err.kind, err.detail
    if peer_role == "destination" and (answer := _plaintext_answer(bytes(err.received))) is not None:
        return answer
    if kind == "timeout":
        return MigrationTimeout(f"TLS handshake with the {peer_role} did not finish within {timeout:g} s")
    if kind == "closed":
        return ConnectionLost(f"the {peer_role} closed the connection during the TLS handshake")
    if kind == "io":
        return ConnectionLost(f"TLS handshake: connection lost: {why}")
    if kind == "untrusted":
        if peer_role == "destination":
            hint = " (or name the certificate's host with --tls-hostname)" if "mismatch" in why.lower() else ""
            return AuthenticationError(f"the destination's TLS certificate is not trusted: {why}; it must be signed by "
                                       f"the CA in --tls-ca and name the host connected to ({host}){hint}")
        return Refused(f"the source's TLS certificate is not trusted: {why}; it must be signed by this destination's --tls-ca")
    if kind == "refused":
        return Refused(f"the {peer_role} refused this host's TLS certificate ({why}): it must be signed by the CA "
                       f"the {peer_role} trusts (its --tls-ca)")
    if kind == "version":
        return ProtocolError(f"TLS handshake with the {peer_role} failed: {why} (vmmpy requires TLS 1.3)")
    if kind == "not-tls":
        return ProtocolError(f"TLS handshake with the {peer_role} failed: {why}; does the {peer_role} use TLS?")
    return ProtocolError(f"TLS handshake with the {peer_role} failed: {why}")


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


def with_tls_error(message: str, sock: socket.socket | None) -> str:
    """``message`` with the TLS stream's reason added, when TLS is why the stream ended (an
    alert, a record that failed its check, a peer that closed without close_notify)."""
    why = getattr(sock, "tls_error", None)
    return f"{message} ({why})" if why and why not in message else message
