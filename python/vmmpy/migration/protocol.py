"""The migration wire protocol: frames, messages, and the order they come in.

This module owns the bytes on the wire and nothing else: no sockets policy, no VM, no rounds.
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
    |==== page batches (VMPB), raw, then one =====>|     recv_pages() per batch, in Rust
    |==== empty batch ending the round ===========>|     (with n streams: on every stream)
    |---- MEMORY_END (r, totals) ----------------->|     totals checked against what arrived
    |     ... one MEMORY..MEMORY_END per round ... |
    |---- STATE (encode_sections container) ------>|  D: restore_sections
    |---- COMMIT_REQUEST (source digest) --------->|  D: commit digest of own memory, compare
    |<--- COMMIT_ACK (destination digest) ---------|  D: AWAIT_COMMITTED
    |---- COMMITTED ------------------------------>|  D: start_running; S: stop_for_good
    |<--- RESUMED (start time) --------------------|  S: the downtime ends (best effort)
    |                                              |
    |<--- ABORT (why) ---- either way, any time ---|  before COMMITTED: S resumes, D discards

Receiver (destination) state machine::

    AWAIT_HELLO --HELLO--> AWAIT_AUTH --AUTH ok--> AWAIT_SPEC --SPEC ok--> READY
    READY --STREAMS (v3, before round 0, once)--> JOINING --n-1 JOINs accepted--> READY
    READY --MEMORY--> RECEIVING --batches, empty batch, MEMORY_END--> READY
    READY --STATE--> HAVE_STATE --COMMIT_REQUEST, digest equal--> AWAIT_COMMITTED
    AWAIT_COMMITTED --COMMITTED--> RUNNING (done)
    any state --ABORT, bad frame, unexpected message, EOF, timeout--> DISCARDED (done)

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

Version 4 adds compression: SPEC ends with the codecs the source offers (``u8 n, n x u8
codec``; 1 = LZ4) and the destination's ACCEPT of the spec ends with the one it takes (``u8
codec``, 0 = none). Only then may page batches carry the LZ4 flag; an older peer never sees
either field, nor a compressed batch.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
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
PROTOCOL_VERSIONS = (2, 3, 4, 5)
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


# The largest payload each message may declare; STATE's bound is the receiver's max_state.
MAX_PAYLOAD = {
    MessageType.HELLO: 2 + 2 * 16 + NONCE_SIZE + 1 + MAX_NAME,
    MessageType.CHALLENGE: 2 + 1 + NONCE_SIZE,
    MessageType.AUTH: 1 + MAC_SIZE,
    MessageType.ACCEPT: 2 + MAC_SIZE + 1,
    MessageType.REFUSE: 1 + 2 + MAX_REASON,
    MessageType.SPEC: 64 * 1024,
    MessageType.MEMORY: 8,
    MessageType.MEMORY_END: 4 + 4 * 8,
    MessageType.STATE: DEFAULT_MAX_STATE,
    MessageType.COMMIT_REQUEST: 16,
    MessageType.COMMIT_ACK: 16,
    MessageType.COMMITTED: 0,
    MessageType.ABORT: 2 + MAX_REASON,
    MessageType.RESUMED: 4,
    MessageType.STREAMS: 2,
    MessageType.STREAMS_TOKEN: 2 + TOKEN_SIZE,
    MessageType.JOIN: 2 + TOKEN_SIZE + 1 + MAC_SIZE,
    MessageType.RESOLVE: SESSION_ID_SIZE + 1,
    MessageType.RESOLVED: 1 + 4,
    MessageType.RELEASED: 0,
}


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
    bound = max_state if msg_type is MessageType.STATE else MAX_PAYLOAD[msg_type]
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
    """The peer's address for a message (a TLS relay's local end has none: "the peer")."""
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


# -- payload reading helpers -------------------------------------------------------------------


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


def _reason_bytes(reason: str) -> bytes:
    raw = reason.encode("utf-8", errors="replace")
    if len(raw) > MAX_REASON:
        raw = raw[: MAX_REASON - 3].decode("utf-8", errors="ignore").encode() + b"..."
    return raw


# -- messages: one encoder and one decoder each ------------------------------------------------


@dataclass(frozen=True)
class Hello:
    versions: tuple[int, ...]
    nonce: bytes
    software: str = "vmmpy"


def encode_hello(m: Hello) -> bytes:
    if not 1 <= len(m.versions) <= 16:
        raise ProtocolError(f"HELLO: {len(m.versions)} protocol versions; 1 to 16 may be offered")
    sw = m.software.encode()[:MAX_NAME]
    return struct.pack(f"<H{len(m.versions)}H", len(m.versions), *m.versions) + _nonce(m.nonce, "HELLO") + bytes([len(sw)]) + sw


def decode_hello(payload: bytes) -> Hello:
    r = _Reader(MessageType.HELLO, payload)
    (count,) = r.unpack("H", "the version count")
    if not 1 <= count <= 16:
        raise ProtocolError(f"HELLO: offers {count} protocol versions; 1 to 16 may be offered")
    versions = r.unpack(f"{count}H", "the version list")
    nonce = r.take(NONCE_SIZE, "the nonce")
    (sw_len,) = r.unpack("B", "the software name length")
    software = r.text(sw_len, "the software name")
    r.done()
    return Hello(tuple(versions), nonce, software)


def _nonce(nonce: bytes, name: str) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise ProtocolError(f"{name}: nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    return nonce


@dataclass(frozen=True)
class Challenge:
    version: int
    key_required: bool
    nonce: bytes


def encode_challenge(m: Challenge) -> bytes:
    return struct.pack("<HB", m.version, int(m.key_required)) + _nonce(m.nonce, "CHALLENGE")


def decode_challenge(payload: bytes) -> Challenge:
    r = _Reader(MessageType.CHALLENGE, payload)
    version, key_required = r.unpack("HB", "version and key flag")
    if key_required not in (0, 1):
        raise ProtocolError(f"CHALLENGE: key flag is {key_required}, expected 0 or 1")
    nonce = r.take(NONCE_SIZE, "the nonce")
    r.done()
    return Challenge(version, bool(key_required), nonce)


def encode_auth(mac: bytes) -> bytes:
    if len(mac) not in (0, MAC_SIZE):
        raise ProtocolError(f"AUTH: a MAC is {MAC_SIZE} bytes (or none), got {len(mac)}")
    return bytes([len(mac)]) + mac


def decode_auth(payload: bytes) -> bytes:
    r = _Reader(MessageType.AUTH, payload)
    (size,) = r.unpack("B", "the MAC length")
    if size not in (0, MAC_SIZE):
        raise ProtocolError(f"AUTH: MAC length {size}, expected 0 or {MAC_SIZE}")
    mac = r.take(size, "the MAC")
    r.done()
    return mac


@dataclass(frozen=True)
class Accept:
    stage: Stage
    proof: bytes = b""  # the destination's HMAC, in the AUTH stage when it holds a key
    compression: str | None = None  # version >= 4, SPEC stage: the codec taken, None for none


def encode_accept(m: Accept, version: int = 1) -> bytes:
    if len(m.proof) not in (0, MAC_SIZE):
        raise ProtocolError(f"ACCEPT: a proof is {MAC_SIZE} bytes (or none), got {len(m.proof)}")
    out = bytes([int(m.stage), len(m.proof)]) + m.proof
    if version >= COMPRESSION_VERSION and m.stage is Stage.SPEC:
        out += bytes([_codec_id(m.compression, "ACCEPT") if m.compression else 0])
    elif m.compression:
        raise ProtocolError(f"ACCEPT: protocol version {version} cannot carry a compression answer")
    return out


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


def _stage(raw: int, name: str) -> Stage:
    try:
        return Stage(raw)
    except ValueError:
        raise ProtocolError(f"{name}: unknown stage {raw}") from None


def decode_accept(payload: bytes, version: int = 1) -> Accept:
    r = _Reader(MessageType.ACCEPT, payload)
    raw_stage, size = r.unpack("BB", "stage and proof length")
    stage = _stage(raw_stage, "ACCEPT")
    if size not in (0, MAC_SIZE):
        raise ProtocolError(f"ACCEPT: proof length {size}, expected 0 or {MAC_SIZE}")
    proof = r.take(size, "the proof")
    compression = None
    if version >= COMPRESSION_VERSION and stage is Stage.SPEC:
        (codec,) = r.unpack("B", "the compression answer")
        compression = _codec_name(codec, "ACCEPT") if codec else None
    r.done()
    return Accept(stage, proof, compression)


@dataclass(frozen=True)
class Refuse:
    stage: Stage
    reason: str


def encode_refuse(m: Refuse) -> bytes:
    raw = _reason_bytes(m.reason)
    return struct.pack("<BH", int(m.stage), len(raw)) + raw


def decode_refuse(payload: bytes) -> Refuse:
    r = _Reader(MessageType.REFUSE, payload)
    raw_stage, size = r.unpack("BH", "stage and reason length")
    stage = _stage(raw_stage, "REFUSE")
    if size > MAX_REASON:
        raise ProtocolError(f"REFUSE: reason of {size} bytes exceeds {MAX_REASON}")
    reason = r.text(size, "the reason")
    r.done()
    return Refuse(stage, reason)


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


_SPEC_FIXED = struct.Struct("<IIQQBB")


def encode_spec(m: Spec, version: int = 1) -> bytes:
    vendor = m.vendor.encode()
    if len(vendor) > MAX_NAME:
        raise ProtocolError(f"SPEC: vendor name of {len(vendor)} bytes exceeds {MAX_NAME}")
    if len(m.devices) > MAX_DEVICES:
        raise ProtocolError(f"SPEC: {len(m.devices)} devices exceed the {MAX_DEVICES} allowed")
    parts = [_SPEC_FIXED.pack(m.page_size, m.vcpus, m.lowmem_size, m.highmem_size, int(m.wired), int(m.live))]
    parts.append(bytes([len(vendor)]) + vendor)
    tsc = m.tsc.encode()
    if len(tsc) > MAX_NAME:
        raise ProtocolError(f"SPEC: TSC mode of {len(tsc)} bytes exceeds {MAX_NAME}")
    parts.append(bytes([len(tsc)]) + tsc)
    parts.append(struct.pack("<H", len(m.devices)))
    for name, section_version in sorted(m.devices.items()):
        raw = name.encode()
        if not 1 <= len(raw) <= MAX_NAME:
            raise ProtocolError(f"SPEC: device name {name!r} must be 1 to {MAX_NAME} bytes")
        parts.append(bytes([len(raw)]) + raw + struct.pack("<I", section_version))
    if version >= COMPRESSION_VERSION:
        if len(m.compression) > MAX_CODECS:
            raise ProtocolError(f"SPEC: {len(m.compression)} compression codecs offered; at most {MAX_CODECS}")
        parts.append(bytes([len(m.compression), *(_codec_id(c, "SPEC") for c in m.compression)]))
    elif m.compression:
        raise ProtocolError(f"SPEC: protocol version {version} cannot carry a compression offer")
    return b"".join(parts)


def decode_spec(payload: bytes, protocol_version: int = 1) -> Spec:
    r = _Reader(MessageType.SPEC, payload)
    page_size, vcpus, lowmem, highmem, wired, live = r.unpack(_SPEC_FIXED.format[1:], "the fixed fields")
    if wired not in (0, 1) or live not in (0, 1):
        raise ProtocolError(f"SPEC: wired/live flags must be 0 or 1, got {wired}/{live}")
    (vendor_len,) = r.unpack("B", "the vendor length")
    vendor = r.text(vendor_len, "the vendor")
    (tsc_len,) = r.unpack("B", "the TSC mode length")
    tsc = r.text(tsc_len, "the TSC mode")
    (count,) = r.unpack("H", "the device count")
    if count > MAX_DEVICES:
        raise ProtocolError(f"SPEC: {count} devices exceed the {MAX_DEVICES} allowed")
    devices: dict[str, int] = {}
    for index in range(count):
        (name_len,) = r.unpack("B", f"device {index}'s name length")
        if name_len == 0:
            raise ProtocolError(f"SPEC: device {index} has an empty name")
        name = r.text(name_len, f"device {index}'s name")
        (version,) = r.unpack("I", f"device '{name}''s version")
        if name in devices:
            raise ProtocolError(f"SPEC: device '{name}' is listed twice")
        devices[name] = version
    compression: tuple[str, ...] = ()
    if protocol_version >= COMPRESSION_VERSION:
        (offered,) = r.unpack("B", "the compression codec count")
        if offered > MAX_CODECS:
            raise ProtocolError(f"SPEC: {offered} compression codecs offered; at most {MAX_CODECS}")
        codecs = r.unpack(f"{offered}B", "the compression codecs")
        compression = tuple(_codec_name(c, "SPEC") for c in codecs)
        if len(set(compression)) != len(compression):
            raise ProtocolError(f"SPEC: a compression codec is offered twice: {list(compression)}")
    r.done()
    return Spec(page_size, vendor, vcpus, lowmem, highmem, bool(wired), bool(live), devices, tsc, compression)


@dataclass(frozen=True)
class Memory:
    round: int
    flags: MemoryFlags


def encode_memory(m: Memory) -> bytes:
    return struct.pack("<II", m.round, int(m.flags))


def decode_memory(payload: bytes) -> Memory:
    r = _Reader(MessageType.MEMORY, payload)
    rnd, flags = r.unpack("II", "round and flags")
    r.done()
    if flags & ~int(MemoryFlags.ALL_PAGES | MemoryFlags.FINAL):
        raise ProtocolError(f"MEMORY: unknown flags {flags:#x}")
    return Memory(rnd, MemoryFlags(flags))


@dataclass(frozen=True)
class MemoryEnd:
    round: int
    batches: int
    data_pages: int
    zero_pages: int
    wire_bytes: int


_MEMORY_END = struct.Struct("<IQQQQ")


def encode_memory_end(m: MemoryEnd) -> bytes:
    return _MEMORY_END.pack(m.round, m.batches, m.data_pages, m.zero_pages, m.wire_bytes)


def decode_memory_end(payload: bytes) -> MemoryEnd:
    r = _Reader(MessageType.MEMORY_END, payload)
    fields = r.unpack(_MEMORY_END.format[1:], "the round totals")
    r.done()
    return MemoryEnd(*fields)


def _stream_count(count: int, name: str) -> int:
    if not 2 <= count <= MAX_STREAMS:
        raise ProtocolError(f"{name}: {count} streams; 2 to {MAX_STREAMS} may be asked for (one stream needs no STREAMS)")
    return count


def encode_streams(count: int) -> bytes:
    return struct.pack("<H", _stream_count(count, "STREAMS"))


def decode_streams(payload: bytes) -> int:
    r = _Reader(MessageType.STREAMS, payload)
    (count,) = r.unpack("H", "the stream count")
    r.done()
    return _stream_count(count, "STREAMS")


@dataclass(frozen=True)
class StreamsToken:
    count: int
    token: bytes  # random, per session: a data connection must present it in its JOIN


def _token(token: bytes, name: str) -> bytes:
    if len(token) != TOKEN_SIZE:
        raise ProtocolError(f"{name}: a session token is {TOKEN_SIZE} bytes, got {len(token)}")
    return token


def encode_streams_token(m: StreamsToken) -> bytes:
    return struct.pack("<H", _stream_count(m.count, "STREAMS_TOKEN")) + _token(m.token, "STREAMS_TOKEN")


def decode_streams_token(payload: bytes) -> StreamsToken:
    r = _Reader(MessageType.STREAMS_TOKEN, payload)
    (count,) = r.unpack("H", "the stream count")
    token = r.take(TOKEN_SIZE, "the session token")
    r.done()
    return StreamsToken(_stream_count(count, "STREAMS_TOKEN"), token)


@dataclass(frozen=True)
class Join:
    index: int  # 1..n-1: the main connection is stream 0
    token: bytes
    mac: bytes = b""  # HMAC over the session's handshake when a key is used


def encode_join(m: Join) -> bytes:
    if not 1 <= m.index < MAX_STREAMS:
        raise ProtocolError(f"JOIN: stream index {m.index}; data streams are 1 to {MAX_STREAMS - 1}")
    if len(m.mac) not in (0, MAC_SIZE):
        raise ProtocolError(f"JOIN: a MAC is {MAC_SIZE} bytes (or none), got {len(m.mac)}")
    return struct.pack("<H", m.index) + _token(m.token, "JOIN") + bytes([len(m.mac)]) + m.mac


def decode_join(payload: bytes) -> Join:
    r = _Reader(MessageType.JOIN, payload)
    (index,) = r.unpack("H", "the stream index")
    token = r.take(TOKEN_SIZE, "the session token")
    (size,) = r.unpack("B", "the MAC length")
    if size not in (0, MAC_SIZE):
        raise ProtocolError(f"JOIN: MAC length {size}, expected 0 or {MAC_SIZE}")
    mac = r.take(size, "the MAC")
    r.done()
    return Join(index, token, mac)


def encode_digest(digest: int) -> bytes:
    if not 0 <= digest < 1 << 128:
        raise ProtocolError(f"a memory digest is 128 bits; {digest} is out of range")
    return digest.to_bytes(16, "little")


def decode_digest(msg_type: MessageType, payload: bytes) -> int:
    r = _Reader(msg_type, payload)
    raw = r.take(16, "the memory digest")
    r.done()
    return int.from_bytes(raw, "little")


def encode_abort(reason: str) -> bytes:
    raw = _reason_bytes(reason)
    return struct.pack("<H", len(raw)) + raw


def decode_abort(payload: bytes) -> str:
    r = _Reader(MessageType.ABORT, payload)
    (size,) = r.unpack("H", "the reason length")
    if size > MAX_REASON:
        raise ProtocolError(f"ABORT: reason of {size} bytes exceeds {MAX_REASON}")
    reason = r.text(size, "the reason")
    r.done()
    return reason


def encode_resumed(start_us: int) -> bytes:
    """RESUMED: the guest runs on the destination; how long starting it took after COMMITTED
    was read (microseconds, saturating)."""
    return struct.pack("<I", max(0, min(start_us, 0xFFFFFFFF)))


def decode_resumed(payload: bytes) -> int:
    r = _Reader(MessageType.RESUMED, payload)
    (start_us,) = r.unpack("I", "the start time")
    r.done()
    return start_us


class Decision(enum.IntEnum):
    """What the source decided for a session: it commits exactly when it sent COMMITTED."""

    COMMIT = 1
    ABORT = 2


class Outcome(enum.IntEnum):
    """What the destination does with a session's guest after a RESOLVE."""

    RUNNING = 1  # it runs the guest (it read COMMITTED, or this RESOLVE said commit)
    DISCARDED = 2  # it threw the guest away (an ABORT, this RESOLVE said abort, or its operator did)
    UNKNOWN = 3  # it holds no such session (another process, or one that never reached COMMIT_ACK)


@dataclass(frozen=True)
class Resolve:
    session: bytes  # session_id() of the migration in doubt
    decision: Decision


def encode_resolve(m: Resolve) -> bytes:
    if len(m.session) != SESSION_ID_SIZE:
        raise ProtocolError(f"RESOLVE: a session id is {SESSION_ID_SIZE} bytes, got {len(m.session)}")
    return m.session + bytes([int(m.decision)])


def decode_resolve(payload: bytes) -> Resolve:
    r = _Reader(MessageType.RESOLVE, payload)
    session = r.take(SESSION_ID_SIZE, "the session id")
    (raw,) = r.unpack("B", "the decision")
    r.done()
    try:
        return Resolve(session, Decision(raw))
    except ValueError:
        raise ProtocolError(f"RESOLVE: unknown decision {raw} (1 commit, 2 abort)") from None


@dataclass(frozen=True)
class Resolved:
    outcome: Outcome
    start_us: int = 0  # RUNNING because of this RESOLVE: what starting the guest took


def encode_resolved(m: Resolved) -> bytes:
    return bytes([int(m.outcome)]) + struct.pack("<I", max(0, min(m.start_us, 0xFFFFFFFF)))


def decode_resolved(payload: bytes) -> Resolved:
    r = _Reader(MessageType.RESOLVED, payload)
    (raw,) = r.unpack("B", "the outcome")
    (start_us,) = r.unpack("I", "the start time")
    r.done()
    try:
        return Resolved(Outcome(raw), start_us)
    except ValueError:
        raise ProtocolError(f"RESOLVED: unknown outcome {raw} (1 running, 2 discarded, 3 unknown)") from None


_SESSION_LABEL = b"vmmpy-migration-v5 session\x00"


def session_id(hello_frame: bytes, challenge_frame: bytes) -> bytes:
    """The name both ends give a session: a hash of its HELLO and CHALLENGE as sent (both
    nonces), so it is fresh for every migration and needs no field of its own. It names the
    session; it proves nothing (the RESOLVE connection's own handshake does)."""
    return hashlib.sha256(_SESSION_LABEL + hello_frame + challenge_frame).digest()[:SESSION_ID_SIZE]


def decode_empty(msg_type: MessageType, payload: bytes) -> None:
    if payload:
        raise ProtocolError(f"{msg_type.name}: carries no payload, got {len(payload)} bytes")


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
