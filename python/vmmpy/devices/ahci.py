"""ahci-hd: an AHCI 1.3 host bus adapter with one port and a SATA disk on it, backed by a file
image (bhyve's pci_ahci.c ``ahci-hd``, much reduced).

``-s SLOT,ahci-hd,PATH[,ser=SERIAL]``. The image must exist; its size in 512-byte sectors
(rounded down) is the disk's capacity. I/O is real file I/O; FLUSH CACHE is ``fsync``.

PCI: 8086:2821 (ICH8 AHCI, as bhyve), class 01:06:01 (SATA, AHCI), INTA. BAR 5 (ABAR) is a
32-bit memory BAR of 4 KiB with the HBA registers::

    0x00 CAP    NP 0 (one port), NCS 31 (32 slots), ISS Gen3, SAM (AHCI only), S64A
    0x04 GHC    HR (reset, self-clearing), IE (interrupt enable), AE (always 1)
    0x08 IS     port 0 interrupt pending, write 1 to clear
    0x0C PI     1 (port 0)
    0x10 VS     1.3.0
    0x100 port 0: PxCLB/PxCLBU, PxFB/PxFBU, PxIS (write 1 to clear), PxIE, PxCMD (ST, SUD,
          POD, FRE; CR and FR follow ST and FRE), PxTFD, PxSIG (0x101: ATA disk),
          PxSSTS (0x113: device present, Gen1, active), PxSCTL, PxSERR (write 1 to clear),
          PxSACT, PxCI

Registers take 4-byte accesses; other widths read all-ones and write nothing (logged).

Commands: with PxCMD.ST set, writing PxCI issues the command slots whose bits are set; they run
synchronously in slot order during that write. Each slot's command header (at PxCLB + 32 *
slot) gives the command table (CTBA, 128-byte aligned) with a Register H2D FIS (type 0x27, C
bit set) and the PRDT (up to 256 entries; each data base word aligned, byte count even, in
guest RAM). ATA commands: IDENTIFY DEVICE (0xEC), READ DMA EXT (0x25), WRITE DMA EXT (0x35),
FLUSH CACHE (0xE7) and FLUSH CACHE EXT (0xEA); a count of 0 means 65536 sectors. The PRDT must
hold at least the transfer; PRDBC reports the bytes moved. On success PxTFD is DRDY (0x40), a
D2H Register FIS goes to PxFB + 0x40 (if PxCMD.FRE) and PxIS.DHRS is set.

Errors: an unknown command, an ATAPI or malformed FIS, an LBA range past the capacity, a
malformed or out-of-RAM PRDT or too short a PRDT, complete with a task file error: PxTFD =
DRDY|ERR with ABRT, PxIS.TFES, and the port stops processing (the remaining PxCI bits stay) until
software clears PxCMD.ST (which clears PxCI) and sets it again (which clears the error status).
A command header or table outside guest RAM is a host bus fatal error (PxIS.HBFS), handled the
same way. Nothing a guest writes raises out of the device.

Interrupts: INTx, up while GHC.IE is set and IS bit 0 is set; IS bit 0 is set whenever PxIS &
PxIE becomes non-zero, and writing 1 to clear it leaves it set while PxIS & PxIE is still
non-zero.

Saved state (beside ``pci``): ``hba`` with ``ghc is`` and ``port`` (``clb fb is ie cmd tfd serr
sctl ci halted``); ``device`` with ``path capacity_sectors serial``.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import ClassVar

from ..memory import LazyMemoryError
from .disk import open_image
from .pci import PciConfigError, PciFunction, PciHost, PciState, parse_options

log = logging.getLogger(__name__)

SECTOR = 512
ABAR_SIZE = 0x1000
PORT = 0x100
SERIAL_BYTES = 20
MAX_PRDT = 256

CAP = 0 | (31 << 8) | (3 << 20) | (1 << 18) | (1 << 31)
VS = 0x0001_0300
GHC_HR, GHC_IE, GHC_AE = 1, 2, 1 << 31
PX_CLB, PX_CLBU, PX_FB, PX_FBU, PX_IS, PX_IE, PX_CMD = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18
PX_TFD, PX_SIG, PX_SSTS, PX_SCTL, PX_SERR, PX_SACT, PX_CI = 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x38
CMD_ST, CMD_SUD, CMD_POD, CMD_FRE, CMD_FR, CMD_CR = 1, 2, 4, 1 << 4, 1 << 14, 1 << 15
CMD_WRITABLE = CMD_ST | CMD_SUD | CMD_POD | CMD_FRE
IS_DHRS, IS_HBFS, IS_TFES = 1, 1 << 29, 1 << 30
IE_WRITABLE = 0xFDC0_00FF
SIG_ATA = 0x0000_0101
SSTS_ACTIVE = 0x113
TFD_IDLE = 0x40
ATA_ERR, ATA_ABRT = 0x01, 0x04

FIS_H2D, FIS_D2H = 0x27, 0x34
ATA_IDENTIFY, ATA_READ_DMA_EXT, ATA_WRITE_DMA_EXT, ATA_FLUSH, ATA_FLUSH_EXT = 0xEC, 0x25, 0x35, 0xE7, 0xEA


class CommandError(Exception):
    """The command cannot complete: a task file error (or, with ``fatal``, a host bus fatal error)."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


def ata_string(text: str, length: int) -> bytes:
    """An ATA IDENTIFY string: space padded, the two bytes of each word swapped."""
    raw = text.encode().ljust(length, b" ")[:length]
    return bytes(raw[i ^ 1] for i in range(length))


@dataclass
class AhciPortState:
    clb: int
    fb: int
    irq_status: int  # PxIS
    ie: int
    cmd: int
    tfd: int
    serr: int
    sctl: int
    ci: int
    halted: bool


@dataclass
class AhciHbaState:
    ghc: int
    irq_status: int  # IS
    port: AhciPortState


@dataclass
class AhciDiskState:
    path: str
    capacity_sectors: int
    serial: str


@dataclass
class AhciState:
    VERSION: ClassVar[int] = 1
    MIN_VERSION: ClassVar[int] = 1

    pci: PciState
    hba: AhciHbaState
    device: AhciDiskState


class AhciHd(PciFunction):
    EMULATION = "ahci-hd"
    VENDOR_ID = 0x8086
    DEVICE_ID = 0x2821
    SUBSYSTEM_VENDOR_ID = 0x8086
    SUBSYSTEM_ID = 0x2821
    CLASS = 0x01  # mass storage
    SUBCLASS = 0x06  # SATA
    PROGIF = 0x01  # AHCI 1.0
    USES_INTX = True
    STATE = AhciState
    OPTIONS_HELP = "PATH[,ser=SERIAL]"

    def __init__(self, host: PciHost, bus: int, slot: int, func: int, conf: str | None = None) -> None:
        super().__init__(host, bus, slot, func, conf)
        options = parse_options(self.name, conf, positional="path", keys=("ser",))
        path = options.get("path")
        if not path:
            raise PciConfigError(f"{self.name}: no image file given (-s {slot},ahci-hd,PATH)")
        serial = options.get("ser", f"vmmpy-ahci-{bus}-{slot}-{func}")
        if len(serial.encode()) > SERIAL_BYTES or not serial.isascii():
            raise PciConfigError(f"{self.name}: ser={serial}: a serial is at most {SERIAL_BYTES} ASCII characters")
        self.path, self.serial = path, serial
        self.fd, self.capacity = open_image(self.name, path, block=SECTOR)
        self.add_bar(5, "mem32", ABAR_SIZE)
        self.stats = {"reads": 0, "writes": 0, "flushes": 0, "identifies": 0, "errors": 0}
        self._hba_reset()

    def _hba_reset(self) -> None:
        self.ghc = GHC_AE
        self.is_ = 0
        self.clb = self.fb = 0
        self.px_is = self.px_ie = 0
        self.cmd = CMD_SUD | CMD_POD
        self.tfd = TFD_IDLE
        self.serr = self.sctl = self.ci = 0
        self.halted = False
        self._update_intx()

    # ---- guest memory ------------------------------------------------------------------------
    def ram_contains(self, gpa: int, length: int) -> bool:
        if gpa < 0 or length < 0:
            return False
        return any(seg.gpa <= gpa and gpa + length <= seg.gpa + seg.size for seg in self.host.memory.segments)

    def _read(self, gpa: int, size: int, what: str, fatal: bool = False) -> bytes:
        if not self.ram_contains(gpa, size):
            raise CommandError(f"{what} at gpa {gpa:#x} (+{size:#x}) is not guest RAM", fatal)
        return self.host.memory.read(gpa, size)

    def _write(self, gpa: int, data: bytes, what: str, fatal: bool = False) -> None:
        if not self.ram_contains(gpa, len(data)):
            raise CommandError(f"{what} at gpa {gpa:#x} (+{len(data):#x}) is not guest RAM", fatal)
        self.host.memory.write(gpa, data)

    # ---- registers -----------------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> int:
        if size != 4 or offset % 4:
            log.warning("%s: %d-byte read of register %#x is not a supported access", self.name, size, offset)
            return (1 << (8 * size)) - 1
        if offset < PORT:
            return {0x00: CAP, 0x04: self.ghc, 0x08: self.is_, 0x0C: 1, 0x10: VS}.get(offset, 0)
        reg = offset - PORT
        cmd = self.cmd | (CMD_CR if self.cmd & CMD_ST else 0) | (CMD_FR if self.cmd & CMD_FRE else 0)
        return {PX_CLB: self.clb & 0xFFFF_FFFF, PX_CLBU: self.clb >> 32, PX_FB: self.fb & 0xFFFF_FFFF, PX_FBU: self.fb >> 32,
                PX_IS: self.px_is, PX_IE: self.px_ie, PX_CMD: cmd, PX_TFD: self.tfd, PX_SIG: SIG_ATA, PX_SSTS: SSTS_ACTIVE,
                PX_SCTL: self.sctl, PX_SERR: self.serr, PX_SACT: 0, PX_CI: self.ci}.get(reg, 0)

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if size != 4 or offset % 4:
            log.warning("%s: %d-byte write of register %#x ignored", self.name, size, offset)
            return
        if offset == 0x04:
            if value & GHC_HR:
                log.info("%s: HBA reset", self.name)
                self._hba_reset()
                return
            self.ghc = GHC_AE | (value & GHC_IE)
        elif offset == 0x08:
            self.is_ &= ~value
            self._latch_is()
        elif offset >= PORT:
            self._port_write(offset - PORT, value)
        self._update_intx()

    def _port_write(self, reg: int, value: int) -> None:
        running = bool(self.cmd & CMD_ST)
        if reg in (PX_CLB, PX_CLBU):
            if not running:
                shift = 0 if reg == PX_CLB else 32
                value &= 0xFFFF_FC00 if reg == PX_CLB else 0xFFFF_FFFF
                self.clb = (self.clb & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif reg in (PX_FB, PX_FBU):
            if not self.cmd & CMD_FRE:
                shift = 0 if reg == PX_FB else 32
                value &= 0xFFFF_FF00 if reg == PX_FB else 0xFFFF_FFFF
                self.fb = (self.fb & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif reg == PX_IS:
            self.px_is &= ~value
            self._latch_is()
        elif reg == PX_IE:
            self.px_ie = value & IE_WRITABLE
            self._latch_is()
        elif reg == PX_CMD:
            new = value & CMD_WRITABLE
            if running and not new & CMD_ST:
                self.ci = 0  # stopping the port drops issued commands
                self.halted = False
            elif not running and new & CMD_ST:
                if self.halted or self.tfd & ATA_ERR:
                    self.tfd = TFD_IDLE  # restarting recovers from the error
                self.halted = False
            self.cmd = new
        elif reg == PX_SCTL:
            self.sctl = value & 0xFFF
        elif reg == PX_SERR:
            self.serr &= ~value
        elif reg == PX_CI:
            if running:
                self.ci |= value
                self._process()
        # TFD, SIG, SSTS, SACT (no NCQ) are read-only

    def _latch_is(self) -> None:
        if self.px_is & self.px_ie:
            self.is_ |= 1

    def _update_intx(self) -> None:
        self.set_intx(bool(self.ghc & GHC_IE and self.is_ & 1))

    # ---- commands ------------------------------------------------------------------------------
    def _process(self) -> None:
        while self.ci and not self.halted and self.cmd & CMD_ST:
            slot = (self.ci & -self.ci).bit_length() - 1
            try:
                self._command(slot)
            except CommandError as err:
                self.stats["errors"] += 1
                log.info("%s: command slot %d failed: %s", self.name, slot, err)
                self.tfd = (ATA_ABRT << 8) | TFD_IDLE | ATA_ERR
                self.px_is |= IS_HBFS if err.fatal else IS_TFES
                self.halted = True
                self._d2h_fis(ATA_ABRT)
                self._latch_is()
                return
            self.ci &= ~(1 << slot)
            self.tfd = TFD_IDLE
            self.px_is |= IS_DHRS
            self._d2h_fis(0)
            self._latch_is()

    def _d2h_fis(self, error: int) -> None:
        if not self.cmd & CMD_FRE:
            return
        fis = bytes([FIS_D2H, 0x40, self.tfd & 0xFF, error]) + bytes(16)
        try:
            self._write(self.fb + 0x40, fis, "received FIS area")
        except CommandError as err:
            log.info("%s: %s", self.name, err)

    def _command(self, slot: int) -> None:
        header = self._read(self.clb + 32 * slot, 32, f"command header {slot}", fatal=True)
        dw0, _, ctba, ctbau = struct.unpack_from("<IIII", header, 0)
        table = (ctbau << 32) | ctba
        cfl, atapi, prdtl = dw0 & 0x1F, dw0 & (1 << 5), dw0 >> 16
        if table % 128:
            raise CommandError(f"command table at {table:#x} is not 128-byte aligned", fatal=True)
        if atapi:
            raise CommandError("ATAPI command on a disk")
        if cfl < 5 or cfl > 16:
            raise CommandError(f"command FIS length {cfl} dwords is not 5..16")
        if prdtl > MAX_PRDT:
            raise CommandError(f"PRDT of {prdtl} entries (at most {MAX_PRDT})")
        cfis = self._read(table, 20, "command FIS", fatal=True)
        if cfis[0] != FIS_H2D or not cfis[1] & 0x80:
            raise CommandError(f"command FIS type {cfis[0]:#x} flags {cfis[1]:#x} is not a Register H2D command")
        command = cfis[2]
        lba = int.from_bytes(cfis[4:7] + cfis[8:11], "little")
        count = int.from_bytes(cfis[12:14], "little") or 65536
        prdt = []
        raw = self._read(table + 0x80, 16 * prdtl, "PRDT", fatal=True) if prdtl else b""
        for i in range(prdtl):
            dba, dbau, _, dw3 = struct.unpack_from("<IIII", raw, 16 * i)
            addr, length = (dbau << 32) | dba, (dw3 & 0x3F_FFFF) + 1
            if addr & 1 or length & 1:
                raise CommandError(f"PRD {i}: base {addr:#x} or byte count {length} is odd")
            if not self.ram_contains(addr, length):
                raise CommandError(f"PRD {i}: buffer at gpa {addr:#x} (+{length:#x}) is not guest RAM")
            prdt.append((addr, length))
        moved = 0
        if command == ATA_IDENTIFY:
            moved = self._scatter(prdt, self._identify_data())
            self.stats["identifies"] += 1
        elif command in (ATA_READ_DMA_EXT, ATA_WRITE_DMA_EXT):
            if lba + count > self.capacity:
                raise CommandError(f"sectors {lba}..{lba + count - 1} are past the capacity {self.capacity}")
            length = count * SECTOR
            if sum(n for _, n in prdt) < length:
                raise CommandError(f"PRDT holds {sum(n for _, n in prdt)} bytes, the transfer is {length}")
            try:
                if command == ATA_READ_DMA_EXT:
                    data = os.pread(self.fd, length, lba * SECTOR)
                    moved = self._scatter(prdt, data + bytes(length - len(data)))
                    self.stats["reads"] += 1
                else:
                    data = bytearray()
                    for addr, n in prdt:
                        data += self.host.memory.read(addr, min(n, length - len(data)))
                        if len(data) >= length:
                            break
                    os.pwrite(self.fd, bytes(data), lba * SECTOR)
                    moved = length
                    self.stats["writes"] += 1
            except LazyMemoryError:
                raise  # the host's failure, not the guest's: it stops the VM
            except OSError as err:
                raise CommandError(f"image I/O at sector {lba} failed: {err}") from None
        elif command in (ATA_FLUSH, ATA_FLUSH_EXT):
            self._flush()
            self.stats["flushes"] += 1
        else:
            raise CommandError(f"ATA command {command:#x} is not supported")
        self._write(self.clb + 32 * slot + 4, struct.pack("<I", moved), f"command header {slot}", fatal=True)

    def _scatter(self, prdt: list[tuple[int, int]], data: bytes) -> int:
        done = 0
        for addr, n in prdt:
            take = min(n, len(data) - done)
            if take <= 0:
                break
            self.host.memory.write(addr, data[done:done + take])
            done += take
        return done

    def _identify_data(self) -> bytes:
        words = [0] * 256
        words[0] = 0x0040
        words[47] = 0x8001
        words[49] = 0x0300  # LBA, DMA
        words[53] = 0x0006
        lba28 = min(self.capacity, 0x0FFF_FFFF)
        words[60], words[61] = lba28 & 0xFFFF, lba28 >> 16
        words[80] = 0x01F0  # ATA/ATAPI-4 .. ACS
        words[82], words[83], words[84] = 0x0020, 0x4400, 0x4000  # write cache; 48-bit, FLUSH EXT
        words[85], words[86], words[87] = 0x0020, 0x0400, 0x4000
        words[88] = 0x203F
        for i in range(4):
            words[100 + i] = (self.capacity >> (16 * i)) & 0xFFFF
        words[106] = 0x4000
        data = bytearray(struct.pack("<256H", *words))
        data[20:40] = ata_string(self.serial, 20)
        data[46:54] = ata_string("1.0", 8)
        data[54:94] = ata_string("vmmpy AHCI disk", 40)
        return bytes(data)

    # ---- pause, state ------------------------------------------------------------------------
    def _flush(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)

    def pause(self) -> None:
        self._flush()

    def save(self) -> AhciState:
        port = AhciPortState(self.clb, self.fb, self.px_is, self.px_ie, self.cmd, self.tfd, self.serr, self.sctl, self.ci, self.halted)
        return AhciState(pci=self.save_pci(), hba=AhciHbaState(self.ghc, self.is_, port),
                         device=AhciDiskState(self.path, self.capacity, self.serial))

    def restore(self, state: AhciState) -> None:
        where = f"{self.name}: device"
        if state.device.capacity_sectors != self.capacity:
            raise ValueError(f"{where}: saved with an image of {state.device.capacity_sectors} sectors; {self.path!r} has {self.capacity}")
        if state.device.serial != self.serial:
            raise ValueError(f"{where}: saved with serial {state.device.serial!r}; configured {self.serial!r} (the 'ser' option)")
        hba = state.hba
        where = f"{self.name}: hba"
        port = hba.port
        limits = {"ghc": (hba.ghc, GHC_AE | GHC_IE), "irq_status": (hba.irq_status, 1), "port clb": (port.clb, (1 << 64) - 1024),
                  "port fb": (port.fb, (1 << 64) - 256), "port irq_status": (port.irq_status, 0xFFFF_FFFF), "port ie": (port.ie, IE_WRITABLE),
                  "port cmd": (port.cmd, CMD_WRITABLE), "port tfd": (port.tfd, 0xFFFF), "port serr": (port.serr, 0xFFFF_FFFF),
                  "port sctl": (port.sctl, 0xFFF), "port ci": (port.ci, 0xFFFF_FFFF)}
        for key, (value, mask) in limits.items():
            if value < 0 or value & ~mask:
                raise ValueError(f"{where}: field '{key}' value {value:#x} has bits the register cannot hold")
        if not hba.ghc & GHC_AE:
            raise ValueError(f"{where}: field 'ghc' value {hba.ghc:#x} lacks AHCI enable, which is always set")
        if port.ci and not port.cmd & CMD_ST:
            raise ValueError(f"{where}: commands issued (ci {port.ci:#x}) on a stopped port")
        if port.ci and not port.halted:
            raise ValueError(f"{where}: commands issued (ci {port.ci:#x}) but not halted: commands complete synchronously")
        before = self.save_pci()
        self.restore_pci(state.pci)
        level = bool(hba.ghc & GHC_IE and hba.irq_status & 1)
        if level != self.intx_level:
            saved_level = self.intx_level
            self.restore_pci(before)
            raise ValueError(f"{self.name}: saved INTx level {saved_level} disagrees with GHC and IS (level {level})")
        self.ghc, self.is_ = hba.ghc, hba.irq_status
        self.clb, self.fb, self.px_is, self.px_ie, self.cmd, self.tfd = port.clb, port.fb, port.irq_status, port.ie, port.cmd, port.tfd
        self.serr, self.sctl, self.ci, self.halted = port.serr, port.sctl, port.ci, port.halted

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
