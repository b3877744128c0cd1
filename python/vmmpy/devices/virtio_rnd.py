"""virtio-rnd: an entropy source (bhyve's pci_virtio_rnd.c).

``-s SLOT,virtio-rnd[,seed=N]``. One queue of 64 entries; every chain must be device-writable
only, and the device fills all of it. The bytes come from the host's ``os.urandom``; with
``seed=N`` they come instead from a deterministic xorshift64* stream (state started at
``splitmix64(N)``, each step ``x ^= x >> 12; x ^= x << 25; x ^= x >> 27``, output
``x * 0x2545F4914F6CDD1D`` as 8 little-endian bytes), so tests and replays see the same bytes.
A seeded stream is not entropy: use it only to make runs reproducible.

Saved state (beside the PCI and virtio state): whether it is seeded, and the stream's state
and the unused tail of its last 8-byte output, so a restored device continues the stream
exactly. A restore refuses a seeded state into an unseeded device and the reverse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from .pci import PciConfigError, PciHost, PciState, parse_options
from .virtio import VirtioError, VirtioPciDevice, VirtioState, Virtqueue

MASK64 = (1 << 64) - 1
XORSHIFT_MULTIPLIER = 0x2545F4914F6CDD1D
QUEUE_SIZE = 64


def splitmix64(seed: int) -> int:
    z = (seed + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


class SeededStream:
    """The deterministic byte stream ``seed=N`` selects."""

    def __init__(self, seed: int) -> None:
        self.state = splitmix64(seed) or 1
        self.tail = b""

    def read(self, n: int) -> bytes:
        out = bytearray(self.tail[:n])
        self.tail = self.tail[n:]
        x = self.state
        while len(out) < n:
            x ^= x >> 12
            x ^= (x << 25) & MASK64
            x ^= x >> 27
            word = ((x * XORSHIFT_MULTIPLIER) & MASK64).to_bytes(8, "little")
            take = min(8, n - len(out))
            out += word[:take]
            self.tail = word[take:]
        self.state = x
        return bytes(out)


@dataclass
class RandomDeviceState:
    seeded: bool
    stream_state: int
    stream_tail: bytes


@dataclass
class VirtioRandomState:
    VERSION: ClassVar[int] = 1
    MIN_VERSION: ClassVar[int] = 1

    pci: PciState
    virtio: VirtioState
    device: RandomDeviceState


class VirtioRandom(VirtioPciDevice):
    EMULATION = "virtio-rnd"
    DEVICE_ID = 0x1005
    SUBSYSTEM_ID = 4  # virtio device type: entropy
    CLASS = 0x10  # encryption/decryption controller, as bhyve
    SUBCLASS = 0x80
    STATE = VirtioRandomState
    QUEUE_SIZES = (QUEUE_SIZE,)
    OPTIONS_HELP = "[seed=N]"

    def __init__(self, host: PciHost, bus: int, slot: int, func: int, conf: str | None = None) -> None:
        super().__init__(host, bus, slot, func, conf)
        options = parse_options(self.name, conf, keys=("seed",))
        self.seed: int | None = None
        if "seed" in options:
            try:
                self.seed = int(options["seed"], 0)
            except ValueError:
                raise PciConfigError(f"{self.name}: seed={options['seed']}: not a whole number") from None
            if not 0 <= self.seed <= MASK64:
                raise PciConfigError(f"{self.name}: seed={options['seed']}: must be 0 .. 2^64-1")
        self.stream = SeededStream(self.seed) if self.seed is not None else None
        self.bytes_given = 0

    def random_bytes(self, n: int) -> bytes:
        return self.stream.read(n) if self.stream is not None else os.urandom(n)

    def process_queue(self, queue: Virtqueue) -> None:
        completed = 0
        try:
            while (chain := queue.pop()) is not None:
                if chain.readable:
                    raise VirtioError(f"{self.name}: chain at head {chain.head} has device-readable buffers; an entropy request is writable only")
                written = queue.scatter(chain.writable, self.random_bytes(chain.writable_len))
                self.bytes_given += written
                queue.push(chain.head, written)
                completed += 1
        finally:
            self.signal(queue, completed)

    def save_device(self) -> RandomDeviceState:
        if self.stream is None:
            return RandomDeviceState(seeded=False, stream_state=0, stream_tail=b"")
        return RandomDeviceState(seeded=True, stream_state=self.stream.state, stream_tail=self.stream.tail)

    def restore_device(self, state: RandomDeviceState) -> None:
        where = f"{self.name}: device"
        if state.seeded != (self.stream is not None):
            raise ValueError(f"{where}: saved {'with' if state.seeded else 'without'} a seed; configured "
                             f"{'with' if self.stream is not None else 'without'} one (the 'seed' option)")
        if self.stream is not None:
            if not 1 <= state.stream_state <= MASK64 or len(state.stream_tail) >= 8:
                raise ValueError(f"{where}: stream state {state.stream_state:#x} / tail of {len(state.stream_tail)} bytes is not a valid xorshift state")
            self.stream.state, self.stream.tail = state.stream_state, bytes(state.stream_tail)
