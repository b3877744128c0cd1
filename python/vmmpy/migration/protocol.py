"""The migration wire protocol: frames, messages, and the order they come in.

This module owns the bytes on the wire and nothing else: no sockets policy, no VM, no rounds.
Each message is declared once (``MESSAGES``: its fields in wire order, their encodings and rules,
its payload bound); ``encode_*``/``decode_*`` are that one declaration read two ways.
``source`` and ``destination`` drive it; ``docs/migration-protocol.md`` is the long form.

Message sequence (S = source, D = destination)::

    S                                              D
    |---- HELLO (versions, nonce_s) -------------->|  D: AWAIT_HELLO
    |<--- CHALLENGE (version, key?, nonce_d) ------|
    |---- AUTH (HMAC over the transcript) -------->|  D: AWAIT_AUTH  (no state read before this)
    |<--- ACCEPT(auth, D's proof) | REFUSE(why) ---|
    |---- SPEC (page size, vendor, layout, devs) ->|  D: AWAIT_SPEC
    |<--- ACCEPT(spec) | REFUSE(why) --------------|
    |---- STREAMS (n) ---------------------------->|  D: READY -> JOINING (v3, only with n > 1)
    |<--- STREAMS_TOKEN (n, token) | REFUSE(why) --|
    |  data connections 1..n-1, each to the same listener:
    |---- JOIN (index, token, HMAC) -------------->|  D: nothing else read from it before this
    |<--- ACCEPT(join, D's proof) | REFUSE(why) ---|  D: JOINING -> READY once all n-1 joined
    |---- MEMORY (round r, flags) ---------------->|  D: READY -> RECEIVING(r)
    |==== page batches (VMPB), raw, then one =====>|     recv_share(): all of them, in Rust
    |==== empty batch ending the round ===========>|     (with n streams: on every stream)
    |---- MEMORY_END (r, totals) ----------------->|     totals checked against what arrived
    |<--- ROUND_DONE (r) --------------------------|  (v8, a round that is not final: D has all of it)
    |     ... one MEMORY..MEMORY_END per round ... |
    |---- STATE_PART (some sections) ------------->|  D: READY -> STATE_PARTS (v9, zero or more):
    |                                              |     each section read and checked as it comes
    |---- STATE (encode_sections container) ------>|  D: the rest read and checked, then loaded
    |---- COMMIT_REQUEST (source digest) --------->|  D: commit digest of own memory, compare
    |<--- COMMIT_ACK (destination digest) ---------|  D: AWAIT_COMMITTED; prepare_to_run
    |---- COMMITTED ------------------------------>|  D: start_running; S: stop_for_good
    |<--- RESUMED (start time) --------------------|  S: the downtime ends (best effort)
    |                                              |
    |<--- ABORT (why) ---- either way, any time ---|  before COMMITTED: S resumes, D discards

The receiver's (destination's) state machine is the table ``RECEIVER`` (drawn in the docs from
it); the source's order is ``SOURCE_NEXT`` and ``SOURCE_AWAITS``. A message a state does not
read is refused from its header, by name and state.

Every frame starts with a fixed 24-byte little-endian header::

    offset size field
     0     4    magic "VMMG"
     4     2    frame format version (1)
     6     2    message type
     8     4    flags (none defined; must be 0)
    12     4    payload length
    16     8    xxh3-64 of header bytes 0..16 followed by the payload

Page batches are not frames: they are the memory core's own checksummed format
(``rust/wire/batch.rs``), sent and received in Rust with the GIL released, so a round costs no
per-page Python work. Their page bytes are covered by the memory digests compared at commit.

Version 3 adds parallel streams and nothing else: a version 3 session that asks for one stream
is byte for byte a version 2 session with a different version number. With n streams the main
connection is stream 0 and carries every frame; streams 1..n-1 carry only page batches after
their JOIN. A round's batches are spread over all n; each stream ends the round with its own
empty batch, and MEMORY_END carries the totals over all of them.

Version 6 adds the local migration (a Unix socket, same host): instead of memory rounds the
source, its guest paused, sends LOCAL_MEMORY (the segments' names, addresses and sizes, and the
dirty page runs) followed by one byte ``F`` carrying the segments' memfd descriptors (SCM_RIGHTS,
lowmem first); the destination maps the same pages. STATE and the commit follow as in any
session; COMMIT_REQUEST and COMMIT_ACK carry ``local_digest`` of each side's descriptors (the same
memfds give the same digest), so no page is hashed or copied::

    |---- LOCAL_MEMORY (segments, dirty runs) ---->|  D: READY -> READY (memory mapped, dirty marked)
    |==== 'F' + SCM_RIGHTS (one memfd a segment) =>|

Version 4 adds compression: SPEC ends with the codecs the source offers (``u8 n, n x u8
codec``; 1 = LZ4) and the destination's ACCEPT of the spec ends with the one it takes (``u8
codec``, 0 = none). Only then may page batches carry the LZ4 flag; an older peer never sees
either field, nor a compressed batch.

Version 9 lets the state come in parts. Each STATE_PART is a section container (the same
format as STATE) holding the next few sections as the source saves them; STATE holds the last
(or, from an older source or a guest with few sections, all of them). The destination reads
and checks each part as it arrives, so it works on the first sections while the source still
saves the rest; a section name may come only once across the parts, and the parts together
are bounded by max_state as one STATE is. Nothing is loaded into the guest before STATE, when
the sections are checked as a whole (none missing, none unknown) and loaded.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

from .. import _core
from .errors import ConnectionLost, MigrationTimeout, ProtocolError

MAGIC = b"VMMG"
FRAME_VERSION = 1
# 2: the commit digest is the per-page commit digest (rust/digest/tracker.rs), not a run digest;
# the destination answers COMMITTED with RESUMED once the guest runs.
# 3: parallel page streams (STREAMS, STREAMS_TOKEN, JOIN); a session with one stream is a version 2 session.
# 4: page batch compression, offered in SPEC and answered in ACCEPT.
# 5: ownership through the commit: a destination that has sent COMMIT_ACK holds the guest paused
#    "in doubt" when the link fails, the source settles it by reconnecting (RESOLVE/RESOLVED), and
#    the source says RELEASED once it knows the guest runs there.
# 6: local migration (LOCAL_MEMORY). 7: post-copy (POSTCOPY, RECOVER, RECOVERED, POSTCOPY_DONE).
# 8: the destination answers each round that is not final with ROUND_DONE once it has taken all of
#    it, so the source pauses the guest only when the destination has caught up.
# 9: the state may come in parts (STATE_PART ... STATE), so the destination reads and checks the
#    first sections while the source still saves the rest: both inside the downtime.
PROTOCOL_VERSIONS = (2, 3, 4, 5, 6, 7, 8, 9)
STREAMS_VERSION = 3  # the first protocol version with parallel streams
MAX_STREAMS = _core.MAX_STREAMS  # connections a session may use, the main one included
TOKEN_SIZE = 32
#: The first protocol version whose SPEC and ACCEPT carry the compression offer and answer.
COMPRESSION_VERSION = 4
#: Page batch codecs by wire id (the batch flag of that codec: rust/wire/batch.rs).
CODECS = {"lz4": 1}
_CODEC_NAMES = {v: k for k, v in CODECS.items()}
MAX_CODECS = 4
#: The first protocol version with in-doubt ownership: RESOLVE, RESOLVED and RELEASED.
OWNERSHIP_VERSION = 5
LOCAL_VERSION = 6  # the first protocol version with LOCAL_MEMORY (memfds over a Unix socket)
POSTCOPY_VERSION = 7  # the first with post-copy (POSTCOPY, the page exchange, RECOVER/RECOVERED)
ROUND_DONE_VERSION = 8  # the first where the destination answers a round that is not final (ROUND_DONE)
STATE_PART_VERSION = 9  # the first where the state may come in parts (STATE_PART)
#: Sections the source puts in each STATE_PART: an idle guest's 14 go in four frames, so the
#: destination starts on the first quarter while the source saves the rest, and pays for a
#: few frames, not one a section.
STATE_PART_SECTIONS = 4
POSTCOPY_CHUNK_SIZE = _core.POSTCOPY_CHUNK_SIZE
MAX_POSTCOPY_CHUNK = _core.POSTCOPY_MAX_CHUNK_PAGES * 4096
MAX_SEGMENTS = 2  # lowmem, highmem
#: Dirty runs LOCAL_MEMORY may carry (16 bytes each): 64 MiB of payload.
MAX_DIRTY_RUNS = 1 << 22
#: The byte after LOCAL_MEMORY that carries the descriptors.
FDS_MARKER = b"F"
SESSION_ID_SIZE = 16
HEADER = struct.Struct("<4sHHIIQ")
HEADER_SIZE = HEADER.size
NONCE_SIZE = 32
MAC_SIZE = 32
MAX_REASON = 4096
MAX_DEVICES = 1024
MAX_NAME = 255
DEFAULT_MAX_STATE = 256 << 20
_READ_CHUNK = 1 << 20


class MessageType(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    ACCEPT = 4
    REFUSE = 5
    SPEC = 6
    MEMORY = 7
    MEMORY_END = 8
    STATE = 9
    COMMIT_REQUEST = 10
    COMMIT_ACK = 11
    COMMITTED = 12
    ABORT = 13
    RESUMED = 14
    STREAMS = 15  # v3: the source asks for n page streams
    STREAMS_TOKEN = 16  # v3: the destination grants them and hands out the session token
    JOIN = 17  # v3: the first frame on a data connection
    RESOLVE = 18  # v5: on a new connection after the handshake, the source's decision for a session in doubt
    RESOLVED = 19  # v5: the destination's answer: what it now does with that session's guest
    RELEASED = 20  # v5: the source knows the guest runs on the destination; nothing more will be asked
    LOCAL_MEMORY = 21  # v6: a local migration's memory: its segments, their memfds (SCM_RIGHTS), dirty runs
    POSTCOPY = 22  # v7: the switch to post-copy: the chunk size and the pages the destination lacks
    RECOVER = 23  # v7: on a new connection after the handshake, resume a post-copy session's page exchange
    RECOVERED = 24  # v7: the destination's answer: the exchange goes on on this connection, or no such session
    POSTCOPY_DONE = 25  # v7: every page is on the destination: what post-copy cost the guest there
    ROUND_DONE = 26  # v8: the destination has taken every page of a round that is not final
    STATE_PART = 27  # v9: some of the state's sections, more to come; STATE carries the last of them


class Stage(enum.IntEnum):
    """What an ACCEPT or REFUSE answers."""

    AUTH = 1
    SPEC = 2
    STREAMS = 3
    JOIN = 4


class MemoryFlags(enum.IntFlag):
    ALL_PAGES = 1  # the round carries every page (round 0, warm)
    FINAL = 2  # the guest is paused: the last round


@dataclass(frozen=True)
class Frame:
    type: MessageType
    payload: bytes
    raw: bytes  # header + payload as they were on the wire (the handshake transcript uses it)


# -- frames --------------------------------------------------------------------------------------


def encode_frame(msg_type: MessageType, payload: bytes = b"", *, version: int = FRAME_VERSION) -> bytes:
    if len(payload) > MAX_PAYLOAD[msg_type]:
        raise ProtocolError(f"{msg_type.name}: payload of {len(payload)} bytes exceeds the {MAX_PAYLOAD[msg_type]} allowed")
    head = struct.pack("<4sHHII", MAGIC, version, int(msg_type), 0, len(payload))
    return head + struct.pack("<Q", _core.xxh3_64(head + payload)) + payload


def decode_header(head: bytes, *, max_state: int = DEFAULT_MAX_STATE) -> tuple[MessageType, int, int]:
    """Check a frame header; returns (type, payload length, checksum). Raises ProtocolError."""
    if len(head) != HEADER_SIZE:
        raise ProtocolError(f"frame header is {len(head)} bytes, expected {HEADER_SIZE}")
    magic, version, raw_type, flags, length, checksum = HEADER.unpack(head)
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic!r}, expected {MAGIC!r} (not a vmmpy migration stream, or out of step)")
    if version != FRAME_VERSION:
        raise ProtocolError(f"frame format version {version} is not one this vmmpy speaks ({FRAME_VERSION})")
    try:
        msg_type = MessageType(raw_type)
    except ValueError:
        raise ProtocolError(f"unknown message type {raw_type}") from None
    if flags != 0:
        raise ProtocolError(f"{msg_type.name}: unknown frame flags {flags:#x}")
    bound = max_state if msg_type in STATE_MESSAGES else MAX_PAYLOAD[msg_type]
    if length > bound:
        raise ProtocolError(f"{msg_type.name}: declared payload of {length} bytes exceeds the {bound} allowed")
    return msg_type, length, checksum


def _recv_exact(sock: socket.socket, size: int, what: str) -> bytes:
    """Read exactly ``size`` bytes, growing the buffer only as bytes arrive (a lying length
    field costs at most one chunk)."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        want = min(size - got, _READ_CHUNK)
        try:
            chunk = sock.recv(want)
        except (BlockingIOError, TimeoutError):
            raise MigrationTimeout(f"timed out: {_peer_name(sock)} sent nothing for {_receive_timeout(sock):g} s while "
                                   f"{what} was awaited ({got} of {size} bytes arrived)") from None
        except OSError as err:
            raise ConnectionLost(f"connection lost while reading {what}: {err.strerror or err}") from None
        if not chunk:
            raise ConnectionLost(f"peer closed the connection while sending {what} ({got} of {size} bytes arrived)")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _peer_name(sock: socket.socket) -> str:
    """The peer's address for a message ("the peer" when the socket has none, as a socketpair)."""
    try:
        peer = sock.getpeername()
    except OSError:
        return "the peer"
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"the peer [{host}]:{port}" if ":" in host else f"the peer {host}:{port}"
    return "the peer"


def _receive_timeout(sock: socket.socket) -> float:
    """The socket's receive timeout (SO_RCVTIMEO, as net.set_io_timeout sets it), in seconds."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.calcsize("ll"))
        sec, usec = struct.unpack("ll", raw)
        return round(sec + usec / 1e6, 3)
    except (OSError, struct.error):
        return float(sock.gettimeout() or 0)


def read_frame(sock: socket.socket, *, max_state: int = DEFAULT_MAX_STATE, allowed=None, where: str = "") -> Frame:
    """Read one frame. With ``allowed``, a frame of another type (ABORT is always allowed) is
    refused from its header, before its payload is read."""
    head = _recv_exact(sock, HEADER_SIZE, f"a frame header{where}")
    msg_type, length, checksum = decode_header(head, max_state=max_state)
    if allowed is not None and msg_type not in allowed and msg_type is not MessageType.ABORT:
        names = " or ".join(t.name for t in allowed)
        raise ProtocolError(f"expected {names}{where}, got {msg_type.name}")
    payload = _recv_exact(sock, length, f"the {msg_type.name} payload") if length else b""
    actual = _core.xxh3_64(head[:16] + payload)
    if actual != checksum:
        raise ProtocolError(f"{msg_type.name}: frame checksum mismatch (stored {checksum:#018x}, computed {actual:#018x})")
    return Frame(msg_type, payload, head + payload)


def decode_frame(data: bytes) -> Frame:
    """A whole frame already read (header and exactly its payload), checked as ``read_frame`` does."""
    msg_type, length, checksum = decode_header(data[:HEADER_SIZE])
    if len(data) != HEADER_SIZE + length:
        raise ProtocolError(f"{msg_type.name}: frame of {len(data)} bytes, its header says {HEADER_SIZE + length}")
    actual = _core.xxh3_64(data[:16] + data[HEADER_SIZE:])
    if actual != checksum:
        raise ProtocolError(f"{msg_type.name}: frame checksum mismatch (stored {checksum:#018x}, computed {actual:#018x})")
    return Frame(msg_type, data[HEADER_SIZE:], data)


def send_bytes(sock: socket.socket, data: bytes, what: str) -> None:
    try:
        sock.sendall(data)
    except (BlockingIOError, TimeoutError):
        raise MigrationTimeout(f"timed out sending {what}: the peer is not reading") from None
    except OSError as err:
        raise ConnectionLost(f"connection lost while sending {what}: {err.strerror or err}") from None


def write_frame(sock: socket.socket, msg_type: MessageType, payload: bytes = b"") -> bytes:
    frame = encode_frame(msg_type, payload)
    send_bytes(sock, frame, msg_type.name)
    return frame


# -- the messages' values ----------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    versions: tuple[int, ...]
    nonce: bytes
    software: str = "vmmpy"


@dataclass(frozen=True)
class Challenge:
    version: int
    key_required: bool
    nonce: bytes


@dataclass(frozen=True)
class Accept:
    stage: Stage
    proof: bytes = b""  # the destination's HMAC, in the AUTH stage when it holds a key
    compression: str | None = None  # version >= 4, SPEC stage: the codec taken, None for none


@dataclass(frozen=True)
class Refuse:
    stage: Stage
    reason: str


@dataclass(frozen=True)
class Spec:
    """What a destination must match to take the guest."""

    page_size: int
    vendor: str
    vcpus: int
    lowmem_size: int
    highmem_size: int
    wired: bool
    live: bool
    devices: dict[str, int] = field(default_factory=dict)  # section name -> section version
    tsc: str = "instructions"  # the guest TSC's source: "instructions" or "host"
    compression: tuple[str, ...] = ()  # version >= 4: page batch codecs the source offers, preferred first

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, live: bool) -> Spec:
        try:
            return cls(
                page_size=int(d["page_size"]),
                vendor=str(d["vendor"]),
                vcpus=int(d["vcpus"]),
                lowmem_size=int(d["lowmem_size"]),
                highmem_size=int(d["highmem_size"]),
                wired=bool(d["wired"]),
                live=live,
                devices={str(k): int(v) for k, v in dict(d.get("devices", {})).items()},
                tsc=str(d.get("tsc", "instructions")),
            )
        except KeyError as err:
            raise ValueError(f"adapter spec() lacks the field {err.args[0]!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "page_size": self.page_size,
            "vendor": self.vendor,
            "vcpus": self.vcpus,
            "lowmem_size": self.lowmem_size,
            "highmem_size": self.highmem_size,
            "wired": self.wired,
            "live": self.live,
            "devices": dict(self.devices),
            "tsc": self.tsc,
        }


@dataclass(frozen=True)
class Memory:
    round: int
    flags: MemoryFlags


@dataclass(frozen=True)
class MemoryEnd:
    round: int
    batches: int
    data_pages: int
    zero_pages: int
    wire_bytes: int


@dataclass(frozen=True)
class LocalMemory:
    segments: tuple[tuple[str, int, int], ...]  # (name, gpa, size), lowmem first: one memfd each follows
    dirty_runs: bytes = b""  # little-endian u64 pairs (first pfn, pages): GuestMemory.peek_dirty_runs


@dataclass(frozen=True)
class Postcopy:
    chunk_size: int  # bytes per chunk of the page exchange (4 KiB to MAX_POSTCOPY_CHUNK, whole pages)
    needed_runs: bytes = b""  # little-endian u64 pairs (first pfn, pages): the pages the destination lacks


@dataclass(frozen=True)
class PostcopyDone:
    """The destination's post-copy figures, sent once it has every page."""

    remote_faults: int  # demand fetches
    fault_p50_us: int
    fault_p99_us: int
    fault_max_us: int
    blocked_us: int  # time accesses (vCPUs, device DMA) waited for pages
    requested_pages: int
    pushed_pages: int


@dataclass(frozen=True)
class StreamsToken:
    count: int
    token: bytes  # random, per session: a data connection must present it in its JOIN


@dataclass(frozen=True)
class Join:
    index: int  # 1..n-1: the main connection is stream 0
    token: bytes
    mac: bytes = b""  # HMAC over the session's handshake when a key is used


@dataclass(frozen=True)
class Resolve:
    session: bytes  # session_id() of the migration in doubt
    decision: Decision


@dataclass(frozen=True)
class Resolved:
    outcome: Outcome
    start_us: int = 0  # RUNNING because of this RESOLVE: what starting the guest took


class Decision(enum.IntEnum):
    """What the source decided for a session: it commits exactly when it sent COMMITTED."""

    COMMIT = 1
    ABORT = 2


class Outcome(enum.IntEnum):
    """What the destination does with a session's guest after a RESOLVE."""

    RUNNING = 1  # it runs the guest (it read COMMITTED, or this RESOLVE said commit)
    DISCARDED = 2  # it threw the guest away (an ABORT, this RESOLVE said abort, or its operator did)
    UNKNOWN = 3  # it holds no such session (another process, or one that never reached COMMIT_ACK)


# -- messages: each declared once ---------------------------------------------------------------
#
# A message is a list of fields in wire order (``MESSAGES`` below). Each field kind knows its
# bytes both ways and the one rule its values obey, so encoding and decoding are derived from the
# same declaration and cannot drift: a value an encoder refuses is exactly one a decoder refuses,
# with the same sentence. Messages with one field (AUTH, ABORT, STREAMS, RESUMED, the digests)
# stand for that field's value; the others are the dataclasses below.


class _Reader:
    def __init__(self, msg_type: MessageType, payload: bytes) -> None:
        self.name = msg_type.name
        self.data = payload
        self.offset = 0

    def take(self, size: int, what: str) -> bytes:
        if self.offset + size > len(self.data):
            raise ProtocolError(f"{self.name}: truncated in {what} (needs {size} bytes at offset {self.offset}, payload is {len(self.data)})")
        out = self.data[self.offset : self.offset + size]
        self.offset += size
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        st = struct.Struct("<" + fmt)
        return st.unpack(self.take(st.size, what))

    def text(self, length: int, what: str) -> str:
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.name}: {what} is not valid UTF-8") from None

    def done(self) -> None:
        if self.offset != len(self.data):
            raise ProtocolError(f"{self.name}: {len(self.data) - self.offset} unexpected bytes after the last field")


class _Field:
    """One field of a message: ``name`` is its attribute (or key), ``what`` names it in a
    truncation error. ``present(version, values)`` says whether it is on the wire at all (fields
    added by a later protocol version); ``encode``/``decode`` move its bytes."""

    name: str
    what: str

    def present(self, version: int, values: dict[str, Any]) -> bool:
        return True

    def absent_value(self) -> Any:
        return None

    def encode(self, value: Any, msg: str) -> bytes:
        raise NotImplementedError

    def decode(self, r: _Reader, values: dict[str, Any]) -> Any:
        raise NotImplementedError


@dataclass(frozen=True)
class _Ints(_Field):
    """Integers read as one little-endian struct (``what`` names the group). Each part is
    ``(name, format, rule)``; a rule maps a raw value to the field's value, or says why not."""

    what: str
    parts: tuple[tuple[str, str, Any], ...]

    @property
    def name(self) -> str:
        return self.parts[0][0]

    def fmt(self) -> str:
        return "".join(f for _, f, _ in self.parts)

    def encode_all(self, values: dict[str, Any], msg: str) -> bytes:
        raw = []
        for name, fmt, rule in self.parts:
            value = values[name]
            if rule is not None:
                rule(value, msg)
            raw.append(_clamp(fmt, value) if rule is _saturating else int(value))
        return struct.pack("<" + self.fmt(), *raw)

    def decode_all(self, r: _Reader, values: dict[str, Any]) -> None:
        for (name, _fmt, rule), raw in zip(self.parts, r.unpack(self.fmt(), self.what), strict=True):
            values[name] = rule(raw, r.name) if rule is not None else raw


def _clamp(fmt: str, value: int) -> int:
    return max(0, min(int(value), (1 << (8 * struct.calcsize("<" + fmt))) - 1))


def _saturating(value: int, msg: str) -> int:
    """A count that saturates at the field's width rather than wrap (encode side; any value reads)."""
    return value


def _flag(label: str):
    def rule(value: int, msg: str) -> bool:
        if int(value) not in (0, 1):
            raise ProtocolError(f"{msg}: {label} is {int(value)}, expected 0 or 1")
        return bool(value)
    return rule


def _enum(cls: type[enum.IntEnum], label: str):
    def rule(value: int, msg: str):
        try:
            return cls(int(value))
        except ValueError:
            known = ", ".join(f"{m.value} {m.name.lower()}" for m in cls)
            raise ProtocolError(f"{msg}: unknown {label} {int(value)} ({known})") from None
    return rule


def _memory_flags(value: int, msg: str) -> MemoryFlags:
    if int(value) & ~int(MemoryFlags.ALL_PAGES | MemoryFlags.FINAL):
        raise ProtocolError(f"{msg}: unknown flags {int(value):#x}")
    return MemoryFlags(int(value))


def _within(low: int, high: int, says: str):
    """A number from ``low`` to ``high``; ``says`` is the sentence for one that is not ({n})."""
    def rule(value: int, msg: str) -> int:
        if not low <= int(value) <= high:
            raise ProtocolError(f"{msg}: {says.format(n=int(value))}")
        return int(value)
    return rule


@dataclass(frozen=True)
class _Fixed(_Field):
    """Exactly ``size`` bytes (a nonce, a token, a session id)."""

    name: str
    what: str
    size: int
    noun: str

    def encode(self, value: bytes, msg: str) -> bytes:
        if len(value) != self.size:
            raise ProtocolError(f"{msg}: {self.noun} is {self.size} bytes, got {len(value)}")
        return bytes(value)

    def decode(self, r: _Reader, values: dict[str, Any]) -> bytes:
        return r.take(self.size, self.what)


@dataclass(frozen=True)
class _Sized(_Field):
    """A u8 length, then that many bytes; the length is one of ``sizes`` (a MAC: none or 32)."""

    name: str
    what: str
    sizes: tuple[int, ...]
    label: str  # "MAC", "proof"

    def _check(self, size: int, msg: str) -> None:
        if size not in self.sizes:
            raise ProtocolError(f"{msg}: {self.label} length {size}, expected {' or '.join(map(str, self.sizes))}")

    def encode(self, value: bytes, msg: str) -> bytes:
        self._check(len(value), msg)
        return bytes([len(value)]) + bytes(value)

    def decode(self, r: _Reader, values: dict[str, Any]) -> bytes:
        (size,) = r.unpack("B", f"the {self.label} length")
        self._check(size, r.name)
        return r.take(size, self.what)


@dataclass(frozen=True)
class _Text(_Field):
    """A length (``length`` format), then that many bytes of UTF-8, at most ``limit``. Longer
    text an encoder refuses, or with ``cut`` shortens: "bytes" to the limit (a software name),
    "ellipsis" to the limit ending in "..." (a reason: the sentence is still read)."""

    name: str
    what: str
    length: str
    limit: int
    cut: str = ""

    def encode(self, value: str, msg: str) -> bytes:
        raw = value.encode("utf-8", errors="replace")
        if len(raw) > self.limit and self.cut == "bytes":
            raw = raw[: self.limit]
        elif len(raw) > self.limit and self.cut == "ellipsis":
            raw = raw[: self.limit - 3].decode("utf-8", errors="ignore").encode() + b"..."
        self._check(len(raw), msg)
        return struct.pack("<" + self.length, len(raw)) + raw

    def _check(self, size: int, msg: str) -> None:
        if size > self.limit:
            raise ProtocolError(f"{msg}: {self.what.removeprefix('the ')} of {size} bytes exceeds {self.limit}")

    def decode(self, r: _Reader, values: dict[str, Any]) -> str:
        (size,) = r.unpack(self.length, f"{self.what} length")
        self._check(size, r.name)
        return r.text(size, self.what)


@dataclass(frozen=True)
class _Devices(_Field):
    """SPEC's devices: a u16 count (at most MAX_DEVICES), then per device, sorted by name, a u8
    name length, the name (1 to MAX_NAME bytes) and its u32 section version."""

    name: str = "devices"
    what: str = "the device count"

    def encode(self, value: dict[str, int], msg: str) -> bytes:
        if len(value) > MAX_DEVICES:
            raise ProtocolError(f"{msg}: {len(value)} devices exceed the {MAX_DEVICES} allowed")
        parts = [struct.pack("<H", len(value))]
        for name, section_version in sorted(value.items()):
            raw = name.encode()
            if not 1 <= len(raw) <= MAX_NAME:
                raise ProtocolError(f"{msg}: device name {name!r} must be 1 to {MAX_NAME} bytes")
            parts.append(bytes([len(raw)]) + raw + struct.pack("<I", section_version))
        return b"".join(parts)

    def decode(self, r: _Reader, values: dict[str, Any]) -> dict[str, int]:
        (count,) = r.unpack("H", self.what)
        if count > MAX_DEVICES:
            raise ProtocolError(f"{r.name}: {count} devices exceed the {MAX_DEVICES} allowed")
        devices: dict[str, int] = {}
        for index in range(count):
            (name_len,) = r.unpack("B", f"device {index}'s name length")
            if name_len == 0:
                raise ProtocolError(f"{r.name}: device {index} has an empty name")
            name = r.text(name_len, f"device {index}'s name")
            (version,) = r.unpack("I", f"device '{name}''s version")
            if name in devices:
                raise ProtocolError(f"{r.name}: device '{name}' is listed twice")
            devices[name] = version
        return devices


@dataclass(frozen=True)
class _Versions(_Field):
    """HELLO's protocol versions: a u16 count (1 to 16), then that many u16."""

    name: str = "versions"
    what: str = "the version list"

    def _check(self, count: int, msg: str) -> None:
        if not 1 <= count <= 16:
            raise ProtocolError(f"{msg}: offers {count} protocol versions; 1 to 16 may be offered")

    def encode(self, value: tuple[int, ...], msg: str) -> bytes:
        self._check(len(value), msg)
        return struct.pack(f"<H{len(value)}H", len(value), *value)

    def decode(self, r: _Reader, values: dict[str, Any]) -> tuple[int, ...]:
        (count,) = r.unpack("H", "the version count")
        self._check(count, r.name)
        return tuple(r.unpack(f"{count}H", self.what))


def _codec_id(name: str, message: str) -> int:
    try:
        return CODECS[name]
    except KeyError:
        raise ProtocolError(f"{message}: unknown compression codec {name!r} (known: {', '.join(CODECS)})") from None


def _codec_name(raw: int, message: str) -> str:
    try:
        return _CODEC_NAMES[raw]
    except KeyError:
        raise ProtocolError(f"{message}: unknown compression codec id {raw} (known: "
                            f"{', '.join(f'{v} {k}' for k, v in CODECS.items())})") from None


@dataclass(frozen=True)
class _Since(_Field):
    """A field on the wire from protocol version ``since`` on (and, with ``stage``, only in an
    answer to that stage); an encoder refuses to put a value in a message that cannot carry it."""

    inner: _Field
    since: int
    stage: Stage | None = None
    says: str = ""  # "a compression offer"

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def what(self) -> str:
        return self.inner.what

    def present(self, version: int, values: dict[str, Any]) -> bool:
        return version >= self.since and (self.stage is None or values.get("stage") is self.stage)

    def absent_value(self) -> Any:
        return self.inner.absent_value()

    def refuse_absent(self, version: int, value: Any, msg: str) -> None:
        if value:
            raise ProtocolError(f"{msg}: protocol version {version} cannot carry {self.says}")

    def encode(self, value: Any, msg: str) -> bytes:
        return self.inner.encode(value, msg)

    def decode(self, r: _Reader, values: dict[str, Any]) -> Any:
        return self.inner.decode(r, values)


@dataclass(frozen=True)
class _CodecOffer(_Field):
    """SPEC's offer: a u8 count (at most MAX_CODECS), then that many codec ids, none twice."""

    name: str = "compression"
    what: str = "the compression codecs"

    def absent_value(self) -> tuple[str, ...]:
        return ()

    def encode(self, value: tuple[str, ...], msg: str) -> bytes:
        if len(value) > MAX_CODECS:
            raise ProtocolError(f"{msg}: {len(value)} compression codecs offered; at most {MAX_CODECS}")
        return bytes([len(value), *(_codec_id(c, msg) for c in value)])

    def decode(self, r: _Reader, values: dict[str, Any]) -> tuple[str, ...]:
        (offered,) = r.unpack("B", "the compression codec count")
        if offered > MAX_CODECS:
            raise ProtocolError(f"{r.name}: {offered} compression codecs offered; at most {MAX_CODECS}")
        codecs = tuple(_codec_name(c, r.name) for c in r.unpack(f"{offered}B", self.what))
        if len(set(codecs)) != len(codecs):
            raise ProtocolError(f"{r.name}: a compression codec is offered twice: {list(codecs)}")
        return codecs


@dataclass(frozen=True)
class _CodecAnswer(_Field):
    """ACCEPT's answer to SPEC: one codec id, 0 for none."""

    name: str = "compression"
    what: str = "the compression answer"

    def encode(self, value: str | None, msg: str) -> bytes:
        return bytes([_codec_id(value, msg) if value else 0])

    def decode(self, r: _Reader, values: dict[str, Any]) -> str | None:
        (codec,) = r.unpack("B", self.what)
        return _codec_name(codec, r.name) if codec else None


@dataclass(frozen=True)
class _Digest(_Field):
    """A 128-bit memory digest, 16 bytes little-endian."""

    name: str = "digest"
    what: str = "the memory digest"

    def encode(self, value: int, msg: str) -> bytes:
        if not 0 <= value < 1 << 128:
            raise ProtocolError(f"a memory digest is 128 bits; {value} is out of range")
        return value.to_bytes(16, "little")

    def decode(self, r: _Reader, values: dict[str, Any]) -> int:
        return int.from_bytes(r.take(16, self.what), "little")


@dataclass(frozen=True)
class MessageSpec:
    """One message, declared once: its type, its fields in wire order, the largest payload it may
    declare, and the class its decoded form takes (None: the one field's value, or None for a
    message with no fields). ``raw``: the payload is another owner's format (STATE: a state
    container, state/section.py) and passes through as bytes."""

    type: MessageType
    fields: tuple[_Field, ...]
    max_payload: int
    cls: type | None = None
    raw: bool = False

    def encode(self, message: Any, version: int = 1) -> bytes:
        msg = self.type.name
        if self.raw:
            return bytes(message)
        values = self._values(message)
        parts = []
        for f in self.fields:
            if isinstance(f, _Ints):
                parts.append(f.encode_all(values, msg))
            elif f.present(version, values):
                parts.append(f.encode(values[f.name], msg))
            elif isinstance(f, _Since):
                f.refuse_absent(version, values[f.name], msg)
        return b"".join(parts)

    def decode(self, payload: bytes, version: int = 1) -> Any:
        if self.raw:
            return payload
        r = _Reader(self.type, payload)
        values: dict[str, Any] = {}
        for f in self.fields:
            if isinstance(f, _Ints):
                f.decode_all(r, values)
            elif f.present(version, values):
                values[f.name] = f.decode(r, values)
            else:
                values[f.name] = f.absent_value()
        r.done()
        if self.cls is not None:
            return self.cls(**values)
        return next(iter(values.values()), None)

    def _values(self, message: Any) -> dict[str, Any]:
        if self.cls is not None:
            return {n: getattr(message, n) for n in self._names()}
        names = self._names()
        if not names:
            if message is not None:
                raise ProtocolError(f"{self.type.name}: carries no payload")
            return {}
        return {names[0]: message}

    def _names(self) -> list[str]:
        out: list[str] = []
        for f in self.fields:
            out += [n for n, _, _ in f.parts] if isinstance(f, _Ints) else [f.name]
        return out


@dataclass(frozen=True)
class _Segments(_Field):
    """LOCAL_MEMORY's segments: a u8 count (1 to MAX_SEGMENTS), then per segment a u8 name length,
    the name (1 to MAX_NAME bytes), its u64 guest-physical address and u64 size."""

    name: str = "segments"
    what: str = "the segment count"

    def _count(self, count: int, msg: str) -> None:
        if not 1 <= count <= MAX_SEGMENTS:
            raise ProtocolError(f"{msg}: {count} segments; 1 to {MAX_SEGMENTS} may be handed over")

    def encode(self, value: tuple[tuple[str, int, int], ...], msg: str) -> bytes:
        self._count(len(value), msg)
        parts = [bytes([len(value)])]
        for name, gpa, size in value:
            raw = name.encode()
            if not 1 <= len(raw) <= MAX_NAME:
                raise ProtocolError(f"{msg}: segment name {name!r} must be 1 to {MAX_NAME} bytes")
            parts.append(bytes([len(raw)]) + raw + struct.pack("<QQ", gpa, size))
        return b"".join(parts)

    def decode(self, r: _Reader, values: dict[str, Any]) -> tuple[tuple[str, int, int], ...]:
        (count,) = r.unpack("B", self.what)
        self._count(count, r.name)
        out = []
        for index in range(count):
            (name_len,) = r.unpack("B", f"segment {index}'s name length")
            if name_len == 0:
                raise ProtocolError(f"{r.name}: segment {index} has an empty name")
            name = r.text(name_len, f"segment {index}'s name")
            gpa, size = r.unpack("QQ", f"segment '{name}''s address and size")
            out.append((name, gpa, size))
        return tuple(out)


@dataclass(frozen=True)
class _Runs(_Field):
    """LOCAL_MEMORY's dirty runs (POSTCOPY's needed runs): a u32 count (at most MAX_DIRTY_RUNS),
    then that many 16-byte pairs (u64 first page frame number, u64 page count), passed through as
    bytes."""

    name: str = "dirty_runs"
    what: str = "the dirty run count"
    kind: str = "dirty"

    def _count(self, count: int, msg: str) -> None:
        if count > MAX_DIRTY_RUNS:
            raise ProtocolError(f"{msg}: {count} {self.kind} runs exceed the {MAX_DIRTY_RUNS} allowed")

    def encode(self, value: bytes, msg: str) -> bytes:
        if len(value) % 16:
            raise ProtocolError(f"{msg}: {self.kind} runs are 16-byte pairs, got {len(value)} bytes")
        self._count(len(value) // 16, msg)
        return struct.pack("<I", len(value) // 16) + bytes(value)

    def decode(self, r: _Reader, values: dict[str, Any]) -> bytes:
        (count,) = r.unpack("I", self.what)
        self._count(count, r.name)
        return r.take(16 * count, f"the {self.kind} runs")


def _chunk_size(value: int, msg: str) -> int:
    if not (4096 <= value <= MAX_POSTCOPY_CHUNK and value % 4096 == 0):
        raise ProtocolError(f"{msg}: chunk size {value} is not 4 KiB to {MAX_POSTCOPY_CHUNK // 1024} KiB in whole pages")
    return value


def _reason(what: str = "the reason") -> _Text:
    return _Text("reason", what, "H", MAX_REASON, cut="ellipsis")


def _mac(label: str = "MAC", name: str = "mac") -> _Sized:
    return _Sized(name, f"the {label}", (0, MAC_SIZE), label)


_STAGE = ("stage", "B", _enum(Stage, "stage"))
_NONCE = _Fixed("nonce", "the nonce", NONCE_SIZE, "a nonce")
_TOKEN = _Fixed("token", "the session token", TOKEN_SIZE, "a session token")
_STREAM_COUNT = _within(2, MAX_STREAMS, "{n} streams; 2 to " + str(MAX_STREAMS) + " may be asked for (one stream needs no STREAMS)")

#: Every message of the protocol, in type order.
MESSAGES: tuple[MessageSpec, ...] = (
    MessageSpec(MessageType.HELLO, (_Versions(), _NONCE, _Text("software", "the software name", "B", MAX_NAME, cut="bytes")),
                2 + 2 * 16 + NONCE_SIZE + 1 + MAX_NAME, Hello),
    MessageSpec(MessageType.CHALLENGE, (_Ints("version and key flag", (("version", "H", None), ("key_required", "B", _flag("key flag")))),
                                        _NONCE), 2 + 1 + NONCE_SIZE, Challenge),
    MessageSpec(MessageType.AUTH, (_mac(),), 1 + MAC_SIZE),
    MessageSpec(MessageType.ACCEPT, (_Ints("the stage", (_STAGE,)), _mac("proof", "proof"),
                                     _Since(_CodecAnswer(), COMPRESSION_VERSION, Stage.SPEC, "a compression answer")),
                2 + MAC_SIZE + 1, Accept),
    MessageSpec(MessageType.REFUSE, (_Ints("the stage", (_STAGE,)), _reason()), 1 + 2 + MAX_REASON, Refuse),
    MessageSpec(MessageType.SPEC, (
        _Ints("the fixed fields", (("page_size", "I", None), ("vcpus", "I", None), ("lowmem_size", "Q", None),
                                   ("highmem_size", "Q", None), ("wired", "B", _flag("wired flag")), ("live", "B", _flag("live flag")))),
        _Text("vendor", "the vendor", "B", MAX_NAME),
        _Text("tsc", "the TSC mode", "B", MAX_NAME),
        _Devices(),
        _Since(_CodecOffer(), COMPRESSION_VERSION, None, "a compression offer"),
    ), 64 * 1024, Spec),
    MessageSpec(MessageType.MEMORY, (_Ints("round and flags", (("round", "I", None), ("flags", "I", _memory_flags))),), 8, Memory),
    MessageSpec(MessageType.MEMORY_END, (_Ints("the round totals", (("round", "I", None), ("batches", "Q", None), ("data_pages", "Q", None),
                                                                    ("zero_pages", "Q", None), ("wire_bytes", "Q", None))),),
                4 + 4 * 8, MemoryEnd),
    MessageSpec(MessageType.STATE, (), DEFAULT_MAX_STATE, raw=True),
    MessageSpec(MessageType.COMMIT_REQUEST, (_Digest(),), 16),
    MessageSpec(MessageType.COMMIT_ACK, (_Digest(),), 16),
    MessageSpec(MessageType.COMMITTED, (), 0),
    MessageSpec(MessageType.ABORT, (_reason(),), 2 + MAX_REASON),
    MessageSpec(MessageType.RESUMED, (_Ints("the start time", (("start_us", "I", _saturating),)),), 4),
    MessageSpec(MessageType.STREAMS, (_Ints("the stream count", (("count", "H", _STREAM_COUNT),)),), 2),
    MessageSpec(MessageType.STREAMS_TOKEN, (_Ints("the stream count", (("count", "H", _STREAM_COUNT),)), _TOKEN),
                2 + TOKEN_SIZE, StreamsToken),
    MessageSpec(MessageType.JOIN, (_Ints("the stream index", (("index", "H", _within(1, MAX_STREAMS - 1, "stream index {n}; data streams are 1 to "
                                                                                     + str(MAX_STREAMS - 1))),)), _TOKEN, _mac()),
                2 + TOKEN_SIZE + 1 + MAC_SIZE, Join),
    MessageSpec(MessageType.RESOLVE, (_Fixed("session", "the session id", SESSION_ID_SIZE, "a session id"),
                                      _Ints("the decision", (("decision", "B", _enum(Decision, "decision")),))),
                SESSION_ID_SIZE + 1, Resolve),
    MessageSpec(MessageType.RESOLVED, (_Ints("the outcome and start time", (("outcome", "B", _enum(Outcome, "outcome")),
                                                                             ("start_us", "I", _saturating))),),
                1 + 4, Resolved),
    MessageSpec(MessageType.RELEASED, (), 0),
    MessageSpec(MessageType.LOCAL_MEMORY, (_Segments(), _Runs()),
                1 + MAX_SEGMENTS * (1 + MAX_NAME + 16) + 4 + 16 * MAX_DIRTY_RUNS, LocalMemory),
    MessageSpec(MessageType.POSTCOPY, (_Ints("the chunk size", (("chunk_size", "I", _chunk_size),)),
                                       _Runs("needed_runs", "the needed run count", "needed")),
                4 + 4 + 16 * MAX_DIRTY_RUNS, Postcopy),
    MessageSpec(MessageType.RECOVER, (_Fixed("session", "the session id", SESSION_ID_SIZE, "a session id"),), SESSION_ID_SIZE),
    MessageSpec(MessageType.RECOVERED, (_Ints("the outcome", (("outcome", "B", _enum(Outcome, "outcome")),)),), 1),
    MessageSpec(MessageType.POSTCOPY_DONE, (_Ints("the post-copy figures", (
        ("remote_faults", "Q", _saturating), ("fault_p50_us", "I", _saturating), ("fault_p99_us", "I", _saturating),
        ("fault_max_us", "I", _saturating), ("blocked_us", "Q", _saturating), ("requested_pages", "Q", _saturating),
        ("pushed_pages", "Q", _saturating))),), 8 + 3 * 4 + 3 * 8, PostcopyDone),
    MessageSpec(MessageType.ROUND_DONE, (_Ints("the round", (("round", "I", None),)),), 4),
    MessageSpec(MessageType.STATE_PART, (), DEFAULT_MAX_STATE, raw=True),
)
SPECS: dict[MessageType, MessageSpec] = {m.type: m for m in MESSAGES}
#: The messages that carry the state (section containers), bounded by the receiver's max_state.
STATE_MESSAGES = frozenset((MessageType.STATE, MessageType.STATE_PART))
# The largest payload each message may declare; the state's bound is the receiver's max_state.
MAX_PAYLOAD: dict[MessageType, int] = {m.type: m.max_payload for m in MESSAGES}


def encode_message(msg_type: MessageType, message: Any = None, version: int = 1) -> bytes:
    """The payload of ``message`` (its dataclass, or its one field's value) for ``version``."""
    return SPECS[msg_type].encode(message, version)


def decode_message(msg_type: MessageType, payload: bytes, version: int = 1) -> Any:
    """``msg_type``'s payload decoded and checked for ``version`` (ProtocolError naming the
    message and the field otherwise)."""
    return SPECS[msg_type].decode(payload, version)


# The names the two sides call, each a line over the table.


def encode_hello(m: Hello) -> bytes:
    return encode_message(MessageType.HELLO, m)


def decode_hello(payload: bytes) -> Hello:
    return decode_message(MessageType.HELLO, payload)


def encode_challenge(m: Challenge) -> bytes:
    return encode_message(MessageType.CHALLENGE, m)


def decode_challenge(payload: bytes) -> Challenge:
    return decode_message(MessageType.CHALLENGE, payload)


def encode_auth(mac: bytes) -> bytes:
    return encode_message(MessageType.AUTH, mac)


def decode_auth(payload: bytes) -> bytes:
    return decode_message(MessageType.AUTH, payload)


def encode_accept(m: Accept, version: int = 1) -> bytes:
    return encode_message(MessageType.ACCEPT, m, version)


def decode_accept(payload: bytes, version: int = 1) -> Accept:
    return decode_message(MessageType.ACCEPT, payload, version)


def encode_refuse(m: Refuse) -> bytes:
    return encode_message(MessageType.REFUSE, m)


def decode_refuse(payload: bytes) -> Refuse:
    return decode_message(MessageType.REFUSE, payload)


def encode_spec(m: Spec, version: int = 1) -> bytes:
    return encode_message(MessageType.SPEC, m, version)


def decode_spec(payload: bytes, protocol_version: int = 1) -> Spec:
    return decode_message(MessageType.SPEC, payload, protocol_version)


def encode_memory(m: Memory) -> bytes:
    return encode_message(MessageType.MEMORY, m)


def decode_memory(payload: bytes) -> Memory:
    return decode_message(MessageType.MEMORY, payload)


def encode_memory_end(m: MemoryEnd) -> bytes:
    return encode_message(MessageType.MEMORY_END, m)


def decode_memory_end(payload: bytes) -> MemoryEnd:
    return decode_message(MessageType.MEMORY_END, payload)


def encode_round_done(round_number: int) -> bytes:
    return encode_message(MessageType.ROUND_DONE, round_number)


def decode_round_done(payload: bytes) -> int:
    return decode_message(MessageType.ROUND_DONE, payload)


def encode_digest(digest: int) -> bytes:
    return encode_message(MessageType.COMMIT_REQUEST, digest)


def decode_digest(msg_type: MessageType, payload: bytes) -> int:
    return decode_message(msg_type, payload)


def encode_abort(reason: str) -> bytes:
    return encode_message(MessageType.ABORT, reason)


def decode_abort(payload: bytes) -> str:
    return decode_message(MessageType.ABORT, payload)


def encode_resumed(start_us: int) -> bytes:
    return encode_message(MessageType.RESUMED, start_us)


def decode_resumed(payload: bytes) -> int:
    return decode_message(MessageType.RESUMED, payload)


def encode_streams(count: int) -> bytes:
    return encode_message(MessageType.STREAMS, count)


def decode_streams(payload: bytes) -> int:
    return decode_message(MessageType.STREAMS, payload)


def encode_streams_token(m: StreamsToken) -> bytes:
    return encode_message(MessageType.STREAMS_TOKEN, m)


def decode_streams_token(payload: bytes) -> StreamsToken:
    return decode_message(MessageType.STREAMS_TOKEN, payload)


def encode_join(m: Join) -> bytes:
    return encode_message(MessageType.JOIN, m)


def decode_join(payload: bytes) -> Join:
    return decode_message(MessageType.JOIN, payload)


def encode_resolve(m: Resolve) -> bytes:
    return encode_message(MessageType.RESOLVE, m)


def decode_resolve(payload: bytes) -> Resolve:
    return decode_message(MessageType.RESOLVE, payload)


def encode_local_memory(m: LocalMemory) -> bytes:
    return encode_message(MessageType.LOCAL_MEMORY, m)


def decode_local_memory(payload: bytes) -> LocalMemory:
    return decode_message(MessageType.LOCAL_MEMORY, payload)


def encode_resolved(m: Resolved) -> bytes:
    return encode_message(MessageType.RESOLVED, m)


def decode_resolved(payload: bytes) -> Resolved:
    return decode_message(MessageType.RESOLVED, payload)



def encode_postcopy(m: Postcopy) -> bytes:
    return encode_message(MessageType.POSTCOPY, m)


def decode_postcopy(payload: bytes) -> Postcopy:
    return decode_message(MessageType.POSTCOPY, payload)


def encode_postcopy_done(m: PostcopyDone) -> bytes:
    return encode_message(MessageType.POSTCOPY_DONE, m)


def decode_postcopy_done(payload: bytes) -> PostcopyDone:
    return decode_message(MessageType.POSTCOPY_DONE, payload)


def encode_recover(session: bytes) -> bytes:
    return encode_message(MessageType.RECOVER, session)


def decode_recover(payload: bytes) -> bytes:
    return decode_message(MessageType.RECOVER, payload)


def encode_recovered(outcome: Outcome) -> bytes:
    return encode_message(MessageType.RECOVERED, outcome)


def decode_recovered(payload: bytes) -> Outcome:
    return decode_message(MessageType.RECOVERED, payload)


def decode_empty(msg_type: MessageType, payload: bytes) -> None:
    if payload:
        raise ProtocolError(f"{msg_type.name}: carries no payload, got {len(payload)} bytes")


# -- the order of messages: the receiver's state machine and the source's sequence --------------


class RxState(enum.Enum):
    """The receiver's (destination's) states, as ``docs/migration-protocol.md`` draws them."""

    AWAIT_HELLO = "await-hello"
    AWAIT_AUTH = "await-auth"
    AWAIT_SPEC = "await-spec"
    READY = "ready"
    JOINING = "joining"  # v3: data streams connecting after STREAMS
    RECEIVING = "receiving"
    STATE_PARTS = "state-parts"  # v9: STATE_PART read, the rest of the state to come
    HAVE_STATE = "have-state"
    AWAIT_COMMITTED = "await-committed"
    IN_DOUBT = "in-doubt"  # v5: COMMIT_ACK sent, then the link failed: held paused until settled
    RUNNING = "running"
    ANSWERED = "answered"  # v5: a connection that asked RESOLVE, answered with RESOLVED
    PAGES = "pages"  # v7: a connection that asked RECOVER carries the page exchange, then RELEASED
    DISCARDED = "discarded"


#: The receiver's transitions: in each state, the messages it reads and the state each leads to
#: once handled (JOIN: the n-1 JOINs on the data connections, all accepted). A frame of any other
#: type is refused from its header, naming it and the state. Not drawn: from any state, ABORT, a
#: bad or unexpected frame, EOF, a timeout or a cancel lead to DISCARDED, except that from
#: AWAIT_COMMITTED (v5) all but ABORT lead to IN_DOUBT.
RECEIVER: dict[RxState, dict[MessageType, RxState]] = {
    RxState.AWAIT_HELLO: {MessageType.HELLO: RxState.AWAIT_AUTH},
    RxState.AWAIT_AUTH: {MessageType.AUTH: RxState.AWAIT_SPEC},
    RxState.AWAIT_SPEC: {MessageType.SPEC: RxState.READY, MessageType.RESOLVE: RxState.ANSWERED, MessageType.RECOVER: RxState.PAGES},
    RxState.READY: {MessageType.STREAMS: RxState.JOINING, MessageType.MEMORY: RxState.RECEIVING, MessageType.STATE: RxState.HAVE_STATE,
                    MessageType.LOCAL_MEMORY: RxState.READY, MessageType.POSTCOPY: RxState.READY,
                    MessageType.STATE_PART: RxState.STATE_PARTS},
    RxState.STATE_PARTS: {MessageType.STATE_PART: RxState.STATE_PARTS, MessageType.STATE: RxState.HAVE_STATE},
    RxState.JOINING: {MessageType.JOIN: RxState.READY},
    RxState.RECEIVING: {MessageType.MEMORY_END: RxState.READY},
    RxState.HAVE_STATE: {MessageType.COMMIT_REQUEST: RxState.AWAIT_COMMITTED},
    RxState.AWAIT_COMMITTED: {MessageType.COMMITTED: RxState.RUNNING},
    RxState.RUNNING: {MessageType.RELEASED: RxState.RUNNING},
    RxState.ANSWERED: {MessageType.RELEASED: RxState.ANSWERED},
    RxState.PAGES: {MessageType.RELEASED: RxState.PAGES},
}

#: The protocol version that added each message (the rest are in every version).
SINCE: dict[MessageType, int] = {
    MessageType.STREAMS: STREAMS_VERSION,
    MessageType.STREAMS_TOKEN: STREAMS_VERSION,
    MessageType.JOIN: STREAMS_VERSION,
    MessageType.RESOLVE: OWNERSHIP_VERSION,
    MessageType.RESOLVED: OWNERSHIP_VERSION,
    MessageType.RELEASED: OWNERSHIP_VERSION,
    MessageType.LOCAL_MEMORY: LOCAL_VERSION,
    MessageType.POSTCOPY: POSTCOPY_VERSION,
    MessageType.RECOVER: POSTCOPY_VERSION,
    MessageType.RECOVERED: POSTCOPY_VERSION,
    MessageType.POSTCOPY_DONE: POSTCOPY_VERSION,
    MessageType.ROUND_DONE: ROUND_DONE_VERSION,
    MessageType.STATE_PART: STATE_PART_VERSION,
}

#: The source's sequence on one connection: after each message it sent (None: nothing yet), the
#: messages it may send next. ABORT may follow anything.
SOURCE_NEXT: dict[MessageType | None, tuple[MessageType, ...]] = {
    None: (MessageType.HELLO,),
    MessageType.HELLO: (MessageType.AUTH,),
    MessageType.AUTH: (MessageType.SPEC, MessageType.RESOLVE, MessageType.RECOVER),
    MessageType.SPEC: (MessageType.STREAMS, MessageType.MEMORY, MessageType.LOCAL_MEMORY, MessageType.POSTCOPY),
    MessageType.LOCAL_MEMORY: (MessageType.STATE, MessageType.STATE_PART),
    MessageType.POSTCOPY: (MessageType.STATE, MessageType.STATE_PART),
    MessageType.STREAMS: (MessageType.MEMORY, MessageType.POSTCOPY),
    MessageType.MEMORY: (MessageType.MEMORY_END,),
    MessageType.MEMORY_END: (MessageType.MEMORY, MessageType.STATE, MessageType.STATE_PART, MessageType.POSTCOPY),
    MessageType.STATE_PART: (MessageType.STATE_PART, MessageType.STATE),
    MessageType.STATE: (MessageType.COMMIT_REQUEST,),
    MessageType.COMMIT_REQUEST: (MessageType.COMMITTED,),
    MessageType.COMMITTED: (MessageType.RELEASED,),
    MessageType.RESOLVE: (MessageType.RELEASED,),
    MessageType.RECOVER: (MessageType.RELEASED,),
    MessageType.RELEASED: (),
}

#: What the source reads after each message that is answered (REFUSE and ABORT may come instead).
SOURCE_AWAITS: dict[MessageType, MessageType] = {
    MessageType.HELLO: MessageType.CHALLENGE,
    MessageType.AUTH: MessageType.ACCEPT,
    MessageType.SPEC: MessageType.ACCEPT,
    MessageType.STREAMS: MessageType.STREAMS_TOKEN,
    MessageType.MEMORY_END: MessageType.ROUND_DONE,  # v8, and only for a round that is not final
    MessageType.COMMIT_REQUEST: MessageType.COMMIT_ACK,
    MessageType.COMMITTED: MessageType.RESUMED,
    MessageType.RESOLVE: MessageType.RESOLVED,
    MessageType.RECOVER: MessageType.RECOVERED,
}


def receiver_reads(state: RxState, version: int) -> tuple[MessageType, ...]:
    """The messages a receiver in ``state`` reads at protocol ``version``."""
    return tuple(t for t in RECEIVER.get(state, {}) if version >= SINCE.get(t, 0))


def receiver_next(state: RxState, msg_type: MessageType) -> RxState:
    """The state ``msg_type``, handled, leads to from ``state``; ProtocolError naming both if none."""
    try:
        return RECEIVER[state][msg_type]
    except KeyError:
        raise ProtocolError(f"unexpected {msg_type.name} in state {state.value}") from None


def source_may_send(last: MessageType | None, msg_type: MessageType) -> None:
    """Refuse (ProtocolError naming both) a message the source's sequence does not allow after ``last``."""
    if msg_type is not MessageType.ABORT and msg_type not in SOURCE_NEXT.get(last, ()):
        after = f"after {last.name}" if last is not None else "first"
        raise ProtocolError(f"the source may not send {msg_type.name} {after} (the sequence allows "
                            f"{' or '.join(t.name for t in SOURCE_NEXT.get(last, ())) or 'nothing more'})")


def receiver_drawing() -> list[str]:
    """The receiver's transitions as the docs draw them: ``STATE --MESSAGE--> STATE``, one a line."""
    return [f"{state.name} --{t.name}--> {nxt.name}" for state, moves in RECEIVER.items() for t, nxt in moves.items()]


_SESSION_LABEL = b"vmmpy-migration-v5 session\x00"


def session_id(hello_frame: bytes, challenge_frame: bytes) -> bytes:
    """The name both ends give a session: a hash of its HELLO and CHALLENGE as sent (both
    nonces), so it is fresh for every migration and needs no field of its own. It names the
    session; it proves nothing (the RESOLVE connection's own handshake does)."""
    return hashlib.sha256(_SESSION_LABEL + hello_frame + challenge_frame).digest()[:SESSION_ID_SIZE]



# -- a local migration's descriptors and digest ---------------------------------------------------


def send_memory_fds(sock: socket.socket, fds: list[int]) -> None:
    """The byte that follows LOCAL_MEMORY, carrying the segments' memfds (SCM_RIGHTS) in order."""
    try:
        if socket.send_fds(sock, [FDS_MARKER], list(fds)) != 1:
            raise ConnectionLost("sending the memory descriptors: the destination took nothing")
    except OSError as err:
        raise ConnectionLost(f"sending the memory descriptors: {err.strerror or err}") from None


def recv_memory_fds(sock: socket.socket, count: int) -> list[int]:
    """The descriptors that follow LOCAL_MEMORY: exactly ``count`` of them on the marker byte, or
    ProtocolError saying what came (any that did come are closed)."""
    try:
        data, fds, flags, _ = socket.recv_fds(sock, 1, count + 1)
    except (BlockingIOError, TimeoutError):
        raise MigrationTimeout("timed out waiting for the memory descriptors after LOCAL_MEMORY") from None
    except OSError as err:
        raise ConnectionLost(f"connection lost while reading the memory descriptors: {err.strerror or err}") from None
    if data != FDS_MARKER or len(fds) != count or flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        got = "end of stream" if not data else f"{data!r} with {len(fds)} descriptor(s)"
        raise ProtocolError(f"LOCAL_MEMORY announced {count} memory descriptor(s) on the byte {FDS_MARKER!r}; got {got}")
    return fds


_LOCAL_LABEL = b"vmmpy-migration-v6 local memory\x00"


def local_digest(segments: list[tuple[str, int, int, int, int]]) -> int:
    """What COMMIT_REQUEST and COMMIT_ACK carry in a local migration: a 128-bit hash of each
    segment's (name, gpa, size) and its memfd's (device, inode). Both ends compute it from the
    descriptors they hold, so equal digests mean the destination maps the source's very memory."""
    h = hashlib.sha256(_LOCAL_LABEL)
    for name, gpa, size, dev, ino in segments:
        raw = name.encode()
        h.update(bytes([len(raw)]) + raw + struct.pack("<QQQQ", gpa, size, dev, ino))
    return int.from_bytes(h.digest()[:16], "little")


# -- the end-of-round marker: an empty page batch ----------------------------------------------

#: Bytes of a page batch's fixed header, and so of an end-of-round batch (the format is the
#: memory core's, rust/wire/batch.rs; this module only names it).
BATCH_HEADER_SIZE = _core.BATCH_HEADER_SIZE


def end_of_round_batch(segment_gpa: int) -> bytes:
    """A page batch with no ranges: the memory core receives it as a no-op, and the receiver
    takes it as the end of a round's batches (the senders never emit an empty batch). Encoded by
    the memory core, the batch format's one owner."""
    return _core.end_of_round_batch(segment_gpa)


# -- authentication ----------------------------------------------------------------------------

_SOURCE_LABEL = b"vmmpy-migration-v1 source proof\x00"
_DEST_LABEL = b"vmmpy-migration-v1 destination proof\x00"


def source_proof(key: bytes, hello_frame: bytes, challenge_frame: bytes) -> bytes:
    """HMAC-SHA256 over both frames as sent (so both nonces and the chosen version are bound)."""
    return hmac.new(key, _SOURCE_LABEL + hello_frame + challenge_frame, hashlib.sha256).digest()


def destination_proof(key: bytes, hello_frame: bytes, challenge_frame: bytes, auth_frame: bytes) -> bytes:
    """The destination's answer: the same transcript plus the source's AUTH, a different label,
    so a source never sends memory to a peer that does not hold the key too."""
    return hmac.new(key, _DEST_LABEL + hello_frame + challenge_frame + auth_frame, hashlib.sha256).digest()


_JOIN_LABEL = b"vmmpy-migration-v3 join\x00"
_JOINED_LABEL = b"vmmpy-migration-v3 join accepted\x00"


def join_proof(key: bytes, hello_frame: bytes, challenge_frame: bytes, index: int, token: bytes) -> bytes:
    """A data connection's proof that it belongs to the session: HMAC over the session's HELLO and
    CHALLENGE (both nonces), the stream index and the session token."""
    return hmac.new(key, _JOIN_LABEL + hello_frame + challenge_frame + struct.pack("<H", index) + token, hashlib.sha256).digest()


def joined_proof(key: bytes, hello_frame: bytes, challenge_frame: bytes, join_frame: bytes) -> bytes:
    """The destination's answer on a data connection, so pages never go to a peer without the key."""
    return hmac.new(key, _JOINED_LABEL + hello_frame + challenge_frame + join_frame, hashlib.sha256).digest()


def proofs_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
