"""vioapic: the I/O APIC (82093AA-style, 24 pins) at 0xFEC00000.

Owns: IOREGSEL (+0x00) and IOWIN (+0x10), the ID, version and arbitration registers, the
24-entry redirection table (vector, delivery mode, destination mode, delivery status,
polarity, remote IRR, trigger mode, mask, destination), the pin levels, and edge/level
semantics: an edge is an inactive->active transition seen while unmasked (edges arriving
while masked are lost, as on hardware); a level pin delivers while active, unmasked and with
remote IRR clear, sets remote IRR, and delivers again after the EOI if still active.

Pins are driven in logical terms (``assert_irq`` = active): the polarity bit is stored and
read back but the line model is already "active", as bhyve's is.

Does not own: the local APICs (messages go through the ``route(dest, logical)`` callable, e.g.
``ApicBus.route``); the 8259 path (ExtINT entries are stored and not delivered: the vatpic
reaches the vCPU through its own sink). Fixed and lowest-priority entries are delivered;
lowest-priority picks the lowest APIC ID among the destinations (no arbitration). A message
that reaches no local APIC is dropped and leaves remote IRR clear.
"""

from __future__ import annotations

import dataclasses

from .interfaces import DeviceAccessError, DeviceState, LapicRoute, check_access

IOAPIC_BASE = 0xFEC00000
IOAPIC_SIZE = 0x1000
IOREGSEL = 0x00
IOWIN = 0x10
PIN_COUNT = 24
IOAPIC_VERSION = 0x11 | ((PIN_COUNT - 1) << 16)

REG_ID = 0x00
REG_VERSION = 0x01
REG_ARBITRATION = 0x02
REG_REDIR_BASE = 0x10

RTE_VECTOR = 0xFF
RTE_DEST_LOGICAL = 1 << 11
RTE_DELIVERY_STATUS = 1 << 12
RTE_POLARITY_LOW = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
RTE_WRITABLE_LOW = 0x0001AFFF  # vector, delivery mode, dest mode, polarity, trigger, mask
RTE_DEST_SHIFT = 56

DELIVERY_FIXED = 0
DELIVERY_LOWEST_PRIORITY = 1


@dataclasses.dataclass
class VioapicState(DeviceState):
    """Saved I/O APIC: the 24 redirection entries as 64-bit ints (remote IRR included) and
    the pin levels as 0/1."""

    VERSION = 1
    SECTION = "vioapic"

    ioapic_id: int
    ioregsel: int
    redirection: list[int]
    pin_levels: list[int]

    def validate(self) -> None:
        self.check_int("ioapic_id", 0, 0xF)
        self.check_int("ioregsel", 0, 0xFF)
        if len(self.redirection) != PIN_COUNT:
            raise self.fail("redirection", f"redirection entry {len(self.redirection) - 1} out of range "
                            f"({PIN_COUNT} pins)" if len(self.redirection) > PIN_COUNT else
                            f"has {len(self.redirection)} entries, expected {PIN_COUNT}")
        self.check_list("redirection", PIN_COUNT, 0, 2**64 - 1)
        self.check_list("pin_levels", PIN_COUNT, 0, 1)


class Vioapic:
    """The I/O APIC. Implements ``IrqSink`` over its 24 pins and takes EOIs from the vlapics."""

    mmio_ranges = [(IOAPIC_BASE, IOAPIC_SIZE)]

    def __init__(self, route: LapicRoute, ioapic_id: int = 0) -> None:
        self.route = route
        self.ioapic_id = ioapic_id & 0xF
        self.ioregsel = 0
        self.redirection = [RTE_MASKED] * PIN_COUNT
        self.pin_levels = [0] * PIN_COUNT

    # --- pins -----------------------------------------------------------------------------

    def _check_pin(self, pin: int) -> None:
        if not 0 <= pin < PIN_COUNT:
            raise ValueError(f"vioapic: pin {pin} out of range (0..{PIN_COUNT - 1})")

    def assert_irq(self, pin: int) -> None:
        self._check_pin(pin)
        if self.pin_levels[pin]:
            return
        self.pin_levels[pin] = 1
        self._evaluate(pin, rising=True)

    def deassert_irq(self, pin: int) -> None:
        self._check_pin(pin)
        self.pin_levels[pin] = 0

    def pulse_irq(self, pin: int) -> None:
        self.assert_irq(pin)
        self.deassert_irq(pin)

    def eoi(self, vector: int) -> None:
        """A local APIC's EOI of a level-triggered ``vector``: clear remote IRR of the pins
        that sent it, and redeliver those still active."""
        for pin, entry in enumerate(self.redirection):
            if entry & RTE_LEVEL and entry & RTE_REMOTE_IRR and entry & RTE_VECTOR == vector:
                self.redirection[pin] = entry & ~RTE_REMOTE_IRR
                self._evaluate(pin, rising=False)

    def _evaluate(self, pin: int, rising: bool) -> None:
        entry = self.redirection[pin]
        if entry & RTE_MASKED or not self.pin_levels[pin]:
            return
        if entry & RTE_LEVEL:
            if not entry & RTE_REMOTE_IRR and self._send(entry):
                self.redirection[pin] = entry | RTE_REMOTE_IRR
        elif rising:
            self._send(entry)

    def _send(self, entry: int) -> bool:
        mode = (entry >> 8) & 7
        if mode not in (DELIVERY_FIXED, DELIVERY_LOWEST_PRIORITY):
            return False
        targets = list(self.route(entry >> RTE_DEST_SHIFT, bool(entry & RTE_DEST_LOGICAL)))
        if not targets:
            return False
        if mode == DELIVERY_LOWEST_PRIORITY:
            targets = [min(targets, key=lambda t: t.apic_id)]
        for target in targets:
            target.set_intr(entry & RTE_VECTOR, bool(entry & RTE_LEVEL))
        return True

    # --- registers ------------------------------------------------------------------------

    def _offset(self, gpa: int, size: int) -> int:
        offset = gpa - IOAPIC_BASE
        if not 0 <= offset < IOAPIC_SIZE:
            raise DeviceAccessError(f"vioapic: address {gpa:#x} is outside the I/O APIC window")
        check_access("vioapic", f"offset {offset:#x}", size, (4,))
        return offset

    def read_register(self, index: int) -> int:
        if index == REG_ID:
            return self.ioapic_id << 24
        if index == REG_VERSION:
            return IOAPIC_VERSION
        if index == REG_ARBITRATION:
            return self.ioapic_id << 24
        if REG_REDIR_BASE <= index < REG_REDIR_BASE + 2 * PIN_COUNT:
            entry = self.redirection[(index - REG_REDIR_BASE) >> 1]
            return (entry >> 32) if index & 1 else entry & 0xFFFFFFFF
        return 0

    def write_register(self, index: int, value: int) -> None:
        if index == REG_ID:
            self.ioapic_id = (value >> 24) & 0xF
            return
        if not REG_REDIR_BASE <= index < REG_REDIR_BASE + 2 * PIN_COUNT:
            return  # version, arbitration and unused indices are read-only
        pin = (index - REG_REDIR_BASE) >> 1
        entry = self.redirection[pin]
        if index & 1:
            entry = (entry & 0xFFFFFFFF) | ((value & 0xFF000000) << 32)
        else:
            kept = entry & ~RTE_WRITABLE_LOW & 0xFFFFFFFF
            entry = (entry & ~0xFFFFFFFF) | kept | (value & RTE_WRITABLE_LOW)
            if not entry & RTE_LEVEL:
                entry &= ~RTE_REMOTE_IRR  # remote IRR means nothing for edge entries
        self.redirection[pin] = entry
        self._evaluate(pin, rising=False)

    def mmio_read(self, gpa: int, size: int) -> int:
        offset = self._offset(gpa, size)
        if offset == IOREGSEL:
            return self.ioregsel
        if offset == IOWIN:
            return self.read_register(self.ioregsel)
        return 0

    def mmio_write(self, gpa: int, size: int, value: int) -> None:
        offset = self._offset(gpa, size)
        if offset == IOREGSEL:
            self.ioregsel = value & 0xFF
        elif offset == IOWIN:
            self.write_register(self.ioregsel, value & 0xFFFFFFFF)

    # --- state ----------------------------------------------------------------------------

    def save(self) -> VioapicState:
        return VioapicState(ioapic_id=self.ioapic_id, ioregsel=self.ioregsel,
                            redirection=list(self.redirection), pin_levels=list(self.pin_levels))

    def restore(self, state: VioapicState) -> None:
        state.validate()
        self.ioapic_id = state.ioapic_id
        self.ioregsel = state.ioregsel
        self.redirection = list(state.redirection)
        self.pin_levels = list(state.pin_levels)
