"""virtio-blk: a block device backed by a file image (bhyve's pci_virtio_block.c).

``-s SLOT,virtio-blk,PATH[,ro][,ser=SERIAL]``. The image must exist; its size in 512-byte
sectors (rounded down) is the capacity. I/O is real file I/O (``os.pread``/``os.pwrite``);
FLUSH is ``fsync``. One request queue of 128 entries.

Requests: a 16-byte device-readable header ``{u32 type, u32 reserved, u64 sector}``, data
buffers (device-readable for OUT, device-writable for IN), and a final device-writable status
byte (0 OK, 1 IOERR, 2 UNSUPP). Types: IN (0), OUT (1), FLUSH (4), GET_ID (8: the serial, 20
bytes, NUL padded). A transfer that is not whole sectors or runs past the capacity, or a write
to a read-only image, completes with IOERR; an unknown type with UNSUPP; a chain without a
header or status byte is a broken driver and puts the device in its error state.

Features offered: SEG_MAX, BLK_SIZE (512), FLUSH, and RO with ``ro``. Configuration: capacity
(u64), size_max (0), seg_max (126), geometry (0), blk_size (512).

Saved state (beside the PCI and virtio state): the image path, capacity in sectors, read-only
flag and serial; restore refuses an image whose capacity or mode differs. Requests complete
during the notify that announced them, so there is never one in flight; pause fsyncs the image.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from typing import ClassVar

from .disk import open_image
from .pci import PciConfigError, PciHost, PciState, parse_options
from .virtio import Chain, VirtioError, VirtioPciDevice, VirtioState, Virtqueue

log = logging.getLogger(__name__)

SECTOR_SIZE = 512
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
VIRTIO_BLK_ID_BYTES = 20
QUEUE_SIZE = 128
_HEADER = struct.Struct("<IIQ")


@dataclass
class BlockDeviceState:
    path: str
    capacity_sectors: int
    read_only: bool
    serial: str


@dataclass
class VirtioBlockState:
    VERSION: ClassVar[int] = 1
    MIN_VERSION: ClassVar[int] = 1

    pci: PciState
    virtio: VirtioState
    device: BlockDeviceState


class VirtioBlock(VirtioPciDevice):
    EMULATION = "virtio-blk"
    DEVICE_ID = 0x1001
    SUBSYSTEM_ID = 2  # virtio device type: block
    CLASS = 0x01  # mass storage
    SUBCLASS = 0x80  # other
    STATE = VirtioBlockState
    QUEUE_SIZES = (QUEUE_SIZE,)
    CONFIG_SIZE = 24
    OPTIONS_HELP = "PATH[,ro][,ser=SERIAL]"

    def __init__(self, host: PciHost, bus: int, slot: int, func: int, conf: str | None = None) -> None:
        super().__init__(host, bus, slot, func, conf)
        options = parse_options(self.name, conf, positional="path", flags=("ro",), keys=("ser",))
        path = options.get("path")
        if not path:
            raise PciConfigError(f"{self.name}: no image file given (-s {slot},virtio-blk,PATH)")
        self.path = path
        self.read_only = "ro" in options
        serial = options.get("ser", f"vmmpy-{bus}-{slot}-{func}")
        if len(serial.encode()) > VIRTIO_BLK_ID_BYTES:
            raise PciConfigError(f"{self.name}: ser={serial}: a serial has at most {VIRTIO_BLK_ID_BYTES} bytes")
        self.serial = serial
        self.fd, self.capacity = open_image(self.name, path, read_only=self.read_only, block=SECTOR_SIZE)
        self.host_features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH | (VIRTIO_BLK_F_RO if self.read_only else 0)
        self.stats = {"reads": 0, "writes": 0, "flushes": 0, "errors": 0}

    def config_bytes(self) -> bytes:
        return struct.pack("<QIIHBBI", self.capacity, 0, QUEUE_SIZE - 2, 0, 0, 0, SECTOR_SIZE)

    # ---- requests ----------------------------------------------------------------------------
    def process_queue(self, queue: Virtqueue) -> None:
        completed = 0
        try:
            while (chain := queue.pop()) is not None:
                queue.push(chain.head, self._request(queue, chain))
                completed += 1
        finally:
            self.signal(queue, completed)

    def _request(self, queue: Virtqueue, chain: Chain) -> int:
        """Carry out one request; the number of bytes written into the chain."""
        if chain.readable_len < _HEADER.size:
            raise VirtioError(f"{self.name}: request at head {chain.head} has {chain.readable_len} readable bytes, not a {_HEADER.size}-byte header")
        if chain.writable_len < 1:
            raise VirtioError(f"{self.name}: request at head {chain.head} has no writable status byte")
        kind, _, sector = _HEADER.unpack(queue.gather(chain.readable, limit=_HEADER.size))
        data_out = chain.readable_len - _HEADER.size
        data_in = chain.writable_len - 1
        written = 0
        if kind == VIRTIO_BLK_T_IN:
            status = self._check_range(sector, data_in)
            if status == VIRTIO_BLK_S_OK:
                try:
                    data = os.pread(self.fd, data_in, sector * SECTOR_SIZE)
                    data += bytes(data_in - len(data))
                    written = queue.scatter(chain.writable, data)
                    self.stats["reads"] += 1
                except OSError as err:
                    status = self._io_error("read", sector, err)
        elif kind == VIRTIO_BLK_T_OUT:
            status = VIRTIO_BLK_S_IOERR if self.read_only else self._check_range(sector, data_out)
            if status == VIRTIO_BLK_S_OK:
                data = queue.gather(chain.readable, skip=_HEADER.size)
                try:
                    os.pwrite(self.fd, data, sector * SECTOR_SIZE)
                    self.stats["writes"] += 1
                except OSError as err:
                    status = self._io_error("write", sector, err)
        elif kind == VIRTIO_BLK_T_FLUSH:
            status = VIRTIO_BLK_S_OK
            try:
                if not self.read_only:
                    os.fsync(self.fd)
                self.stats["flushes"] += 1
            except OSError as err:
                status = self._io_error("flush", sector, err)
        elif kind == VIRTIO_BLK_T_GET_ID:
            ident = self.serial.encode().ljust(VIRTIO_BLK_ID_BYTES, b"\0")
            written = queue.scatter(chain.writable, ident[:data_in])
            status = VIRTIO_BLK_S_OK
        else:
            status = VIRTIO_BLK_S_UNSUPP
        if status != VIRTIO_BLK_S_OK:
            self.stats["errors"] += 1
            written = 0
        queue.scatter(chain.writable, bytes([status]), skip=data_in)
        return written + 1

    def _check_range(self, sector: int, length: int) -> int:
        if length % SECTOR_SIZE or sector + length // SECTOR_SIZE > self.capacity:
            log.info("%s: request for %d bytes at sector %d refused (capacity %d sectors)", self.name, length, sector, self.capacity)
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK

    def _io_error(self, what: str, sector: int, err: OSError) -> int:
        log.error("%s: %s at sector %d of %s failed: %s", self.name, what, sector, self.path, err)
        return VIRTIO_BLK_S_IOERR

    # ---- pause, state ------------------------------------------------------------------------
    def pause(self) -> None:
        if not self.read_only:
            os.fsync(self.fd)

    def save_device(self) -> BlockDeviceState:
        return BlockDeviceState(path=self.path, capacity_sectors=self.capacity, read_only=self.read_only, serial=self.serial)

    def restore_device(self, state: BlockDeviceState) -> None:
        where = f"{self.name}: device"
        if state.capacity_sectors != self.capacity:
            raise ValueError(f"{where}: saved with an image of {state.capacity_sectors} sectors; {self.path!r} has {self.capacity}")
        if state.read_only != self.read_only:
            raise ValueError(f"{where}: saved {'read-only' if state.read_only else 'read-write'}; configured "
                             f"{'read-only' if self.read_only else 'read-write'} (the 'ro' option)")
        if state.serial != self.serial:
            raise ValueError(f"{where}: saved with serial {state.serial!r}; configured {self.serial!r} (the 'ser' option)")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
