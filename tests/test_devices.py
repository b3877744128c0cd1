"""PCI and virtio devices: config space, BARs and INTx; the virtio guest drivers run to their
verdicts; a run paused mid-I/O, saved and restored into a fresh machine finishes bit-identically;
hostile virtqueues break the device, never the VMM; bad configuration is refused at start."""

import hashlib
import logging
import struct

import pytest

from vmmpy.devices.pci import HostBridge, LpcBridge, PciBus, PciHost
from vmmpy.devices.uart import CaptureConsole
from vmmpy.devices.virtio import STATUS_NEEDS_RESET, vring_size
from vmmpy.devices.virtio_blk import VirtioBlock
from vmmpy.devices.virtio_rnd import VirtioRandom
from vmmpy.guest.programs import blktest, load_program, rndtest, vconsole
from vmmpy.memory import GuestMemory
from vmmpy.runtime.commands import static_registry
from vmmpy.runtime.config import ConfigError, VmConfig, parse_slot
from vmmpy.runtime.process import EXIT_POWEROFF, Machine

from .device_state import payload_of, restore_payload
from .guest_points import pause_in_write_pass, run_guest
from .inproc import move_to_fresh_machine, run_to_end, wait_paused

MEMSIZE = 8 << 20
DISK_BYTES = 256 << 10


def make_image(path, size=DISK_BYTES):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def build(name, slots, program, args, consoles=None):
    consoles = dict(consoles or {})
    com1 = consoles.setdefault("com1", CaptureConsole())
    machine = Machine(VmConfig(name=name, memsize=MEMSIZE, slots=[parse_slot(s) for s in slots]), consoles=consoles)
    machine.setup_memory()
    machine.load_program(load_program(program, args, memsize=MEMSIZE))
    return machine, com1


# ---- PCI -----------------------------------------------------------------------------------------


class Pins:
    def __init__(self):
        self.events = []

    def __call__(self, pin, level):
        self.events.append((pin, level))


def cfg(bus, b, s, f, reg, size=4, value=None):
    bus.io_write(0xCF8, 4, 0x8000_0000 | (b << 16) | (s << 11) | (f << 8) | (reg & 0xFC))
    port = 0xCFC + (reg & 3)
    if value is None:
        return bus.io_read(port, size)
    bus.io_write(port, size, value)


def test_pci_config_mechanism_ids_bars_sizing_and_multifunction(tmp_path):
    memory = GuestMemory(MEMSIZE)
    pins = Pins()
    bus = PciBus(pins)
    host = PciHost(lambda: memory, pins)
    img = make_image(tmp_path / "d.img")
    functions = [HostBridge(host, 0, 0, 0), LpcBridge(host, 0, 1, 0), VirtioBlock(host, 0, 3, 0, img),
                 VirtioRandom(host, 0, 3, 1, "seed=1")]
    for f in functions:
        bus.add(f)
    bus.finish()
    assert cfg(bus, 0, 0, 0, 0) == 0x1275_1275
    assert cfg(bus, 0, 1, 0, 0x0A, 2) == 0x0601  # ISA bridge
    assert cfg(bus, 0, 3, 0, 0) == 0x1001_1AF4 and cfg(bus, 0, 3, 1, 0, 2) == 0x1AF4
    assert cfg(bus, 0, 3, 0, 2, 2) == 0x1001  # 2-byte read at offset 2
    assert cfg(bus, 0, 3, 0, 0x0E, 1) & 0x80, "function 0 of a multi-function slot says so"
    assert cfg(bus, 0, 7, 0, 0) == 0xFFFF_FFFF, "an absent function reads all-ones"
    assert cfg(bus, 0, 3, 0, 0x2E, 2) == 2  # subsystem id: virtio block
    bar0 = cfg(bus, 0, 3, 0, 0x10)
    assert bar0 & 1 and 0x2000 <= bar0 & ~3 < 0x10000
    assert cfg(bus, 0, 3, 0, 0x04, 2) & 0x5 == 0x5, "I/O decoding and bus mastering on"
    # BAR sizing: all-ones reads back the size mask, then the address is put back.
    cfg(bus, 0, 3, 0, 0x10, 4, 0xFFFF_FFFF)
    size = (~(cfg(bus, 0, 3, 0, 0x10) & ~3) & 0xFFFF_FFFF) + 1
    assert size == 64
    cfg(bus, 0, 3, 0, 0x10, 4, 0x3000)
    assert bus.io_owner(0x3000 + 0x12) is functions[2]
    assert bus.io_owner(bar0 & ~3) is None
    # Read-only fields ignore writes; the interrupt line is writable.
    cfg(bus, 0, 3, 0, 0, 4, 0)
    assert cfg(bus, 0, 3, 0, 0) == 0x1001_1AF4
    assert cfg(bus, 0, 3, 0, 0x3D, 1) == 1 and cfg(bus, 0, 3, 0, 0x3C, 1) == 16 + 3
    # Disabling I/O decoding hides the BAR.
    cfg(bus, 0, 3, 0, 0x04, 2, 0)
    assert bus.io_owner(0x3012) is None
    # 0xCF8 only latches 4-byte writes.
    bus.io_write(0xCF8, 1, 0)
    assert bus.io_read(0xCF8, 4) & 0x8000_0000
    for f in functions:
        f.close()


def test_intx_lines_are_shared_and_follow_the_disable_bit():
    memory = GuestMemory(MEMSIZE)
    pins = Pins()
    bus = PciBus(pins)
    host = PciHost(lambda: memory, pins)
    a, b = VirtioRandom(host, 0, 4, 0), VirtioRandom(host, 0, 12, 0)  # 4 and 12: both pin 20
    bus.add(a)
    bus.add(b)
    bus.finish()
    a.set_intx(True)
    b.set_intx(True)
    a.set_intx(False)
    assert pins.events == [(20, True)], "the shared line stays up while one function asserts"
    b.cfg_write(0x04, 2, b.command | 0x400)
    assert pins.events[-1] == (20, False) and b.cfg_read(0x06, 2) & 0x8, "status still shows the INTx"


# ---- the guest drivers ---------------------------------------------------------------------------

BLK_SLOTS = ["0,hostbridge", "1,lpc", "3,virtio-blk,{img},ser=disk-7"]


@pytest.mark.parametrize("mode", ["irq", "poll"])
def test_blktest_writes_reads_and_digests_every_sector(tmp_path, mode):
    img = make_image(tmp_path / "disk.img")
    slots = [s.format(img=img) for s in BLK_SLOTS]
    machine, com1 = build(f"blk-{mode}", slots, "blktest", {"mode": mode, "seed": "5", "batch": "3", "request_sectors": "7"})
    machine.start(serve_control=False)
    assert run_to_end(machine) == EXIT_POWEROFF
    sectors = DISK_BYTES // 512
    digest = blktest.reference_digest(5, sectors)
    text = com1.output.decode()
    assert text.startswith(f"blktest: disk disk-7, {sectors} sectors\nblktest: wrote {sectors} sectors in {-(-sectors // 7)} requests, flushed\n")
    assert f"blktest: read back {sectors} sectors, all match, digest 0x{digest:016x}\n" in text
    assert text.endswith("blktest: done (poll: isr 0)\n" if mode == "poll" else "interrupts)\n")
    assert open(img, "rb").read() == blktest.reference_image(5, sectors)
    device = machine.pci_functions[2]
    assert device.stats["flushes"] == 1 and device.stats["errors"] == 0


def test_blktest_memory_writes_are_dirty_pages(tmp_path):
    img = make_image(tmp_path / "disk.img", 64 << 10)
    machine, _ = build("blk-dirty", [f"3,virtio-blk,{img}"], "blktest", {})
    machine.vm.memory.get_and_clear_dirty()
    machine.start(serve_control=False)
    assert machine.wait(60) == EXIT_POWEROFF
    dirty = set(int(p) for p in machine.vm.memory.get_and_clear_dirty())
    machine.close()
    assert 0x201000 >> 12 in dirty, "the used ring (written only by the device) is a dirty page"


def test_rndtest_with_a_seed_prints_the_reference_digest():
    machine, com1 = build("rnd-seed", ["4,virtio-rnd,seed=99"], "rndtest", {"bytes": "8K", "chunk": "256", "batch": "5"})
    machine.start(serve_control=False)
    assert run_to_end(machine) == EXIT_POWEROFF
    assert com1.output.decode() == f"rndtest: received 8192 bytes in 32 requests, digest 0x{rndtest.reference_digest(99, 8192):016x}\n"


def test_rndtest_from_host_entropy_gets_every_byte():
    machine, com1 = build("rnd-host", ["4,virtio-rnd"], "rndtest", {"bytes": "4K"})
    machine.start(serve_control=False)
    assert run_to_end(machine) == EXIT_POWEROFF
    assert com1.output.decode().startswith("rndtest: received 4096 bytes in 8 requests, digest 0x")


def test_vconsole_prints_through_the_virtio_console(tmp_path):
    out = tmp_path / "vc.log"
    machine, com1 = build("vc-file", [f"5,virtio-console,{out}"], "vconsole", {"lines": "12"})
    machine.start(serve_control=False)
    assert run_to_end(machine) == EXIT_POWEROFF
    expected = vconsole.reference_output(12)
    assert out.read_bytes() == expected
    assert com1.output.decode() == f"vconsole: sent 12 lines, {len(expected)} bytes\n"


# ---- pause mid-I/O, save, restore into a fresh machine ------------------------------------------------


def outputs(machine, com1, extra):
    return bytes(com1.output), {k: bytes(v.output) for k, v in extra.items()}


CASES = {
    "blk-irq": (["0,hostbridge", "3,virtio-blk,{img}"], "blktest", {"batch": "4", "request_sectors": "8"}, None),
    "blk-poll": (["3,virtio-blk,{img}"], "blktest", {"mode": "poll", "batch": "2"}, None),
    "rnd": (["4,virtio-rnd,seed=3"], "rndtest", {"bytes": "16K", "chunk": "64", "batch": "7"}, None),
    "vconsole": (["5,virtio-console"], "vconsole", {"lines": "60"}, "virtio-console@pci.0.5.0"),
    "scsi": (["0,hostbridge", "4,virtio-scsi,{img}"], "scsitest", {"request_sectors": "5", "seed": "4"}, None),
}


@pytest.mark.parametrize("case", [
    pytest.param(case, marks=pytest.mark.covers(operation="state-move", guest=program, device=slots[-1].split(",")[1], via="machine"))
    for case, (slots, program, _args, _console) in sorted(CASES.items())
])
def test_a_run_paused_mid_io_and_restored_elsewhere_finishes_bit_identically(tmp_path, case):
    slots_t, program, args, vc_name = CASES[case]

    def run_once(img, pause_at=None, tag=""):
        slots = [s.format(img=img) for s in slots_t]
        extra = {vc_name: CaptureConsole()} if vc_name else {}
        machine, com1 = build(f"mid-{case}{tag}", slots, program, args, extra)
        if pause_at is None:
            machine.start(serve_control=False)
            assert run_to_end(machine) == EXIT_POWEROFF
            return outputs(machine, com1, extra), machine.vm.vcpus[0].instructions_retired
        machine.pause_at = pause_at
        machine.start(serve_control=False)
        wait_paused(machine)
        before = outputs(machine, com1, extra)
        extra2 = {vc_name: CaptureConsole()} if vc_name else {}
        com1b = CaptureConsole()
        config = VmConfig(name=f"mid-{case}{tag}-dst", memsize=MEMSIZE, slots=[parse_slot(s) for s in slots])
        target = move_to_fresh_machine(machine, config, {"com1": com1b, **extra2})
        assert run_to_end(target) == EXIT_POWEROFF
        after = outputs(target, com1b, extra2)
        return (before[0] + after[0], {k: before[1][k] + after[1][k] for k in before[1]}), None

    ref_img = make_image(tmp_path / "ref.img")
    reference, total = run_once(ref_img)
    assert b"MISMATCH" not in reference[0] and b"failed" not in reference[0]
    for fraction in (0.13, 0.5, 0.91):
        img = make_image(tmp_path / f"img-{fraction}.img")
        result, _ = run_once(img, pause_at=int(total * fraction), tag=f"-{int(fraction * 100)}")
        assert result == reference, f"paused at {fraction} of the run"
        assert sha(img) == sha(ref_img)


DISK_GUESTS = {  # the disk drivers sharing programs/_storage.py: their slot, and what they call a block
    "blktest": ("3,virtio-blk,{img}", "sector"),
    "nvmetest": ("5,nvme,{img}", "block"),
    "ahcitest": ("6,ahci-hd,{img}", "sector"),
    "scsitest": ("4,virtio-scsi,{img}", "block"),
}


@pytest.mark.parametrize("program", sorted(DISK_GUESTS))
def test_every_disk_driver_names_the_first_qword_that_reads_back_wrong(tmp_path, program):
    """The shared read-back check: a qword changed on the disk between the write pass and the
    read pass (the guest paused just after its "wrote" line, found by running it) is named, and
    the driver stops without a digest."""
    slot, unit = DISK_GUESTS[program]
    slots = ["0,hostbridge", slot]
    run = run_guest(program, [s.format(img=make_image(tmp_path / "probe.img")) for s in slots])
    assert "wrote" in run.lines[1]
    img = make_image(tmp_path / "disk.img")
    machine, com1 = build(f"bad-{program}", [s.format(img=img) for s in slots], program, {})
    machine.pause_at = run.line_ends[1] + 2
    machine.start(serve_control=False)
    wait_paused(machine)
    assert bytes(com1.output).decode() == run.lines[0] + run.lines[1], "paused between the passes"
    with open(img, "r+b") as f:
        f.seek(37 * 512 + 5 * 8)
        good = f.read(8)
        f.seek(37 * 512 + 5 * 8)
        f.write(bytes(b ^ 0xFF for b in good))
    machine.resume()
    assert run_to_end(machine) == EXIT_POWEROFF
    assert com1.output.decode() == run.lines[0] + run.lines[1] + f"{program}: MISMATCH {unit} 37 qword 5\n"


# ---- hostile guests ----------------------------------------------------------------------------------


class Driver:
    """Drives a bare virtio device through its registers, as a guest would, with crafted rings."""

    def __init__(self, device_cls, conf=None, memsize=MEMSIZE):
        self.memory = GuestMemory(memsize)
        self.pins = Pins()
        self.host = PciHost(lambda: self.memory, self.pins)
        self.device = device_cls(self.host, 0, 3, 0, conf)
        self.device.set_bar_address(0, 0x2000)
        self.device.cfg_write(0x04, 2, 0x5)
        self.ring = 0x200000
        self.size = self.device.queues[0].size
        self.avail = self.ring + vring_size(self.size)[0]
        self.used = self.ring + vring_size(self.size)[1]
        self.out(0x12, 1, 0)
        self.out(0x12, 1, 3)
        self.out(0x0E, 2, 0)
        self.out(0x08, 4, self.ring >> 12)
        self.out(0x12, 1, 7)
        self.avail_idx = 0

    def out(self, reg, size, value):
        self.device.io_write(0x2000 + reg, size, value)

    def inp(self, reg, size):
        return self.device.io_read(0x2000 + reg, size)

    def desc(self, index, addr, length, flags, next_index=0):
        self.memory.write(self.ring + 16 * index, struct.pack("<QIHH", addr, length, flags, next_index))

    def publish(self, head, by=1):
        self.memory.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + by) & 0xFFFF
        self.memory.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        self.out(0x10, 2, 0)

    def used_idx(self):
        return struct.unpack("<H", self.memory.read(self.used + 2, 2))[0]


HOSTILE = {
    "loop": lambda d: (d.desc(0, 0x300000, 16, 1, 1), d.desc(1, 0x300100, 16, 1, 0), d.publish(0)),
    "self-loop": lambda d: (d.desc(5, 0x300000, 16, 1, 5), d.publish(5)),
    "next out of range": lambda d: (d.desc(0, 0x300000, 16, 1, 9999), d.publish(0)),
    "head out of range": lambda d: d.publish(4000),
    "buffer outside RAM": lambda d: (d.desc(0, 0xC000_0000, 16, 0), d.publish(0)),
    "buffer crossing the end of RAM": lambda d: (d.desc(0, MEMSIZE - 8, 16, 0), d.publish(0)),
    "indirect": lambda d: (d.desc(0, 0x300000, 16, 4), d.publish(0)),
    "readable after writable": lambda d: (d.desc(0, 0x300000, 16, 3, 1), d.desc(1, 0x300100, 16, 0), d.publish(0)),
    "avail index jump": lambda d: d.publish(0, by=1000),
    "no status byte": lambda d: (d.desc(0, 0x300000, 16, 0), d.publish(0)),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_hostile_virtqueues_put_the_device_in_error_never_crash(tmp_path, attack, caplog):
    img = make_image(tmp_path / "h.img")
    d = Driver(VirtioBlock, img)
    with caplog.at_level(logging.ERROR):
        HOSTILE[attack](d)
    assert d.inp(0x12, 1) & STATUS_NEEDS_RESET, "DEVICE_NEEDS_RESET is set"
    assert d.device.error and "virtio-blk@pci.0.3.0: " in d.device.error
    assert any("needs reset" in r.message for r in caplog.records)
    state = payload_of(d.device)
    assert state["virtio"]["error"] == d.device.error, "the error state is saved"
    d.out(0x10, 2, 0)  # further notifies do nothing
    # A reset brings it back: a good request then works.
    d.out(0x12, 1, 0)
    assert d.device.error is None and not d.inp(0x12, 1)
    d.__init__(VirtioBlock, img)
    d.memory.write(0x300000, struct.pack("<IIQ", 4, 0, 0))
    d.desc(0, 0x300000, 16, 1, 1)
    d.desc(1, 0x300100, 1, 2)
    d.publish(0)
    assert d.used_idx() == 1 and d.memory.read(0x300100, 1) == b"\0"
    d.device.close()


def test_a_hostile_guest_in_a_running_vm_gets_a_device_error_and_the_vm_runs_on(tmp_path):
    """A guest that points a queue outside RAM and loops a chain: the VM keeps running to its
    power-off, the device reports NEEDS_RESET in its status register."""
    from vmmpy.guest import assemble

    img = make_image(tmp_path / "x.img")
    source = """
.org 0x100000
start:  movabs rax, 0x80001810       ; bus 0 slot 3 BAR 0
        out32 0xcf8, rax
        in32 rbp, 0xcfc
        and rbp, 0xfffc
        lea rdx, [rbp + 0x08]
        mov rax, 0x200               ; ring at 2 MiB
        out32 rdx, rax
        mov rdi, 0x200000
        mov rax, 0x300000
        st64 [rdi], rax
        mov rax, 16
        st32 [rdi + 8], rax
        mov rax, 1                   ; NEXT -> itself
        st16 [rdi + 12], rax
        mov rax, 0
        st16 [rdi + 14], rax
        mov rax, 1
        st16 [rdi + 0x802], rax      ; avail idx 1 (ring entry 0 is head 0)
        lea rdx, [rbp + 0x10]
        mov rax, 0
        out16 rdx, rax               ; notify
        lea rdx, [rbp + 0x12]
        in8 rax, rdx
        out8 0x3f8, rax
        mov rax, 0x3400
        out16 0x404, rax
"""
    com1 = CaptureConsole()
    machine = Machine(VmConfig(name="hostile", memsize=MEMSIZE, slots=[parse_slot(f"3,virtio-blk,{img}")]), consoles={"com1": com1})
    machine.setup_memory()
    machine.load_program(assemble(source))
    machine.start(serve_control=False)
    assert run_to_end(machine) == EXIT_POWEROFF
    assert com1.output[0] & STATUS_NEEDS_RESET
    assert "descriptor loop" in machine.pci_functions[0].error


# ---- configuration and state refusals ------------------------------------------------------------


@pytest.mark.parametrize("slots, message", [
    (["3,virtio-gpu"], "unknown emulation 'virtio-gpu'"),
    (["3,virtio-blk,/nonexistent/disk.img"], "virtio-blk@pci.0.3.0: cannot open image file '/nonexistent/disk.img'"),
    (["3,virtio-blk"], "virtio-blk@pci.0.3.0: no image file given"),
    (["3,virtio-rnd,speed=9"], "virtio-rnd@pci.0.3.0: unknown option 'speed'"),
    (["3,virtio-rnd,seed=x"], "seed=x: not a whole number"),
    (["3:1,virtio-rnd"], "slot 0:3 has functions but no function 0"),
    (["3,virtio-rnd", "3,virtio-console"], "slot already holds virtio-rnd"),
    (["1:1:0,lpc"], "the LPC bridge must be on bus 0"),
])
def test_bad_configuration_is_refused_at_start_naming_the_device(slots, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        Machine(VmConfig(name="bad-config", slots=[parse_slot(s) for s in slots]))
    # Nothing was left behind: the name is free again.
    Machine(VmConfig(name="bad-config")).close()


def test_restore_refuses_a_different_disk_naming_device_and_field(tmp_path):
    a, b = make_image(tmp_path / "a.img"), make_image(tmp_path / "b.img", 128 << 10)
    memory = GuestMemory(MEMSIZE)
    host = PciHost(lambda: memory, Pins())
    saved = payload_of(VirtioBlock(host, 0, 3, 0, a))
    other = VirtioBlock(host, 0, 3, 0, b)
    before = payload_of(other)
    with pytest.raises(ValueError, match=r"virtio-blk@pci\.0\.3\.0: device: saved with an image of 512 sectors; .* has 256"):
        restore_payload(other, saved)
    assert payload_of(other) == before, "a refused restore changes nothing"
    saved["virtio"]["queues"][0]["last_avail"] = 70000
    with pytest.raises(ValueError, match="field 'last_avail' value 70000"):
        restore_payload(VirtioBlock(host, 0, 3, 0, a), saved)


def test_static_registry_knows_every_device_section_from_the_classes(tmp_path):
    img = make_image(tmp_path / "r.img")
    config = VmConfig(name="reg", slots=[parse_slot(s) for s in ("0,hostbridge", "1,lpc", f"3,virtio-blk,{img}", "4,virtio-rnd", "5,virtio-console")])
    registry = static_registry(config)
    machine = Machine(config)
    try:
        assert {d.name: d.STATE.VERSION for d in machine.devices} == machine.device_sections()
        for device in machine.devices:
            registry.check(device.name, device.STATE.VERSION, what="test")
    finally:
        machine.close()


# ---- through vmmrun and vmmctl -----------------------------------------------------------------------


@pytest.mark.covers(operation="suspend", guest="blktest", device="virtio-blk", via="cli")
def test_vmmrun_suspends_a_blktest_guest_and_resumes_it_with_the_disk(tmp_path):
    import json
    import subprocess

    from .procs import start_vmmrun, stop, vmmctl, vmmrun_cmd, wait_for_socket, wait_for_state

    img = make_image(tmp_path / "disk.img", 1 << 20)
    console = tmp_path / "console.log"
    slots = ["-s", "0,hostbridge", "-s", "1,lpc", "-s", f"3,virtio-blk,{img}"]
    probe = make_image(tmp_path / "probe.img", 1 << 20)  # the same disk, for the in-process run
    at, first_line = pause_in_write_pass("blktest", [s.replace(img, probe) for s in slots[1::2]])
    proc = start_vmmrun(tmp_path, "--guest", "blktest", "-m", "8M", *slots, "-l", f"com1,{console}", f"--pause-at={at}", "blk0")
    try:
        wait_for_socket(tmp_path, "blk0", proc)
        wait_for_state(tmp_path, "blk0", "paused")
        ckp = tmp_path / "blk0.ckp"
        saved = vmmctl(tmp_path, "--vm=blk0", f"--suspend={ckp}", "--json")
        assert saved.returncode == 0, saved.stderr
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)
    assert console.read_text() == first_line, "suspended halfway through the write pass"
    meta = json.loads((tmp_path / "blk0.ckp.meta").read_text())
    assert "virtio-blk@pci.0.3.0" in json.dumps(meta)
    missing = subprocess.run(vmmrun_cmd("-r", str(ckp), "-s", "0,hostbridge", "-s", "1,lpc", "-l", f"com1,{console}",
                                        "--run-dir", str(tmp_path), "blk0"), capture_output=True, text=True, timeout=120)
    assert missing.returncode == 4 and "virtio-blk@pci.0.3.0" in missing.stderr
    resumed = subprocess.run(vmmrun_cmd("-r", str(ckp), *slots, "-l", f"com1,{console}", "--run-dir", str(tmp_path), "blk0"),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 1, resumed.stderr
    sectors = (1 << 20) // 512
    assert f"all match, digest 0x{blktest.reference_digest(1, sectors):016x}\n" in console.read_text()
    assert open(img, "rb").read() == blktest.reference_image(1, sectors)


def test_vmmrun_refuses_a_missing_image_at_start(tmp_path):
    import subprocess

    from .procs import vmmrun_cmd

    result = subprocess.run(vmmrun_cmd("--guest", "blktest", "-m", "8M", "-s", "3,virtio-blk,/no/such.img",
                                       "--run-dir", str(tmp_path), "nodisk"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 4
    assert "virtio-blk@pci.0.3.0: cannot open image file '/no/such.img'" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_console_file_on_a_full_disk_drops_output_and_says_so_once(capsys):
    from vmmpy.devices.uart import FileConsole

    console = FileConsole("/dev/full")  # every write fails with ENOSPC, as on a full disk
    console.write(b"hello")
    console.write(b", world")
    assert console.dropped == 12 and console.error is not None
    err = capsys.readouterr().err
    assert err.count("/dev/full") == 1 and "No space left on device" in err and "keeps running" in err
    console.close()
