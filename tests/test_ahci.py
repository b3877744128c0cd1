"""ahci-hd: the HBA function and its ABAR, the ahcitest guest driver to its verdict, a run paused
mid-I/O at exact instruction counts and moved into a fresh machine finishing identically
(console and image), hostile command lists getting task file errors (never a VMM crash), state
refusals, and bad configuration refused at start."""

import copy
import struct

import pytest

from vmmpy.devices.ahci import AhciHd
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
SECTORS = DISK_BYTES // 512
BAR = 0xC000_0000


def test_ahci_function_has_its_abar_in_bar5_and_the_bus_routes_it(tmp_path):
    memory = GuestMemory(MEMSIZE)
    pins = Pins()
    bus = PciBus(pins)
    dev = AhciHd(PciHost(lambda: memory, pins), 0, 6, 0, make_image(tmp_path / "a.img"))
    bus.add(dev)
    bus.finish()
    assert dev.cfg_read(0, 4) == 0x2821_8086 and dev.cfg_read(0x08, 4) >> 8 == 0x010601
    assert dev.cfg_read(0x24, 4) == BAR and dev.cfg_read(0x10, 4) == 0
    assert bus.mmio_owner(BAR + 0x138) is dev
    assert dev.mmio_read(BAR + 0x0C, 4) == 1 and dev.mmio_read(BAR + 0x10, 4) == 0x0001_0300
    assert dev.mmio_read(BAR + 0x124, 4) == 0x101 and dev.mmio_read(BAR + 0x128, 4) & 0xF == 3
    assert dev.mmio_read(BAR + 0x04, 2) == 0xFFFF, "a 2-byte register read is refused"
    dev.close()


SLOTS = ["0,hostbridge", "1,lpc", "6,ahci-hd,{img},ser=sata-disk-1"]


@pytest.mark.parametrize("mode, extra", [("irq", {}), ("poll", {"request_sectors": "40", "batch": "16"})])
def test_ahcitest_writes_reads_and_digests_every_sector(tmp_path, mode, extra):
    img = make_image(tmp_path / "disk.img", DISK_BYTES)
    machine, com1 = build(f"ahci-{mode}", [s.format(img=img) for s in SLOTS], "ahcitest", {"mode": mode, "seed": "5", **extra})
    machine.start(serve_control=False)
    assert run_to_end(machine) == EXIT_POWEROFF
    per = int(extra.get("request_sectors", 8))
    text = com1.output.decode()
    assert text.startswith(f"ahcitest: disk sata-disk-1, {SECTORS} sectors\n"
                           f"ahcitest: wrote {SECTORS} sectors in {-(-SECTORS // per)} commands, flushed\n")
    assert f"ahcitest: read back {SECTORS} sectors, all match, digest 0x{blktest.reference_digest(5, SECTORS):016x}\n" in text
    assert text.endswith("ahcitest: done (poll)\n" if mode == "poll" else " interrupts)\n")
    assert open(img, "rb").read() == blktest.reference_image(5, SECTORS)
    n = -(-SECTORS // per)
    assert machine.pci_functions[2].stats == {"reads": n, "writes": n, "flushes": 1, "identifies": 1, "errors": 0}


CASES = {
    "irq": (["0,hostbridge", "6,ahci-hd,{img}"], {"batch": "5", "request_sectors": "16"}),
    "poll": (["6,ahci-hd,{img}"], {"mode": "poll", "batch": "3", "request_sectors": "9"}),
}


@pytest.mark.covers(operation="state-move", guest="ahcitest", device="ahci-hd", via="machine")
@pytest.mark.parametrize("case", sorted(CASES))
def test_ahcitest_paused_mid_io_and_restored_elsewhere_finishes_identically(tmp_path, case):
    slots_t, args = CASES[case]

    def run_once(img, pause_at=None, tag=""):
        slots = [s.format(img=img) for s in slots_t]
        machine, com1 = build(f"ahmid-{case}{tag}", slots, "ahcitest", args)
        if pause_at is None:
            machine.start(serve_control=False)
            assert run_to_end(machine) == EXIT_POWEROFF
            return outputs(machine, com1, {}), machine.vm.vcpus[0].instructions_retired
        machine.pause_at = pause_at
        machine.start(serve_control=False)
        wait_paused(machine)
        before = outputs(machine, com1, {})
        com1b = CaptureConsole()
        config = VmConfig(name=f"ahmid-{case}{tag}-dst", memsize=MEMSIZE, slots=[parse_slot(s) for s in slots])
        target = move_to_fresh_machine(machine, config, {"com1": com1b})
        assert run_to_end(target) == EXIT_POWEROFF
        after = outputs(target, com1b, {})
        return (before[0] + after[0], {}), None

    ref_img = make_image(tmp_path / "ref.img", DISK_BYTES)
    reference, total = run_once(ref_img)
    assert b"all match" in reference[0] and b"failed" not in reference[0]
    for fraction in (0.13, 0.5, 0.91):
        img = make_image(tmp_path / f"img-{fraction}.img", DISK_BYTES)
        result, _ = run_once(img, pause_at=int(total * fraction), tag=f"-{int(fraction * 100)}")
        assert result == reference, f"paused at {fraction} of the run"
        assert sha(img) == sha(ref_img)


@pytest.mark.covers(operation="state-move", guest="ahcitest", device="ahci-hd", via="machine")
def test_a_pause_right_after_issuing_carries_the_pending_interrupt(tmp_path):
    """Pause a few instructions after a PxCI write, with the port's interrupt pending and the
    INTx line up; move the guest; same console and image."""
    img = make_image(tmp_path / "ref.img", DISK_BYTES)
    run = run_guest("ahcitest", [f"6,ahci-hd,{img}"], {"batch": "4"}, watch=(0, {0x138, 0x110}))  # PxCI, PxIS
    reference = "".join(run.lines).encode()
    issues = [count for count, offset in run.register_writes if offset == 0x138]
    assert len(issues) == 1 + 2 * (SECTORS // 32) + 1, "identify, write and read batches, flush"
    at = issues[len(issues) // 2 + 3] + 1
    cleared = min(count for count, offset in run.register_writes if offset == 0x110 and count > at - 1)
    assert at < cleared, "the pause falls between the PxCI write and the handler clearing PxIS"
    img2 = make_image(tmp_path / "b.img", DISK_BYTES)
    m, c = build("ahci-step", [f"6,ahci-hd,{img2}"], "ahcitest", {"batch": "4"})
    m.pause_at = at
    m.start(serve_control=False)
    wait_paused(m)
    state = payload_of(m.pci_functions[0])
    assert state["hba"]["irq_status"] == 1 and state["hba"]["port"]["irq_status"] & 1 and state["pci"]["intx_level"]
    before = bytes(c.output)
    com1b = CaptureConsole()
    config = VmConfig(name="ahci-step-dst", memsize=MEMSIZE, slots=[parse_slot(f"6,ahci-hd,{img2}")])
    target = move_to_fresh_machine(m, config, {"com1": com1b})
    assert run_to_end(target) == EXIT_POWEROFF
    assert before + bytes(com1b.output) == reference
    assert sha(img2) == sha(img)


# ---- the HBA driven directly -------------------------------------------------------------------------


class Hba:
    CLB, FB, CT, BUF = 0x200000, 0x201000, 0x202000, 0x210000

    def __init__(self, img, memory=None, start=True):
        self.memory = memory or GuestMemory(MEMSIZE)
        self.dev = AhciHd(PciHost(lambda: self.memory, Pins()), 0, 6, 0, img)
        self.dev.set_bar_address(5, BAR)
        self.dev.cfg_write(0x04, 2, 0x6)
        if start:
            self.w(0x100, self.CLB)
            self.w(0x108, self.FB)
            self.w(0x114, 0x6000_0001)
            self.w(0x04, 0x8000_0002)
            self.w(0x118, 0x17)

    def w(self, off, value):
        self.dev.mmio_write(BAR + off, 4, value)

    def r(self, off):
        return self.dev.mmio_read(BAR + off, 4)

    def command(self, slot, ata, lba=0, count=1, prds=None, write=False, cfl=5, fis_type=0x27, c_bit=0x80, atapi=False, ctba=None):
        prds = [(self.BUF, count * 512)] if prds is None else prds
        ctba = self.CT + 0x100 * slot if ctba is None else ctba
        dw0 = cfl | (atapi << 5) | (write << 6) | (len(prds) << 16)
        self.memory.write(self.CLB + 32 * slot, struct.pack("<IIII", dw0, 0, ctba & 0xFFFF_FFFF, ctba >> 32) + bytes(16))
        if 0 <= ctba < MEMSIZE - 0x100:
            fis = bytes([fis_type, c_bit, ata, 0]) + (lba & 0xFFFFFF).to_bytes(3, "little") + b"\x40" \
                + (lba >> 24).to_bytes(3, "little") + b"\0" + struct.pack("<HH", count & 0xFFFF, 0) + bytes(44)
            self.memory.write(ctba, fis)
            for i, (addr, n) in enumerate(prds):
                self.memory.write(ctba + 0x80 + 16 * i, struct.pack("<IIII", addr & 0xFFFF_FFFF, addr >> 32, 0, n - 1))

    def issue(self, mask):
        self.w(0x138, mask)
        status = self.r(0x110)
        self.w(0x110, status)
        self.w(0x08, 1)
        return status, self.r(0x120)

    def prdbc(self, slot):
        return struct.unpack("<I", self.memory.read(self.CLB + 32 * slot + 4, 4))[0]


HOSTILE = {
    "unknown ATA command": dict(ata=0x99),
    "ATAPI bit": dict(ata=0x25, atapi=True),
    "FIS type not H2D": dict(ata=0x25, fis_type=0x34),
    "FIS without the C bit": dict(ata=0x25, c_bit=0),
    "FIS length 2 dwords": dict(ata=0x25, cfl=2),
    "PRD outside RAM": dict(ata=0x25, prds=[(0xC000_0000, 512)]),
    "PRD crossing the end of RAM": dict(ata=0x35, prds=[(MEMSIZE - 256, 512)]),
    "PRD odd address": dict(ata=0x25, prds=[(Hba.BUF + 1, 512)]),
    "PRD odd count": dict(ata=0x25, prds=[(Hba.BUF, 511)]),
    "PRDT too short": dict(ata=0x25, count=4, prds=[(Hba.BUF, 1024)]),
    "LBA past the capacity": dict(ata=0x35, lba=SECTORS - 1, count=2, write=True),
    "count 0 is 65536 sectors": dict(ata=0x25, count=0, prds=[(Hba.BUF, 512)]),
    "command table outside RAM": dict(ata=0x25, ctba=0xC000_0000),
    "command table misaligned": dict(ata=0x25, ctba=Hba.CT + 0x40),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_commands_get_task_file_errors_and_the_port_recovers(tmp_path, attack):
    img = make_image(tmp_path / "h.img", DISK_BYTES)
    h = Hba(img)
    h.command(0, **HOSTILE[attack])
    h.command(1, 0x25, lba=0)  # a good command behind it stays issued while the port is halted
    status, tfd = h.issue(0b11)
    fatal = attack.startswith("command table")
    assert status & (1 << 29 if fatal else 1 << 30), "HBFS or TFES"
    assert tfd == 0x0441, "DRDY | ERR, error ABRT"
    assert h.r(0x138) == 0b11 and h.dev.halted
    assert h.dev.intx_level is False  # IS was cleared after PxIS
    state = payload_of(h.dev)
    assert state["hba"]["port"]["halted"] and state["hba"]["port"]["ci"] == 0b11
    # Recovery: stop (drops the issued commands), start (clears the error), then a write and a read.
    h.w(0x118, 0x16)
    assert h.r(0x138) == 0
    h.w(0x118, 0x17)
    assert h.r(0x120) == 0x40
    h.memory.write(Hba.BUF, bytes(range(256)) * 2)
    h.command(2, 0x35, lba=7, write=True)
    assert h.issue(0b100) == (1, 0x40)
    h.memory.write(Hba.BUF, bytes(512))
    h.command(3, 0x25, lba=7)
    assert h.issue(0b1000) == (1, 0x40) and h.prdbc(3) == 512
    assert h.memory.read(Hba.BUF, 512) == bytes(range(256)) * 2
    assert open(img, "rb").read()[7 * 512:8 * 512] == bytes(range(256)) * 2
    assert h.dev.stats["errors"] == 1
    h.dev.close()


def test_command_list_outside_ram_and_commands_on_a_stopped_port(tmp_path):
    img = make_image(tmp_path / "l.img", DISK_BYTES)
    h = Hba(img, start=False)
    h.w(0x138, 1)
    assert h.r(0x138) == 0, "PxCI ignores writes while the port is stopped"
    h.w(0x100, 0xC000_0000)
    h.w(0x108, Hba.FB)
    h.w(0x118, 0x17)
    status, tfd = h.issue(1)
    assert status & (1 << 29) and tfd & 1
    h.w(0x100, Hba.CLB)
    assert h.dev.clb == 0xC000_0000, "PxCLB is fixed while the port runs"
    h.dev.close()


def test_identify_reports_serial_and_capacity(tmp_path):
    img = make_image(tmp_path / "i.img", DISK_BYTES)
    h = Hba(img)
    h.command(0, 0xEC)
    assert h.issue(1) == (1, 0x40) and h.prdbc(0) == 512
    data = h.memory.read(Hba.BUF, 512)
    serial = bytes(data[20 + (i ^ 1)] for i in range(20)).decode().rstrip()
    assert serial == "vmmpy-ahci-0-6-0"
    assert struct.unpack_from("<Q", data, 200)[0] == SECTORS and struct.unpack_from("<H", data, 166)[0] & 0x400
    assert h.memory.read(Hba.FB + 0x40, 4) == bytes([0x34, 0x40, 0x40, 0]), "D2H register FIS received"
    h.dev.close()


def test_restore_refuses_bad_state_and_changes_nothing(tmp_path):
    a, b = make_image(tmp_path / "a.img", DISK_BYTES), make_image(tmp_path / "b.img", 128 << 10)
    h = Hba(a)
    saved = payload_of(h.dev)
    other = Hba(b, start=False)
    before = payload_of(other.dev)
    with pytest.raises(ValueError, match=r"ahci-hd@pci\.0\.6\.0: device: saved with an image of 512 sectors; .* has 256"):
        restore_payload(other.dev, saved)
    assert payload_of(other.dev) == before
    fresh = Hba(a, start=False)
    before = payload_of(fresh.dev)
    for mutate, message in (
        (lambda s: s["hba"]["port"].update(ci=3), "commands issued (ci 0x3) but not halted"),
        (lambda s: s["hba"]["port"].update(clb=0x200010), "field 'port clb' value 0x200010"),
        (lambda s: s["hba"].update(ghc=2), "lacks AHCI enable"),
        (lambda s: s["hba"].update(irq_status=1), "saved INTx level False disagrees"),
        (lambda s: s["hba"]["port"].update(halted="yes"), "hba.port.halted: expected a bool, got 'yes'"),
    ):
        bad = copy.deepcopy(saved)
        mutate(bad)
        with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
            restore_payload(fresh.dev, bad)
        assert payload_of(fresh.dev) == before, message
    restore_payload(fresh.dev, saved)
    assert payload_of(fresh.dev) == saved
    for x in (h, other, fresh):
        x.dev.close()


@pytest.mark.parametrize("slots, message", [
    (["6,ahci-hd,/nonexistent/disk.img"], "ahci-hd@pci.0.6.0: cannot open image file '/nonexistent/disk.img'"),
    (["6,ahci-hd"], "ahci-hd@pci.0.6.0: no image file given"),
    (["6,ahci-hd,{img},cache=off"], "ahci-hd@pci.0.6.0: unknown option 'cache'"),
])
def test_bad_ahci_configuration_is_refused_at_start(tmp_path, slots, message):
    img = make_image(tmp_path / "c.img")
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        Machine(VmConfig(name="bad-ahci", slots=[parse_slot(s.format(img=img)) for s in slots]))
    Machine(VmConfig(name="bad-ahci")).close()


def test_static_registry_knows_the_ahci_section(tmp_path):
    img = make_image(tmp_path / "r.img")
    config = VmConfig(name="reg-ahci", slots=[parse_slot(s) for s in ("0,hostbridge", f"6,ahci-hd,{img}")])
    registry = static_registry(config)
    machine = Machine(config)
    try:
        assert machine.device_sections()["ahci-hd@pci.0.6.0"] == AhciHd.STATE.VERSION
        for device in machine.devices:
            registry.check(device.name, device.STATE.VERSION, what="test")
    finally:
        machine.close()


@pytest.mark.covers(operation="suspend", guest="ahcitest", device="ahci-hd", via="cli")
def test_vmmrun_suspends_an_ahcitest_guest_and_resumes_it_with_the_disk(tmp_path):
    import json
    import subprocess

    from .procs import start_vmmrun, stop, vmmctl, vmmrun_cmd, wait_for_socket, wait_for_state

    img = make_image(tmp_path / "disk.img", 1 << 20)
    console = tmp_path / "console.log"
    slots = ["-s", "0,hostbridge", "-s", f"6,ahci-hd,{img}"]
    probe = make_image(tmp_path / "probe.img", 1 << 20)  # the same disk, for the in-process run
    at, first_line = pause_in_write_pass("ahcitest", [s.replace(img, probe) for s in slots[1::2]])
    proc = start_vmmrun(tmp_path, "--guest", "ahcitest", "-m", "8M", *slots, "-l", f"com1,{console}", f"--pause-at={at}", "ah0")
    try:
        wait_for_socket(tmp_path, "ah0", proc)
        wait_for_state(tmp_path, "ah0", "paused")
        ckp = tmp_path / "ah0.ckp"
        saved = vmmctl(tmp_path, "--vm=ah0", f"--suspend={ckp}", "--json")
        assert saved.returncode == 0, saved.stderr
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)
    assert console.read_text() == first_line, "suspended halfway through the write pass"
    assert "ahci-hd@pci.0.6.0" in json.dumps(json.loads((tmp_path / "ah0.ckp.meta").read_text()))
    resumed = subprocess.run(vmmrun_cmd("-r", str(ckp), *slots, "-l", f"com1,{console}", "--run-dir", str(tmp_path), "ah0"),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 1, resumed.stderr
    sectors = (1 << 20) // 512
    assert f"all match, digest 0x{blktest.reference_digest(1, sectors):016x}\n" in console.read_text()
    assert open(img, "rb").read() == blktest.reference_image(1, sectors)
