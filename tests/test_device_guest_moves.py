"""Every device guest carried through each way a guest leaves its machine ends exactly as a run
that was never stopped: checkpointed mid-I/O and restored eagerly or lazily (the source running
on to its end too), migrated warm, and migrated live with the guest doing I/O after round 0 has
gone out. The proof is the guest's whole end: exit status, final memory, every vCPU's registers
and instruction count, the console (the pieces each machine printed, joined), what the device
wrote out (virtio-console's file, the disk image). Both ends are ``vmmpy.Vm``s in this process, a
migration goes over loopback, and the disk image and the echo peer are shared by both ends, as
bhyve requires of a migration's storage.

A few cases add the AMD vendor or a second vCPU (the application processor waits for a STARTUP
IPI the drivers never send, so its state travels untouched), a key, parallel streams or LZ4
batches; memtouch, the guest that dirties pages fastest, is migrated live and checkpointed too.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmmpy import Vm

from .test_devices import make_image

MEMORY = "32M"
KEY = b"device-guest-moves-key"
DISK = 1 << 20  # a 1 MiB disk: about 6 M instructions of writes and reads


@dataclass(frozen=True)
class Guest:
    slot: str  # its device's -s option: {img} a disk image, {out} a file, {peer} the echo peer's port
    args: dict[str, str] = field(default_factory=dict)
    # nettest waits for echoes by polling, so how many instructions a run takes is the host's
    # timing (its memory, registers, console and digest are still exact).
    exact_count: bool = True

    @property
    def device(self) -> str:
        return self.slot.split(",")[1] if self.slot else "none"


GUESTS = {
    "blktest": Guest("3,virtio-blk,{img}"),
    "nvmetest": Guest("5,nvme,{img}"),
    "ahcitest": Guest("6,ahci-hd,{img}"),
    "scsitest": Guest("4,virtio-scsi,{img}"),
    "rndtest": Guest("4,virtio-rnd,seed=7", {"bytes": "1M", "chunk": "256", "batch": "3"}),
    "vconsole": Guest("5,virtio-console,{out}", {"lines": "1500"}),
    "nettest": Guest("4,virtio-net,peer=127.0.0.1:{peer}", {"frames": "80", "payload": "512"}, exact_count=False),
    "memtouch": Guest("", {"wss": "8M", "pattern": "random", "writes": "400000", "report": "100000"}),
}


@dataclass(frozen=True)
class End:
    """How a guest ended."""

    status: int
    console: str
    output: bytes  # what virtio-console wrote to its file
    disk: str  # SHA-256 of the disk image
    memory: str  # SHA-256 of lowmem
    registers: tuple  # every vCPU's
    instructions: tuple | None  # every vCPU's instructions retired; None where the run's length is the host's


class Place:
    """The files one machine's devices use, and its -s options."""

    def __init__(self, directory: Path, tag: str, guest: Guest, peer: EchoProcess | None) -> None:
        self.image = directory / f"{tag}.img"
        self.out = directory / f"{tag}.out"
        make_image(self.image, DISK)
        device = [guest.slot.format(img=self.image, out=self.out, peer=peer.port if peer else 0)] if guest.slot else []
        self.slots = ["0,hostbridge", "1,lpc", *device]

    def copy_to(self, other: Place) -> None:
        """What the operator copies with a checkpoint: the disk as it is now, the console file."""
        shutil.copyfile(self.image, other.image)
        if self.out.exists():
            shutil.copyfile(self.out, other.out)


def end_of(vm: Vm, guest: Guest, place: Place, console_before: str = "") -> End:
    status = vm.wait(120)
    assert status is not None, "the guest did not stop in time"
    view = vm.machine.vm.memory.view("lowmem")
    try:
        memory = hashlib.sha256(view).hexdigest()
    finally:
        del view
    cpus = vm.machine.vm.vcpus
    return End(status, console_before + vm.console, place.out.read_bytes() if place.out.exists() else b"",
               hashlib.sha256(place.image.read_bytes()).hexdigest(), memory, tuple(cpu.registers() for cpu in cpus),
               tuple(cpu.instructions_retired for cpu in cpus) if guest.exact_count else None)


class EchoProcess:
    """The echo peer in a process of its own: every datagram goes back to its sender unchanged.
    In this process (``EchoPeer``, a thread) each echo waited for the interpreter lock the
    polling vCPU thread holds, so a run of nettest took 3-10 s and 3-7 M instructions on one
    machine, and a pause point taken from one run could lie past the end of the next; answered
    by a process, runs take about 0.1 s and agree within 1 %."""

    SCRIPT = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.bind(('127.0.0.1', 0))\n"
        "print(s.getsockname()[1], flush=True)\n"
        "while True:\n"
        "    data, addr = s.recvfrom(65536)\n"
        "    s.sendto(data, addr)\n"
    )

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.SCRIPT], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # ends when the process does, if it fails to start
        if not line.strip().isdigit():
            self.close()
            raise RuntimeError(f"the echo process did not start (it printed {line!r})")
        self.port = int(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture
def peer():
    p = EchoProcess()
    yield p
    p.close()


_references: dict[tuple, tuple[End, int]] = {}


def reference(tmp_path: Path, name: str, cpus: int, vendor: str, peer: EchoProcess) -> tuple[End, int]:
    """The uninterrupted run's end and vCPU 0's instruction count (run once per configuration)."""
    key = (name, cpus, vendor)
    if key not in _references:
        guest = GUESTS[name]
        place = Place(tmp_path, "reference", guest, peer)
        with Vm(name, args=guest.args, memory=MEMORY, cpus=cpus, vendor=vendor, slots=place.slots) as vm:
            vm.start()
            end = end_of(vm, guest, place)
            total = vm.machine.vm.vcpus[0].instructions_retired
        assert end.status == 1, end.console
        assert "MISMATCH" not in end.console and "failed" not in end.console and "short" not in end.console, end.console
        _references[key] = (end, total)
    return _references[key]


def case(name: str, how: str, *, cpus: int = 1, vendor: str = "intel", key: bool = False, streams: int = 1,
         compress: str = "off"):
    """One case and the combination it proves; ``key``, ``streams`` and ``compress`` are the
    migration's options (``key`` also a checkpoint's)."""
    guest = GUESTS[name]
    common = {"guest": name, "device": guest.device, "via": "api", "vcpus": cpus, "vendor": vendor, "key": key}
    if how.startswith("checkpoint"):
        mark = pytest.mark.covers(operation="checkpoint", restore=how.split("-")[1], **common)
    else:
        mark = pytest.mark.covers(operation=f"migrate-{how}", streams=streams, compress=compress, **common)
    extras = [vendor] * (vendor != "intel") + [f"{cpus}cpus"] * (cpus > 1) + ["key"] * key + [f"{streams}streams"] * (streams > 1)
    extras += [compress] * (compress != "off")
    link = {"key": KEY if key else None, "params": {"streams": streams, "compress": compress}}
    return pytest.param(name, how, cpus, vendor, link, id="-".join([name, how, *extras]), marks=mark)


HOWS = ("checkpoint-eager", "checkpoint-lazy", "warm", "live")
CASES = [case(name, how) for name in GUESTS if name != "memtouch" for how in HOWS] + [
    case("blktest", "live", vendor="amd", key=True),
    case("nvmetest", "checkpoint-lazy", vendor="amd", key=True),
    case("scsitest", "warm", cpus=2, streams=2),
    case("ahcitest", "live", cpus=2, compress="lz4"),
    case("nettest", "warm", vendor="amd", cpus=2),
    case("vconsole", "checkpoint-eager", cpus=2),
    case("rndtest", "live", streams=3, key=True),
    case("memtouch", "live", vendor="amd", cpus=2, compress="lz4"),
    case("memtouch", "checkpoint-lazy"),
] + [
    # Post-copy at round 0: the guest runs on at the destination before any page is there, so its
    # device's DMA (reads of the disk into guest memory, writes from it) hits pages not fetched yet.
    pytest.param(name, "postcopy", 1, "intel", {"key": None, "params": {"streams": 1, "compress": "off", "postcopy": "after=0"}},
                 id=f"{name}-postcopy", marks=pytest.mark.covers(operation="migrate-live", guest=name, device=GUESTS[name].device,
                                                                 via="api", postcopy="round0"))
    for name in ("blktest", "nvmetest")
]


@pytest.mark.parametrize("name, how, cpus, vendor, link", CASES)
def test_a_device_guest_moved_mid_io_ends_as_an_uninterrupted_run(tmp_path, peer, name, how, cpus, vendor, link):
    guest = GUESTS[name]
    expected, total = reference(tmp_path, name, cpus, vendor, peer)
    machine = {"memory": MEMORY, "cpus": cpus, "vendor": vendor}
    here = Place(tmp_path, "source", guest, peer)
    with Vm(name, args=guest.args, slots=here.slots, **machine) as source:
        source.start(pause_at=total * 3 // 10)
        source.wait_paused(60)
        if how.startswith("checkpoint"):
            source.checkpoint(tmp_path / "vm.ckp", key=link["key"])
            first = source.console
            there = Place(tmp_path, "restored", guest, peer)
            here.copy_to(there)
            source.resume()  # a checkpoint lets the guest run on: it ends as if never saved too
            assert end_of(source, guest, here) == expected
            with Vm.restore(tmp_path / "vm.ckp", mode=how.split("-")[1], key=link["key"], slots=there.slots) as restored:
                assert (restored.config.ncpus, restored.config.vendor) == (cpus, vendor)
                restored.start()
                assert end_of(restored, guest, there, first) == expected
            return
        with Vm.receive(slots=here.slots, key=link["key"], **machine) as destination:
            if how == "warm":
                stats = source.migrate(*destination.address, live=False, **link)
            elif how == "postcopy":
                stats = source.migrate(*destination.address, live=True, **link)
                pc = stats.postcopy
                assert pc["after_rounds"] == 0 and pc["requested_pages"] + pc["pushed_pages"] == pc["pages_needed"] > 0
            else:
                stats = migrate_live(source, destination, total, link)
            assert stats.status == "completed" and destination.received(60).status == "completed"
            wanted = link["params"]
            assert (stats.streams, stats.compression or "off") == (wanted["streams"], wanted["compress"]), "the options were used"
            if how == "postcopy":
                assert destination.received(1).postcopy["requested_pages"] > 0, "the guest ran before its memory was all there"
            assert source.wait(10) == 0, "the source exits 0 once the guest runs there"
            got = end_of(destination, guest, here, source.console)
    assert got == expected


def migrate_live(source: Vm, destination: Vm, total: int, link: dict):
    """Live: round 0 sends all memory with the guest held at 30 % of its run; then, while the
    migration waits on, the guest runs to 60 % (doing I/O, its device writing guest memory) and
    stops itself there, where the migration switches over (a running vCPU cannot be read from
    another thread, and a guest left to run could finish before a loaded host switches over).
    The rounds after round 0 must carry every page the guest and its device wrote."""
    machine = source.machine

    def after_round(stats) -> None:
        if stats.status != "active" or machine.pause_at is not None:
            return
        machine.pause_at = total * 6 // 10
        source.resume()
        deadline = time.monotonic() + 60
        while not machine.paused:
            assert time.monotonic() < deadline, "the guest did not get to 60 % of its run"
            time.sleep(0.001)

    stats = source.migrate(*destination.address, live=True, progress=after_round, **link)
    assert stats.live and not stats.rounds[0].final and stats.rounds[-1].final
    assert sum(r.pages_dirtied for r in stats.rounds[1:]) > 0, "the guest's I/O after round 0 dirtied pages"
    return stats
