"""A loopback TCP proxy that reads the migration protocol as it forwards it, to break a
migration at an exact message boundary (or an exact byte inside a message), in either direction.

It owns no byte format: control frames are read with ``protocol.py``'s header (``P.HEADER``: magic
``VMMG``, version, type, flags, payload length, checksum) and page batches with the memory core's
own batch header decoder (``_core.decode_batch_header``, ``rust/wire/batch.rs``: magic ``VMPB``,
flags, range count, payload length; then the range table of 16-byte entries). Each message's length comes from its
header alone, so a message type added later needs no change here (it is logged as ``TYPE_<n>``
until ``MessageType`` names it). Frames and batches are told apart by their magic, so no protocol
state is kept. A batch's payload length is checked against its range table (plain: 4096 bytes per
DATA page; LZ4, flag 0x0001: 8 + L with 0 < L <= the raw size): a stream the proxy cannot follow
is reported in ``errors``, never silently miscounted. TLS streams are not readable (see
``errors``); the proxy forwards them untouched and can fault none.

::

    with FaultProxy(("127.0.0.1", dest_port), direction="s2d", after_message=2, action="cut") as proxy:
        ... migrate to proxy.address ...
        assert proxy.wait_fired(30)
    proxy.log   # [Message("s2d", 1, "HELLO", 65, ...), Message("d2s", 1, "CHALLENGE", 59, ...), ...]

``FaultProxy(target, *, direction="s2d", after_message=None, inside_bytes=None, action="cut",
stall_seconds=None, connection=0, accept_many=True, on_fault=None)``

* Directions: ``"s2d"`` is what the connecting side (the source) sends, ``"d2s"`` the answers.
  Messages are counted from 1 per direction and per connection: on a plain session s2d 1 HELLO,
  2 AUTH, 3 SPEC, 4 MEMORY ...; d2s 1 CHALLENGE, 2 ACCEPT, 3 ACCEPT ...
* ``after_message=None``: a dry run, nothing is faulted; the log records every message (use it to
  enumerate fault points, ``fault_cases.py``). ``after_message=k``: the fault fires once the first
  k messages of ``direction`` have been forwarded (k=0: before any byte); with ``inside_bytes=n``
  once k messages and the first n bytes of message k+1 have been (1 <= n < its length; an n past
  its end is reported in ``errors`` and nothing fires). ``after_message="COMMIT_ACK"`` (a message
  type's name): once the first message of that type has been (for a point whose index varies
  from run to run, as the messages after live rounds do). Bytes beyond the point are held back, so
  the peer has exactly that prefix, and when the fault fires nothing more moves on that
  connection in either direction.
* ``action``: ``"cut"`` and ``"reset"`` first wait (at most 5 s) until what the proxy wrote to
  each peer has reached it (SIOCOUTQ), as a close that resets would discard it. Then ``"cut"``
  shuts down both sockets of the connection and closes them: each peer reads the bytes up to the
  point, then EOF; as from a peer that closed its socket, a write after that is answered by a
  reset. ``"reset"`` closes both with SO_LINGER 0: each peer gets a reset (Linux still delivers
  what was already in its receive queue first; the reset is reported once, to whichever of a
  read or a write comes first). ``"stall"`` forwards nothing either
  way on that connection, sockets open, for ``stall_seconds`` or, with None, until ``release()``
  or ``close()``; after the stall forwarding resumes where it stopped, byte-exact.
* ``connection``: which accepted connection the fault is armed on (0 = the first, the main
  connection; parallel streams' data connections are 1, 2 ... in the order they connect).
  Other connections are relayed and logged untouched, and so is every connection accepted after
  the fault fired (a source that reconnects). ``accept_many=False`` accepts one connection only.
  Once a connection to the target is refused (nothing listens there any more), the proxy stops
  listening too: a later connection to it is refused, as one to the target itself would be.
* ``on_fault(proxy)``: called on the proxy's thread right after the action (for a stall: while
  it stalls, e.g. to kill -9 a process; ``release()`` may be called from it). Nothing is forwarded
  on any connection while it runs.

Results: ``log`` (a copy of the list of ``Message``, in the order messages were completed),
``message_count(direction, connection=0)``, ``fired`` (true from the moment the point is
reached, before the action: a peer that saw the fault finds it set), ``fired_at`` (the last
message forwarded before the fault in its direction, or None), ``wait_fired(timeout)``,
``wait_quiet(timeout)`` (every accepted connection ended), ``errors`` (what the proxy could not
do or read; a test asserts it empty), ``address``/``port``. ``close()`` is idempotent, closes every
socket and joins the proxy's one thread (bounded).
"""

from __future__ import annotations

import fcntl
import selectors
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from vmmpy import _core
from vmmpy.migration import protocol as P

DIRECTIONS = ("s2d", "d2s")
ACTIONS = ("cut", "reset", "stall")
FRAME_MAGIC = P.MAGIC
BATCH_MAGIC = b"VMPB"
MAGIC_SIZE = 4
RANGE_ENTRY = struct.Struct("<QIB3x")  # rust/wire/batch.rs: gpa u64 | pages u32 | kind u8 (0 DATA, 1 ZERO) | 3 bytes 0
DATA, ZERO = 0, 1
BATCH_FLAG_LZ4 = _core.BATCH_FLAG_LZ4
LZ4_PREFIX = 8  # the block's xxh3-64 before the LZ4 block
KEEP_PAYLOAD = 8192  # frames up to this payload keep it in the log (MEMORY, MEMORY_END, ACCEPT ...)
READ_STEP = 256 * 1024
HIGH_WATER = 1 << 20  # stop reading a side while this much waits to be written to the other
DRAIN_S = 5.0
MAX_CONNECTIONS = 64


class Message(NamedTuple):
    """One message as forwarded: ``index`` counts from 1 per direction and connection; ``kind`` is
    the frame type's name (``TYPE_<n>`` for one MessageType does not name), ``BATCH``,
    ``BATCH_LZ4`` or ``EMPTY_BATCH`` (a round's end); ``length`` is its bytes on the wire, header
    included. ``payload`` is a frame's payload when at most 8 KiB, else empty."""

    direction: str
    index: int
    kind: str
    length: int
    connection: int = 0
    detail: str = ""
    payload: bytes = b""


def frame_kind(raw_type: int) -> str:
    try:
        return P.MessageType(raw_type).name
    except ValueError:
        return f"TYPE_{raw_type}"


def _frame_detail(kind: str, payload: bytes) -> str:
    """A few words for a human reading the log; empty where nothing short says more."""
    try:
        if kind == "MEMORY":
            m = P.decode_memory(payload)
            return f"round {m.round} {m.flags.name or 'dirty pages'}".replace("|", "+")
        if kind == "MEMORY_END":
            e = P.decode_memory_end(payload)
            return f"round {e.round}: {e.batches} batches, {e.data_pages} data + {e.zero_pages} zero pages, {e.wire_bytes} bytes"
        if kind in ("ACCEPT", "REFUSE") and payload:
            return f"stage {P.Stage(payload[0]).name.lower()}"
    except (P.ProtocolError, ValueError):
        return ""
    return ""


class _Parser:
    """Follows one direction of one connection: where each message starts and ends.

    A message is read in steps: its magic, then its header (a frame's 24 bytes; a batch's 40,
    then its range table), then its body; ``limit()`` says how many bytes the current step
    still needs, so the caller never feeds past a decision point."""

    def __init__(self, direction: str, connection: int, record: Callable[[Message | str], None]) -> None:
        self.direction, self.connection, self.record = direction, connection, record
        self.done = 0  # messages completed
        self.kinds_done: set[str] = set()  # the kinds among them
        self.offset = 0  # bytes of this direction fed so far
        self.error: str | None = None  # set once the stream cannot be followed; parsing stops
        self._start()

    def _start(self) -> None:
        self.pos = 0  # bytes into the current message
        self.head = bytearray()  # what is kept of it: header, a batch's table, a small frame's payload
        self.need = MAGIC_SIZE  # bytes ``head`` must hold before the next step
        self.length: int | None = None  # the message's length, once its header is read
        self.kind = ""
        self.detail = ""
        self.keep = False  # a small frame: its payload is kept for the log
        self.in_header = True

    def limit(self) -> int:
        if self.error is not None:
            return 1 << 62
        if len(self.head) < self.need:
            return self.need - len(self.head)
        return self.length - self.pos

    def feed(self, chunk: bytes) -> None:
        """Feed at most ``limit()`` bytes."""
        self.offset += len(chunk)
        if self.error is not None:
            return
        self.pos += len(chunk)
        if self.in_header:
            self.head += chunk
            if len(self.head) == self.need:
                self._header_step()
        elif self.keep:
            self.head += chunk
        if self.error is None and self.pos == self.length:
            self._complete()

    def _header_step(self) -> None:
        head = bytes(self.head)
        if self.need == MAGIC_SIZE:
            if head == FRAME_MAGIC:
                self.need = P.HEADER_SIZE
            elif head == BATCH_MAGIC:
                self.need = P.BATCH_HEADER_SIZE
            else:
                self._fail(f"neither a frame ({FRAME_MAGIC.decode()}) nor a page batch ({BATCH_MAGIC.decode()}) starts here: "
                           f"first bytes {head.hex(' ')}" + (" (a TLS record?)" if head[:1] == b"\x16" else ""))
            return
        if head[:MAGIC_SIZE] == FRAME_MAGIC:
            _magic, _version, raw_type, _flags, payload_len, _sum = P.HEADER.unpack(head)
            self.kind = frame_kind(raw_type)
            self.length = P.HEADER_SIZE + payload_len
            self.keep = payload_len <= KEEP_PAYLOAD
            self.in_header = False
            return
        if self.length is None:  # a batch's fixed header: the table's size and the length follow from it
            try:  # decoded by the memory core, the format's owner (which refuses too many ranges)
                header = _core.decode_batch_header(head[:P.BATCH_HEADER_SIZE])
            except _core.PageBatchError as err:
                self._fail(str(err))
                return
            ranges, payload_len = header["range_count"], header["payload_len"]
            self.need = P.BATCH_HEADER_SIZE + ranges * RANGE_ENTRY.size
            self.length = self.need + payload_len
            if ranges:
                return
        self.in_header = False
        self._check_batch(head)

    def _check_batch(self, head: bytes) -> None:
        """Name the batch and check its payload length against its range table."""
        header = _core.decode_batch_header(head[:P.BATCH_HEADER_SIZE])
        flags, ranges, payload_len = header["flags"], header["range_count"], header["payload_len"]
        pages = {DATA: 0, ZERO: 0}
        for _gpa, count, kind in RANGE_ENTRY.iter_unpack(head[P.BATCH_HEADER_SIZE:]):
            pages[DATA if kind == DATA else ZERO] += count
        raw = pages[DATA] * _core.PAGE_SIZE
        self.detail = f"{ranges} ranges, {pages[DATA]} data + {pages[ZERO]} zero pages" if ranges else ""
        if flags & BATCH_FLAG_LZ4:
            self.kind = "BATCH_LZ4"
            if not (0 < raw <= _core.MAX_COMPRESSED_BATCH_DATA and LZ4_PREFIX < payload_len <= LZ4_PREFIX + raw):
                self._fail(f"LZ4 page batch of {pages[DATA]} data pages declares a payload of {payload_len} bytes "
                           f"(expected {LZ4_PREFIX + 1} to {LZ4_PREFIX + raw}, and 1 to "
                           f"{_core.MAX_COMPRESSED_BATCH_DATA // _core.PAGE_SIZE} data pages)")
        else:
            self.kind = "BATCH" if ranges else "EMPTY_BATCH"
            if payload_len != raw:
                self._fail(f"page batch of {pages[DATA]} data pages declares a payload of {payload_len} bytes, expected {raw}")

    def _complete(self) -> None:
        self.done += 1
        self.kinds_done.add(self.kind)
        payload = bytes(self.head[P.HEADER_SIZE:]) if self.keep else b""
        detail = self.detail or (_frame_detail(self.kind, payload) if self.keep else "")
        self.record(Message(self.direction, self.done, self.kind, self.length, self.connection, detail, payload))
        self._start()

    def _fail(self, why: str) -> None:
        after = f"after message {self.done}" if self.done else "before any message"
        self.error = (f"connection {self.connection} {self.direction}: byte {self.offset - self.pos} ({after}): {why}; "
                      "the rest of this direction is forwarded unread")
        self.record(self.error)


class _Pipe:
    """One direction of a connection: bytes read from ``src``, held (``inbuf``) until the parser
    and the fault point admit them, then written to ``dst`` (``outbuf``)."""

    def __init__(self, direction: str, src: socket.socket, dst: socket.socket, parser: _Parser) -> None:
        self.direction, self.src, self.dst, self.parser = direction, src, dst, parser
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.eof = False  # src sent FIN
        self.shut = False  # FIN passed on to dst


class _Link:
    """One accepted connection and its upstream connection."""

    def __init__(self, index: int, client: socket.socket, upstream: socket.socket, record) -> None:
        self.index = index
        self.client, self.upstream = client, upstream
        self.pipes = {
            "s2d": _Pipe("s2d", client, upstream, _Parser("s2d", index, record)),
            "d2s": _Pipe("d2s", upstream, client, _Parser("d2s", index, record)),
        }
        self.frozen = False  # a stall: nothing read, admitted or written
        self.stall_until: float | None = None
        self.armed = False
        self.closed = False

    def sockets(self) -> tuple[socket.socket, socket.socket]:
        return self.client, self.upstream


class FaultProxy:
    def __init__(
        self,
        target: tuple[str, int],
        *,
        direction: str = "s2d",
        after_message: int | str | None = None,
        inside_bytes: int | None = None,
        action: str = "cut",
        stall_seconds: float | None = None,
        connection: int = 0,
        accept_many: bool = True,
        on_fault: Callable[[FaultProxy], None] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}; got {action!r}")
        if isinstance(after_message, str):
            if after_message not in P.MessageType.__members__:
                raise ValueError(f"after_message names no message type: {after_message!r}")
        elif after_message is not None and (not isinstance(after_message, int) or after_message < 0):
            raise ValueError(f"after_message must be a message count from 0, a message type's name, or None for a dry run; "
                             f"got {after_message!r}")
        if inside_bytes is not None and (after_message is None or not isinstance(inside_bytes, int) or inside_bytes < 1):
            raise ValueError(f"inside_bytes must be a byte count from 1, with after_message; got {inside_bytes!r}")
        if stall_seconds is not None and (action != "stall" or stall_seconds <= 0):
            raise ValueError(f"stall_seconds goes with action='stall' and must be positive; got {stall_seconds!r}")
        self.target = target
        self.direction, self.after_message, self.inside_bytes = direction, after_message, inside_bytes
        self.action, self.stall_seconds, self.connection = action, stall_seconds, connection
        self.accept_many, self.on_fault = accept_many, on_fault
        self._log: list[Message] = []
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self._fired = threading.Event()
        self._quiet = threading.Event()
        self.fired_at: Message | None = None
        self._links: list[_Link] = []
        self._masks: dict[socket.socket, int] = {}
        self._accepted = 0
        self._release = False
        self._closing = False
        self.listener = socket.create_server((host, 0))
        self.listener.setblocking(False)
        self.address = (host, self.listener.getsockname()[1])
        self.port = self.address[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name=f"fault-proxy-{self.port}", daemon=True)
        self._thread.start()

    # -- the test's side -------------------------------------------------------------------------
    @property
    def log(self) -> list[Message]:
        with self._lock:
            return list(self._log)

    @property
    def errors(self) -> list[str]:
        with self._lock:
            return list(self._errors)

    @property
    def fired(self) -> bool:
        return self._fired.is_set()

    def message_count(self, direction: str, connection: int = 0) -> int:
        with self._lock:
            return sum(1 for m in self._log if m.direction == direction and m.connection == connection)

    def wait_fired(self, timeout: float) -> bool:
        return self._fired.wait(timeout)

    def wait_quiet(self, timeout: float) -> bool:
        """Until a connection was accepted and every accepted one has ended (bounded)."""
        return self._quiet.wait(timeout)

    def release(self) -> None:
        """End a stall now (forwarding resumes); safe from ``on_fault``."""
        self._release = True
        self._wake()

    def close(self) -> None:
        self._closing = True
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(15)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _record(self, item: Message | str) -> None:
        """A parser's news: a message completed, or the reason it cannot follow its stream."""
        with self._lock:
            (self._log if isinstance(item, Message) else self._errors).append(item)

    def _error(self, text: str) -> None:
        with self._lock:
            self._errors.append(text)

    # -- the proxy's thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._closing:
                self._update_interest()
                timeout = 0.2
                now = time.monotonic()
                for link in self._links:
                    if link.frozen and link.stall_until is not None:
                        timeout = max(0.0, min(timeout, link.stall_until - now))
                for key, mask in self._sel.select(timeout):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    else:
                        link, sock = key.data
                        if not link.closed and mask & selectors.EVENT_READ:
                            self._read(link, sock)
                        if not link.closed and mask & selectors.EVENT_WRITE:
                            self._write(link, sock)
                self._unstall()
        except Exception as err:  # a bug here must show in the test, not vanish with the thread
            self._error(f"the proxy stopped: {type(err).__name__}: {err}")
        finally:
            for link in list(self._links):
                self._end(link, reset=False)
            self._sel.close()
            for s in (self.listener, self._wake_r, self._wake_w):
                s.close()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        index = self._accepted
        self._accepted += 1
        if index + 1 >= (MAX_CONNECTIONS if self.accept_many else 1):
            self._sel.unregister(self.listener)
            self.listener.close()  # a further connection is refused, not left waiting in the backlog
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError as err:
            self._error(f"connection {index}: cannot reach {self.target[0]}:{self.target[1]}: {err.strerror or err}")
            _reset(client)
            if isinstance(err, ConnectionRefusedError) and self.listener.fileno() != -1:
                # Nothing listens at the target any more (its process died or stopped waiting):
                # from now on the proxy refuses as the target does, instead of accepting a
                # connection only to reset it (a source that takes "refused" to mean nobody holds
                # the guest would otherwise retry until its own timeout).
                self._sel.unregister(self.listener)
                self.listener.close()
            if not self._links:
                self._quiet.set()
            return
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(index, client, upstream, self._record)
        link.armed = self.after_message is not None and index == self.connection and not self.fired
        self._links.append(link)
        self._quiet.clear()
        if link.armed:
            self._advance(link, link.pipes[self.direction])  # a fault before any byte (k = 0)

    def _interest(self, sock: socket.socket, mask: int, data) -> None:
        """Selectors refuse an empty mask: a socket without interest is unregistered."""
        old = self._masks.get(sock, 0)
        if old == mask:
            return
        if mask == 0:
            self._sel.unregister(sock)
        elif old == 0:
            self._sel.register(sock, mask, data)
        else:
            self._sel.modify(sock, mask, data)
        self._masks[sock] = mask

    def _update_interest(self) -> None:
        for link in self._links:
            for sock in link.sockets():
                mask = 0
                if not link.frozen:
                    feeds, fed = (link.pipes["s2d"], link.pipes["d2s"]) if sock is link.client else (link.pipes["d2s"], link.pipes["s2d"])
                    if not feeds.eof and not feeds.inbuf and len(feeds.outbuf) < HIGH_WATER:
                        mask |= selectors.EVENT_READ
                    if fed.outbuf:
                        mask |= selectors.EVENT_WRITE
                self._interest(sock, mask, (link, sock))

    def _read(self, link: _Link, sock: socket.socket) -> None:
        pipe = link.pipes["s2d" if sock is link.client else "d2s"]
        try:
            data = sock.recv(READ_STEP)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._end(link, reset=True)  # a peer's reset: the other peer gets one too
            return
        if not data:
            pipe.eof = True
        else:
            pipe.inbuf += data
        self._advance(link, pipe)

    def _write(self, link: _Link, sock: socket.socket) -> None:
        pipe = link.pipes["d2s" if sock is link.client else "s2d"]
        try:
            sent = sock.send(pipe.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._end(link, reset=True)
            return
        del pipe.outbuf[:sent]
        if not pipe.outbuf:
            self._advance(link, pipe)

    def _gap(self, link: _Link, pipe: _Pipe) -> int | None:
        """Bytes ``pipe`` may still admit before the fault point (0: reached), None when the
        fault is not ahead of it."""
        if not link.armed or pipe.direction != self.direction:
            return None
        parser = pipe.parser
        if parser.error is not None:
            self._disarm(link, f"the fault after {self.direction} message {self.after_message} cannot be placed: {parser.error}")
            return None
        if isinstance(self.after_message, str):
            if self.after_message not in parser.kinds_done:
                return None
        elif parser.done < self.after_message:
            return None
        inside = self.inside_bytes or 0
        if parser.length is not None and inside >= parser.length:
            self._disarm(link, f"connection {link.index} {self.direction}: inside_bytes={inside} is not inside message "
                               f"{parser.done + 1} ({parser.kind}, {parser.length} bytes); nothing was faulted")
            return None
        return inside - parser.pos

    def _disarm(self, link: _Link, why: str) -> None:
        link.armed = False
        self._error(why)

    def _advance(self, link: _Link, pipe: _Pipe) -> None:
        """Admit held bytes up to the next message boundary or the fault point, fire the fault
        once everything before it was written, pass a FIN on once everything before it was."""
        while not link.frozen and not link.closed:
            gap = self._gap(link, pipe)
            if gap == 0:
                if not pipe.outbuf:
                    self._fire(link, pipe)
                return
            if not pipe.inbuf:
                break
            take = min(len(pipe.inbuf), pipe.parser.limit(), gap if gap is not None else len(pipe.inbuf))
            chunk = bytes(pipe.inbuf[:take])
            del pipe.inbuf[:take]
            pipe.parser.feed(chunk)
            pipe.outbuf += chunk
        if pipe.eof and not pipe.inbuf and not pipe.outbuf and not pipe.shut and not link.frozen and not link.closed:
            pipe.shut = True
            try:
                pipe.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            if all(p.shut for p in link.pipes.values()):
                self._end(link, reset=False)

    def _fire(self, link: _Link, pipe: _Pipe) -> None:
        link.armed = False
        self.fired_at = next((m for m in reversed(self.log) if m.connection == link.index and m.direction == pipe.direction), None)
        self._fired.set()  # before the peers can see the fault, so a test that saw it finds it set
        if self.action in ("cut", "reset"):
            for sock in link.sockets():
                _wait_sent(sock, DRAIN_S)
            self._end(link, reset=self.action == "reset")
        else:
            link.frozen = True
            link.stall_until = None if self.stall_seconds is None else time.monotonic() + self.stall_seconds
            self._release = False
            self._update_interest()
        if self.on_fault is not None:
            try:
                self.on_fault(self)
            except Exception as err:
                self._error(f"on_fault failed: {type(err).__name__}: {err}")

    def _unstall(self) -> None:
        now = time.monotonic()
        for link in list(self._links):
            if link.frozen and (self._release or (link.stall_until is not None and now >= link.stall_until)):
                link.frozen = False
                for pipe in link.pipes.values():
                    self._advance(link, pipe)
        self._release = False

    def _end(self, link: _Link, *, reset: bool) -> None:
        """Close both sockets of a connection: FIN (after shutting both ways down) or a reset."""
        if link.closed:
            return
        link.closed = True
        for sock in link.sockets():
            self._interest(sock, 0, None)
            self._masks.pop(sock, None)
            if reset:
                _reset(sock)
            else:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        self._links.remove(link)
        if not self._links:
            self._quiet.set()


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a reset, not a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _wait_sent(sock: socket.socket, timeout: float) -> None:
    """Until the kernel holds nothing unacknowledged for ``sock`` (SIOCOUTQ), bounded: a close
    that resets (SO_LINGER 0, or unread bytes in the proxy's own receive queue) discards what was
    not yet sent, and the bytes before the fault point must reach the peer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        except OSError:
            return
        if queued == 0:
            return
        time.sleep(0.001)
