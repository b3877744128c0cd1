"""nvme: the 64-bit MMIO BAR on the PCI bus, the nvmetest guest driver to its verdict, a run
paused mid-I/O at exact instruction counts and moved into a fresh machine finishing
identically (console and image), completions held and pending across a save/restore, hostile
commands getting NVMe statuses, and bad configuration refused at start."""

import logging
import struct

import pytest

from vmmpy.devices.nvme import CSTS_CFS, CSTS_RDY, Nvme
from vmmpy.devices.pci import PciBus, PciHost
from vmmpy.devices.uart import CaptureConsole
from vmmpy.guest.programs import blktest
from vmmpy.memory import GuestMemory
from vmmpy.runtime.commands import static_registry
from vmmpy.runtime.config import ConfigError, VmConfig, parse_slot
from vmmpy.runtime.process import EXIT_POWEROFF, Machine

from .device_state import payload_of, restore_payload
from .guest_points import pause_in_write_pass, run_guest
from .inproc import move_to_fresh_machine, run_to_end, wait_paused
from .test_devices import MEMSIZE, Pins, build, make_image, outputs, sha

DISK_BYTES = 256 << 10
BLOCKS = DISK_BYTES // 512
BAR = 0xC000_0000


def test_nvme_function_has_a_64bit_mmio_bar_the_bus_routes(tmp_path):
    memory = GuestMemory(MEMSIZE)
    pins = Pins()
    bus = PciBus(pins)
    dev = Nvme(PciHost(lambda: memory, pins), 0, 5, 0, make_image(tmp_path / "n.img"))
    bus.add(dev)
    bus.finish()
    assert dev.cfg_read(0, 4) == 0x0A0A_FB5D
    assert dev.cfg_read(0x08, 4) >> 8 == 0x010802, "class 01:08:02 (NVM Express)"
    assert dev.cfg_read(0x10, 4) == BAR | 0x4 and dev.cfg_read(0x14, 4) == 0, "64-bit memory BAR in the PCI hole"
    assert dev.cfg_read(0x04, 2) & 0x6 == 0x6, "memory decoding and bus mastering on"
    assert bus.mmio_owner(BAR + 0x1000) is dev and bus.mmio_owner(BAR + 0x4000) is None
    assert dev.mmio_read(BAR + 0x08, 4) == 0x0001_0300
    assert dev.mmio_read(BAR, 8) & 0xFFFF == 255 and (dev.mmio_read(BAR, 8) >> 32) & 0xF == 0, "MQES 255, DSTRD 0"
    # Sizing both halves, then moving the BAR.
    dev.cfg_write(0x10, 4, 0xFFFF_FFFF)
    dev.cfg_write(0x14, 4, 0xFFFF_FFFF)
    assert dev.cfg_read(0x10, 4) == 0xFFFF_C004 and dev.cfg_read(0x14, 4) == 0xFFFF_FFFF
    dev.cfg_write(0x10, 4, 0xD000_0000)
    dev.cfg_write(0x14, 4, 0)
    assert bus.mmio_owner(0xD000_0000 + 0x1c) is dev and bus.mmio_owner(BAR) is None
    saved = payload_of(dev)
    assert saved["pci"]["bars"] == [{"index": 0, "kind": "mem64", "size": 0x4000, "addr": 0xD000_0000}]
    dev.cfg_write(0x04, 2, 0)
    assert bus.mmio_owner(0xD000_0000) is None, "memory decoding off hides the BAR"
    dev.close()


# ---- the guest driver ----------------------------------------------------------------------------

SLOTS = ["0,hostbridge", "1,lpc", "5,nvme,{img},ser=nvme-disk-1"]


@pytest.mark.parametrize("mode, extra", [("irq", {}), ("poll", {"offset": "2048", "request_blocks": "12", "batch": "15"})])
def test_nvmetest_writes_reads_and_digests_every_block(tmp_path, mode, extra):
    img = make_image(tmp_path / "disk.img", DISK_BYTES)
    machine, com1 = build(f"nvme-{mode}", [s.format(img=img) for s in SLOTS], "nvmetest", {"mode": mode, "seed": "5", **extra})
    machine.start(serve_control=False)
    assert run_to_end(machine) == EXIT_POWEROFF
    per = int(extra.get("request_blocks", 8))
    text = com1.output.decode()
    assert text.startswith(f"nvmetest: controller nvme-disk-1, namespace 1: {BLOCKS} blocks\n"
                           f"nvmetest: wrote {BLOCKS} blocks in {-(-BLOCKS // per)} commands, flushed\n")
    assert f"nvmetest: read back {BLOCKS} blocks, all match, digest 0x{blktest.reference_digest(5, BLOCKS):016x}\n" in text
    assert text.endswith("nvmetest: done (poll)\n" if mode == "poll" else " interrupts)\n")
    assert open(img, "rb").read() == blktest.reference_image(5, BLOCKS)
    device = machine.pci_functions[2]
    assert device.stats == {"reads": -(-BLOCKS // per), "writes": -(-BLOCKS // per), "flushes": 1, "errors": 0}
    assert device.csts & CSTS_RDY and (device.csts >> 2) & 3 == 2, "shut down cleanly"


CASES = {
    "irq": (["0,hostbridge", "5,nvme,{img}"], {"batch": "5", "request_blocks": "16"}),
    "poll": (["5,nvme,{img}"], {"mode": "poll", "batch": "3", "offset": "512", "request_blocks": "9"}),
}


@pytest.mark.covers(operation="state-move", guest="nvmetest", device="nvme", via="machine")
@pytest.mark.parametrize("case", sorted(CASES))
def test_nvmetest_paused_mid_io_and_restored_elsewhere_finishes_identically(tmp_path, case):
    slots_t, args = CASES[case]

    def run_once(img, pause_at=None, tag=""):
        slots = [s.format(img=img) for s in slots_t]
        machine, com1 = build(f"nvmid-{case}{tag}", slots, "nvmetest", args)
        if pause_at is None:
            machine.start(serve_control=False)
            assert run_to_end(machine) == EXIT_POWEROFF
            return outputs(machine, com1, {}), machine.vm.vcpus[0].instructions_retired, None
        machine.pause_at = pause_at
        machine.start(serve_control=False)
        wait_paused(machine)
        before = outputs(machine, com1, {})
        saved = payload_of(machine.pci_functions[-1])
        com1b = CaptureConsole()
        config = VmConfig(name=f"nvmid-{case}{tag}-dst", memsize=MEMSIZE, slots=[parse_slot(s) for s in slots])
        target = move_to_fresh_machine(machine, config, {"com1": com1b})
        assert run_to_end(target) == EXIT_POWEROFF
        after = outputs(target, com1b, {})
        return (before[0] + after[0], {}), None, saved

    ref_img = make_image(tmp_path / "ref.img", DISK_BYTES)
    reference, total, _ = run_once(ref_img)
    assert b"all match" in reference[0] and b"failed" not in reference[0]
    seen_io_queues = False
    for fraction in (0.13, 0.5, 0.91):
        img = make_image(tmp_path / f"img-{fraction}.img", DISK_BYTES)
        result, _, saved = run_once(img, pause_at=int(total * fraction), tag=f"-{int(fraction * 100)}")
        assert result == reference, f"paused at {fraction} of the run"
        assert sha(img) == sha(ref_img)
        seen_io_queues |= any(q["qid"] == 1 for q in saved["nvme"]["sqs"])
    assert seen_io_queues, "some pause point fell inside the I/O phase"


@pytest.mark.covers(operation="state-move", guest="nvmetest", device="nvme", via="machine")
def test_a_pause_right_after_a_doorbell_carries_unreleased_completions_and_the_interrupt(tmp_path):
    """Pause a few instructions after an I/O SQ doorbell write, when the device holds
    completions the driver has not released and the INTx line is up; move it; same result."""
    img = make_image(tmp_path / "ref.img", DISK_BYTES)
    run = run_guest("nvmetest", [f"5,nvme,{img}"], {"batch": "4"}, watch=(0, {0x1008, 0x100C}))  # SQ 1 tail, CQ 1 head
    reference = "".join(run.lines).encode()
    rings = [count for count, offset in run.register_writes if offset == 0x1008]
    assert len(rings) == 2 * (-(-BLOCKS // 32)) + 1, "write and read batches, and the flush"
    at = rings[len(rings) // 2 + 3] + 3  # a read batch
    release = min(count for count, offset in run.register_writes if offset == 0x100C and count > at - 3)
    assert at < release, "the pause falls between the batch's SQ doorbell and its CQ head doorbell"
    img2 = make_image(tmp_path / "b.img", DISK_BYTES)
    m, c = build("nvme-step", [f"5,nvme,{img2}"], "nvmetest", {"batch": "4"})
    m.pause_at = at
    m.start(serve_control=False)
    wait_paused(m)
    state = payload_of(m.pci_functions[0])
    cq1 = [q for q in state["nvme"]["cqs"] if q["qid"] == 1][0]
    assert (cq1["tail"] - cq1["head"]) % cq1["size"] == 4, "the batch's completions are not yet released"
    assert state["pci"]["intx_level"] or state["nvme"]["intms"], "the interrupt is owed or being handled"
    before = bytes(c.output)
    com1b = CaptureConsole()
    config = VmConfig(name="nvme-step-dst", memsize=MEMSIZE, slots=[parse_slot(f"5,nvme,{img2}")])
    target = move_to_fresh_machine(m, config, {"com1": com1b})
    assert run_to_end(target) == EXIT_POWEROFF
    assert before + bytes(com1b.output) == reference
    assert sha(img2) == sha(img)


# ---- the device driven directly: hostile commands, held completions, state refusals -----------------


class Ctl:
    """Drives a bare NVMe function through its registers and queues, as a guest would."""

    ASQ, ACQ, IOSQ, IOCQ, BUF = 0x200000, 0x201000, 0x202000, 0x203000, 0x210000

    def __init__(self, img, memory=None, enable=True):
        self.memory = memory or GuestMemory(MEMSIZE)
        self.pins = Pins()
        self.dev = Nvme(PciHost(lambda: self.memory, self.pins), 0, 5, 0, img)
        self.dev.set_bar_address(0, BAR)
        self.dev.cfg_write(0x04, 2, 0x6)
        self.tail = {0: 0, 1: 0}
        self.head = {0: 0, 1: 0}
        self.phase = {0: 1, 1: 1}
        self.sqsize = {0: 8, 1: 8}
        self.cqsize = {0: 8, 1: 8}
        self.base = {0: (self.ASQ, self.ACQ), 1: (self.IOSQ, self.IOCQ)}
        self.cid = 0
        if enable:
            self.w(0x24, (7 << 16) | 7)
            self.dev.mmio_write(BAR + 0x28, 8, self.ASQ)
            self.dev.mmio_write(BAR + 0x30, 8, self.ACQ)
            self.w(0x14, 1 | (6 << 16) | (4 << 20))
            assert self.r(0x1c) & CSTS_RDY

    def w(self, off, value):
        self.dev.mmio_write(BAR + off, 4, value)

    def r(self, off):
        return self.dev.mmio_read(BAR + off, 4)

    def put(self, qid, opcode, nsid=1, prp1=0, prp2=0, cdw=(0,) * 6, flags=0):
        self.cid += 1
        entry = struct.pack("<IIQQQQ6I", opcode | (flags << 8) | (self.cid << 16), nsid, 0, 0, prp1, prp2, *cdw)
        self.memory.write(self.base[qid][0] + 64 * self.tail[qid], entry)
        self.tail[qid] = (self.tail[qid] + 1) % self.sqsize[qid]

    def ring(self, qid):
        self.w(0x1000 + 8 * qid, self.tail[qid])

    def take(self, qid, release=True):
        raw = self.memory.read(self.base[qid][1] + 16 * self.head[qid], 16)
        dw0, _, sq, dw3 = struct.unpack("<IIII", raw)
        if (dw3 >> 16) & 1 != self.phase[qid]:
            return None
        self.head[qid] = (self.head[qid] + 1) % self.cqsize[qid]
        if self.head[qid] == 0:
            self.phase[qid] ^= 1
        if release:
            self.w(0x1004 + 8 * qid, self.head[qid])
        return {"dw0": dw0, "sqid": sq >> 16, "cid": dw3 & 0xFFFF, "sct": (dw3 >> 25) & 7, "sc": (dw3 >> 17) & 0xFF, "dnr": dw3 >> 31}

    def cmd(self, qid, opcode, **kw):
        self.put(qid, opcode, **kw)
        self.ring(qid)
        done = self.take(qid)
        assert done is not None and done["cid"] == self.cid and done["sqid"] == qid
        return done["sct"], done["sc"]

    def io_cq(self, size=8, ien=True):
        assert self.cmd(0, 0x05, prp1=self.IOCQ, cdw=(((size - 1) << 16) | 1, 1 | (ien << 1), 0, 0, 0, 0)) == (0, 0)
        self.cqsize[1] = size

    def io_sq(self, size=8):
        assert self.cmd(0, 0x01, prp1=self.IOSQ, cdw=(((size - 1) << 16) | 1, 1 | (1 << 16), 0, 0, 0, 0)) == (0, 0)
        self.sqsize[1] = size

    def io_queues(self, cq_size=8, sq_size=8):
        self.io_cq(cq_size)
        self.io_sq(sq_size)


def rw(lba, nlb, write=False):
    return 0x01 if write else 0x02, (lba & 0xFFFF_FFFF, lba >> 32, nlb - 1, 0, 0, 0)


HOSTILE = {
    # (queue, opcode, kwargs) -> expected (SCT, SC)
    "admin opcode unknown": (0, 0x7F, {}, (0, 0x01)),
    "io opcode unknown": (1, 0x55, {}, (0, 0x01)),
    "SGL asked for (PSDT)": (1, 0x02, {"prp1": Ctl.BUF, "cdw": rw(0, 1)[1], "flags": 0x40}, (0, 0x02)),
    "fused command": (1, 0x02, {"prp1": Ctl.BUF, "cdw": rw(0, 1)[1], "flags": 0x1}, (0, 0x02)),
    "PRP1 outside RAM": (1, 0x02, {"prp1": 0xC000_0000, "cdw": rw(0, 1)[1]}, (0, 0x04)),
    "transfer running past the end of RAM": (1, 0x01, {"prp1": MEMSIZE - 512, "prp2": MEMSIZE, "cdw": rw(0, 4)[1]}, (0, 0x04)),
    "PRP1 not dword aligned": (1, 0x02, {"prp1": Ctl.BUF + 2, "cdw": rw(0, 1)[1]}, (0, 0x13)),
    "PRP2 with an offset": (1, 0x02, {"prp1": Ctl.BUF + 0x800, "prp2": Ctl.BUF + 0x1010, "cdw": rw(0, 8)[1]}, (0, 0x13)),
    "PRP2 outside RAM": (1, 0x02, {"prp1": Ctl.BUF, "prp2": 0xFFFF_F000, "cdw": rw(0, 16)[1]}, (0, 0x04)),
    "needs a PRP list": (1, 0x02, {"prp1": Ctl.BUF + 0x200, "prp2": Ctl.BUF + 0x1000, "cdw": rw(0, 16)[1]}, (0, 0x02)),
    "beyond MDTS": (1, 0x02, {"prp1": Ctl.BUF, "prp2": Ctl.BUF + 0x1000, "cdw": rw(0, 17)[1]}, (0, 0x02)),
    "LBA out of range": (1, 0x01, {"prp1": Ctl.BUF, "cdw": rw(BLOCKS - 1, 2, True)[1]}, (0, 0x80)),
    "LBA wraps": (1, 0x02, {"prp1": Ctl.BUF, "cdw": rw((1 << 64) - 1, 2)[1]}, (0, 0x80)),
    "namespace 2": (1, 0x02, {"nsid": 2, "prp1": Ctl.BUF, "cdw": rw(0, 1)[1]}, (0, 0x0B)),
    "flush namespace 0": (1, 0x00, {"nsid": 0}, (0, 0x0B)),
    "create SQ 2": (0, 0x01, {"prp1": 0x204000, "cdw": ((7 << 16) | 2, 1 | (1 << 16), 0, 0, 0, 0)}, (1, 0x01)),
    "create SQ 1 again": (0, 0x01, {"prp1": 0x204000, "cdw": ((7 << 16) | 1, 1 | (1 << 16), 0, 0, 0, 0)}, (1, 0x01)),
    "create SQ on CQ 0": (0, 0x01, {"prp1": 0x204000, "cdw": ((7 << 16) | 1, 1, 0, 0, 0, 0)}, (1, 0x00), "cq"),
    "create SQ on CQ 7": (0, 0x01, {"prp1": 0x204000, "cdw": ((7 << 16) | 1, 1 | (7 << 16), 0, 0, 0, 0)}, (1, 0x00), "cq"),
    "create CQ 0": (0, 0x05, {"prp1": 0x204000, "cdw": ((7 << 16) | 0, 1, 0, 0, 0, 0)}, (1, 0x01)),
    "create CQ of 1000 entries": (0, 0x05, {"prp1": 0x204000, "cdw": ((999 << 16) | 1, 1, 0, 0, 0, 0)}, (1, 0x02)),
    "create CQ not contiguous": (0, 0x05, {"prp1": 0x204000, "cdw": ((7 << 16) | 1, 0, 0, 0, 0, 0)}, (0, 0x02)),
    "create CQ outside RAM": (0, 0x05, {"prp1": 0xC000_0000, "cdw": ((7 << 16) | 1, 1, 0, 0, 0, 0)}, (0, 0x04), "none"),
    "create CQ vector 3": (0, 0x05, {"prp1": 0x204000, "cdw": ((7 << 16) | 1, 1 | (3 << 16), 0, 0, 0, 0)}, (1, 0x08), "none"),
    "delete SQ 0": (0, 0x00, {"cdw": (0, 0, 0, 0, 0, 0)}, (1, 0x01)),
    "delete SQ 9": (0, 0x00, {"cdw": (9, 0, 0, 0, 0, 0)}, (1, 0x01)),
    "delete CQ 1 with its SQ": (0, 0x04, {"cdw": (1, 0, 0, 0, 0, 0)}, (1, 0x0C)),
    "identify CNS 0x55": (0, 0x06, {"prp1": 0x204000, "cdw": (0x55, 0, 0, 0, 0, 0)}, (0, 0x02)),
    "identify outside RAM": (0, 0x06, {"prp1": 0xC000_0000, "cdw": (1, 0, 0, 0, 0, 0)}, (0, 0x04)),
    "get feature 0x42": (0, 0x0A, {"cdw": (0x42, 0, 0, 0, 0, 0)}, (0, 0x02)),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_commands_get_nvme_statuses_and_the_controller_runs_on(tmp_path, attack):
    img = make_image(tmp_path / "h.img", DISK_BYTES)
    c = Ctl(img)
    qid, opcode, kw, expected, *setup = HOSTILE[attack]
    setup = setup[0] if setup else "io"  # which I/O queues exist when the command comes
    if setup in ("io", "cq"):
        c.io_cq()
    if setup == "io":
        c.io_sq()
    assert c.cmd(qid, opcode, **kw) == expected
    if setup == "none":
        c.io_cq()
    if setup != "io":
        c.io_sq()
    assert c.dev.error is None and c.r(0x1c) & 3 == CSTS_RDY, "no fatal status"
    # The controller still works: a write and a read back.
    c.memory.write(Ctl.BUF, bytes(range(256)) * 2)
    op, cdw = rw(3, 1, True)
    assert c.cmd(1, op, prp1=Ctl.BUF, cdw=cdw) == (0, 0)
    c.memory.write(Ctl.BUF, bytes(512))
    op, cdw = rw(3, 1)
    assert c.cmd(1, op, prp1=Ctl.BUF, cdw=cdw) == (0, 0)
    assert c.memory.read(Ctl.BUF, 512) == bytes(range(256)) * 2
    assert open(img, "rb").read()[3 * 512:4 * 512] == bytes(range(256)) * 2
    assert c.dev.stats["errors"] == 1
    c.dev.close()


def test_bad_registers_and_doorbells_never_crash(tmp_path, caplog):
    img = make_image(tmp_path / "r.img", DISK_BYTES)
    c = Ctl(img, enable=False)
    with caplog.at_level(logging.WARNING):
        # Admin queues outside RAM: enable gives a fatal status, not an exception.
        c.w(0x24, (7 << 16) | 7)
        c.dev.mmio_write(BAR + 0x28, 8, 0xC000_0000)
        c.dev.mmio_write(BAR + 0x30, 8, Ctl.ACQ)
        c.w(0x14, 1)
        assert c.r(0x1c) & CSTS_CFS and not c.r(0x1c) & CSTS_RDY
        assert "controller fatal status" in caplog.text
        c.w(0x14, 0)  # disable resets
        assert c.r(0x1c) == 0 and c.dev.error is None
        c.dev.mmio_write(BAR + 0x28, 8, Ctl.ASQ)
        c.w(0x14, 1 | (6 << 16) | (4 << 20))
        assert c.r(0x1c) & CSTS_RDY
        c.w(0x1000 + 8 * 7, 1)  # a doorbell of a queue that does not exist
        c.w(0x1000, 200)  # a tail beyond the queue
        c.dev.mmio_write(BAR + 0x1000, 2, 1)  # a 2-byte doorbell write
        assert c.dev.mmio_read(BAR + 0x14, 2) == 0xFFFF  # a 2-byte register read
        assert "invalid SQ tail doorbell write" in caplog.text
    assert c.cmd(0, 0x06, prp1=0x204000, cdw=(1, 0, 0, 0, 0, 0)) == (0, 0)
    assert c.memory.read(0x204000 + 4, 20).rstrip() == b"vmmpy-nvme-0-5-0"
    c.dev.close()


def test_a_full_completion_queue_holds_commands_across_save_and_restore(tmp_path):
    """A CQ of 2 entries holds one completion: three commands announced at once leave two in
    the SQ. Saved (device and memory) and restored into a fresh device, the driver releases
    completions and the held commands run, as they would have on the original."""
    img = make_image(tmp_path / "f.img", DISK_BYTES)
    c = Ctl(img)
    c.io_queues(cq_size=2, sq_size=8)
    for i in range(3):
        c.memory.write(Ctl.BUF + 0x1000 * i, bytes([0x10 + i]) * 512)
        op, cdw = rw(10 + i, 1, True)
        c.put(1, op, prp1=Ctl.BUF + 0x1000 * i, cdw=cdw)
    c.ring(1)
    state = payload_of(c.dev)
    sq1 = [q for q in state["nvme"]["sqs"] if q["qid"] == 1][0]
    cq1 = [q for q in state["nvme"]["cqs"] if q["qid"] == 1][0]
    assert (sq1["head"], sq1["tail"]) == (1, 3) and (cq1["head"], cq1["tail"], cq1["phase"]) == (0, 1, 1)
    assert state["pci"]["intx_level"] and c.dev.intx_asserted
    # A fresh device with the memory and the state.
    memory = GuestMemory(MEMSIZE)
    memory.write(0, c.memory.read(0, MEMSIZE))
    c.dev.close()
    d = Ctl(img, memory=memory, enable=False)
    restore_payload(d.dev, state)
    d.tail, d.head, d.phase, d.sqsize, d.cqsize, d.cid = c.tail, c.head, c.phase, c.sqsize, c.cqsize, c.cid
    assert payload_of(d.dev) == state
    got = []
    while len(got) < 3:
        done = d.take(1)  # each release lets the next held command run
        assert done is not None
        got.append((done["cid"], done["sc"]))
    assert got == [(c.cid - 2, 0), (c.cid - 1, 0), (c.cid, 0)]
    assert d.take(1) is None and not d.dev.intx_level
    data = open(img, "rb").read()
    assert [data[512 * (10 + i)] for i in range(3)] == [0x10, 0x11, 0x12]
    d.dev.close()


def test_restore_refuses_bad_state_naming_device_and_field_and_changes_nothing(tmp_path):
    a, b = make_image(tmp_path / "a.img", DISK_BYTES), make_image(tmp_path / "b.img", 128 << 10)
    c = Ctl(a)
    c.io_queues()
    saved = payload_of(c.dev)
    other = Ctl(b, enable=False)
    before = payload_of(other.dev)
    with pytest.raises(ValueError, match=r"nvme@pci\.0\.5\.0: device: saved with an image of 512 blocks; .* has 256"):
        restore_payload(other.dev, saved)
    assert payload_of(other.dev) == before
    fresh = Ctl(a, enable=False)
    before = payload_of(fresh.dev)
    for mutate, message in (
        (lambda s: s["nvme"]["cqs"][1].update(head=8), "CQ 1 field 'head' value 8 is outside the queue of 8"),
        (lambda s: s["nvme"]["cqs"][1].update(phase=2), "field 'phase' value 2"),
        (lambda s: s["nvme"]["sqs"][1].update(cqid=5), "SQ 1 field 'cqid' value 5"),
        (lambda s: s["nvme"]["sqs"][1].update(base=0x1234), "field 'base' value 0x1234"),
        (lambda s: s["nvme"].update(cc=1 << 30), "field 'cc'"),
        (lambda s: s["pci"].update(intx_level=True), "saved INTx level True disagrees"),
    ):
        import copy
        bad = copy.deepcopy(saved)
        mutate(bad)
        with pytest.raises(ValueError, match=message.replace(".", r"\.")):
            restore_payload(fresh.dev, bad)
        assert payload_of(fresh.dev) == before, message
    restore_payload(fresh.dev, saved)
    assert payload_of(fresh.dev) == saved
    for ctl in (c, other, fresh):
        ctl.dev.close()


# ---- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize("slots, message", [
    (["5,nvme,/nonexistent/disk.img"], "nvme@pci.0.5.0: cannot open image file '/nonexistent/disk.img'"),
    (["5,nvme"], "nvme@pci.0.5.0: no image file given"),
    (["5,nvme,{img},ro"], "nvme@pci.0.5.0: unknown option 'ro'"),
    (["5,nvme,{img},ser=abcdefghijklmnopqrstuvwxyz"], "a serial is at most 20"),
])
def test_bad_nvme_configuration_is_refused_at_start(tmp_path, slots, message):
    img = make_image(tmp_path / "c.img")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        Machine(VmConfig(name="bad-nvme", slots=[parse_slot(s.format(img=img)) for s in slots]))
    Machine(VmConfig(name="bad-nvme")).close()


def test_static_registry_knows_the_nvme_section(tmp_path):
    img = make_image(tmp_path / "r.img")
    config = VmConfig(name="reg-nvme", slots=[parse_slot(s) for s in ("0,hostbridge", f"5,nvme,{img}")])
    registry = static_registry(config)
    machine = Machine(config)
    try:
        assert machine.device_sections()["nvme@pci.0.5.0"] == Nvme.STATE.VERSION
        for device in machine.devices:
            registry.check(device.name, device.STATE.VERSION, what="test")
    finally:
        machine.close()


@pytest.mark.covers(operation="suspend", guest="nvmetest", device="nvme", via="cli")
def test_vmmrun_suspends_an_nvmetest_guest_and_resumes_it_with_the_disk(tmp_path):
    import json
    import subprocess

    from .procs import start_vmmrun, stop, vmmctl, vmmrun_cmd, wait_for_socket, wait_for_state

    img = make_image(tmp_path / "disk.img", 1 << 20)
    console = tmp_path / "console.log"
    slots = ["-s", "0,hostbridge", "-s", f"5,nvme,{img}"]
    probe = make_image(tmp_path / "probe.img", 1 << 20)  # the same disk, for the in-process run
    at, first_line = pause_in_write_pass("nvmetest", [s.replace(img, probe) for s in slots[1::2]])
    proc = start_vmmrun(tmp_path, "--guest", "nvmetest", "-m", "8M", *slots, "-l", f"com1,{console}", f"--pause-at={at}", "nv0")
    try:
        wait_for_socket(tmp_path, "nv0", proc)
        wait_for_state(tmp_path, "nv0", "paused")
        ckp = tmp_path / "nv0.ckp"
        saved = vmmctl(tmp_path, "--vm=nv0", f"--suspend={ckp}", "--json")
        assert saved.returncode == 0, saved.stderr
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)
    assert console.read_text() == first_line, "suspended halfway through the write pass"
    assert "nvme@pci.0.5.0" in json.dumps(json.loads((tmp_path / "nv0.ckp.meta").read_text()))
    resumed = subprocess.run(vmmrun_cmd("-r", str(ckp), *slots, "-l", f"com1,{console}", "--run-dir", str(tmp_path), "nv0"),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 1, resumed.stderr
    blocks = (1 << 20) // 512
    assert f"all match, digest 0x{blktest.reference_digest(1, blocks):016x}\n" in console.read_text()
    assert open(img, "rb").read() == blktest.reference_image(1, blocks)


def test_vmmrun_refuses_a_missing_nvme_image_at_start(tmp_path):
    import subprocess

    from .procs import vmmrun_cmd

    result = subprocess.run(vmmrun_cmd("--guest", "nvmetest", "-m", "8M", "-s", "5,nvme,/no/such.img",
                                       "--run-dir", str(tmp_path), "nonvme"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 4
    assert "nvme@pci.0.5.0: cannot open image file '/no/such.img'" in result.stderr
    assert "Traceback" not in result.stderr
