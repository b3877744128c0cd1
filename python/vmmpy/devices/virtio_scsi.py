"""virtio-scsi: one SCSI disk (target 0, LUN 0) backed by a file (bhyve's pci_virtio_scsi.c
talks to CTL; here the device is its own small direct-access target).

``-s SLOT,virtio-scsi,PATH[,ro]``: the image is opened read-write (``ro``: read-only);
capacity = file size / 512, rounded down (an image under 512 bytes is refused).

Queues: 0 controlq, 1 eventq, 2 requestq, 128 entries each. No features (no HOTPLUG, no
CHANGE, no T10_PI). Configuration (legacy, 36 bytes): num_queues 1, seg_max 126, max_sectors
0xFFFF, cmd_per_lun 128, event_info_size 16, sense_size 96, cdb_size 32, max_channel 0,
max_target 0, max_lun 0.

A request chain is: device-readable ``virtio_scsi_cmd_req`` (lun[8], id u64, task_attr,
prio, crn, cdb[32]: 51 bytes), device-readable data-out, device-writable
``virtio_scsi_cmd_resp`` (sense_len u32, resid u32, status_qualifier u16, status u8,
response u8, sense[96]: 108 bytes), device-writable data-in. A LUN other than ``01 00 40 00
...`` (target 0, LUN 0) gets response BAD_TARGET. Commands: TEST UNIT READY, REQUEST SENSE,
INQUIRY, READ CAPACITY(10), READ(10), WRITE(10), SYNCHRONIZE CACHE(10) (``fsync``). Others get
CHECK CONDITION with fixed-format sense ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE
(0x20); an LBA range past the capacity ILLEGAL REQUEST / LBA OUT OF RANGE (0x21); a write to a
read-only image DATA PROTECT / WRITE PROTECTED (0x27); a transfer larger than the data
buffers ILLEGAL REQUEST / INVALID FIELD IN CDB (0x24). Control queue: TMF requests are
answered FUNCTION_REJECTED, AN query/subscribe with no events. The event queue's buffers are
held (no events are ever raised).

Requests complete synchronously during the notify (devices/virtio.py), so nothing is in
flight at a save. Saved state (beside PCI and virtio): ``path``, ``capacity_sectors``,
``read_only``, ``sense`` (the last CHECK CONDITION's sense, for REQUEST SENSE); restore
refuses another capacity or mode. The image is not part of a checkpoint, as for virtio-blk.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import ClassVar

from .disk import open_image
from .pci import PciConfigError, PciHost, PciState, parse_options
from .virtio import VirtioError, VirtioPciDevice, VirtioState, Virtqueue

QUEUE_SIZE = 128
CONTROLQ, EVENTQ, REQUESTQ = 0, 1, 2
SECTOR = 512
REQ_SIZE = 51
RESP_SIZE = 108
SENSE_SIZE = 96
CDB_SIZE = 32

S_OK, S_BAD_TARGET, S_FUNCTION_REJECTED = 0, 3, 11
GOOD, CHECK_CONDITION = 0x00, 0x02
KEY_NONE, KEY_ILLEGAL_REQUEST, KEY_DATA_PROTECT, KEY_MEDIUM_ERROR = 0x0, 0x5, 0x7, 0x3
ASC_INVALID_OPCODE, ASC_LBA_OUT_OF_RANGE, ASC_INVALID_FIELD, ASC_WRITE_PROTECTED = 0x20, 0x21, 0x24, 0x27

TEST_UNIT_READY, REQUEST_SENSE, INQUIRY, READ_CAPACITY_10 = 0x00, 0x03, 0x12, 0x25
READ_10, WRITE_10, SYNCHRONIZE_CACHE_10 = 0x28, 0x2A, 0x35


def fixed_sense(key: int, asc: int, ascq: int = 0) -> bytes:
    return bytes((0x70, 0, key, 0, 0, 0, 0, 10, 0, 0, 0, 0, asc, ascq, 0, 0, 0, 0))


@dataclass
class ScsiDeviceState:
    path: str
    capacity_sectors: int
    read_only: bool
    sense: bytes


@dataclass
class VirtioScsiState:
    VERSION: ClassVar[int] = 1
    MIN_VERSION: ClassVar[int] = 1

    pci: PciState
    virtio: VirtioState
    device: ScsiDeviceState


class VirtioScsi(VirtioPciDevice):
    EMULATION = "virtio-scsi"
    DEVICE_ID = 0x1004
    SUBSYSTEM_ID = 8  # virtio device type: SCSI host
    CLASS = 0x01  # mass storage
    SUBCLASS = 0x00  # SCSI
    STATE = VirtioScsiState
    QUEUE_SIZES = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)
    CONFIG_SIZE = 36
    OPTIONS_HELP = "PATH[,ro]"

    def __init__(self, host: PciHost, bus: int, slot: int, func: int, conf: str | None = None) -> None:
        super().__init__(host, bus, slot, func, conf)
        options = parse_options(self.name, conf, positional="path", flags=("ro",))
        path = options.get("path")
        if not path:
            raise PciConfigError(f"{self.name}: no image file given (it takes {self.OPTIONS_HELP})")
        self.path = path
        self.read_only = "ro" in options
        self.fd, self.capacity = open_image(self.name, path, read_only=self.read_only, block=SECTOR)
        self.sense = fixed_sense(KEY_NONE, 0)
        self.stats = {"commands": 0, "check_conditions": 0, "flushes": 0}

    def config_bytes(self) -> bytes:
        return struct.pack("<IIIIIIIHHI", 1, QUEUE_SIZE - 2, 0xFFFF, QUEUE_SIZE, 16, SENSE_SIZE, CDB_SIZE, 0, 0, 0)

    # ---- queues ------------------------------------------------------------------------------
    def process_queue(self, queue: Virtqueue) -> None:
        if queue.index == EVENTQ:
            return  # buffers are held for events that never come
        completed = 0
        try:
            while (chain := queue.pop()) is not None:
                written = self._control(queue, chain) if queue.index == CONTROLQ else self._request(queue, chain)
                queue.push(chain.head, written)
                completed += 1
        finally:
            self.signal(queue, completed)

    def _control(self, queue: Virtqueue, chain) -> int:
        if chain.readable_len < 4:
            raise VirtioError(f"{self.name}: control chain at head {chain.head} has no request type")
        kind = struct.unpack("<I", queue.gather(chain.readable, limit=4))[0]
        if kind == 0:  # TMF: response u8 at the start of the writable part
            reply = bytes((S_FUNCTION_REJECTED,))
        elif kind in (1, 2):  # AN query / subscribe: event_actual u32, response u8
            reply = struct.pack("<IB", 0, S_OK)
        else:
            raise VirtioError(f"{self.name}: control request type {kind} at head {chain.head} is unknown")
        if chain.writable_len < len(reply):
            raise VirtioError(f"{self.name}: control chain at head {chain.head} has no room for its response")
        return queue.scatter(chain.writable, reply)

    def _request(self, queue: Virtqueue, chain) -> int:
        if chain.readable_len < REQ_SIZE or chain.writable_len < RESP_SIZE:
            raise VirtioError(f"{self.name}: request chain at head {chain.head} lacks the {REQ_SIZE}-byte request "
                              f"or the {RESP_SIZE}-byte response")
        req = queue.gather(chain.readable, limit=REQ_SIZE)
        lun, cdb = req[0:8], req[19:19 + CDB_SIZE]
        data_out_len = chain.readable_len - REQ_SIZE
        data_in_len = chain.writable_len - RESP_SIZE
        if lun[0] != 1 or lun[1] != 0 or (struct.unpack(">H", lun[2:4])[0] & 0x3FFF) != 0:
            resp = struct.pack("<IIHBB", 0, 0, 0, GOOD, S_BAD_TARGET)
            return queue.scatter(chain.writable, resp + bytes(SENSE_SIZE))
        self.stats["commands"] += 1
        status, data_in, sense, resid = self._execute(queue, chain, cdb, data_out_len, data_in_len)
        if status == CHECK_CONDITION:
            self.stats["check_conditions"] += 1
            self.sense = sense
        resp = struct.pack("<IIHBB", len(sense) if status == CHECK_CONDITION else 0, resid, 0, status, S_OK)
        resp += (sense if status == CHECK_CONDITION else b"").ljust(SENSE_SIZE, b"\0")
        written = queue.scatter(chain.writable, resp)
        if data_in:
            written += queue.scatter(chain.writable, data_in, skip=RESP_SIZE)
        return written

    def _execute(self, queue: Virtqueue, chain, cdb: bytes, out_len: int, in_len: int) -> tuple[int, bytes, bytes, int]:
        """(status, data-in bytes, sense, residual) of one command."""
        op = cdb[0]

        def check(key: int, asc: int) -> tuple[int, bytes, bytes, int]:
            return CHECK_CONDITION, b"", fixed_sense(key, asc), max(in_len, out_len)

        def data(payload: bytes) -> tuple[int, bytes, bytes, int]:
            payload = payload[:in_len]
            return GOOD, payload, b"", in_len - len(payload)

        if op == TEST_UNIT_READY:
            return GOOD, b"", b"", 0
        if op == REQUEST_SENSE:
            sense, self.sense = self.sense, fixed_sense(KEY_NONE, 0)
            return data(sense[: cdb[4]])
        if op == INQUIRY:
            if cdb[1] & 1:  # vital product data pages are not offered
                return check(KEY_ILLEGAL_REQUEST, ASC_INVALID_FIELD)
            inquiry = bytes((0x00, 0x00, 0x05, 0x02, 31, 0, 0, 0x02)) + b"vmmpy   " + b"virtio-scsi disk" + b"0001"
            return data(inquiry[: struct.unpack(">H", cdb[3:5])[0]])
        if op == READ_CAPACITY_10:
            return data(struct.pack(">II", min(self.capacity - 1, 0xFFFFFFFF), SECTOR))
        if op in (READ_10, WRITE_10):
            lba, count = struct.unpack(">I", cdb[2:6])[0], struct.unpack(">H", cdb[7:9])[0]
            if lba + count > self.capacity:
                return check(KEY_ILLEGAL_REQUEST, ASC_LBA_OUT_OF_RANGE)
            nbytes = count * SECTOR
            if op == READ_10:
                if nbytes > in_len:
                    return check(KEY_ILLEGAL_REQUEST, ASC_INVALID_FIELD)
                return data(os.pread(self.fd, nbytes, lba * SECTOR))
            if self.read_only:
                return check(KEY_DATA_PROTECT, ASC_WRITE_PROTECTED)
            if nbytes > out_len:
                return check(KEY_ILLEGAL_REQUEST, ASC_INVALID_FIELD)
            payload = queue.gather(chain.readable, skip=REQ_SIZE, limit=nbytes)
            os.pwrite(self.fd, payload, lba * SECTOR)
            return GOOD, b"", b"", out_len - nbytes
        if op == SYNCHRONIZE_CACHE_10:
            if not self.read_only:
                os.fsync(self.fd)
            self.stats["flushes"] += 1
            return GOOD, b"", b"", 0
        return check(KEY_ILLEGAL_REQUEST, ASC_INVALID_OPCODE)

    # ---- pause / state -----------------------------------------------------------------------
    def pause(self) -> None:
        if not self.read_only:
            os.fsync(self.fd)

    def device_reset(self) -> None:
        self.sense = fixed_sense(KEY_NONE, 0)

    def save_device(self) -> ScsiDeviceState:
        return ScsiDeviceState(path=self.path, capacity_sectors=self.capacity, read_only=self.read_only, sense=self.sense)

    def restore_device(self, state: ScsiDeviceState) -> None:
        where = f"{self.name}: device"
        if state.capacity_sectors != self.capacity:
            raise ValueError(f"{where}: saved with an image of {state.capacity_sectors} sectors; "
                             f"'{self.path}' has {self.capacity}")
        if state.read_only != self.read_only:
            raise ValueError(f"{where}: saved {'read-only' if state.read_only else 'read-write'}, "
                             f"this device is {'read-only' if self.read_only else 'read-write'}")
        if len(state.sense) != 18:
            raise ValueError(f"{where}: field 'sense' holds {len(state.sense)} bytes, not 18")
        self.sense = state.sense

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
