"""Sockets for migration: address parsing, connect/listen on IPv4 and IPv6 and on Unix sockets
(a local migration's ``unix:PATH``), kernel-level timeouts, cancellation that interrupts a blocked
transfer, and bandwidth pacing.

A Unix address travels where a TCP one does, as the host ``unix:PATH`` (an absolute path) with
port 0: ``format_address`` prints it as given, ``connect`` and ``listen`` open AF_UNIX sockets.
A listener's path is made mode 0600 (the owner only) as it is bound; a path a live listener holds
is refused, a stale socket left by a killed process is replaced, anything else is refused.

Page batches are moved by the memory core on a raw fd, which must be blocking; a Python socket
timeout would make it non-blocking. So every socket here is blocking with SO_RCVTIMEO and
SO_SNDTIMEO set: a stalled peer turns into EAGAIN after the timeout, in Rust and Python alike,
and the engine reports it as a timeout naming the peer and the seconds (``errors.peer_stalled``).
Where bytes are handed on in a loop (the memory core's sends, the pacing relay) the timeout counts
from the last byte the peer took: a sleeping send that copied part of its bytes returns only when
its timeout runs out, and the next one would wait the whole timeout again. Cancellation shuts the
socket down from a watcher thread, which wakes any blocked send or receive at once.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable

from .errors import ConnectionLost, MigrationError, MigrationTimeout, peer_stalled

DEFAULT_PORT = 24983  # bhyve's DEFAULT_MIGRATION_PORT
#: Kernel send buffer asked for on migration sockets, each stream's. With the default (16 KiB to
#: start, autotuned) a round's single large sendmsg and the receiver's readv into guest memory
#: ping-pong in small steps; 4 MiB buffers measured 1 GiB of pages over loopback at several times
#: the default's rate. The kernel caps the request at net.core.wmem_max and then doubles it.
#:
#: The receive buffer is left to the kernel's autotuning: asking for one (SO_RCVBUF) locks it, and
#: Linux 6.18 advertises about 98 % of a locked buffer as the window (by the ratio of payload to
#: memory the socket has seen). A reader that falls behind by a window, as one stream's does while
#: the others hold both CPUs, lets the queue reach the buffer's limit, and the kernel drops the
#: next segments where an unlocked buffer would grow. The receiver, waiting for a whole window
#: (SO_RCVLOWAT), and the sender, its window full, then wait for the sender's retransmission timer
#: (200 ms and more). Measured in session 38 (docs/performance.md): a warm ``--streams 4``
#: migration over loopback on 2 CPUs lost segments in a quarter to all of the runs of a set, and
#: one stream sat out almost the whole round; with the receive buffer autotuned none were lost.
#: The kernel grows a buffer only while its reader keeps up, to at most net.ipv4.tcp_rmem's
#: largest (32 MiB on the VM measured, 6 MiB by default): a destination stopped mid-round may hold
#: that much per stream, where a locked buffer held 2 MiB (8 MiB from another host); a connection
#: nobody reads keeps the kernel's starting size (128 KiB) where it inherited the listener's
#: locked 8 MiB before.
SOCKET_BUFFER_BYTES = 4 << 20
#: The same for a connection whose two ends are on one host (loopback, or this host's own
#: address): bytes in flight are read again while still in the shared caches, where 4 streams of
#: 4 MiB kept 32 MiB in flight. Alternated A/B over loopback, session 14 (docs/performance.md),
#: when both buffers were set: 1 GiB wired with 4 streams 0.358 -> 0.320 s, 2 streams 0.355 ->
#: 0.318 s, one 0.441 -> 0.397 s. A connection to another host keeps SOCKET_BUFFER_BYTES: its
#: bandwidth-delay product was not measured, and a smaller window would only cap it.
LOCAL_SOCKET_BUFFER_BYTES = 1 << 20


def set_send_buffer(sock: socket.socket, size: int = SOCKET_BUFFER_BYTES) -> None:
    """Ask for a ``size``-byte kernel send buffer (best effort: capped by sysctls). The receive
    buffer stays the kernel's to size (see SOCKET_BUFFER_BYTES)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except OSError:
        pass


def peer_on_this_host(sock: socket.socket) -> bool:
    """Whether a connected TCP socket's peer is on this host: a loopback address, or this end's
    own address (a migration to the host's external address). False when it cannot tell."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        mine, theirs = sock.getsockname()[0], sock.getpeername()[0]
    except (OSError, IndexError, TypeError):
        return False
    return theirs == mine or is_loopback_address(theirs)


def is_loopback_address(host: str) -> bool:
    """Whether ``host`` names this host's loopback: ``localhost``, 127.0.0.0/8, ``::1``, or
    127.0.0.0/8 written as an IPv4-mapped IPv6 address (``::ffff:127.0.0.1``, what a dual-stack
    listener sees of an IPv4 peer), with or without an IPv6 zone (``%lo``)."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def fit_send_buffer(sock: socket.socket) -> None:
    """A connected TCP socket's send buffer for where its peer is: LOCAL_SOCKET_BUFFER_BYTES on
    this host, else SOCKET_BUFFER_BYTES (which listeners and new connections already have)."""
    if peer_on_this_host(sock):
        set_send_buffer(sock, LOCAL_SOCKET_BUFFER_BYTES)


UNIX_PREFIX = "unix:"


def is_unix(host: str) -> bool:
    """Whether ``host`` is a Unix socket address (``unix:PATH``)."""
    return host.startswith(UNIX_PREFIX)


def unix_path(host: str) -> str:
    return host[len(UNIX_PREFIX):]


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``HOST,PORT`` (bhyve's form), ``[V6]:PORT``, ``[V6]`` or a bare IPv6
    address (``::1``, whose colons are not a port separator); or ``unix:PATH``, returned as
    (``unix:ABSOLUTE-PATH``, 0)."""
    text = text.strip()
    if not text:
        raise ValueError("migration address is empty; expected HOST[:PORT], HOST,PORT or [IPV6]:PORT")
    if is_unix(text):
        path = unix_path(text)
        if not path:
            raise ValueError(f"migration address {text!r} has no path; expected unix:PATH")
        if "\0" in path:
            raise ValueError(f"migration address {text!r}: a path may not hold a NUL byte")
        return UNIX_PREFIX + os.path.abspath(path), 0
    host, port_text = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"migration address {text!r}: '[' without a closing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if rest[0] not in ":,":
                raise ValueError(f"migration address {text!r}: expected ':PORT' after ']', got {rest!r}")
            port_text = rest[1:]
    elif "," in text:
        host, port_text = text.rsplit(",", 1)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise ValueError(f"migration address {text!r} has no host")
    if port_text is None:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"migration address {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"migration address {text!r}: port {port} is out of range 0-65535")
    return host, port


def format_address(host: str, port: int) -> str:
    if is_unix(host):
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def set_io_timeout(sock: socket.socket, seconds: float) -> None:
    """Blocking socket whose every send and receive gives up after ``seconds`` (EAGAIN)."""
    sock.setblocking(True)
    sec = int(seconds)
    usec = int((seconds - sec) * 1_000_000)
    tv = struct.pack("ll", sec, max(usec, 1 if sec == 0 else 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def core_endpoint(sock: socket.socket):
    """What the memory core reads and writes ``sock``'s bytes through: a TLS connection's session
    in the core (``TlsSocket.core_link``, which holds whatever plaintext it already opened), or the
    fd of a plain socket."""
    link = getattr(sock, "core_link", None)
    return link if link is not None else sock.fileno()


def for_page_requests(sock: socket.socket, seconds: float):
    """Ready ``sock`` for post-copy's page exchange (small requests, each answered at once): its
    I/O timeout, no Nagle delay (TCP only). Returns what the core exchanges pages on
    (``core_endpoint``)."""
    set_io_timeout(sock, seconds)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return core_endpoint(sock)


def send_timeout(sock: socket.socket) -> float | None:
    """The socket's SO_SNDTIMEO in seconds, None when it has none."""
    try:
        sec, usec = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.calcsize("ll")))
    except OSError:
        return None
    return (sec + usec / 1e6) or None


def peer_address(sock: socket.socket) -> str | None:
    """``HOST:PORT`` of the TCP peer (a TLS connection's too: its socket is the TCP one); None
    when there is none."""
    try:
        addr = sock.getpeername()
    except OSError:
        return None
    if isinstance(addr, tuple):
        return format_address(addr[0], addr[1])
    return None


class PeerStalled(OSError):
    """The peer took nothing for the socket's whole send timeout (``timeout`` seconds)."""

    def __init__(self, timeout: float | None) -> None:
        super().__init__(errno.EAGAIN, "the peer took nothing within the send timeout")
        self.timeout = timeout


def send_within_timeout(sock: socket.socket, data: memoryview, stop: threading.Event | None = None) -> None:
    """``sock.sendall(data)`` on a blocking socket, except that its SO_SNDTIMEO counts from the
    last byte the peer took (PeerStalled after that long without one). Never sleeps in the kernel,
    so it sees ``stop`` within a fifth of a second."""
    last = time.monotonic()
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while data:
        try:
            n = sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            timeout = send_timeout(sock)
            left = None if timeout is None else timeout - (time.monotonic() - last)
            if left is not None and left <= 0:
                raise PeerStalled(timeout) from None
            if stop is not None and stop.is_set():
                raise InterruptedError(errno.EINTR, "the relay was stopped") from None
            poller.poll(int(min(0.2, left if left is not None else 0.2) * 1000) + 1)
            continue
        data = data[n:]
        last = time.monotonic()


def connect(host: str, port: int, *, timeout: float) -> socket.socket:
    where = format_address(host, port)
    if is_unix(host):
        return _connect_unix(unix_path(host), where, timeout)
    try:
        sock = _open_tcp(host, port, timeout)
    except ConnectionRefusedError:
        raise ConnectionLost(f"cannot connect to {where}: connection refused (is the destination listening?)") from None
    except TimeoutError:
        raise MigrationTimeout(f"cannot connect to {where}: no answer within {timeout:g} s") from None
    except OSError as err:
        raise ConnectionLost(f"cannot connect to {where}: {err.strerror or err}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    set_send_buffer(sock)
    fit_send_buffer(sock)
    return sock


def _open_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """``socket.create_connection`` without its name lookup where ``host`` is an address written
    out (IPv4 or IPv6): a process's first ``getaddrinfo`` costs 2-8 ms here (the C library reads
    its configuration), and a source's first connection is inside the migration's setup. A name
    goes through the lookup as before, and so does an address with a zone (``fe80::1%eth0``),
    whose scope only the lookup puts in the socket address (a 2-tuple's is 0, which the kernel
    refuses for a link-local address)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a name
        family = None
    if family is None or "%" in host:
        return socket.create_connection((host, port), timeout=timeout)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


#: Connections the kernel completes before the destination accepts them: a waiting destination
#: accepts strangers and its source alike (each on its own thread), so many may arrive at once.
LISTEN_BACKLOG = 64


def _connect_unix(path: str, where: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.settimeout(None)
    except ConnectionRefusedError:
        sock.close()
        raise ConnectionLost(f"cannot connect to {where}: connection refused (is the destination listening?)") from None
    except FileNotFoundError:
        sock.close()
        raise ConnectionLost(f"cannot connect to {where}: no such socket (start `vmmrun -R {where} ...` first)") from None
    except TimeoutError:
        sock.close()
        raise MigrationTimeout(f"cannot connect to {where}: no answer within {timeout:g} s") from None
    except OSError as err:
        sock.close()
        raise ConnectionLost(f"cannot connect to {where}: {err.strerror or err}") from None
    return sock


def _unix_listener(path: str) -> socket.socket:
    """A listener on ``path``, mode 0600 from birth. A live listener's path is refused; a stale
    socket (nobody accepts: its process was killed) is replaced; any other file is refused."""
    where = UNIX_PREFIX + path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        import stat

        if not stat.S_ISSOCK(st.st_mode):
            raise MigrationError(f"cannot listen on {where}: the path exists and is not a socket; choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2)
        try:
            probe.connect(path)
            live = True
        except OSError:
            live = False
        finally:
            probe.close()
        if live:
            raise MigrationError(f"cannot listen on {where}: another process listens there (a vmmrun -R waiting already?)")
        try:
            os.unlink(path)  # stale: left by a process that was killed
        except FileNotFoundError:
            pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound and listening under a temporary name, then renamed into place: the path appears
    # only once a source can connect (whoever waits for it never meets a refused connection).
    staging = f"{path}.{os.getpid()}.new"
    old_umask = os.umask(0o177)  # born 0600: nobody else may connect, not even for an instant
    try:
        sock.bind(staging)
        sock.listen(LISTEN_BACKLOG)
        os.rename(staging, path)
    except OSError as err:
        sock.close()
        try:
            os.unlink(staging)
        except OSError:
            pass
        raise MigrationError(f"cannot listen on {where}: {err.strerror or err}") from None
    finally:
        os.umask(old_umask)
    return sock


def unlink_unix(listener: socket.socket) -> None:
    """Remove a Unix listener's path, if it still names this listener's socket (best effort)."""
    try:
        if listener.family != socket.AF_UNIX:
            return
        path = listener.getsockname()  # the staging name it was bound under (see _unix_listener)
        if isinstance(path, str) and path.endswith(".new"):
            os.unlink(path.rsplit(".", 2)[0])
    except OSError:
        pass


def accepted_peer(conn: socket.socket, peer) -> str:
    """An accepted connection's peer for the record: ``HOST:PORT``, or for a Unix socket the
    connecting process (SO_PEERCRED)."""
    if isinstance(peer, tuple):
        return format_address(*peer[:2])
    try:
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        return f"local process {pid} (uid {uid})"
    except OSError:
        return "a local process"


def listen(host: str, port: int) -> socket.socket:
    if is_unix(host):
        return _unix_listener(unix_path(host))
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
    except OSError as err:
        raise MigrationError(f"cannot listen on {format_address(host, port)}: {err.strerror or err}") from None
    set_send_buffer(listener)  # accepted connections inherit the send buffer's size and TCP_NODELAY
    # The destination's small replies (CHALLENGE, ACCEPT, COMMIT_ACK) must leave at once: with
    # Nagle's algorithm COMMIT_ACK waited for the source's delayed ACK, tens of ms of downtime.
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return listener


class CancelWatcher:
    """Watches a cancel event; when it fires, shuts the registered sockets down so whatever is
    blocked on them returns at once. ``commit_point()`` closes the window: after it a cancel no
    longer touches the connection (the source is committing)."""

    POLL = 0.02

    def __init__(self, cancel: threading.Event | None) -> None:
        self.cancel = cancel
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._committed = False
        self._done = threading.Event()
        self.fired = False
        self._thread = None
        if cancel is not None:
            self._thread = threading.Thread(target=self._watch, name="migration-cancel", daemon=True)
            self._thread.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            fire = self.fired
        if fire:
            shutdown_quietly(sock)

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set() and not self._committed

    def commit_point(self) -> bool:
        """Atomically: if not cancelled, no cancel will act from now on. Returns False if cancelled."""
        with self._lock:
            if self.cancel is not None and self.cancel.is_set():
                return False
            self._committed = True
            return True

    def _watch(self) -> None:
        # Sleep on our own event, so close() wakes the thread at once (it used to sleep on the
        # caller's cancel event, and closing waited out the poll: 20 ms on every migration).
        while not self._done.wait(self.POLL):
            if self.cancel.is_set():
                with self._lock:
                    if self._committed:
                        return
                    self.fired = True
                    socks = list(self._sockets)
                for sock in socks:
                    shutdown_quietly(sock)
                return

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


def buffered(sock: socket.socket) -> int:
    """Bytes ``sock`` already holds for the reader, which select() cannot see (a TLS socket's
    decrypted plaintext, ``tls.TlsSocket.pending``); 0 for a plain socket."""
    pending = getattr(sock, "pending", None)
    return pending() if pending is not None else 0


def unacknowledged(sock: socket.socket) -> int | None:
    """Bytes written to ``sock`` that its peer has not acknowledged yet (SIOCOUTQ), or None where
    the kernel does not say."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return None


#: How often ``await_delivery`` looks again at first, and at most.
DELIVERY_POLL_S = 0.0005
DELIVERY_POLL_MAX_S = 0.01


def await_delivery(socks: list[socket.socket], stall_timeout: float, stop: Callable[[], bool] | None = None) -> bool:
    """Wait until every byte written to ``socks`` has reached the peer's kernel, for as long as
    the peer keeps taking them. True: they have, or the peer has something to say first (data, a
    hang-up or an error on one of the sockets, which the next read gives); False:
    ``stall_timeout`` seconds passed with no byte taken, or ``stop()`` said to give up.

    A live migration's round is not over while its pages still sit in this host's send buffers:
    pausing the guest then would put the destination's backlog into the downtime. Every look
    either finds fewer bytes waiting than the last or counts towards the stall, so the wait is
    bounded by the bytes waiting and the timeout."""
    poller = select.poll()
    for s in socks:
        if s.fileno() >= 0:  # a closed socket has nothing waiting (unacknowledged says None)
            poller.register(s, select.POLLIN | select.POLLPRI | select.POLLRDHUP)  # POLLERR and POLLHUP always
    least, since, polls = None, time.monotonic(), 0
    while True:
        waiting = sum(unacknowledged(s) or 0 for s in socks)
        if waiting == 0:
            return True
        if stop is not None and stop():
            return False
        now = time.monotonic()
        if least is None or waiting < least:
            least, since = waiting, now
        elif now - since >= stall_timeout:
            return False
        if poller.poll(min(DELIVERY_POLL_S * (1 + polls // 20), DELIVERY_POLL_MAX_S) * 1000):
            return True
        polls += 1


def shutdown_quietly(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """shutdown(2) one or both directions, ignoring a socket already shut or closed: what
    cancelling, failing and closing do to wake whatever is blocked on it."""
    try:
        sock.shutdown(how)
    except OSError:
        pass


class Channel:
    """The source's connection: it reads from the TCP socket and writes to ``out`` (the TCP socket
    itself, or with a bandwidth cap a local socketpair drained by a pacing relay thread, so that
    page batches written by the memory core are paced as finely as frames). ``peer`` is the
    destination's address, for the errors."""

    PEER_ROLE = "destination"

    def __init__(self, sock: socket.socket, bandwidth_cap: float | None) -> None:
        self.sock = sock
        self.peer = peer_address(sock)
        self.relay_error: OSError | None = None
        self._relay = None
        self._inner = None
        self.out = sock
        if bandwidth_cap:
            if bandwidth_cap <= 0:
                raise ValueError(f"bandwidth cap must be positive bytes/s, got {bandwidth_cap}")
            self.out, self._inner = socket.socketpair()
            for s, opt in ((self.out, socket.SO_SNDBUF), (self._inner, socket.SO_RCVBUF)):
                s.setsockopt(socket.SOL_SOCKET, opt, 64 * 1024)
            self._stop = threading.Event()
            self._cap = float(bandwidth_cap)
            self._relay = threading.Thread(target=self._pace, name="migration-pacer", daemon=True)
            self._relay.start()

    @property
    def out_fd(self):
        """What the memory core writes page batches to: the fd of ``out``, or a TLS connection's
        session in the core (``TlsSocket.core_link``), which encrypts them on the way."""
        return core_endpoint(self.out)

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.sock, self.out, self._inner) if s is not None]

    def _pace(self) -> None:
        chunk = int(min(64 * 1024, max(4096, self._cap / 50)))
        buf = bytearray(chunk)
        view = memoryview(buf)
        due = time.monotonic()
        try:
            while True:
                n = self._inner.recv_into(buf)
                if n == 0:
                    break
                now = time.monotonic()
                if due > now and self._stop.wait(due - now):
                    break
                due = max(due, now - 0.05) + n / self._cap  # at most 50 ms of credit
                # Not sendall: after each partial copy it would wait the whole send timeout again.
                send_within_timeout(self.sock, view[:n], self._stop)
        except OSError as err:
            self.relay_error = err
        finally:
            # The writer blocked on ``out`` wakes with EPIPE and asks translate() why.
            shutdown_quietly(self._inner)

    def translate(self, err: BaseException, what: str) -> MigrationError:
        """Why a write to ``out`` failed, in the user's terms: the relay's own failure if it is
        the cause, and a timeout as which peer took nothing for how long during ``what``."""
        cause = self.relay_error if self.relay_error is not None else err
        if _is_timeout(cause):
            seconds = getattr(cause, "timeout", None) or send_timeout(self.sock)
            peer = self.peer or getattr(cause, "peer", None)
            during = f"the {what} message" if what.isupper() else what  # a frame's type, or "round 2's page batches"
            return MigrationTimeout(peer_stalled(self.PEER_ROLE, peer, seconds, sending=True, during=during))
        if cause is self.relay_error:
            return ConnectionLost(f"connection lost while sending {what}: {cause.strerror or cause}")
        if isinstance(err, MigrationError):
            return err
        if isinstance(err, OSError):
            return ConnectionLost(f"connection lost while sending {what}: {err.strerror or err}")
        return MigrationError(f"{what}: {err}")

    def flush(self, timeout: float) -> None:
        """Wait until the relay has handed everything to TCP (no-op without a cap)."""
        if self._relay is None:
            return
        shutdown_quietly(self.out, socket.SHUT_WR)
        self._relay.join(timeout)
        if self._relay.is_alive():
            raise MigrationTimeout(f"pacing relay did not drain within {timeout:g} s")
        if self.relay_error is not None:
            raise self.translate(self.relay_error, "the last frames")
        # Everything paced is on the wire and ``out`` is shut for writing; what may still follow
        # (RELEASED, an ABORT) is a frame or two, so it goes to TCP directly, unpaced.
        for s in (self.out, self._inner):
            s.close()
        self.out, self._inner, self._relay = self.sock, None, None

    def close(self) -> None:
        if self._relay is not None:
            self._stop.set()
            for s in (self.out, self._inner):
                shutdown_quietly(s)
            self._relay.join(timeout=2.0)
        for s in self.sockets():
            try:
                s.close()
            except OSError:
                pass


def _is_timeout(err: BaseException) -> bool:
    """A send that ran out of time: EAGAIN on a blocking socket (from the memory core or Python)
    or the frame layer's own timeout."""
    if isinstance(err, MigrationTimeout):
        return True
    return isinstance(err, OSError) and err.errno in (errno.EAGAIN, errno.EWOULDBLOCK)


# -- the bandwidth probe behind ``vmmctl --estimate`` --------------------------------------------
def is_local_address(host: str) -> bool:
    """True when ``host`` names an address of this machine: binding a socket to it succeeds only
    then (loopback, or an address on one of this host's interfaces)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, _type, _proto, _name, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((addr[0], 0))
            return True
        except OSError:
            continue
    return False


def measure_local_throughput(host: str, seconds: float = 0.3, *, chunk: int = 1 << 20, max_bytes: int = 16 << 30) -> float:
    """Bytes/s one TCP stream carries from this process to a listener on ``host`` (an address of
    this machine), sending ``chunk``-byte writes for ``seconds``.

    This is what a migration to a destination on this host goes through: the same kernel path
    (loopback or a local interface), measured now, with this VM's vCPU threads competing for the
    CPUs as they will during the migration. It says nothing about any other link."""
    if not 0 < seconds <= 5:
        raise ValueError(f"the probe runs for (0, 5] seconds, got {seconds}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, 0), family=family, backlog=1)
    received = 0
    failure: list[BaseException] = []

    def drain() -> None:
        nonlocal received
        try:
            listener.settimeout(5)
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                buf = bytearray(chunk)
                while (n := conn.recv_into(buf)) > 0:
                    received += n
        except OSError as err:
            failure.append(err)

    reader = threading.Thread(target=drain, name="bandwidth-probe", daemon=True)
    reader.start()
    payload = bytes(chunk)
    try:
        sender = socket.create_connection(listener.getsockname()[:2], timeout=5)
        with sender:
            start = time.monotonic()
            sent = 0
            while time.monotonic() - start < seconds and sent < max_bytes:
                sender.sendall(payload)
                sent += chunk
            sender.shutdown(socket.SHUT_WR)
            reader.join(5)
            elapsed = time.monotonic() - start
    finally:
        listener.close()
    if failure or reader.is_alive() or received != sent:
        why = failure[0] if failure else "the receiver did not finish"
        raise MigrationError(f"bandwidth probe on {host} failed: {why}")
    return received / elapsed
