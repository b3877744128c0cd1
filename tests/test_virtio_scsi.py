"""virtio-scsi: scsitest runs to its verdict (INQUIRY, READ CAPACITY, WRITE/READ(10), SYNCHRONIZE
CACHE, sense for an unsupported command); hostile request chains break the device, not the VMM;
state refusals and bad configuration. Pause/save/restore mid-I/O: the ``scsi`` case of
test_devices.py's bit-identical test."""

import logging
import struct

import pytest

from vmmpy.devices.pci import PciHost
from vmmpy.devices.virtio import STATUS_NEEDS_RESET, vring_size
from vmmpy.devices.virtio_scsi import VirtioScsi
from vmmpy.guest.programs import scsitest
from vmmpy.memory import GuestMemory
from vmmpy.runtime.config import ConfigError, VmConfig, parse_slot
from vmmpy.runtime.process import EXIT_POWEROFF, Machine

from .device_state import payload_of, restore_payload
from .inproc import run_to_end
from .test_devices import MEMSIZE, Pins, build, make_image


@pytest.mark.parametrize("rs", ["1", "8", "128"])
def test_scsitest_writes_reads_and_digests_every_block(tmp_path, rs):
    img = make_image(tmp_path / "s.img", 128 << 10)
    machine, com1 = build(f"scsi-{rs}", ["0,hostbridge", "1,lpc", f"4,virtio-scsi,{img}"], "scsitest",
                          {"seed": "9", "request_sectors": rs})
    machine.start(serve_control=False)
    assert run_to_end(machine) == EXIT_POWEROFF
    assert com1.output.decode() == scsitest.reference_output(9, 256, int(rs))
    assert open(img, "rb").read() == scsitest.reference_image(9, 256)
    device = machine.pci_functions[2]
    assert device.stats["flushes"] == 1 and device.stats["check_conditions"] == 1


class ScsiDriver:
    def __init__(self, img, conf_extra=""):
        self.memory = GuestMemory(MEMSIZE)
        self.host = PciHost(lambda: self.memory, Pins())
        self.device = VirtioScsi(self.host, 0, 3, 0, img + conf_extra)
        self.device.set_bar_address(0, 0x2000)
        self.device.cfg_write(0x04, 2, 0x5)
        self.ring = 0x200000
        self.size = self.device.queues[2].size
        self.avail = self.ring + vring_size(self.size)[0]
        self.used = self.ring + vring_size(self.size)[1]
        for reg, size, value in ((0x12, 1, 0), (0x12, 1, 3), (0x0E, 2, 2), (0x08, 4, self.ring >> 12), (0x12, 1, 7)):
            self.device.io_write(0x2000 + reg, size, value)
        self.avail_idx = 0

    def desc(self, index, addr, length, flags, next_index=0):
        self.memory.write(self.ring + 16 * index, struct.pack("<QIHH", addr, length, flags, next_index))

    def publish(self, head, by=1):
        self.memory.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + by) & 0xFFFF
        self.memory.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        self.device.io_write(0x2000 + 0x10, 2, 2)

    def command(self, cdb, data_in=0, lun=b"\x01\x00\x40\x00\0\0\0\0"):
        self.memory.write(0x300000, lun + bytes(11) + cdb.ljust(32, b"\0"))
        self.desc(0, 0x300000, 51, 1, 1)
        self.desc(1, 0x301000, 108, 2 | (1 if data_in else 0), 2)
        self.desc(2, 0x302000, data_in, 2)
        self.publish(0)
        resp = self.memory.read(0x301000, 108)
        return resp[10], resp[11], resp[12:30], self.memory.read(0x302000, data_in)


def test_sense_data_for_unsupported_and_out_of_range_commands(tmp_path):
    img = make_image(tmp_path / "s.img", 64 << 10)
    d = ScsiDriver(img)
    status, response, sense, _ = d.command(b"\x1a")
    assert (status, response, sense[2], sense[12]) == (2, 0, 5, 0x20)
    status, _, _, data = d.command(b"\x03\0\0\0\x12", data_in=18)  # REQUEST SENSE returns it
    assert status == 0 and data[2] == 5 and data[12] == 0x20
    status, _, sense, _ = d.command(b"\x28\0\0\0\0\x7f\0\0\x02", data_in=1024)  # READ(10) past the end
    assert (status, sense[2], sense[12]) == (2, 5, 0x21)
    assert d.command(b"\x00", lun=b"\x01\x01\x40\x00\0\0\0\0")[1] == 3, "another target: BAD_TARGET"
    status, _, _, data = d.command(b"\x25", data_in=8)
    assert status == 0 and struct.unpack(">II", data) == (127, 512)
    d.device.close()
    ro = ScsiDriver(img, ",ro")
    status, _, sense, _ = ro.command(b"\x2a\0\0\0\0\0\0\0\x01")
    assert (status, sense[2], sense[12]) == (2, 7, 0x27)
    ro.device.close()


HOSTILE = {
    "loop": lambda d: (d.desc(0, 0x300000, 51, 1, 1), d.desc(1, 0x300100, 16, 1, 0), d.publish(0)),
    "next out of range": lambda d: (d.desc(0, 0x300000, 51, 1, 9999), d.publish(0)),
    "head out of range": lambda d: d.publish(4000),
    "buffer outside RAM": lambda d: (d.desc(0, 0xC000_0000, 51, 0), d.publish(0)),
    "indirect": lambda d: (d.desc(0, 0x300000, 16, 4), d.publish(0)),
    "readable after writable": lambda d: (d.desc(0, 0x300000, 108, 3, 1), d.desc(1, 0x300100, 51, 0), d.publish(0)),
    "avail index jump": lambda d: d.publish(0, by=1000),
    "no response buffer": lambda d: (d.desc(0, 0x300000, 51, 0), d.publish(0)),
    "short request": lambda d: (d.desc(0, 0x300000, 20, 1, 1), d.desc(1, 0x301000, 108, 2), d.publish(0)),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_request_chains_put_the_device_in_error_never_crash(tmp_path, attack, caplog):
    img = make_image(tmp_path / "h.img", 64 << 10)
    d = ScsiDriver(img)
    with caplog.at_level(logging.ERROR):
        HOSTILE[attack](d)
    assert d.device.io_read(0x2012, 1) & STATUS_NEEDS_RESET
    assert d.device.error and "virtio-scsi@pci.0.3.0: " in d.device.error
    assert payload_of(d.device)["virtio"]["error"] == d.device.error
    d.device.io_write(0x2012, 1, 0)
    assert d.device.error is None
    d.device.close()
    d = ScsiDriver(img)
    assert d.command(b"\x00")[:2] == (0, 0), "after a reset a good command works"
    d.device.close()


def test_restore_refuses_another_disk_and_changes_nothing(tmp_path):
    a, b = make_image(tmp_path / "a.img", 64 << 10), make_image(tmp_path / "b.img", 32 << 10)
    memory = GuestMemory(MEMSIZE)
    host = PciHost(lambda: memory, Pins())
    saved = payload_of(VirtioScsi(host, 0, 3, 0, a))
    other = VirtioScsi(host, 0, 3, 0, b)
    before = payload_of(other)
    with pytest.raises(ValueError, match=r"virtio-scsi@pci\.0\.3\.0: device: saved with an image of 128 sectors"):
        restore_payload(other, saved)
    assert payload_of(other) == before
    with pytest.raises(ValueError, match="saved read-write, this device is read-only"):
        restore_payload(VirtioScsi(host, 0, 3, 0, a + ",ro"), saved)


@pytest.mark.parametrize("conf, message", [
    ("virtio-scsi", "virtio-scsi@pci.0.4.0: no image file given"),
    ("virtio-scsi,/no/such.img", "virtio-scsi@pci.0.4.0: cannot open image file '/no/such.img'"),
    ("virtio-scsi,{img},lun=3", "unknown option 'lun'"),
])
def test_bad_configuration_is_refused_at_start(tmp_path, conf, message):
    img = make_image(tmp_path / "c.img", 4096)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        Machine(VmConfig(name="bad-scsi", slots=[parse_slot(f"4,{conf.format(img=img)}")]))
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x" * 100)
    with pytest.raises(ConfigError, match="smaller than one 512-byte sector"):
        Machine(VmConfig(name="bad-scsi", slots=[parse_slot(f"4,virtio-scsi,{tiny}")]))
