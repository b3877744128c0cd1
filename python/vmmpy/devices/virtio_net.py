"""virtio-net: an Ethernet interface over virtio whose frames travel as UDP datagrams.

``-s SLOT,virtio-net,peer=HOST:PORT[,mac=xx:xx:xx:xx:xx:xx]``: every frame the guest transmits
is sent as one UDP datagram (the Ethernet frame, without the virtio-net header) to HOST:PORT
from a socket bound to an ephemeral port on the matching local address and connected to the
peer; every datagram that socket receives from the peer is one frame for the guest. The peer
may be another vmmpy (two VMs pointing at each other's ports need fixed ports: a future
``listen=`` option) or a test responder on loopback. The peer is resolved and the socket made
at start: a missing or unusable ``peer=`` refuses the device, naming it.

Queues: 0 receiveq, 1 transmitq, 256 entries each. Features: MAC (the address in the device
configuration) and STATUS (configuration ``status`` bit 0 = link up). No MRG_RXBUF, CSUM, GSO
or control queue: every buffer starts with the legacy 10-byte ``virtio_net_hdr`` (flags,
gso_type, hdr_len, gso_size, csum_start, csum_offset). The device writes a zero header before
each received frame and ignores the header of transmitted ones. Configuration: mac[6],
status (u16).

Determinism: host frames never enter guest memory asynchronously. A received datagram waits
in the device's host-side queue (at most 256 frames; beyond that, and frames over 1518 bytes,
are dropped and counted) and is moved into the guest's receive buffers only during a queue
notify exit: on every notify (of either queue) the device first transmits what the transmit
queue holds, then reads whatever the socket has (without blocking), then fills as many
receive buffers as it has frames. A driver waiting for a frame notifies the receive queue
(its "poll" doorbell) until one arrives. So what the guest sees depends only on its own
instructions and on which frames have arrived by a notify; the number of polls may vary with
host timing, the contents and order of frames do not. Pause reads the socket once more
(waiting up to 50 ms for stragglers) so the frames the peer had answered travel in the saved
state; the socket itself is a backend, like a disk image, and a restored device opens its
own.

A receive chain must be device-writable only and hold at least the header; a frame longer
than the chain is dropped and the chain returned with used length 0. A transmit chain must be
device-readable only and hold at least the header. Breaking these is a device error like any
other malformed chain (``devices/virtio.py``).

Saved state (beside the PCI and virtio state): ``mac``, ``link_up``, ``pending`` (the host
frames not yet delivered, in order), ``peer`` (informational; not checked). Restore refuses
another MAC address.
"""

from __future__ import annotations

import collections
import errno
import logging
import select
import socket
import struct
from dataclasses import dataclass
from typing import ClassVar

from .pci import PciConfigError, PciHost, PciState, parse_options
from .virtio import ISR_CONFIG, VirtioError, VirtioPciDevice, VirtioState, Virtqueue

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
RECEIVEQ, TRANSMITQ = 0, 1
NET_HDR_SIZE = 10
MAX_FRAME = 1518
MIN_FRAME = 14
PENDING_LIMIT = 256
PAUSE_DRAIN_SECONDS = 0.05

VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_S_LINK_UP = 1


def parse_mac(device: str, text: str) -> bytes:
    parts = text.split(":")
    try:
        if len(parts) != 6 or any(len(p) != 2 for p in parts):
            raise ValueError
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise PciConfigError(f"{device}: mac={text}: expected six hex bytes like 02:00:00:00:00:01") from None
    if mac[0] & 1:
        raise PciConfigError(f"{device}: mac={text} is a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_peer(device: str, text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text:
        raise PciConfigError(f"{device}: peer={text}: expected HOST:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise PciConfigError(f"{device}: peer={text}: port '{port_text}' is not a number") from None
    if not 1 <= port <= 65535:
        raise PciConfigError(f"{device}: peer={text}: port {port} is not in 1..65535")
    return host, port


@dataclass
class NetDeviceState:
    mac: str
    link_up: bool
    pending: list[bytes]
    peer: str


@dataclass
class VirtioNetState:
    VERSION: ClassVar[int] = 1
    MIN_VERSION: ClassVar[int] = 1

    pci: PciState
    virtio: VirtioState
    device: NetDeviceState


class VirtioNet(VirtioPciDevice):
    EMULATION = "virtio-net"
    DEVICE_ID = 0x1000
    SUBSYSTEM_ID = 1  # virtio device type: network
    CLASS = 0x02  # network controller
    SUBCLASS = 0x00  # Ethernet
    STATE = VirtioNetState
    QUEUE_SIZES = (QUEUE_SIZE, QUEUE_SIZE)
    CONFIG_SIZE = 8
    OPTIONS_HELP = "peer=HOST:PORT[,mac=MAC]"

    def __init__(self, host: PciHost, bus: int, slot: int, func: int, conf: str | None = None) -> None:
        super().__init__(host, bus, slot, func, conf)
        options = parse_options(self.name, conf, keys=("peer", "mac"))
        self.host_features = VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
        if "mac" in options:
            self.mac = parse_mac(self.name, options["mac"])
        else:  # locally administered, unique per slot: 02:76:6d:BB:SS:FF ("vm")
            self.mac = bytes((0x02, 0x76, 0x6D, bus & 0xFF, slot, func))
        if not options.get("peer"):
            raise PciConfigError(f"{self.name}: no peer given (it takes peer=HOST:PORT, frames go there as UDP datagrams)")
        self.peer_text = options["peer"]
        peer_host, port = parse_peer(self.name, self.peer_text)
        try:
            family, kind, proto, _, address = socket.getaddrinfo(peer_host, port, type=socket.SOCK_DGRAM)[0]
        except (socket.gaierror, UnicodeError) as err:
            raise PciConfigError(f"{self.name}: peer={self.peer_text}: cannot resolve '{peer_host}': {err}") from None
        self.sock = socket.socket(family, kind, proto)
        try:
            self.sock.setblocking(False)
            self.sock.connect(address)
        except OSError as err:
            self.sock.close()
            raise PciConfigError(f"{self.name}: peer={self.peer_text}: cannot reach it: {err.strerror or err}") from None
        self.link_up = True
        self.pending: collections.deque[bytes] = collections.deque()
        self.stats = {"tx_frames": 0, "rx_frames": 0, "tx_errors": 0, "rx_dropped": 0}

    # ---- configuration ---------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return self.mac + struct.pack("<H", VIRTIO_NET_S_LINK_UP if self.link_up else 0)

    def set_link(self, up: bool) -> None:
        """Link up or down (a configuration change the driver is told about)."""
        with self.lock:
            if up != self.link_up:
                self.link_up = up
                if self.status & 0x04:
                    self.raise_interrupt(ISR_CONFIG)

    # ---- queues ------------------------------------------------------------------------------
    def process_queue(self, queue: Virtqueue) -> None:
        if queue.index == TRANSMITQ:
            self._transmit(queue)
        self._poll_socket()
        self._fill_receive(self.queues[RECEIVEQ])

    def _transmit(self, queue: Virtqueue) -> None:
        completed = 0
        try:
            while (chain := queue.pop()) is not None:
                if chain.writable:
                    raise VirtioError(f"{self.name}: transmit chain at head {chain.head} has device-writable buffers")
                if chain.readable_len < NET_HDR_SIZE:
                    raise VirtioError(f"{self.name}: transmit chain at head {chain.head} holds {chain.readable_len} bytes, "
                                      f"less than the {NET_HDR_SIZE}-byte virtio-net header")
                frame = queue.gather(chain.readable, skip=NET_HDR_SIZE, limit=MAX_FRAME + 1)
                if MIN_FRAME <= len(frame) <= MAX_FRAME and self.link_up:
                    try:
                        self.sock.send(frame)
                        self.stats["tx_frames"] += 1
                    except OSError as err:  # e.g. ECONNREFUSED from an earlier datagram: the frame is lost, as on a wire
                        self.stats["tx_errors"] += 1
                        log.debug("%s: send to %s failed: %s", self.name, self.peer_text, err)
                else:
                    self.stats["tx_errors"] += 1
                queue.push(chain.head, 0)
                completed += 1
        finally:
            self.signal(queue, completed)

    def _poll_socket(self) -> None:
        """Move every datagram the socket holds to the host-side queue (never blocks)."""
        while True:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                if err.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue  # an ICMP error for an earlier send; the socket lives on
                return
            self.receive_frame(data, deliver=False)

    def receive_frame(self, frame: bytes, deliver: bool = False) -> None:
        """A frame for the guest: queued, and with ``deliver`` put into receive buffers now
        (tests; the socket path only delivers during notifies)."""
        with self.lock:
            if not MIN_FRAME <= len(frame) <= MAX_FRAME or len(self.pending) >= PENDING_LIMIT or not self.link_up:
                self.stats["rx_dropped"] += 1
                return
            self.pending.append(bytes(frame))
            if deliver and self.error is None and self.queues[RECEIVEQ].ready and self.status & 0x04:
                self._guarded(lambda: self._fill_receive(self.queues[RECEIVEQ]))

    def _fill_receive(self, queue: Virtqueue) -> None:
        if not queue.ready:
            return
        completed = 0
        try:
            while self.pending and queue.pending():
                chain = queue.pop()
                if chain.readable:
                    raise VirtioError(f"{self.name}: receive chain at head {chain.head} has device-readable buffers")
                if chain.writable_len < NET_HDR_SIZE:
                    raise VirtioError(f"{self.name}: receive chain at head {chain.head} holds {chain.writable_len} bytes, "
                                      f"less than the {NET_HDR_SIZE}-byte virtio-net header")
                frame = self.pending.popleft()
                if NET_HDR_SIZE + len(frame) > chain.writable_len:
                    self.stats["rx_dropped"] += 1
                    queue.push(chain.head, 0)
                else:
                    written = queue.scatter(chain.writable, bytes(NET_HDR_SIZE) + frame)
                    self.stats["rx_frames"] += 1
                    queue.push(chain.head, written)
                completed += 1
        finally:
            self.signal(queue, completed)

    def device_reset(self) -> None:
        self.pending.clear()

    # ---- pause / state -----------------------------------------------------------------------
    def pause(self) -> None:
        """Take in what the peer has sent (waiting briefly for stragglers) so it is saved."""
        with self.lock:
            try:
                select.select([self.sock], [], [], PAUSE_DRAIN_SECONDS)
            except (OSError, ValueError):
                return
            self._poll_socket()

    def save_device(self) -> NetDeviceState:
        return NetDeviceState(mac=format_mac(self.mac), link_up=self.link_up, pending=list(self.pending), peer=self.peer_text)

    def restore_device(self, state: NetDeviceState) -> None:
        where = f"{self.name}: device"
        if state.mac != format_mac(self.mac):
            raise ValueError(f"{where}: saved with mac {state.mac}; this device has {format_mac(self.mac)} (mac= option)")
        pending = state.pending
        if len(pending) > PENDING_LIMIT:
            raise ValueError(f"{where}: field 'pending' holds {len(pending)} frames, more than {PENDING_LIMIT}")
        for i, frame in enumerate(pending):
            if not isinstance(frame, bytes) or not MIN_FRAME <= len(frame) <= MAX_FRAME:
                raise ValueError(f"{where}: field 'pending' entry {i} is not a frame of {MIN_FRAME}..{MAX_FRAME} bytes")
        self.link_up = state.link_up
        self.pending = collections.deque(pending)

    def close(self) -> None:
        self.sock.close()
