"""virtio over the legacy PCI transport (virtio 0.9.5 / "transitional" legacy interface), as
bhyve's virtio.c implements it, and split virtqueues in guest memory.

Transport: I/O BAR 0 holds the legacy register block, device configuration right after it
(no MSI-X, so at offset 0x14)::

    0x00  u32 host (device) features      RO
    0x04  u32 guest (driver) features     RW (masked by the host features)
    0x08  u32 queue address (PFN)         RW, of the selected queue; 0 disables it
    0x0C  u16 queue size                  RO, of the selected queue
    0x0E  u16 queue select                RW
    0x10  u16 queue notify                WO: the queue index to process
    0x12  u8  device status               RW; writing 0 resets the device
    0x13  u8  ISR status                  RO, read-to-clear (bit 0 queue, bit 1 config change)
    0x14  device-specific configuration

A common register accessed with another width than its own reads all-ones and writes
nothing (bhyve does the same and complains). Interrupts are INTx (INTA): the line is asserted
while the ISR is non-zero and drops when the driver reads the ISR.

Split virtqueue layout at ``PFN * 4096`` (legacy alignment 4096): descriptor table (16 bytes
per entry: u64 addr, u32 len, u16 flags, u16 next), then the avail ring (u16 flags, u16 idx,
u16 ring[size], u16 used_event), then at the next 4096 boundary the used ring (u16 flags, u16
idx, {u32 id, u32 len}[size], u16 avail_event).

The device side is strict, because the guest may be hostile: a head or ``next`` index outside
the table, a chain longer than the queue (a loop), an INDIRECT descriptor (not offered), a
device-readable descriptor after a device-writable one, a buffer outside guest RAM, or an
avail index that moved by more than the queue size puts the device in an error state: it sets
DEVICE_NEEDS_RESET (0x40) in the status register, logs the reason naming device, queue and
descriptor, stops processing, and stays so until the driver resets it. The VM keeps running.

Requests complete synchronously, during the queue-notify exit that announced them (and, for
host input, when it arrives): the used ring and the interrupt are updated before the guest
runs on. So at any instruction boundary no request is in flight, runs are deterministic, and a
pause only has to flush backends. Notification suppression: the device honours the driver's
VRING_AVAIL_F_NO_INTERRUPT (no interrupt for completions while set); it never needs to
suppress driver notifications, so the used ring's flags are always 0. EVENT_IDX,
INDIRECT_DESC and NOTIFY_ON_EMPTY are not offered.

All device writes into guest memory go through ``GuestMemory.write``, so they are dirty pages
for migration like a vCPU's stores.

State (under ``"virtio"`` in the device's section): host and negotiated features, status,
ISR, selected queue, the error (or null), and per queue its size, PFN, the device's next avail
index (``last_avail``) and next used index (``next_used``).
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..memory import LazyMemoryError
from .pci import PciFunction, PciHost

log = logging.getLogger(__name__)

VIRTIO_VENDOR_ID = 0x1AF4
VIRTIO_PCI_REVISION = 0

# Legacy register offsets.
VIRTIO_PCI_HOST_FEATURES = 0x00
VIRTIO_PCI_GUEST_FEATURES = 0x04
VIRTIO_PCI_QUEUE_PFN = 0x08
VIRTIO_PCI_QUEUE_NUM = 0x0C
VIRTIO_PCI_QUEUE_SEL = 0x0E
VIRTIO_PCI_QUEUE_NOTIFY = 0x10
VIRTIO_PCI_STATUS = 0x12
VIRTIO_PCI_ISR = 0x13
VIRTIO_PCI_CONFIG = 0x14
_REGISTER_WIDTHS = {
    VIRTIO_PCI_HOST_FEATURES: 4, VIRTIO_PCI_GUEST_FEATURES: 4, VIRTIO_PCI_QUEUE_PFN: 4, VIRTIO_PCI_QUEUE_NUM: 2,
    VIRTIO_PCI_QUEUE_SEL: 2, VIRTIO_PCI_QUEUE_NOTIFY: 2, VIRTIO_PCI_STATUS: 1, VIRTIO_PCI_ISR: 1,
}

# Device status bits.
STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_ALIGN = 4096
PAGE_SHIFT = 12

_DESC = struct.Struct("<QIHH")
#: Largest total buffer size of one chain the devices accept (a sanity bound, not a feature).
MAX_CHAIN_BYTES = 16 << 20


@dataclass
class QueueState:
    size: int
    pfn: int
    last_avail: int
    next_used: int


@dataclass
class VirtioState:
    """The virtio part of a device's section (under ``"virtio"``), versioned with it."""

    host_features: int
    guest_features: int
    status: int
    isr: int
    queue_select: int
    error: str | None
    queues: list[QueueState]


class VirtioError(Exception):
    """The guest broke the virtio contract; the message names device, queue and what."""


def vring_size(qsize: int) -> tuple[int, int, int]:
    """(avail offset, used offset, total bytes) of a legacy split ring of ``qsize`` entries."""
    avail = 16 * qsize
    used = -(-(avail + 6 + 2 * qsize) // VRING_ALIGN) * VRING_ALIGN
    return avail, used, used + 6 + 8 * qsize


@dataclass
class Chain:
    """One popped descriptor chain: its head index and its buffers as (gpa, length)."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


class Virtqueue:
    """The device's view of one split virtqueue in guest memory."""

    def __init__(self, device: VirtioPciDevice, index: int, size: int) -> None:
        self.device = device
        self.index = index
        self.size = size
        self.reset()

    def reset(self) -> None:
        self.pfn = 0
        self.last_avail = 0
        self.next_used = 0

    @property
    def ready(self) -> bool:
        return self.pfn != 0

    @property
    def desc_addr(self) -> int:
        return self.pfn << PAGE_SHIFT

    @property
    def avail_addr(self) -> int:
        return self.desc_addr + vring_size(self.size)[0]

    @property
    def used_addr(self) -> int:
        return self.desc_addr + vring_size(self.size)[1]

    def _where(self) -> str:
        return f"{self.device.name}: queue {self.index}"

    # ---- guest memory ------------------------------------------------------------------------
    # A chunk of lazily restored memory that cannot be loaded is the host's failure, not the
    # guest's: it goes on up and stops the VM, instead of becoming a device error the guest sees.
    def _read(self, gpa: int, size: int, what: str) -> bytes:
        try:
            return self.device.host.memory.read(gpa, size)
        except LazyMemoryError:
            raise
        except (OSError, OverflowError, ValueError):
            raise VirtioError(f"{self._where()}: {what} at gpa {gpa:#x} (+{size}) is outside guest memory") from None

    def _write(self, gpa: int, data: bytes, what: str) -> None:
        try:
            self.device.host.memory.write(gpa, data)
        except LazyMemoryError:
            raise
        except (OSError, OverflowError, ValueError):
            raise VirtioError(f"{self._where()}: {what} at gpa {gpa:#x} (+{len(data)}) is outside guest memory") from None

    def check_ring_memory(self) -> None:
        """The whole ring must be guest RAM; checked when the driver sets the PFN."""
        total = vring_size(self.size)[2]
        if not self.device.ram_contains(self.desc_addr, total):
            raise VirtioError(f"{self._where()}: ring at gpa {self.desc_addr:#x} (+{total:#x}) is not guest RAM")

    # ---- avail side --------------------------------------------------------------------------
    def avail_flags(self) -> int:
        return struct.unpack("<H", self._read(self.avail_addr, 2, "avail flags"))[0]

    def avail_idx(self) -> int:
        return struct.unpack("<H", self._read(self.avail_addr + 2, 2, "avail idx"))[0]

    def pending(self) -> int:
        """How many chains the driver has made available that the device has not taken."""
        idx = self.avail_idx()
        count = (idx - self.last_avail) & 0xFFFF
        if count > self.size:
            raise VirtioError(
                f"{self._where()}: avail idx {idx} is {count} entries ahead of the device's {self.last_avail}, "
                f"more than the queue size {self.size}"
            )
        return count

    def pop(self) -> Chain | None:
        """Take the next available chain, walking and checking every descriptor."""
        if not self.pending():
            return None
        slot = self.last_avail % self.size
        head = struct.unpack("<H", self._read(self.avail_addr + 4 + 2 * slot, 2, f"avail ring entry {slot}"))[0]
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        chain = Chain(head)
        index, total = head, 0
        for _ in range(self.size):
            if index >= self.size:
                raise VirtioError(f"{self._where()}: descriptor index {index} is outside the table of {self.size} (chain head {head})")
            addr, length, flags, next_index = _DESC.unpack(self._read(self.desc_addr + 16 * index, 16, f"descriptor {index}"))
            if flags & VRING_DESC_F_INDIRECT:
                raise VirtioError(f"{self._where()}: descriptor {index} is INDIRECT, which was not negotiated")
            total += length
            if total > MAX_CHAIN_BYTES:
                raise VirtioError(f"{self._where()}: chain at head {head} holds more than {MAX_CHAIN_BYTES} bytes")
            if length and not self.device.ram_contains(addr, length):
                raise VirtioError(f"{self._where()}: descriptor {index} buffer gpa {addr:#x} (+{length:#x}) is not guest RAM")
            if flags & VRING_DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise VirtioError(f"{self._where()}: descriptor {index} is device-readable after a device-writable one (chain head {head})")
            else:
                chain.readable.append((addr, length))
            if not flags & VRING_DESC_F_NEXT:
                return chain
            index = next_index
        raise VirtioError(f"{self._where()}: chain at head {head} is longer than the queue ({self.size}): a descriptor loop")

    # ---- used side ---------------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return a chain to the driver with ``written`` bytes written into it."""
        slot = self.next_used % self.size
        self._write(self.used_addr + 4 + 8 * slot, struct.pack("<II", head, written), f"used ring entry {slot}")
        self.next_used = (self.next_used + 1) & 0xFFFF
        self._write(self.used_addr, struct.pack("<HH", 0, self.next_used), "used flags/idx")

    def wants_interrupt(self) -> bool:
        return not self.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT

    # ---- scatter-gather helpers --------------------------------------------------------------
    def gather(self, buffers: list[tuple[int, int]], skip: int = 0, limit: int | None = None) -> bytes:
        """The bytes of ``buffers`` from offset ``skip`` (``limit`` bytes at most)."""
        out = bytearray()
        for addr, length in buffers:
            if skip >= length:
                skip -= length
                continue
            take = length - skip
            if limit is not None:
                take = min(take, limit - len(out))
            out += self._read(addr + skip, take, "buffer")
            skip = 0
            if limit is not None and len(out) >= limit:
                break
        return bytes(out)

    def scatter(self, buffers: list[tuple[int, int]], data: bytes, skip: int = 0) -> int:
        """Write ``data`` across ``buffers`` from offset ``skip``; the bytes written."""
        done = 0
        for addr, length in buffers:
            if skip >= length:
                skip -= length
                continue
            take = min(length - skip, len(data) - done)
            if take <= 0:
                break
            self._write(addr + skip, data[done:done + take], "buffer")
            done += take
            skip = 0
        return done

    # ---- state -------------------------------------------------------------------------------
    def save(self) -> QueueState:
        return QueueState(self.size, self.pfn, self.last_avail, self.next_used)

    def restore(self, state: QueueState) -> None:
        where = f"{self._where()}: state"
        if state.size != self.size:
            raise ValueError(f"{where}: saved queue size {state.size} is not this device's {self.size}")
        if not 0 <= state.pfn < (1 << 32):
            raise ValueError(f"{where}: field 'pfn' value {state.pfn:#x} is not a 32-bit page number")
        for key in ("last_avail", "next_used"):
            if not 0 <= getattr(state, key) <= 0xFFFF:
                raise ValueError(f"{where}: field '{key}' value {getattr(state, key)} is not a 16-bit index")
        self.pfn, self.last_avail, self.next_used = state.pfn, state.last_avail, state.next_used


class VirtioPciDevice(PciFunction):
    """A legacy virtio PCI device. Subclasses set the IDs, queues and features and implement
    :meth:`process_queue` (and config space, reset, and their own state)."""

    VENDOR_ID = VIRTIO_VENDOR_ID
    SUBSYSTEM_VENDOR_ID = VIRTIO_VENDOR_ID
    REVISION = VIRTIO_PCI_REVISION
    USES_INTX = True
    #: Queue sizes, one per queue.
    QUEUE_SIZES: ClassVar[tuple[int, ...]] = ()
    #: Size of the device-specific configuration.
    CONFIG_SIZE: ClassVar[int] = 0

    def __init__(self, host: PciHost, bus: int, slot: int, func: int, conf: str | None = None) -> None:
        super().__init__(host, bus, slot, func, conf)
        span = VIRTIO_PCI_CONFIG + self.CONFIG_SIZE
        self.add_bar(0, "io", max(32, 1 << (span - 1).bit_length()))
        self.host_features = 0
        self.queues = [Virtqueue(self, i, size) for i, size in enumerate(self.QUEUE_SIZES)]
        self._reset_transport()

    def _reset_transport(self) -> None:
        self.guest_features = 0
        self.status = 0
        self.isr = 0
        self.queue_select = 0
        self.error: str | None = None
        for queue in self.queues:
            queue.reset()

    # ---- guest memory -----------------------------------------------------------------------
    def ram_contains(self, gpa: int, length: int) -> bool:
        if gpa < 0 or length < 0:
            return False
        for seg in self.host.memory.segments:
            if seg.gpa <= gpa and gpa + length <= seg.gpa + seg.size:
                return True
        return False

    # ---- register block ----------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if offset >= VIRTIO_PCI_CONFIG:
            return self.config_read(offset - VIRTIO_PCI_CONFIG, size)
        width = _REGISTER_WIDTHS.get(offset)
        if width != size:
            log.warning("%s: %d-byte read of legacy register %#x (it is %s bytes wide)", self.name, size, offset, width)
            return ones
        if offset == VIRTIO_PCI_HOST_FEATURES:
            return self.host_features
        if offset == VIRTIO_PCI_GUEST_FEATURES:
            return self.guest_features
        if offset == VIRTIO_PCI_QUEUE_PFN:
            return self.queues[self.queue_select].pfn if self.queue_select < len(self.queues) else 0
        if offset == VIRTIO_PCI_QUEUE_NUM:
            return self.queues[self.queue_select].size if self.queue_select < len(self.queues) else 0
        if offset == VIRTIO_PCI_QUEUE_SEL:
            return self.queue_select
        if offset == VIRTIO_PCI_QUEUE_NOTIFY:
            return 0
        if offset == VIRTIO_PCI_STATUS:
            return self.status
        isr, self.isr = self.isr, 0  # ISR: read-to-clear, and the line drops
        self.set_intx(False)
        return isr

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if offset >= VIRTIO_PCI_CONFIG:
            self.config_write(offset - VIRTIO_PCI_CONFIG, size, value)
            return
        width = _REGISTER_WIDTHS.get(offset)
        if width != size:
            log.warning("%s: %d-byte write of legacy register %#x (it is %s bytes wide) ignored", self.name, size, offset, width)
            return
        if offset == VIRTIO_PCI_GUEST_FEATURES:
            self.guest_features = value & self.host_features
        elif offset == VIRTIO_PCI_QUEUE_PFN:
            if self.queue_select < len(self.queues):
                queue = self.queues[self.queue_select]
                queue.reset()
                queue.pfn = value
                if value:
                    self._guarded(queue.check_ring_memory)
        elif offset == VIRTIO_PCI_QUEUE_SEL:
            self.queue_select = value  # an out-of-range select reads size 0, as bhyve
        elif offset == VIRTIO_PCI_QUEUE_NOTIFY:
            self.notify(value)
        elif offset == VIRTIO_PCI_STATUS:
            if value == 0:
                self.reset()
            else:
                self.status = (value & 0xFF) | (self.status & STATUS_NEEDS_RESET)
        # host features and ISR are read-only

    def notify(self, queue_index: int) -> None:
        if queue_index >= len(self.queues):
            log.warning("%s: notify of queue %d, which does not exist (it has %d)", self.name, queue_index, len(self.queues))
            return
        queue = self.queues[queue_index]
        if self.error is not None or not queue.ready:
            return
        self._guarded(lambda: self.process_queue(queue))

    def _guarded(self, work) -> None:
        """Run device work; a guest-caused VirtioError breaks the device, not the VMM."""
        try:
            work()
        except VirtioError as err:
            self.fail(str(err))

    def fail(self, reason: str) -> None:
        self.error = reason
        self.status |= STATUS_NEEDS_RESET
        log.error("%s: device error, needs reset: %s", self.name, reason)
        self.raise_interrupt(ISR_CONFIG)

    def reset(self) -> None:
        """Status 0: the device returns to its initial state; the interrupt drops."""
        self._reset_transport()
        self.set_intx(False)
        self.device_reset()

    def raise_interrupt(self, bits: int = ISR_QUEUE) -> None:
        self.isr |= bits
        self.set_intx(True)

    def signal(self, queue: Virtqueue, completed: int) -> None:
        """``completed`` chains went onto the used ring: interrupt unless suppressed."""
        if completed and queue.wants_interrupt():
            self.raise_interrupt(ISR_QUEUE)

    # ---- device hooks ------------------------------------------------------------------------
    def process_queue(self, queue: Virtqueue) -> None:
        raise NotImplementedError

    def config_bytes(self) -> bytes:
        return b""

    def config_read(self, offset: int, size: int) -> int:
        data = self.config_bytes()
        if offset + size > len(data):
            return (1 << (8 * size)) - 1
        return int.from_bytes(data[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Device configuration is read-only unless a device says otherwise."""

    def device_reset(self) -> None:
        """Device-specific state back to power-on."""

    def save_device(self) -> Any:
        """The device-specific part of the section (the ``device`` field of ``STATE``)."""
        raise NotImplementedError

    def restore_device(self, state: Any) -> None:
        raise NotImplementedError

    # ---- state -------------------------------------------------------------------------------
    def save_virtio(self) -> VirtioState:
        return VirtioState(self.host_features, self.guest_features, self.status, self.isr, self.queue_select, self.error,
                           [queue.save() for queue in self.queues])

    def restore_virtio(self, state: VirtioState) -> None:
        where = f"{self.name}: virtio"
        if state.host_features != self.host_features:
            raise ValueError(f"{where}: saved host features {state.host_features:#x} differ from this device's "
                             f"{self.host_features:#x} (different options?)")
        if state.guest_features & ~self.host_features:
            raise ValueError(f"{where}: field 'guest_features' value {state.guest_features:#x} has features the device does not offer")
        for key, limit in (("status", 0xFF), ("isr", 0x3), ("queue_select", 0xFFFF)):
            if not 0 <= getattr(state, key) <= limit:
                raise ValueError(f"{where}: field '{key}' value {getattr(state, key)} out of range (0..{limit})")
        if len(state.queues) != len(self.queues):
            raise ValueError(f"{where}: field 'queues' has {len(state.queues)} queues, this device has {len(self.queues)}")
        for queue, saved in zip(self.queues, state.queues):
            queue.restore(saved)
        self.guest_features, self.status, self.isr = state.guest_features, state.status, state.isr
        self.queue_select, self.error = state.queue_select, state.error

    def save(self) -> Any:
        return self.STATE(pci=self.save_pci(), virtio=self.save_virtio(), device=self.save_device())

    def restore(self, state: Any) -> None:
        before = self.save()
        try:
            self.restore_pci(state.pci)
            self.restore_virtio(state.virtio)
            self.restore_device(state.device)
            if bool(self.isr) != self.intx_level:
                raise ValueError(f"{self.name}: saved ISR {self.isr:#x} and INTx level {self.intx_level} disagree")
        except (KeyError, TypeError, ValueError):
            # A refused state changes nothing: put back what was there.
            self.restore_pci(before.pci)
            self.restore_virtio(before.virtio)
            self.restore_device(before.device)
            raise
