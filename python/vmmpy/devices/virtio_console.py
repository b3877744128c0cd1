"""virtio-console: a console port over virtio (bhyve's pci_virtio_console.c, one port).

``-s SLOT,virtio-console[,stdio|PATH]``: the port's output goes to stdout or is appended to a
file, as ``-l com1,...`` does for the UART; without a backend output is discarded. Input (from
a terminal on stdio, or :meth:`VirtioConsole.receive`) waits in a 4 KiB buffer until the driver
has receive buffers; more than that is dropped, as a UART overrun would.

Queues: 0 receiveq (device-writable buffers the device fills with input), 1 transmitq
(device-readable buffers whose bytes go to the backend), 64 entries each. No features
(no MULTIPORT, no SIZE); configuration: cols (u16), rows (u16), max_nr_ports (u32) = 0, 0, 1.

Saved state (beside the PCI and virtio state): the input bytes not yet delivered. Output
already written to the backend belongs to the backend. Pause flushes the backend.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .pci import PciConfigError, PciHost, PciState, parse_options
from .uart import ConsoleBackend, FileConsole, StdioConsole
from .virtio import VirtioError, VirtioPciDevice, VirtioState, Virtqueue

QUEUE_SIZE = 64
RECEIVEQ, TRANSMITQ = 0, 1
INPUT_LIMIT = 4096


@dataclass
class ConsoleDeviceState:
    pending_input: bytes


@dataclass
class VirtioConsoleState:
    VERSION: ClassVar[int] = 1
    MIN_VERSION: ClassVar[int] = 1

    pci: PciState
    virtio: VirtioState
    device: ConsoleDeviceState


class VirtioConsole(VirtioPciDevice):
    EMULATION = "virtio-console"
    DEVICE_ID = 0x1003
    SUBSYSTEM_ID = 3  # virtio device type: console
    CLASS = 0x07  # simple communication controller
    SUBCLASS = 0x80  # other
    STATE = VirtioConsoleState
    QUEUE_SIZES = (QUEUE_SIZE, QUEUE_SIZE)
    CONFIG_SIZE = 8
    OPTIONS_HELP = "[stdio|PATH]"

    def __init__(self, host: PciHost, bus: int, slot: int, func: int, conf: str | None = None) -> None:
        super().__init__(host, bus, slot, func, conf)
        options = parse_options(self.name, conf, positional="backend")
        self.backend: ConsoleBackend | None = None
        spec = options.get("backend")
        if spec == "stdio":
            self.backend = StdioConsole(self.receive)
        elif spec:
            try:
                self.backend = FileConsole(spec)
            except OSError as err:
                raise PciConfigError(f"{self.name}: cannot open console file {spec!r}: {err.strerror}") from None
        self.pending_input = bytearray()
        self.bytes_out = 0

    def config_bytes(self) -> bytes:
        return struct.pack("<HHI", 0, 0, 1)

    def process_queue(self, queue: Virtqueue) -> None:
        if queue.index == TRANSMITQ:
            self._transmit(queue)
        else:
            self._fill_receive(queue)

    def _transmit(self, queue: Virtqueue) -> None:
        completed = 0
        try:
            while (chain := queue.pop()) is not None:
                if chain.writable:
                    raise VirtioError(f"{self.name}: transmit chain at head {chain.head} has device-writable buffers")
                data = queue.gather(chain.readable)
                if data and self.backend is not None:
                    self.backend.write(data)
                self.bytes_out += len(data)
                queue.push(chain.head, 0)
                completed += 1
        finally:
            self.signal(queue, completed)

    def _fill_receive(self, queue: Virtqueue) -> None:
        completed = 0
        try:
            while self.pending_input and queue.pending():
                chain = queue.pop()
                if chain.readable:
                    raise VirtioError(f"{self.name}: receive chain at head {chain.head} has device-readable buffers")
                written = queue.scatter(chain.writable, bytes(self.pending_input[: chain.writable_len]))
                del self.pending_input[:written]
                queue.push(chain.head, written)
                completed += 1
        finally:
            self.signal(queue, completed)

    def receive(self, data: bytes) -> None:
        """Input from the backend (a terminal, a test): delivered now if the driver has
        receive buffers, else when it adds some."""
        with self.lock:
            room = INPUT_LIMIT - len(self.pending_input)
            self.pending_input += data[: max(0, room)]
            queue = self.queues[RECEIVEQ]
            if self.error is None and queue.ready and self.status & 0x04:
                self._guarded(lambda: self._fill_receive(queue))

    def device_reset(self) -> None:
        self.pending_input.clear()

    def pause(self) -> None:
        if self.backend is not None:
            self.backend.flush()

    def save_device(self) -> ConsoleDeviceState:
        return ConsoleDeviceState(pending_input=bytes(self.pending_input))

    def restore_device(self, state: ConsoleDeviceState) -> None:
        where = f"{self.name}: device"
        if len(state.pending_input) > INPUT_LIMIT:
            raise ValueError(f"{where}: field 'pending_input' holds {len(state.pending_input)} bytes, more than {INPUT_LIMIT}")
        self.pending_input = bytearray(state.pending_input)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
