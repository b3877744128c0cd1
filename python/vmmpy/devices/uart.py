"""The ns16550 UART behind COM1/COM2 (bhyve's uart_emul.c), and its console backends.

Transmission is instant: a byte written to THR goes straight to the backend, so LSR always
reports the transmitter empty. Received bytes wait in a 16-byte FIFO. The interrupt line is a
callback ``irq(level)`` that the LPC bridge wires to the interrupt controllers.

Saved state: every register, the divisor latch, the receive FIFO's contents and whether a
transmit-empty interrupt is owed. Output already sent to the backend is the backend's, not state.
"""

from __future__ import annotations

import collections
import errno
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, ClassVar

from .base import Device

COM1_BASE, COM1_IRQ = 0x3F8, 4
COM2_BASE, COM2_IRQ = 0x2F8, 3

# Register offsets.
RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
# Bits.
IER_ERDA, IER_ETHRE = 0x01, 0x02
IIR_NOPEND, IIR_THRE, IIR_RDA, IIR_FIFO = 0x01, 0x02, 0x04, 0xC0
LCR_DLAB = 0x80
MCR_LOOPBACK, MCR_OUT2 = 0x10, 0x08
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
FCR_ENABLE, FCR_RX_RESET = 0x01, 0x02
FIFO_SIZE = 16


class ConsoleBackend:
    """Where a UART's output goes and its input comes from."""

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class FileConsole(ConsoleBackend):
    """Appends output to a file (``-l com1,FILE``); no input.

    A serial line does not fail: when the file cannot take more (a full disk, a quota, an I/O
    error) the output is dropped, as on a line nobody listens to, and the guest runs on. The
    first failure is reported once on stderr; ``dropped`` counts the bytes lost.

    Writes are unbuffered, so every byte is in the file the moment the guest sends it; pausing
    does not fsync (a serial line promises no durability, and a migration's downtime or a
    checkpoint should not wait for a disk).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "ab", buffering=0)
        self.dropped = 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> None:
        try:
            written = self._file.write(data) or 0
        except OSError as err:
            self._lost(err, len(data))
            return
        if written < len(data):  # a short write to a file that is filling up
            self._lost(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), len(data) - written)

    def _lost(self, err: OSError, count: int) -> None:
        self.dropped += count
        if self.error is None:
            self.error = err
            print(f"vmmpy: console {self.path}: {err.strerror or err}; dropping console output while writes fail "
                  "(the guest keeps running)", file=sys.stderr)


    def close(self) -> None:
        self._file.close()


class StdioConsole(ConsoleBackend):
    """Output to stdout; input from stdin when it is readable (``-l com1,stdio``)."""

    def __init__(self, on_input: Callable[[bytes], None] | None = None) -> None:
        self._out = sys.stdout.buffer
        if on_input is not None and not sys.stdin.closed and sys.stdin.isatty():
            threading.Thread(target=self._read_stdin, args=(on_input,), daemon=True).start()

    def _read_stdin(self, on_input: Callable[[bytes], None]) -> None:
        fd = sys.stdin.fileno()
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:
                return
            on_input(data)

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self._out.flush()


class CaptureConsole(ConsoleBackend):
    """Keeps output in memory (tests and the Python API)."""

    def __init__(self) -> None:
        self.output = bytearray()

    def write(self, data: bytes) -> None:
        self.output += data


_REGISTERS = ("ier", "lcr", "mcr", "scr", "fcr", "dll", "dlh")


@dataclass
class UartState:
    VERSION: ClassVar[int] = 1
    MIN_VERSION: ClassVar[int] = 1

    ier: int
    lcr: int
    mcr: int
    scr: int
    fcr: int
    dll: int
    dlh: int
    rx_fifo: list[int]
    thre_pending: bool
    irq_level: bool


class Uart(Device):
    SECTION = "uart"
    STATE = UartState

    def __init__(self, name: str, base: int, backend: ConsoleBackend | None, irq: Callable[[bool], None] | None = None) -> None:
        self._name = name
        self.base = base
        self.port_ranges = [(base, 8)]
        self.backend = backend
        self.irq = irq or (lambda level: None)
        self._lock = threading.Lock()
        self.rx: collections.deque[int] = collections.deque()
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.fcr = 0
        self.dll = 0x0C  # 9600 baud from a 1.8432 MHz clock, as firmware leaves it
        self.dlh = 0
        self.thre_pending = False  # a transmit-empty interrupt is owed
        self._irq_level = False

    @property
    def name(self) -> str:
        return self._name

    # -- guest side ----------------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        with self._lock:
            value = self._read(port - self.base)
            self._update_irq()
        return value

    def io_write(self, port: int, size: int, value: int) -> None:
        with self._lock:
            out = self._write(port - self.base, value & 0xFF)
            self._update_irq()
        if out is not None and self.backend is not None:
            self.backend.write(out)

    def _read(self, reg: int) -> int:
        if self.lcr & LCR_DLAB and reg in (RBR_THR, IER):
            return self.dll if reg == RBR_THR else self.dlh
        if reg == RBR_THR:
            return self.rx.popleft() if self.rx else 0
        if reg == IER:
            return self.ier
        if reg == IIR_FCR:
            iir = self._interrupt_id()
            if iir == IIR_THRE:
                self.thre_pending = False  # reading IIR acknowledges THRE
            return iir | (IIR_FIFO if self.fcr & FCR_ENABLE else 0)
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self.rx else 0)
        if reg == MSR:
            # Loopback reflects MCR's outputs; otherwise report DCD, DSR and CTS asserted.
            if self.mcr & MCR_LOOPBACK:
                m = self.mcr
                return ((m & 0x1) << 5) | ((m & 0x2) << 3) | ((m & 0x4) << 4) | ((m & 0x8) << 4)
            return 0xB0
        return self.scr

    def _write(self, reg: int, value: int) -> bytes | None:
        if self.lcr & LCR_DLAB and reg in (RBR_THR, IER):
            if reg == RBR_THR:
                self.dll = value
            else:
                self.dlh = value
            return None
        if reg == RBR_THR:
            self.thre_pending = True
            if self.mcr & MCR_LOOPBACK:
                self._receive(bytes([value]))
                return None
            return bytes([value])
        if reg == IER:
            # Enabling THRE interrupts with an empty transmitter raises one at once.
            if value & IER_ETHRE and not self.ier & IER_ETHRE:
                self.thre_pending = True
            self.ier = value & 0x0F
        elif reg == IIR_FCR:
            if value & FCR_RX_RESET:
                self.rx.clear()
            self.fcr = value & 0xC9
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self.mcr = value & 0x1F
        elif reg == SCR:
            self.scr = value
        return None

    def _interrupt_id(self) -> int:
        if self.ier & IER_ERDA and self.rx:
            return IIR_RDA
        if self.ier & IER_ETHRE and self.thre_pending:
            return IIR_THRE
        return IIR_NOPEND

    def _update_irq(self) -> None:
        level = self._interrupt_id() != IIR_NOPEND
        if level != self._irq_level:
            self._irq_level = level
            self.irq(level)

    # -- host side -----------------------------------------------------------------------
    def _receive(self, data: bytes) -> None:
        for byte in data:
            if len(self.rx) < FIFO_SIZE:
                self.rx.append(byte)  # a full FIFO drops, as an overrun would

    def receive(self, data: bytes) -> None:
        """Bytes arriving from the backend (the keyboard, a test)."""
        with self._lock:
            self._receive(data)
            self._update_irq()

    def pause(self) -> None:
        if self.backend is not None:
            self.backend.flush()

    def save(self) -> UartState:
        with self._lock:
            return UartState(**{reg: getattr(self, reg) for reg in _REGISTERS}, rx_fifo=list(self.rx),
                             thre_pending=self.thre_pending, irq_level=self._irq_level)

    def restore(self, state: UartState) -> None:
        fifo = state.rx_fifo
        if len(fifo) > FIFO_SIZE or not all(0 <= b <= 255 for b in fifo):
            raise ValueError(f"{self.name}: field 'rx_fifo' must hold at most {FIFO_SIZE} bytes, got {fifo!r}")
        for reg in _REGISTERS:
            if not 0 <= getattr(state, reg) <= 0xFF:
                raise ValueError(f"{self.name}: register '{reg}' value {getattr(state, reg)} is not a byte")
        with self._lock:
            for reg in _REGISTERS:
                setattr(self, reg, getattr(state, reg))
            self.rx = collections.deque(fifo)
            self.thre_pending = state.thre_pending
            self._irq_level = state.irq_level

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
