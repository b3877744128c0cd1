"""nvme: an NVM Express controller with one namespace backed by a file image (bhyve's pci_nvme.c,
much reduced).

``-s SLOT,nvme,PATH[,ser=SERIAL]``. The image must exist; its size in 512-byte LBAs (rounded
down) is the namespace size. I/O is real file I/O (``os.pread``/``os.pwrite``); FLUSH is
``fsync``.

PCI: vendor/device fb5d:0a0a (as bhyve), class 01:08:02 (NVM Express), INTA. BAR 0 is a 64-bit
memory BAR of 16 KiB holding the controller registers (MMIO in the 3-4 GiB hole)::

    0x00 CAP (64)   MQES 255 (256 entries), CQR 1, TO 1, DSTRD 0, CSS NVM, MPSMIN = MPSMAX = 4 KiB
    0x08 VS         1.3.0
    0x0C INTMS      write 1s to mask the pin interrupt (bit 0), reads the mask
    0x10 INTMC      write 1s to unmask, reads the mask
    0x14 CC         EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES
    0x1C CSTS       RDY, CFS, SHST
    0x24 AQA        ASQS (11:0), ACQS (27:16), 0-based
    0x28 ASQ (64)   admin submission queue base (4 KiB aligned)
    0x30 ACQ (64)   admin completion queue base (4 KiB aligned)
    0x1000 + 8 * qid      submission queue y tail doorbell (stride 0)
    0x1004 + 8 * qid      completion queue y head doorbell

Registers take 4-byte accesses (and 8-byte ones for CAP, ASQ, ACQ); other widths read all-ones
and write nothing (logged).

Controller: setting CC.EN checks the admin queue registers (sizes, 4 KiB alignment, guest RAM)
and CC (MPS 4 KiB, NVM command set) and sets CSTS.RDY; a bad setup sets CSTS.CFS instead.
Clearing CC.EN resets the controller (queues deleted, RDY and the interrupt cleared). A shutdown
notification (CC.SHN) fsyncs the image and reports shutdown complete (CSTS.SHST = 2).

Admin commands: DELETE I/O SQ (0x00), CREATE I/O SQ (0x01), DELETE I/O CQ (0x04), CREATE I/O CQ
(0x05), IDENTIFY (0x06: CNS 0 namespace, 1 controller, 2 active namespace list), SET/GET
FEATURES (0x09/0x0A) for Number of Queues (0x07) only. One I/O queue pair (queue id 1), up to
256 entries each, physically contiguous. I/O commands on namespace 1: FLUSH (0x00), WRITE (0x01),
READ (0x02).

Transfers use PRP1 and PRP2 only, no PRP lists: a transfer may span at most two memory pages
(PRP1 with any dword-aligned offset, PRP2 the page-aligned second page), so MDTS is 1 (8 KiB)
and a request that needs a PRP list completes with Invalid Field in Command. Statuses: Invalid
Opcode, Invalid Field (PSDT/FUSE set, bad CNS or feature, too large a transfer), PRP Offset
Invalid (unaligned PRP1, offset in PRP2), Data Transfer Error (a PRP outside guest RAM),
Invalid Namespace, LBA Out of Range; and for queue commands Invalid Queue Identifier, Invalid
Queue Size, Completion Queue Invalid, Invalid Interrupt Vector, Invalid Queue Deletion. A
hostile command always gets a status; nothing a guest writes raises out of the device.

Commands complete synchronously, during the doorbell write that announced them: each goes to
its completion queue (with the phase tag) before the guest runs on. A completion queue that is
full holds its submission queue's commands in the queue (the SQ head stops) until the driver
frees entries through the CQ head doorbell. Interrupts: pin-based INTx (MSI is not offered),
asserted while any completion queue with interrupts enabled holds entries the driver has not
released, unless masked through INTMS.

Saved state (beside ``pci``): ``nvme`` with the registers (``cc csts aqa asq acq intms``),
``error`` and ``sqs``/``cqs`` (each ``qid base size head tail`` and ``cqid`` or ``phase ien``);
``device`` with ``path capacity_lbas serial``. Completions not yet released are the CQ entries
between head and tail, in guest memory, which is saved with memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
from dataclasses import dataclass
from typing import ClassVar

from ..memory import LazyMemoryError
from .disk import open_image
from .pci import PciConfigError, PciFunction, PciHost, PciState, parse_options

log = logging.getLogger(__name__)

LBA_SIZE = 512
PAGE = 4096
BAR_SIZE = 0x4000
DOORBELLS = 0x1000
MAX_QUEUE_ENTRIES = 256
MAX_IO_QUEUES = 1
SERIAL_BYTES = 20

REG_CAP, REG_VS, REG_INTMS, REG_INTMC, REG_CC, REG_CSTS, REG_AQA, REG_ASQ, REG_ACQ = 0x00, 0x08, 0x0C, 0x10, 0x14, 0x1C, 0x24, 0x28, 0x30
CAP = (MAX_QUEUE_ENTRIES - 1) | (1 << 16) | (1 << 24) | (1 << 37)  # MQES, CQR, TO = 500 ms, CSS NVM
VS = 0x0001_0300
CC_EN = 1
CC_SHN_SHIFT = 14
CSTS_RDY, CSTS_CFS = 1, 2
CSTS_SHST_COMPLETE = 2 << 2

SCT_GENERIC, SCT_COMMAND = 0, 1
SC_SUCCESS = 0x00
SC_INVALID_OPCODE = 0x01
SC_INVALID_FIELD = 0x02
SC_DATA_TRANSFER_ERROR = 0x04
SC_INVALID_NAMESPACE = 0x0B
SC_PRP_OFFSET_INVALID = 0x13
SC_LBA_OUT_OF_RANGE = 0x80
SC_CQ_INVALID = 0x00
SC_INVALID_QID = 0x01
SC_INVALID_QSIZE = 0x02
SC_INVALID_VECTOR = 0x08
SC_INVALID_QUEUE_DELETION = 0x0C

OK = (SCT_GENERIC, SC_SUCCESS)

ADMIN_DELETE_SQ, ADMIN_CREATE_SQ, ADMIN_DELETE_CQ, ADMIN_CREATE_CQ = 0x00, 0x01, 0x04, 0x05
ADMIN_IDENTIFY, ADMIN_SET_FEATURES, ADMIN_GET_FEATURES = 0x06, 0x09, 0x0A
IO_FLUSH, IO_WRITE, IO_READ = 0x00, 0x01, 0x02
FEATURE_NUMBER_OF_QUEUES = 0x07
SQE_SIZE, CQE_SIZE = 64, 16


class GuestMemoryError(Exception):
    """A queue in guest memory could not be read or written (checked at creation, so a bug or
    a memory map change): the controller reports a fatal status."""


@dataclass
class SubmissionQueue:
    qid: int
    base: int
    size: int
    cqid: int
    head: int = 0
    tail: int = 0



@dataclass
class CompletionQueue:
    qid: int
    base: int
    size: int
    ien: bool
    head: int = 0
    tail: int = 0
    phase: int = 1

    @property
    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head

    @property
    def unreleased(self) -> bool:
        return self.head != self.tail



@dataclass
class NvmeRegisters:
    """The controller part of the section (under ``"nvme"``); queues are saved as they are."""

    cc: int
    csts: int
    aqa: int
    asq: int
    acq: int
    intms: int
    error: str | None
    sqs: list[SubmissionQueue]
    cqs: list[CompletionQueue]


@dataclass
class NvmeDiskState:
    path: str
    capacity_lbas: int
    serial: str


@dataclass
class NvmeState:
    VERSION: ClassVar[int] = 1
    MIN_VERSION: ClassVar[int] = 1

    pci: PciState
    nvme: NvmeRegisters
    device: NvmeDiskState


class Nvme(PciFunction):
    EMULATION = "nvme"
    VENDOR_ID = 0xFB5D
    DEVICE_ID = 0x0A0A
    SUBSYSTEM_VENDOR_ID = 0xFB5D
    SUBSYSTEM_ID = 0x0A0A
    CLASS = 0x01  # mass storage
    SUBCLASS = 0x08  # non-volatile memory
    PROGIF = 0x02  # NVM Express
    USES_INTX = True
    STATE = NvmeState
    OPTIONS_HELP = "PATH[,ser=SERIAL]"

    def __init__(self, host: PciHost, bus: int, slot: int, func: int, conf: str | None = None) -> None:
        super().__init__(host, bus, slot, func, conf)
        options = parse_options(self.name, conf, positional="path", keys=("ser",))
        path = options.get("path")
        if not path:
            raise PciConfigError(f"{self.name}: no image file given (-s {slot},nvme,PATH)")
        serial = options.get("ser", f"vmmpy-nvme-{bus}-{slot}-{func}")
        if len(serial.encode()) > SERIAL_BYTES or not serial.isascii():
            raise PciConfigError(f"{self.name}: ser={serial}: a serial is at most {SERIAL_BYTES} ASCII characters")
        self.path, self.serial = path, serial
        self.fd, self.capacity = open_image(self.name, path, block=LBA_SIZE)
        self.add_bar(0, "mem64", BAR_SIZE)
        self.stats = {"reads": 0, "writes": 0, "flushes": 0, "errors": 0}
        self.aqa = self.asq = self.acq = 0
        self._controller_reset()

    def _controller_reset(self) -> None:
        self.cc = 0
        self.csts = 0
        self.intms = 0
        self.error: str | None = None
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self._update_intx()

    # ---- guest memory ------------------------------------------------------------------------
    def ram_contains(self, gpa: int, length: int) -> bool:
        if gpa < 0 or length < 0:
            return False
        return any(seg.gpa <= gpa and gpa + length <= seg.gpa + seg.size for seg in self.host.memory.segments)

    def _read(self, gpa: int, size: int) -> bytes:
        try:
            return self.host.memory.read(gpa, size)
        except LazyMemoryError:
            raise  # the host's failure, not the guest's: it stops the VM
        except (OSError, OverflowError, ValueError):
            raise GuestMemoryError(f"{self.name}: read of {size} bytes at gpa {gpa:#x} is outside guest memory") from None

    def _write(self, gpa: int, data: bytes) -> None:
        try:
            self.host.memory.write(gpa, data)
        except LazyMemoryError:
            raise
        except (OSError, OverflowError, ValueError):
            raise GuestMemoryError(f"{self.name}: write of {len(data)} bytes at gpa {gpa:#x} is outside guest memory") from None

    # ---- registers -----------------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if offset >= DOORBELLS:
            return 0 if size == 4 else ones  # doorbells are write-only
        wide = {REG_CAP: CAP, REG_ASQ: self.asq, REG_ACQ: self.acq}
        if size == 8:
            if offset in wide:
                return wide[offset]
        elif size == 4:
            for base, value in wide.items():
                if offset in (base, base + 4):
                    return (value >> (8 * (offset - base))) & 0xFFFF_FFFF
            regs = {REG_VS: VS, REG_INTMS: self.intms, REG_INTMC: self.intms, REG_CC: self.cc, REG_CSTS: self.csts, REG_AQA: self.aqa}
            if offset in regs:
                return regs[offset]
            return 0  # reserved
        log.warning("%s: %d-byte read of register %#x is not a supported access", self.name, size, offset)
        return ones

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if offset >= DOORBELLS:
            if size != 4 or offset % 4:
                log.warning("%s: %d-byte doorbell write at %#x ignored", self.name, size, offset)
                return
            self._doorbell((offset - DOORBELLS) // 8, bool((offset - DOORBELLS) % 8), value)
            return
        if size == 8 and offset in (REG_ASQ, REG_ACQ):
            self._set_queue_base(offset, value)
            return
        if size != 4:
            log.warning("%s: %d-byte write of register %#x ignored", self.name, size, offset)
            return
        if offset in (REG_ASQ, REG_ASQ + 4, REG_ACQ, REG_ACQ + 4):
            base = offset & ~7
            old = self.asq if base == REG_ASQ else self.acq
            shift = 8 * (offset - base)
            self._set_queue_base(base, (old & ~(0xFFFF_FFFF << shift)) | (value << shift))
        elif offset == REG_INTMS:
            self.intms |= value & 1
            self._update_intx()
        elif offset == REG_INTMC:
            self.intms &= ~value & 1
            self._update_intx()
        elif offset == REG_CC:
            self._write_cc(value)
        elif offset == REG_AQA:
            if not self.cc & CC_EN:
                self.aqa = value & 0x0FFF_0FFF
        # CAP, VS, CSTS and reserved registers are read-only

    def _set_queue_base(self, register: int, value: int) -> None:
        if self.cc & CC_EN:
            return  # the admin queue registers are fixed while enabled
        value &= 0xFFFF_FFFF_FFFF_F000
        if register == REG_ASQ:
            self.asq = value
        else:
            self.acq = value

    def _write_cc(self, value: int) -> None:
        value &= 0x00FF_FFF1
        was_enabled = bool(self.cc & CC_EN)
        if was_enabled and not value & CC_EN:
            log.info("%s: controller disabled (reset)", self.name)
            self._controller_reset()
            return
        if (value >> CC_SHN_SHIFT) & 3 and not (self.cc >> CC_SHN_SHIFT) & 3:
            self._flush()
            self.csts = (self.csts & ~(3 << 2)) | CSTS_SHST_COMPLETE
        self.cc = value
        if value & CC_EN and not was_enabled:
            self._enable()

    def _enable(self) -> None:
        asqs, acqs = (self.aqa & 0xFFF) + 1, ((self.aqa >> 16) & 0xFFF) + 1
        problem = None
        if (self.cc >> 7) & 0xF:
            problem = "CC.MPS is not 4 KiB"
        elif (self.cc >> 4) & 7:
            problem = "CC.CSS is not the NVM command set"
        elif asqs < 2 or acqs < 2:
            problem = f"admin queue sizes {asqs}/{acqs} (AQA {self.aqa:#x}) are under 2 entries"
        elif not self.ram_contains(self.asq, asqs * SQE_SIZE) or not self.ram_contains(self.acq, acqs * CQE_SIZE) or not self.asq or not self.acq:
            problem = f"admin queues at {self.asq:#x}/{self.acq:#x} are not in guest RAM"
        if problem:
            self._fatal(f"enable refused: {problem}")
            return
        self.sqs = {0: SubmissionQueue(0, self.asq, asqs, 0)}
        self.cqs = {0: CompletionQueue(0, self.acq, acqs, True)}
        self.csts = (self.csts & ~CSTS_CFS) | CSTS_RDY
        log.info("%s: controller ready", self.name)

    def _fatal(self, reason: str) -> None:
        self.error = reason
        self.csts |= CSTS_CFS
        log.error("%s: controller fatal status: %s", self.name, reason)

    # ---- doorbells -----------------------------------------------------------------------------
    def _doorbell(self, qid: int, is_cq: bool, value: int) -> None:
        if not self.csts & CSTS_RDY or self.error is not None:
            return
        queue = (self.cqs if is_cq else self.sqs).get(qid)
        if queue is None or not 0 <= value < queue.size:
            log.warning("%s: invalid %s doorbell write: queue %d, value %d", self.name, "CQ head" if is_cq else "SQ tail", qid, value)
            return
        try:
            if is_cq:
                queue.head = value
                for sq in sorted(self.sqs.values(), key=lambda q: q.qid):
                    if sq.cqid == qid:
                        self._process(sq)
            else:
                queue.tail = value
                self._process(queue)
        except GuestMemoryError as err:
            self._fatal(str(err))
        self._update_intx()

    def _process(self, sq: SubmissionQueue) -> None:
        while sq.head != sq.tail and self.sqs.get(sq.qid) is sq:
            cq = self.cqs[sq.cqid]
            if cq.full:
                return  # held until the driver releases completions
            entry = self._read(sq.base + sq.head * SQE_SIZE, SQE_SIZE)
            sq.head = (sq.head + 1) % sq.size
            cdw0 = struct.unpack_from("<I", entry, 0)[0]
            cid = cdw0 >> 16
            result, status = self._command(sq.qid, entry)
            if status != OK:
                self.stats["errors"] += 1
                log.info("%s: queue %d command %d (opcode %#x) failed: SCT %d SC %#x", self.name, sq.qid, cid, cdw0 & 0xFF, *status)
            self._post(cq, sq, cid, result, status)

    def _post(self, cq: CompletionQueue, sq: SubmissionQueue, cid: int, result: int, status: tuple[int, int]) -> None:
        sct, sc = status
        dw3 = cid | (cq.phase << 16) | (sc << 17) | (sct << 25) | ((1 << 31) if status != OK else 0)
        self._write(cq.base + cq.tail * CQE_SIZE, struct.pack("<IIII", result & 0xFFFF_FFFF, 0, sq.head | (sq.qid << 16), dw3))
        cq.tail = (cq.tail + 1) % cq.size
        if cq.tail == 0:
            cq.phase ^= 1

    def interrupt_level(self) -> bool:
        return not self.intms & 1 and any(cq.ien and cq.unreleased for cq in self.cqs.values())

    def _update_intx(self) -> None:
        self.set_intx(self.interrupt_level())

    # ---- commands ------------------------------------------------------------------------------
    def _command(self, qid: int, entry: bytes) -> tuple[int, tuple[int, int]]:
        cdw0, nsid = struct.unpack_from("<II", entry, 0)
        prp1, prp2 = struct.unpack_from("<QQ", entry, 24)
        cdw = struct.unpack_from("<6I", entry, 40)  # cdw10 .. cdw15
        opcode, fuse, psdt = cdw0 & 0xFF, (cdw0 >> 8) & 3, (cdw0 >> 14) & 3
        if fuse or psdt:
            return 0, (SCT_GENERIC, SC_INVALID_FIELD)
        if qid == 0:
            handler = {ADMIN_DELETE_SQ: self._delete_sq, ADMIN_CREATE_SQ: self._create_sq, ADMIN_DELETE_CQ: self._delete_cq,
                       ADMIN_CREATE_CQ: self._create_cq, ADMIN_IDENTIFY: self._identify,
                       ADMIN_SET_FEATURES: self._features, ADMIN_GET_FEATURES: self._features}.get(opcode)
            if handler is None:
                return 0, (SCT_GENERIC, SC_INVALID_OPCODE)
            return handler(opcode, nsid, prp1, prp2, cdw)
        if opcode == IO_FLUSH:
            if nsid not in (1, 0xFFFF_FFFF):
                return 0, (SCT_GENERIC, SC_INVALID_NAMESPACE)
            self._flush()
            self.stats["flushes"] += 1
            return 0, OK
        if opcode in (IO_READ, IO_WRITE):
            return 0, self._rw(opcode, nsid, prp1, prp2, cdw)
        return 0, (SCT_GENERIC, SC_INVALID_OPCODE)

    def _prp_segments(self, prp1: int, prp2: int, length: int) -> list[tuple[int, int]] | tuple[int, int]:
        """The (gpa, length) pieces of a transfer, or an error status."""
        if prp1 & 3:
            return (SCT_GENERIC, SC_PRP_OFFSET_INVALID)
        first = min(length, PAGE - prp1 % PAGE)
        pieces = [(prp1, first)]
        rest = length - first
        if rest > PAGE:
            return (SCT_GENERIC, SC_INVALID_FIELD)  # would need a PRP list: not supported (MDTS 1)
        if rest:
            if prp2 % PAGE:
                return (SCT_GENERIC, SC_PRP_OFFSET_INVALID)
            pieces.append((prp2, rest))
        for gpa, n in pieces:
            if not self.ram_contains(gpa, n):
                return (SCT_GENERIC, SC_DATA_TRANSFER_ERROR)
        return pieces

    def _to_guest(self, prp1: int, prp2: int, data: bytes) -> tuple[int, int]:
        pieces = self._prp_segments(prp1, prp2, len(data))
        if isinstance(pieces, tuple):
            return pieces
        done = 0
        for gpa, n in pieces:
            self._write(gpa, data[done:done + n])
            done += n
        return OK

    def _rw(self, opcode: int, nsid: int, prp1: int, prp2: int, cdw: tuple[int, ...]) -> tuple[int, int]:
        if nsid != 1:
            return (SCT_GENERIC, SC_INVALID_NAMESPACE)
        slba = cdw[0] | (cdw[1] << 32)
        nlb = (cdw[2] & 0xFFFF) + 1
        if slba + nlb > self.capacity:
            return (SCT_GENERIC, SC_LBA_OUT_OF_RANGE)
        length = nlb * LBA_SIZE
        if length > 2 * PAGE:
            return (SCT_GENERIC, SC_INVALID_FIELD)  # more than MDTS allows
        pieces = self._prp_segments(prp1, prp2, length)
        if isinstance(pieces, tuple):
            return pieces
        try:
            if opcode == IO_READ:
                data = os.pread(self.fd, length, slba * LBA_SIZE)
                data += bytes(length - len(data))
                done = 0
                for gpa, n in pieces:
                    self._write(gpa, data[done:done + n])
                    done += n
                self.stats["reads"] += 1
            else:
                data = b"".join(self._read(gpa, n) for gpa, n in pieces)
                os.pwrite(self.fd, data, slba * LBA_SIZE)
                self.stats["writes"] += 1
        except OSError as err:
            log.error("%s: %s at LBA %d of %s failed: %s", self.name, "read" if opcode == IO_READ else "write", slba, self.path, err)
            return (SCT_GENERIC, SC_DATA_TRANSFER_ERROR)
        return OK

    def _identify(self, opcode: int, nsid: int, prp1: int, prp2: int, cdw: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
        cns = cdw[0] & 0xFF
        data = bytearray(PAGE)
        if cns == 0:
            if nsid != 1:
                return 0, (SCT_GENERIC, SC_INVALID_NAMESPACE)
            struct.pack_into("<QQQ", data, 0, self.capacity, self.capacity, self.capacity)
            struct.pack_into("<I", data, 128, 9 << 16)  # LBA format 0: 512-byte data, no metadata
        elif cns == 1:
            struct.pack_into("<HH", data, 0, self.VENDOR_ID, self.SUBSYSTEM_VENDOR_ID)
            data[4:24] = self.serial.encode().ljust(20, b" ")
            data[24:64] = b"vmmpy NVMe".ljust(40, b" ")
            data[64:72] = b"1.0".ljust(8, b" ")
            data[77] = 1  # MDTS: 2 pages
            struct.pack_into("<I", data, 80, VS)
            data[512], data[513] = 0x66, 0x44  # SQES, CQES
            struct.pack_into("<I", data, 516, 1)  # one namespace
            data[525] = 1  # a volatile write cache: FLUSH means something
        elif cns == 2:
            if nsid < 1:
                struct.pack_into("<I", data, 0, 1)
        else:
            return 0, (SCT_GENERIC, SC_INVALID_FIELD)
        return 0, self._to_guest(prp1, prp2, bytes(data))

    def _features(self, opcode: int, nsid: int, prp1: int, prp2: int, cdw: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
        if cdw[0] & 0xFF != FEATURE_NUMBER_OF_QUEUES:
            return 0, (SCT_GENERIC, SC_INVALID_FIELD)
        n = MAX_IO_QUEUES - 1
        return n | (n << 16), OK

    def _queue_args(self, prp1: int, cdw: tuple[int, ...]) -> tuple[int, int] | tuple[int, int, int]:
        qid, size = cdw[0] & 0xFFFF, (cdw[0] >> 16) + 1
        if not 1 <= qid <= MAX_IO_QUEUES:
            return (SCT_COMMAND, SC_INVALID_QID)
        if not 2 <= size <= MAX_QUEUE_ENTRIES:
            return (SCT_COMMAND, SC_INVALID_QSIZE)
        if not cdw[1] & 1 or prp1 % PAGE:
            return (SCT_GENERIC, SC_INVALID_FIELD)  # CAP.CQR: queues are physically contiguous pages
        return qid, size, prp1

    def _create_cq(self, opcode: int, nsid: int, prp1: int, prp2: int, cdw: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
        args = self._queue_args(prp1, cdw)
        if len(args) == 2:
            return 0, args
        qid, size, base = args
        if qid in self.cqs:
            return 0, (SCT_COMMAND, SC_INVALID_QID)
        if cdw[1] >> 16:
            return 0, (SCT_COMMAND, SC_INVALID_VECTOR)  # pin-based: vector 0 only
        if not self.ram_contains(base, size * CQE_SIZE):
            return 0, (SCT_GENERIC, SC_DATA_TRANSFER_ERROR)
        self.cqs[qid] = CompletionQueue(qid, base, size, bool(cdw[1] & 2))
        return 0, OK

    def _create_sq(self, opcode: int, nsid: int, prp1: int, prp2: int, cdw: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
        args = self._queue_args(prp1, cdw)
        if len(args) == 2:
            return 0, args
        qid, size, base = args
        if qid in self.sqs:
            return 0, (SCT_COMMAND, SC_INVALID_QID)
        cqid = cdw[1] >> 16
        if cqid == 0 or cqid not in self.cqs:
            return 0, (SCT_COMMAND, SC_CQ_INVALID)
        if not self.ram_contains(base, size * SQE_SIZE):
            return 0, (SCT_GENERIC, SC_DATA_TRANSFER_ERROR)
        self.sqs[qid] = SubmissionQueue(qid, base, size, cqid)
        return 0, OK

    def _delete_sq(self, opcode: int, nsid: int, prp1: int, prp2: int, cdw: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
        qid = cdw[0] & 0xFFFF
        if qid == 0 or qid not in self.sqs:
            return 0, (SCT_COMMAND, SC_INVALID_QID)
        del self.sqs[qid]
        return 0, OK

    def _delete_cq(self, opcode: int, nsid: int, prp1: int, prp2: int, cdw: tuple[int, ...]) -> tuple[int, tuple[int, int]]:
        qid = cdw[0] & 0xFFFF
        if qid == 0 or qid not in self.cqs:
            return 0, (SCT_COMMAND, SC_INVALID_QID)
        if any(sq.cqid == qid for sq in self.sqs.values()):
            return 0, (SCT_COMMAND, SC_INVALID_QUEUE_DELETION)
        del self.cqs[qid]
        return 0, OK

    # ---- pause, state ------------------------------------------------------------------------
    def _flush(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)

    def pause(self) -> None:
        self._flush()

    def save(self) -> NvmeState:
        return NvmeState(
            pci=self.save_pci(),
            nvme=NvmeRegisters(
                self.cc, self.csts, self.aqa, self.asq, self.acq, self.intms, self.error,
                sqs=[dataclasses.replace(q) for _, q in sorted(self.sqs.items())],
                cqs=[dataclasses.replace(q) for _, q in sorted(self.cqs.items())],
            ),
            device=NvmeDiskState(self.path, self.capacity, self.serial),
        )

    def _check_nvme(self, state: NvmeRegisters) -> tuple[dict[int, SubmissionQueue], dict[int, CompletionQueue]]:
        where = f"{self.name}: nvme"
        for key, limit in (("cc", 0x00FF_FFF1), ("csts", 0xF), ("aqa", 0x0FFF_0FFF), ("intms", 1),
                           ("asq", 0xFFFF_FFFF_FFFF_F000), ("acq", 0xFFFF_FFFF_FFFF_F000)):
            value = getattr(state, key)
            if value < 0 or value & ~limit:
                raise ValueError(f"{where}: field '{key}' value {value:#x} has bits the register cannot hold")
        cqs: dict[int, CompletionQueue] = {}
        for cq in state.cqs:
            self._check_queue(where, "CQ", cq, cqs, CQE_SIZE)
            if cq.phase not in (0, 1):
                raise ValueError(f"{where}: CQ {cq.qid} field 'phase' value {cq.phase} is not 0 or 1")
            cqs[cq.qid] = dataclasses.replace(cq)
        sqs: dict[int, SubmissionQueue] = {}
        for sq in state.sqs:
            self._check_queue(where, "SQ", sq, sqs, SQE_SIZE)
            if sq.cqid not in cqs or (sq.cqid == 0) != (sq.qid == 0):
                raise ValueError(f"{where}: SQ {sq.qid} field 'cqid' value {sq.cqid} names no suitable completion queue")
            sqs[sq.qid] = dataclasses.replace(sq)
        if bool(sqs) != bool(state.csts & CSTS_RDY) or (sqs and 0 not in sqs) or bool(sqs) != bool(cqs):
            raise ValueError(f"{where}: the queues saved ({sorted(sqs)} / {sorted(cqs)}) do not fit CSTS {state.csts:#x}")
        return sqs, cqs

    @staticmethod
    def _check_queue(where: str, kind: str, queue: SubmissionQueue | CompletionQueue, seen: dict[int, object], entry: int) -> None:
        qid = queue.qid
        if not 0 <= qid <= MAX_IO_QUEUES or qid in seen:
            raise ValueError(f"{where}: {kind} field 'qid' value {qid} is not a free queue id (0..{MAX_IO_QUEUES})")
        if not 2 <= queue.size <= (4096 if qid == 0 else MAX_QUEUE_ENTRIES):
            raise ValueError(f"{where}: {kind} {qid} field 'size' value {queue.size} is out of range")
        for key in ("head", "tail"):
            if not 0 <= getattr(queue, key) < queue.size:
                raise ValueError(f"{where}: {kind} {qid} field '{key}' value {getattr(queue, key)} is outside the queue of {queue.size}")
        if queue.base <= 0 or queue.base % PAGE or queue.base + queue.size * entry > 1 << 64:
            raise ValueError(f"{where}: {kind} {qid} field 'base' value {queue.base:#x} is not a page-aligned address")

    def restore(self, state: NvmeState) -> None:
        where = f"{self.name}: device"
        if state.device.capacity_lbas != self.capacity:
            raise ValueError(f"{where}: saved with an image of {state.device.capacity_lbas} blocks; {self.path!r} has {self.capacity}")
        if state.device.serial != self.serial:
            raise ValueError(f"{where}: saved with serial {state.device.serial!r}; configured {self.serial!r} (the 'ser' option)")
        sqs, cqs = self._check_nvme(state.nvme)
        before = self.save_pci()
        self.restore_pci(state.pci)
        nvme = state.nvme
        level = not nvme.intms & 1 and any(cq.ien and cq.unreleased for cq in cqs.values())
        if level != self.intx_level:
            saved_level = self.intx_level
            self.restore_pci(before)
            raise ValueError(f"{self.name}: saved INTx level {saved_level} disagrees with the completion queues and mask (level {level})")
        self.cc, self.csts, self.aqa, self.asq, self.acq, self.intms = nvme.cc, nvme.csts, nvme.aqa, nvme.asq, nvme.acq, nvme.intms
        self.error = nvme.error
        self.sqs, self.cqs = sqs, cqs

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
