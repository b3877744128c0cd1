"""virtio-net: nettest exchanges frames with an echo peer over UDP on loopback and prints the
reference digest; a run paused mid-traffic, moved into a fresh machine (sections + memory)
finishes identically; hostile rings break the device, not the VMM; a bad peer is refused."""

import logging
import socket
import struct
import threading
import time

import pytest

from vmmpy import Vm
from vmmpy.devices.uart import CaptureConsole
from vmmpy.devices.virtio import STATUS_NEEDS_RESET, vring_size
from vmmpy.devices.virtio_net import VirtioNet
from vmmpy.guest.programs import nettest
from vmmpy.memory import GuestMemory
from vmmpy.runtime.config import ConfigError, VmConfig, parse_slot
from vmmpy.runtime.process import EXIT_POWEROFF, Machine

from .device_state import payload_of, restore_payload
from .inproc import move_to_fresh_machine, paused_or_ended, run_to_end
from .test_devices import MEMSIZE, Pins, build

NET = "virtio-net@pci.0.4.0"


class EchoPeer:
    """A UDP responder on loopback: every datagram goes back to its sender unchanged (after
    ``delay`` seconds)."""

    def __init__(self, delay=0.0):
        self.delay = delay
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.frames = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.frames += 1
            time.sleep(self.delay)
            self.sock.sendto(data, addr)

    def close(self):
        self.stopping.set()
        self.thread.join()
        self.sock.close()


@pytest.fixture
def peer():
    p = EchoPeer()
    yield p
    p.close()


def test_nettest_exchanges_frames_with_an_echo_peer(peer):
    slot = f"4,virtio-net,peer=127.0.0.1:{peer.port},mac=02:00:00:00:00:2a"
    machine, com1 = build("net-echo", ["0,hostbridge", slot], "nettest", {"frames": "20", "payload": "200"})
    machine.start(serve_control=False)
    assert run_to_end(machine) == EXIT_POWEROFF
    assert com1.output.decode() == nettest.reference_output(bytes.fromhex("02000000002a"), 20, 200)
    device = machine.pci_functions[1]
    assert peer.frames == 20 and device.stats["tx_frames"] == 20 and device.stats["rx_frames"] == 20


def test_the_default_mac_comes_from_the_slot(peer):
    machine, com1 = build("net-mac", [f"4,virtio-net,peer=localhost:{peer.port}"], "nettest", {"frames": "3", "payload": "8"})
    machine.start(serve_control=False)
    assert run_to_end(machine) == EXIT_POWEROFF
    assert com1.output.decode() == nettest.reference_output(bytes.fromhex("02766d000400"), 3, 8)


def start_paused_at(start, fraction: float, total: int, attempts: int = 3):
    """A machine and its console from ``start()``, paused at ``fraction`` of a run ``total``
    instructions long. How often the guest polls for an echo depends on when the peer answers
    (host timing), so a run's length varies: by about +-20 % on a quiet machine, and by more
    than 9x under a compiler's load (a slow reference run made a later run end before 0.11 of
    it). A run that ends before its pause point tells its own length, and the next attempt
    pauses at the fraction of that."""
    for _ in range(attempts):
        machine, console = start()
        machine.pause_at = int(total * fraction)
        machine.start(serve_control=False)
        if paused_or_ended(machine):
            return machine, console
        run_to_end(machine)
        total = machine.vm.vcpus[0].instructions_retired
    pytest.fail(f"the guest ended before {fraction} of its run {attempts} times")


# Pause points stay within the first third of the reference run.
@pytest.mark.covers(operation="state-move", guest="nettest", device="virtio-net", via="machine")
@pytest.mark.parametrize("fractions", [(0.11, 0.22, 0.33)])
def test_a_run_paused_mid_traffic_and_restored_elsewhere_finishes_identically(peer, fractions):
    slots = ["0,hostbridge", "1,lpc", f"4,virtio-net,peer=127.0.0.1:{peer.port}"]
    args = {"frames": "30", "payload": "512"}
    machine, com1 = build("net-ref", slots, "nettest", args)
    machine.start(serve_control=False)
    assert run_to_end(machine) == EXIT_POWEROFF
    reference = bytes(com1.output)
    total = machine.vm.vcpus[0].instructions_retired
    assert reference.decode() == nettest.reference_output(bytes.fromhex("02766d000400"), 30, 512)
    for fraction in fractions:
        tag = f"net-{int(fraction * 100)}"
        source, com1 = start_paused_at(lambda: build(tag, slots, "nettest", args), fraction, total)
        before = bytes(com1.output)
        assert b"echoed" not in before, "paused mid-traffic"
        sent = next(f for f in source.pci_functions if isinstance(f, VirtioNet)).stats["tx_frames"]
        assert 0 < sent < 30, f"paused at {fraction} of the run after {sent} of 30 frames: not mid-traffic"
        com1b = CaptureConsole()
        config = VmConfig(name=f"{tag}-dst", memsize=MEMSIZE, slots=[parse_slot(s) for s in slots])
        target = move_to_fresh_machine(source, config, {"com1": com1b})
        assert run_to_end(target) == EXIT_POWEROFF
        assert before + bytes(com1b.output) == reference, f"paused at {fraction} of the run"


def test_frames_pending_at_a_save_travel_in_the_state_and_are_delivered_after_restore(peer):
    """Frames the host received but the guest has not taken are saved and restored in order."""
    memory = GuestMemory(MEMSIZE)
    from vmmpy.devices.pci import PciHost

    host = PciHost(lambda: memory, Pins())
    a = VirtioNet(host, 0, 4, 0, f"peer=127.0.0.1:{peer.port}")
    frames = [bytes([i]) * 60 for i in range(1, 4)]
    for f in frames:
        a.receive_frame(f)
    a.set_link(False)
    state = payload_of(a)
    assert state["device"]["pending"] == frames and state["device"]["link_up"] is False
    b = VirtioNet(host, 0, 4, 0, f"peer=127.0.0.1:{peer.port}")
    restore_payload(b, state)
    assert list(b.pending) == frames and not b.link_up and b.config_bytes()[6:] == b"\0\0"
    other = VirtioNet(host, 0, 4, 0, f"peer=127.0.0.1:{peer.port},mac=02:00:00:00:00:01")
    before = payload_of(other)
    with pytest.raises(ValueError, match=r"virtio-net@pci\.0\.4\.0: device: saved with mac 02:76:6d:00:04:00"):
        restore_payload(other, state)
    assert payload_of(other) == before, "a refused restore changes nothing"
    for d in (a, b, other):
        d.close()


def first_transmit(slots, args):
    """vCPU 0's instruction count at the guest's first transmit notify (before it nothing waits
    on the host, so it is the same on every run) and the console of a whole run."""
    with Vm("nettest", args=args, memory="16M", slots=slots) as vm:
        device, cpu = vm.machine.pci_functions[-1], vm.machine.vm.vcpus[0]
        seen = []
        real = device.notify

        def spy(queue):  # runs on the vCPU's thread, in the exit: the count is readable
            if queue == 1 and not seen:
                seen.append(cpu.instructions_retired)
            return real(queue)

        device.notify = spy
        vm.start()
        assert vm.wait(60) == 1
        return seen[0], vm.console


@pytest.fixture
def slow_peer():
    p = EchoPeer(delay=0.02)  # the echo comes after the transmit's exit, while the guest stands still
    yield p
    p.close()


@pytest.mark.parametrize("move", ["checkpoint", "migrate"])
def test_a_guest_stopped_at_its_pause_point_keeps_the_frame_its_peer_already_answered(slow_peer, tmp_path, move):
    """The guest stops itself (pause_at, vmmrun --pause-at) just after its first transmit; the
    peer's echo is in the device's socket, not yet in the guest. A checkpoint or migration
    taken then must quiesce the device, which takes the echo into the saved state: it used to
    skip that for a guest already paused, so the echo stayed in the old socket and the moved
    guest waited for it for ever."""
    slots = ["0,hostbridge", "1,lpc", f"4,virtio-net,peer=127.0.0.1:{slow_peer.port}"]
    args = {"frames": "3", "payload": "64"}
    at, expected = first_transmit(slots, args)
    slow_peer.frames = 0
    with Vm("nettest", args=args, memory="16M", slots=slots) as source:
        source.start(pause_at=at + 1)
        deadline = time.monotonic() + 30
        while source.state != "paused" or slow_peer.frames < 1:  # not wait_paused: that pauses the devices itself
            assert time.monotonic() < deadline, "the guest did not stop after its first transmit"
            time.sleep(0.001)
        time.sleep(0.05)  # the echo is back in the device's socket
        device = source.machine.pci_functions[-1]
        assert (device.stats["tx_frames"], device.stats["rx_frames"]) == (1, 0), "stopped before the echo was taken in"
        if move == "checkpoint":
            source.checkpoint(tmp_path / "net.ckp")
            first = source.console
            source.close()
            target = Vm.restore(tmp_path / "net.ckp", slots=slots)
            target.start()
        else:
            target = Vm.receive(memory="16M", slots=slots)
            source.migrate(*target.address, live=False)
            target.received(30)
            first = source.console
    with target:
        assert target.wait(20) == 1, "the guest on the other side never got the echo"
        assert target.machine.pci_functions[-1].stats["rx_frames"] == 3
        assert first + target.console == expected


# ---- hostile rings -----------------------------------------------------------------------------------


class NetDriver:
    """Sets up one queue of a bare virtio-net and publishes crafted chains on it."""

    def __init__(self, port, queue):
        self.memory = GuestMemory(MEMSIZE)
        from vmmpy.devices.pci import PciHost

        self.host = PciHost(lambda: self.memory, Pins())
        self.device = VirtioNet(self.host, 0, 3, 0, f"peer=127.0.0.1:{port}")
        self.device.set_bar_address(0, 0x2000)
        self.device.cfg_write(0x04, 2, 0x5)
        self.queue = queue
        self.ring = 0x200000
        self.size = self.device.queues[queue].size
        self.avail = self.ring + vring_size(self.size)[0]
        self.used = self.ring + vring_size(self.size)[1]
        self.out(0x12, 1, 0)
        self.out(0x12, 1, 3)
        self.out(0x0E, 2, queue)
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
        self.out(0x10, 2, self.queue)

    def used_idx(self):
        return struct.unpack("<H", self.memory.read(self.used + 2, 2))[0]


TX_HOSTILE = {
    "loop": lambda d: (d.desc(0, 0x300000, 16, 1, 1), d.desc(1, 0x300100, 16, 1, 0), d.publish(0)),
    "next out of range": lambda d: (d.desc(0, 0x300000, 16, 1, 9999), d.publish(0)),
    "head out of range": lambda d: d.publish(4000),
    "buffer outside RAM": lambda d: (d.desc(0, 0xC000_0000, 64, 0), d.publish(0)),
    "indirect": lambda d: (d.desc(0, 0x300000, 16, 4), d.publish(0)),
    "avail index jump": lambda d: d.publish(0, by=1000),
    "writable transmit buffer": lambda d: (d.desc(0, 0x300000, 64, 2), d.publish(0)),
    "shorter than the header": lambda d: (d.desc(0, 0x300000, 6, 0), d.publish(0)),
}
RX_HOSTILE = {
    "readable receive buffer": lambda d: (d.desc(0, 0x300000, 2048, 0), d.publish(0)),
    "receive buffer shorter than the header": lambda d: (d.desc(0, 0x300000, 4, 2), d.publish(0)),
    "readable after writable": lambda d: (d.desc(0, 0x300000, 16, 3, 1), d.desc(1, 0x300100, 16, 0), d.publish(0)),
    "receive buffer outside RAM": lambda d: (d.desc(0, MEMSIZE - 8, 2048, 2), d.publish(0)),
}


@pytest.mark.parametrize("attack", sorted(TX_HOSTILE) + sorted(RX_HOSTILE))
def test_hostile_rings_put_the_device_in_error_never_crash(peer, attack, caplog):
    queue = 1 if attack in TX_HOSTILE else 0
    d = NetDriver(peer.port, queue)
    if queue == 0:
        d.device.receive_frame(b"\xff" * 60)  # a frame waiting, so the receive chain is taken
    with caplog.at_level(logging.ERROR):
        (TX_HOSTILE.get(attack) or RX_HOSTILE[attack])(d)
    assert d.inp(0x12, 1) & STATUS_NEEDS_RESET
    assert d.device.error and "virtio-net@pci.0.3.0: " in d.device.error
    assert payload_of(d.device)["virtio"]["error"] == d.device.error
    d.out(0x12, 1, 0)
    assert d.device.error is None
    d.device.close()
    # After a reset a good frame goes out and its echo comes back.
    d = NetDriver(peer.port, 1)
    frame = bytes(10) + b"\xff" * 6 + b"\x02" * 6 + b"\x88\xb5" + b"hello, peer!"
    d.memory.write(0x300000, frame)
    d.desc(0, 0x300000, len(frame), 0)
    d.publish(0)
    assert d.used_idx() == 1 and d.device.stats["tx_frames"] == 1
    d.device.pause()  # takes in the echo
    assert list(d.device.pending) == [frame[10:]]
    d.device.close()


def test_an_oversized_frame_is_dropped_and_the_buffer_returned_empty(peer):
    d = NetDriver(peer.port, 0)
    d.device.receive_frame(b"\x01" * 100)
    d.desc(0, 0x300000, 64, 2)
    d.publish(0)
    assert d.used_idx() == 1 and d.device.error is None
    assert struct.unpack("<II", d.memory.read(d.used + 4, 8)) == (0, 0)
    assert d.device.stats["rx_dropped"] == 1
    d.device.close()


@pytest.mark.parametrize("conf, message", [
    ("virtio-net", "virtio-net@pci.0.4.0: no peer given"),
    ("virtio-net,mac=02:00:00:00:00:01", "virtio-net@pci.0.4.0: no peer given"),
    ("virtio-net,peer=127.0.0.1", "peer=127.0.0.1: expected HOST:PORT"),
    ("virtio-net,peer=127.0.0.1:99999", "port 99999 is not in 1..65535"),
    ("virtio-net,peer=127.0.0.1:x", "port 'x' is not a number"),
    ("virtio-net,peer=no-such-host.invalid:9", "cannot resolve 'no-such-host.invalid'"),
    ("virtio-net,peer=127.0.0.1:9,mac=01:00:00:00:00:01", "is a multicast address"),
    ("virtio-net,peer=127.0.0.1:9,mac=zz", "mac=zz: expected six hex bytes"),
    ("virtio-net,127.0.0.1:9", "unknown option '127.0.0.1:9'"),
])
def test_a_missing_or_bad_peer_is_refused_at_start(conf, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        Machine(VmConfig(name="bad-net", slots=[parse_slot(f"4,{conf}")]))
    Machine(VmConfig(name="bad-net")).close()


def test_nettest_without_a_device_says_so():
    machine, com1 = build("net-none", ["0,hostbridge"], "nettest", {})
    machine.start(serve_control=False)
    assert run_to_end(machine) == EXIT_POWEROFF
    assert com1.output.decode() == "nettest: no virtio-net device on PCI bus 0\n"
