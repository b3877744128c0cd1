"""The small protocols between the kernel-emulated devices and whoever wires them.

Owns: the protocols (guest clock, vCPU, interrupt lines, local-APIC targets, exit-emulated
devices, timer devices), the two errors devices raise (bad guest access, bad saved state),
the ``DeviceState`` base every device's state dataclass derives from, and ``IsaIrqRouter``,
the fan-out of an ISA IRQ to the 8259 and the I/O APIC as a PC wires it.

Does not own any device behaviour, the run loop, or how state sections are framed on disk or
on the wire (``state/persist.py`` does that from each state's declaration).

Run-loop contract (what ``vm.Vm``'s VM_RUN does):
  1. run the vCPU until min(next_event_ns() over timer devices) or an exit;
  2. on a port/MMIO exit call the owning device's io_*/mmio_* method;
  3. call ``advance(clock.now_ns())`` on every timer device (each fires what is due, in time
     order, exactly once; register accesses also catch their device up first);
  4. call ``Vlapic.deliver()`` whenever the vCPU can take an interrupt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import ClassVar, Protocol, runtime_checkable


@runtime_checkable
class GuestClock(Protocol):
    """Guest time: nanoseconds, monotonic, deterministic when driven by retired instructions."""

    def now_ns(self) -> int: ...


@runtime_checkable
class Vcpu(Protocol):
    """The vCPU side of interrupt delivery (the Rust vCPU has this method)."""

    def inject_interrupt(self, vector: int) -> None: ...


@runtime_checkable
class LapicTarget(Protocol):
    """What an interrupt message is delivered to: a local APIC accepting a vector."""

    apic_id: int

    def set_intr(self, vector: int, level_triggered: bool) -> None: ...


# route(destination, logical) -> the local APICs an interrupt message addressed so reaches.
LapicRoute = Callable[[int, bool], Sequence[LapicTarget]]


@runtime_checkable
class IrqSink(Protocol):
    """An interrupt controller's input lines (vioapic pins, vatpic IRQs, or a fan-out)."""

    def assert_irq(self, irq: int) -> None: ...

    def deassert_irq(self, irq: int) -> None: ...

    def pulse_irq(self, irq: int) -> None: ...


@runtime_checkable
class TimerDevice(Protocol):
    """A device with guest-time events."""

    def next_event_ns(self) -> int | None: ...

    def advance(self, now_ns: int) -> None: ...


@runtime_checkable
class PortDevice(Protocol):
    port_ranges: list[tuple[int, int]]

    def io_read(self, port: int, size: int) -> int: ...

    def io_write(self, port: int, size: int, value: int) -> None: ...


@runtime_checkable
class MmioDevice(Protocol):
    mmio_ranges: list[tuple[int, int]]

    def mmio_read(self, gpa: int, size: int) -> int: ...

    def mmio_write(self, gpa: int, size: int, value: int) -> None: ...


class DeviceAccessError(ValueError):
    """A port or MMIO access a device cannot take (wrong size, address outside the device)."""


class DeviceStateError(ValueError):
    """Saved device state that cannot be restored; the message names section, field, value."""


class IsaIrqRouter:
    """ISA IRQ fan-out as a PC wires it: IRQ n goes to 8259 input n and I/O APIC pin n,
    except IRQ0 (the PIT/HPET legacy timer), which reaches I/O APIC pin 2."""

    def __init__(self, atpic: IrqSink | None, ioapic: IrqSink | None) -> None:
        self.atpic = atpic
        self.ioapic = ioapic

    @staticmethod
    def ioapic_pin(irq: int) -> int:
        return 2 if irq == 0 else irq

    def _check(self, irq: int) -> None:
        if not 0 <= irq < 16:
            raise ValueError(f"isa irq router: IRQ {irq} out of range (0-15)")

    def assert_irq(self, irq: int) -> None:
        self._check(irq)
        if self.atpic is not None:
            self.atpic.assert_irq(irq)
        if self.ioapic is not None:
            self.ioapic.assert_irq(self.ioapic_pin(irq))

    def deassert_irq(self, irq: int) -> None:
        self._check(irq)
        if self.atpic is not None:
            self.atpic.deassert_irq(irq)
        if self.ioapic is not None:
            self.ioapic.deassert_irq(self.ioapic_pin(irq))

    def pulse_irq(self, irq: int) -> None:
        self._check(irq)
        if self.atpic is not None:
            self.atpic.pulse_irq(irq)
        if self.ioapic is not None:
            self.ioapic.pulse_irq(self.ioapic_pin(irq))


# --- saved state -------------------------------------------------------------------------


@dataclasses.dataclass
class DeviceState:
    """Base of every kernel device's saved state: a declaration in ``state/persist.py``'s pattern.

    Subclasses are dataclasses whose annotated fields are the state (int, bool, str, lists of
    those), with ``VERSION`` (what this vmmpy writes), ``MIN_VERSION`` (the oldest section version
    it reads) and, for a field added after the first version, a default with
    ``metadata={"since": N}``. ``state/`` turns them into section payloads and back, checking
    versions, fields and types; ``validate()`` adds the device's range checks, naming section,
    field and value.
    """

    VERSION: ClassVar[int] = 0
    MIN_VERSION: ClassVar[int] = 1
    SECTION: ClassVar[str] = "?"

    def fail(self, field: str, message: str) -> DeviceStateError:
        return DeviceStateError(f"{self.SECTION}: {field}: {message}")

    def check_int(self, field: str, lo: int, hi: int) -> None:
        value = getattr(self, field)
        if not lo <= value <= hi:
            raise self.fail(field, f"{value} out of range ({lo}..{hi})")

    def check_list(self, field: str, length: int, lo: int | None = None, hi: int | None = None) -> None:
        values = getattr(self, field)
        if len(values) != length:
            raise self.fail(field, f"has {len(values)} entries, expected {length}")
        if lo is not None:
            for i, value in enumerate(values):
                if not lo <= value <= hi:
                    raise self.fail(f"{field}[{i}]", f"{value} out of range ({lo}..{hi})")

    def check_hex(self, field: str, nbytes: int) -> bytes:
        text = getattr(self, field)
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise self.fail(field, f"not a hex string: {text[:40]!r}") from None
        if len(raw) != nbytes:
            raise self.fail(field, f"holds {len(raw)} bytes, expected {nbytes}")
        return raw

    def validate(self) -> None:
        """Range and consistency checks; devices override."""


def check_access(device: str, what: str, size: int, allowed: tuple[int, ...]) -> None:
    """Refuse an access of a size the register does not take."""
    if size not in allowed:
        sizes = "/".join(str(s) for s in allowed)
        raise DeviceAccessError(f"{device}: {size}-byte access to {what}; it takes {sizes}-byte accesses")
