"""PCI: the bus behind configuration mechanism #1 (ports 0xCF8/0xCFC), PCI functions with a
256-byte configuration space, BARs and INTx, and the two bridge functions (hostbridge, lpc).

What bhyve's pci_emul.c does, in vmmpy's terms:

* Configuration access: a 32-bit write to 0xCF8 latches ``enable | bus << 16 | slot << 11 |
  func << 8 | register``; 1-, 2- and 4-byte accesses to 0xCFC..0xCFF read or write the latched
  function's register at ``register + (port - 0xCFC)``. Absent functions read all-ones. Other
  sizes at 0xCF8 are not configuration cycles (0xCF9 belongs to the reset control register).
* Each function's config space holds vendor/device, command/status, revision/class,
  header type (bit 7 on function 0 when the slot has other functions), BARs, subsystem IDs
  and interrupt line/pin. Read-only fields ignore writes; the command register keeps the I/O,
  memory, bus-master and INTx-disable bits; status bit 3 is the INTx status.
* BARs: I/O, 32-bit memory, or 64-bit memory (the BAR register and the next one hold the low and
  high address dwords; the machine still places them below 4 GiB), sizes powers of two. Writing all-ones and reading back gives
  ``~(size - 1) | type bits`` (BAR sizing); other writes move the BAR. The machine assigns
  addresses at start like bhyve (I/O from 0x2000, memory from 0xC0000000 in the 3-4 GiB hole,
  which is not RAM so accesses there are MMIO exits) and enables decoding in the command
  register. The bus answers "who owns port P / gpa G" from the BARs as they are *now*, with
  decoding on.
* INTx: a function that interrupts uses INTA; slot S's INTA goes to I/O APIC pin
  ``16 + S % 8`` (bhyve routes PCI INTx to pins 16-23). The interrupt line register says the pin.
  Lines are shared: a pin is asserted while any function on it asserts (and has INTx enabled).

State: every PCI function saves its config space, its BARs ``{kind, size, addr}`` and its INTx
level (``PciState``) under ``"pci"`` in its section; device models add their own fields beside
it. The bus saves the configuration address latch as section ``pci``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from .base import Device

log = logging.getLogger(__name__)

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
CONFIG_SPACE_SIZE = 256
CONFIG_ENABLE = 1 << 31

# Config space registers (type 0 header).
PCIR_VENDOR = 0x00
PCIR_DEVICE = 0x02
PCIR_COMMAND = 0x04
PCIR_STATUS = 0x06
PCIR_REVID = 0x08
PCIR_PROGIF = 0x09
PCIR_SUBCLASS = 0x0A
PCIR_CLASS = 0x0B
PCIR_CACHELNSZ = 0x0C
PCIR_LATTIMER = 0x0D
PCIR_HDRTYPE = 0x0E
PCIR_BAR0 = 0x10
PCIR_SUBVEND = 0x2C
PCIR_SUBDEV = 0x2E
PCIR_INTLINE = 0x3C
PCIR_INTPIN = 0x3D
BAR_COUNT = 6

CMD_IO = 0x0001
CMD_MEM = 0x0002
CMD_BUSMASTER = 0x0004
CMD_INTX_DISABLE = 0x0400
CMD_WRITABLE = CMD_IO | CMD_MEM | CMD_BUSMASTER | CMD_INTX_DISABLE
STATUS_INTX = 0x0008
HDRTYPE_MULTIFUNCTION = 0x80

BAR_IO_FLAG = 0x1
BAR_MEM32_FLAGS = 0x0  # 32-bit, not prefetchable
BAR_MEM64_FLAGS = 0x4  # 64-bit, not prefetchable: the BAR and the next register hold the address

# Where the machine puts BARs (bhyve's PCI_EMUL_IOBASE/IOLIMIT, PCI_EMUL_MEMBASE32/MEMLIMIT32).
IO_WINDOW = (0x2000, 0x10000)
MMIO_WINDOW = (0xC000_0000, 0xE000_0000)
INTX_FIRST_PIN = 16
INTX_PINS = 8


@dataclass
class BarState:
    index: int
    kind: str
    size: int
    addr: int


@dataclass
class PciState:
    """A function's PCI part, nested in its device's section (versioned with it)."""

    config: bytes
    bars: list[BarState]
    intx_level: bool


@dataclass
class PciFunctionState:
    """The section of a function with nothing but its PCI part (hostbridge, lpc)."""

    VERSION: ClassVar[int] = 1
    MIN_VERSION: ClassVar[int] = 1

    pci: PciState


@dataclass
class PciBusState:
    VERSION: ClassVar[int] = 1
    MIN_VERSION: ClassVar[int] = 1

    config_address: int


class PciConfigError(ValueError):
    """A PCI configuration that cannot be built: the message names the device and option."""


def intx_pin_for_slot(slot: int) -> int:
    """The I/O APIC pin a slot's INTA is wired to."""
    return INTX_FIRST_PIN + slot % INTX_PINS


@dataclass
class Bar:
    index: int
    kind: str  # "io", "mem32" or "mem64"
    size: int
    addr: int = 0

    def flags(self) -> int:
        return {"io": BAR_IO_FLAG, "mem32": BAR_MEM32_FLAGS, "mem64": BAR_MEM64_FLAGS}[self.kind]

    @property
    def is_memory(self) -> bool:
        return self.kind in ("mem32", "mem64")

    def contains(self, address: int) -> bool:
        return self.addr != 0 and self.addr <= address < self.addr + self.size


class PciHost:
    """What PCI functions need from the machine: guest memory (device DMA) and the I/O APIC
    pins INTx lines drive. The runtime gives a VM-backed one; tests may give their own."""

    def __init__(self, memory: Callable[[], Any], set_pin: Callable[[int, bool], None]) -> None:
        self._memory = memory
        self.set_pin = set_pin

    @property
    def memory(self) -> Any:
        return self._memory()


def parse_options(device: str, conf: str | None, *, positional: str | None = None,
                  flags: tuple[str, ...] = (), keys: tuple[str, ...] = ()) -> dict[str, str]:
    """``a.img,ro,ser=X`` -> {positional: "a.img", "ro": "", "ser": "X"}; refuses what the
    device does not take, naming it."""
    options: dict[str, str] = {}
    items = [item for item in (conf or "").split(",") if item != ""] if conf else []
    for i, item in enumerate(items):
        key, sep, value = item.partition("=")
        if sep:
            if key not in keys:
                raise PciConfigError(f"{device}: unknown option '{key}' (it takes {', '.join(keys + flags) or 'none'})")
            options[key] = value
        elif item in flags:
            options[item] = ""
        elif i == 0 and positional is not None:
            options[positional] = item
        else:
            raise PciConfigError(f"{device}: unknown option '{item}' (it takes {', '.join(keys + flags) or 'none'})")
    return options


class PciFunction(Device):
    """One PCI function: config space, BARs, INTx. Device models subclass it, declare their
    IDs, add BARs in ``__init__`` and override :meth:`bar_read` / :meth:`bar_write`."""

    EMULATION: ClassVar[str] = ""
    STATE: ClassVar[type] = PciFunctionState
    VENDOR_ID: ClassVar[int] = 0
    DEVICE_ID: ClassVar[int] = 0
    CLASS: ClassVar[int] = 0
    SUBCLASS: ClassVar[int] = 0
    PROGIF: ClassVar[int] = 0
    REVISION: ClassVar[int] = 0
    SUBSYSTEM_VENDOR_ID: ClassVar[int] = 0
    SUBSYSTEM_ID: ClassVar[int] = 0
    #: True if the function interrupts through INTA.
    USES_INTX: ClassVar[bool] = False
    #: What the CONF part of ``-s SLOT,EMULATION[,CONF]`` takes, for messages and docs.
    OPTIONS_HELP: ClassVar[str] = "no options"

    def __init__(self, host: PciHost, bus: int, slot: int, func: int, conf: str | None = None) -> None:
        self.host = host
        self.lock = threading.RLock()  # guest accesses (any vCPU) and host input (backend threads)
        self.bus_number, self.slot, self.func = bus, slot, func
        self.config = bytearray(CONFIG_SPACE_SIZE)
        self.bars: dict[int, Bar] = {}
        self.intx_level = False  # the function's own INTx output, before the disable bit
        self._intx_listener: Callable[[PciFunction], None] | None = None
        self._set16(PCIR_VENDOR, self.VENDOR_ID)
        self._set16(PCIR_DEVICE, self.DEVICE_ID)
        self.config[PCIR_REVID] = self.REVISION
        self.config[PCIR_PROGIF] = self.PROGIF
        self.config[PCIR_SUBCLASS] = self.SUBCLASS
        self.config[PCIR_CLASS] = self.CLASS
        self._set16(PCIR_SUBVEND, self.SUBSYSTEM_VENDOR_ID)
        self._set16(PCIR_SUBDEV, self.SUBSYSTEM_ID)
        if self.USES_INTX:
            self.config[PCIR_INTPIN] = 1  # INTA
            self.config[PCIR_INTLINE] = intx_pin_for_slot(slot)
        else:
            self.config[PCIR_INTLINE] = 0xFF

    @property
    def name(self) -> str:
        return f"{self.EMULATION}@pci.{self.bus_number}.{self.slot}.{self.func}"

    # ---- config space ----------------------------------------------------------------------
    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def _set(self, offset: int, size: int, value: int) -> None:
        self.config[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _set16(self, offset: int, value: int) -> None:
        self._set(offset, 2, value)

    @property
    def command(self) -> int:
        return self._get(PCIR_COMMAND, 2)

    def add_bar(self, index: int, kind: str, size: int) -> Bar:
        if kind not in ("io", "mem32", "mem64") or size < (4 if kind == "io" else 16) or size & (size - 1):
            raise PciConfigError(f"{self.name}: BAR {index}: bad BAR {kind} of size {size:#x}")
        if kind == "mem64" and index + 1 >= BAR_COUNT:
            raise PciConfigError(f"{self.name}: BAR {index}: a 64-bit BAR needs the next BAR register too")
        if index in self.bars or self._upper_half_of(index) is not None or (kind == "mem64" and index + 1 in self.bars):
            raise PciConfigError(f"{self.name}: BAR {index}: the register is already in use")
        bar = Bar(index, kind, size)
        self.bars[index] = bar
        self._write_bar_register(bar)
        return bar

    def _upper_half_of(self, index: int) -> Bar | None:
        """The 64-bit BAR whose upper address dword is BAR register ``index``, if any."""
        bar = self.bars.get(index - 1)
        return bar if bar is not None and bar.kind == "mem64" else None

    def _write_bar_register(self, bar: Bar) -> None:
        self._set(PCIR_BAR0 + 4 * bar.index, 4, (bar.addr & ~(bar.size - 1) & 0xFFFF_FFFF) | bar.flags())
        if bar.kind == "mem64":
            self._set(PCIR_BAR0 + 4 * (bar.index + 1), 4, bar.addr >> 32)

    def set_bar_address(self, index: int, addr: int) -> None:
        bar = self.bars[index]
        bar.addr = addr
        self._write_bar_register(bar)

    def cfg_read(self, offset: int, size: int) -> int:
        with self.lock:
            return self._get(offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        """A guest write of ``size`` bytes at ``offset``: byte by byte through the register
        rules, so partial writes of wider registers behave."""
        with self.lock:
            self._cfg_write(offset, size, value)

    def _cfg_write(self, offset: int, size: int, value: int) -> None:
        if PCIR_BAR0 <= offset < PCIR_BAR0 + 4 * BAR_COUNT:
            self._bar_write(offset, size, value)
            return
        for i in range(size):
            self._cfg_write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _cfg_write_byte(self, offset: int, byte: int) -> None:
        if offset in (PCIR_COMMAND, PCIR_COMMAND + 1):
            old = self.command
            shift = 8 * (offset - PCIR_COMMAND)
            new = (old & ~(0xFF << shift)) | (byte << shift)
            self._set16(PCIR_COMMAND, (new & CMD_WRITABLE) | (old & ~CMD_WRITABLE))
            if (old ^ new) & CMD_INTX_DISABLE:
                self._intx_changed()
        elif offset in (PCIR_CACHELNSZ, PCIR_LATTIMER, PCIR_INTLINE):
            self.config[offset] = byte
        # Everything else in the header is read-only; device-specific space above 0x40 is
        # the device's (none of vmmpy's functions has capabilities).

    def _bar_write(self, offset: int, size: int, value: int) -> None:
        index = (offset - PCIR_BAR0) // 4
        register = PCIR_BAR0 + 4 * index
        raw = bytearray(self._get(register, 4).to_bytes(4, "little"))
        start = offset - register
        raw[start:start + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")[: 4 - start]
        written = int.from_bytes(raw, "little")
        upper = self._upper_half_of(index)
        if upper is not None:
            # The upper dword of a 64-bit BAR: every bit is an address bit (BARs are < 4 GiB).
            upper.addr = (written << 32) | (upper.addr & 0xFFFF_FFFF)
            self._set(register, 4, written)
            return
        bar = self.bars.get(index)
        if bar is None:
            return  # unimplemented BARs are hardwired to zero
        mask = ~(bar.size - 1) & (0xFFFF_FFFC if bar.kind == "io" else 0xFFFF_FFF0)
        bar.addr = (bar.addr & ~0xFFFF_FFFF) | (written & mask)
        self._set(register, 4, (bar.addr & 0xFFFF_FFFF) | bar.flags())

    # ---- decoding --------------------------------------------------------------------------
    def io_bar_at(self, port: int) -> Bar | None:
        if not self.command & CMD_IO:
            return None
        for bar in self.bars.values():
            if bar.kind == "io" and bar.contains(port) and bar.addr + bar.size <= 0x10000:
                return bar
        return None

    def mmio_bar_at(self, gpa: int) -> Bar | None:
        if not self.command & CMD_MEM:
            return None
        for bar in self.bars.values():
            if bar.is_memory and bar.contains(gpa):
                return bar
        return None

    def io_read(self, port: int, size: int) -> int:
        with self.lock:
            bar = self.io_bar_at(port)
            return self.bar_read(bar.index, port - bar.addr, size)

    def io_write(self, port: int, size: int, value: int) -> None:
        with self.lock:
            bar = self.io_bar_at(port)
            self.bar_write(bar.index, port - bar.addr, size, value)

    def mmio_read(self, gpa: int, size: int) -> int:
        with self.lock:
            bar = self.mmio_bar_at(gpa)
            return self.bar_read(bar.index, gpa - bar.addr, size)

    def mmio_write(self, gpa: int, size: int, value: int) -> None:
        with self.lock:
            bar = self.mmio_bar_at(gpa)
            self.bar_write(bar.index, gpa - bar.addr, size, value)

    def bar_read(self, index: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        pass

    # ---- INTx ------------------------------------------------------------------------------
    @property
    def intx_pin(self) -> int | None:
        return intx_pin_for_slot(self.slot) if self.USES_INTX else None

    @property
    def intx_asserted(self) -> bool:
        """The level this function drives on its pin now (INTx disable masks it)."""
        return self.intx_level and not self.command & CMD_INTX_DISABLE

    def set_intx(self, level: bool) -> None:
        if not self.USES_INTX or level == self.intx_level:
            return
        self.intx_level = level
        self._intx_changed()

    def _intx_changed(self) -> None:
        status = self._get(PCIR_STATUS, 2)
        self._set16(PCIR_STATUS, (status | STATUS_INTX) if self.intx_level else (status & ~STATUS_INTX))
        if self._intx_listener is not None:
            self._intx_listener(self)

    # ---- state -------------------------------------------------------------------------------
    def save_pci(self) -> PciState:
        return PciState(
            config=bytes(self.config),
            bars=[BarState(b.index, b.kind, b.size, b.addr) for b in sorted(self.bars.values(), key=lambda b: b.index)],
            intx_level=self.intx_level,
        )

    def restore_pci(self, state: PciState) -> None:
        """Check a saved ``pci`` field against this function, then load it."""
        where = f"{self.name}: pci"
        config = state.config
        if len(config) != CONFIG_SPACE_SIZE:
            raise ValueError(f"{where}: field 'config' holds {len(config)} bytes, expected {CONFIG_SPACE_SIZE}")
        ids = int.from_bytes(config[0:4], "little")
        mine = self._get(0, 4)
        if ids != mine:
            raise ValueError(f"{where}: saved vendor/device {ids:#010x} is not this function's {mine:#010x}")
        saved_bars = state.bars
        if len(saved_bars) != len(self.bars):
            raise ValueError(f"{where}: field 'bars' has {len(saved_bars)} BARs, this function has {len(self.bars)}")
        for item in saved_bars:
            bar = self.bars.get(item.index)
            if bar is None or (bar.kind, bar.size) != (item.kind, item.size):
                raise ValueError(f"{where}: BAR {item.index} was saved as {item.kind} of {item.size:#x} bytes; "
                                 f"this function has {'none' if bar is None else f'{bar.kind} of {bar.size:#x} bytes'}")
            width = 64 if bar.kind == "mem64" else 32
            if not 0 <= item.addr < (1 << width) or item.addr % bar.size:
                raise ValueError(f"{where}: BAR {item.index} address {item.addr:#x} is not a {bar.size:#x}-aligned {width}-bit address")
        self.config[:] = config
        for item in saved_bars:
            self.bars[item.index].addr = item.addr
        self.intx_level = state.intx_level

    def save(self) -> Any:
        return PciFunctionState(self.save_pci())

    def restore(self, state: Any) -> None:
        self.restore_pci(state.pci)


class HostBridge(PciFunction):
    """bhyve's hostbridge: a host-bridge function with no BARs (NetApp IDs, as bhyve)."""

    EMULATION = "hostbridge"
    VENDOR_ID = 0x1275
    DEVICE_ID = 0x1275
    CLASS = 0x06
    SUBCLASS = 0x00

    def __init__(self, host: PciHost, bus: int, slot: int, func: int, conf: str | None = None) -> None:
        super().__init__(host, bus, slot, func, conf)
        parse_options(self.name, conf)


class LpcBridge(PciFunction):
    """The LPC (PCI-ISA) bridge function: COM1/COM2 and power management behind it are the
    machine's legacy devices, always present; this function makes the bridge visible on the
    bus as bhyve's ``lpc`` (PIIX3-compatible IDs). bhyve allows it on bus 0 only."""

    EMULATION = "lpc"
    VENDOR_ID = 0x8086
    DEVICE_ID = 0x7000
    CLASS = 0x06
    SUBCLASS = 0x01

    def __init__(self, host: PciHost, bus: int, slot: int, func: int, conf: str | None = None) -> None:
        if bus != 0:
            raise PciConfigError(f"lpc@pci.{bus}.{slot}.{func}: the LPC bridge must be on bus 0")
        super().__init__(host, bus, slot, func, conf)
        parse_options(self.name, conf)


class PciBus(Device):
    """Configuration mechanism #1 and the set of functions; routes INTx to I/O APIC pins."""

    SECTION = "pci"
    STATE = PciBusState

    def __init__(self, set_pin: Callable[[int, bool], None]) -> None:
        self.port_ranges = [(CONFIG_ADDRESS_PORT, 1), (CONFIG_DATA_PORT, 4)]
        self.set_pin = set_pin
        self.config_address = 0
        self.functions: dict[tuple[int, int, int], PciFunction] = {}
        self._pin_levels: dict[int, bool] = {}

    def add(self, function: PciFunction) -> None:
        key = (function.bus_number, function.slot, function.func)
        if key in self.functions:
            raise PciConfigError(f"pci {key[0]}:{key[1]}:{key[2]} already holds {self.functions[key].EMULATION}")
        self.functions[key] = function
        function._intx_listener = self._intx_changed

    def finish(self) -> None:
        """After every function is added: multifunction bits, function-0 rule, BAR addresses."""
        for (bus, slot, func), function in sorted(self.functions.items()):
            if func != 0 and (bus, slot, 0) not in self.functions:
                raise PciConfigError(f"{function.name}: slot {bus}:{slot} has functions but no function 0 (a PCI slot starts at function 0)")
            if func == 0 and any(k[:2] == (bus, slot) and k[2] != 0 for k in self.functions):
                function.config[PCIR_HDRTYPE] |= HDRTYPE_MULTIFUNCTION
        self.assign_bars()

    def assign_bars(self) -> None:
        """Give every BAR an address, in slot order, as bhyve's firmware-less setup does, and
        turn decoding on."""
        next_io, next_mem = IO_WINDOW[0], MMIO_WINDOW[0]
        for _, function in sorted(self.functions.items()):
            command = function.command
            for bar in sorted(function.bars.values(), key=lambda b: b.index):
                if bar.kind == "io":
                    addr = -(-next_io // bar.size) * bar.size
                    if addr + bar.size > IO_WINDOW[1]:
                        raise PciConfigError(f"{function.name}: BAR {bar.index}: the PCI I/O window is full")
                    next_io = addr + bar.size
                    command |= CMD_IO
                else:
                    addr = -(-next_mem // bar.size) * bar.size
                    if addr + bar.size > MMIO_WINDOW[1]:
                        raise PciConfigError(f"{function.name}: BAR {bar.index}: the PCI memory window is full")
                    next_mem = addr + bar.size
                    command |= CMD_MEM
                function.set_bar_address(bar.index, addr)
            if function.bars:
                function._set16(PCIR_COMMAND, command | CMD_BUSMASTER)

    # ---- config mechanism #1 ---------------------------------------------------------------
    def _target(self) -> PciFunction | None:
        if not self.config_address & CONFIG_ENABLE:
            return None
        bus = (self.config_address >> 16) & 0xFF
        slot = (self.config_address >> 11) & 0x1F
        func = (self.config_address >> 8) & 0x7
        return self.functions.get((bus, slot, func))

    def io_read(self, port: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if port == CONFIG_ADDRESS_PORT:
            return self.config_address if size == 4 else ones
        function = self._target()
        offset = (self.config_address & 0xFC) + (port - CONFIG_DATA_PORT)
        if function is None or offset + size > CONFIG_SPACE_SIZE or (port - CONFIG_DATA_PORT) + size > 4:
            return ones
        return function.cfg_read(offset, size)

    def io_write(self, port: int, size: int, value: int) -> None:
        if port == CONFIG_ADDRESS_PORT:
            if size == 4:
                self.config_address = value & 0x80FF_FFFC
            return
        function = self._target()
        offset = (self.config_address & 0xFC) + (port - CONFIG_DATA_PORT)
        if function is None or offset + size > CONFIG_SPACE_SIZE or (port - CONFIG_DATA_PORT) + size > 4:
            return
        function.cfg_write(offset, size, value)

    # ---- BAR decoding for the machine's exit dispatch -----------------------------------------
    def io_owner(self, port: int) -> PciFunction | None:
        for function in self.functions.values():
            if function.io_bar_at(port) is not None:
                return function
        return None

    def mmio_owner(self, gpa: int) -> PciFunction | None:
        for function in self.functions.values():
            if function.mmio_bar_at(gpa) is not None:
                return function
        return None

    # ---- INTx --------------------------------------------------------------------------------
    def _level_of(self, pin: int) -> bool:
        return any(f.intx_pin == pin and f.intx_asserted for f in self.functions.values())

    def _intx_changed(self, function: PciFunction) -> None:
        pin = function.intx_pin
        if pin is None:
            return
        level = self._level_of(pin)
        if self._pin_levels.get(pin, False) != level:
            self._pin_levels[pin] = level
            self.set_pin(pin, level)

    def resync_pins(self) -> None:
        """After a restore: the vioapic's pin levels come from its own section; record the
        levels the functions drive so later changes are edges from the right state."""
        self._pin_levels = {pin: self._level_of(pin) for pin in range(INTX_FIRST_PIN, INTX_FIRST_PIN + INTX_PINS)}

    # ---- state -------------------------------------------------------------------------------
    def save(self) -> PciBusState:
        return PciBusState(self.config_address)

    def restore(self, state: PciBusState) -> None:
        value = state.config_address
        if value & ~0x80FF_FFFC or value < 0:
            raise ValueError(f"{self.name}: field 'config_address' value {value:#x} has bits a config address cannot have")
        self.config_address = value
