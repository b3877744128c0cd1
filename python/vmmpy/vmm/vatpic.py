"""vatpic: the cascaded 8259A pair (master at 0x20-0x21, slave at 0xA0-0xA1, ELCR 0x4D0-0x4D1).

Owns: the ICW1-ICW4 initialisation sequence, OCW1 (interrupt mask), OCW2 (non-specific and
specific EOI, rotation, set priority), OCW3 (read IRR/ISR, poll, special mask mode), auto-EOI,
priority rotation, the slave cascaded on master IRQ2, and per-IRQ edge/level sensing from the
ELCR (IRQ0-2, IRQ8 and IRQ13 are always edge, as on a PIIX).

Output: when an unmasked IRQ outranks everything in service, the pair performs the interrupt
acknowledge at once -- IRR -> ISR (or nothing in auto-EOI mode), the vector is
``irq_base + irq`` of the chip that owns it -- and calls ``intr_sink(vector)``. The ``Vm``
routes that to the BSP as ExtINT and the vCPU queues it; the acknowledge is modelled as
immediate because the simulated vCPU takes queued vectors in order.

Does not own: ICW1's LTIM bit (sensing comes from the ELCR, as bhyve does), special fully
nested mode (stored, not acted on), 8080 mode (stored; vectors are always 8086-style).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .interfaces import DeviceAccessError, DeviceState, check_access

MASTER_CMD, MASTER_DATA = 0x20, 0x21
SLAVE_CMD, SLAVE_DATA = 0xA0, 0xA1
ELCR_MASTER, ELCR_SLAVE = 0x4D0, 0x4D1
CASCADE_IRQ = 2
ELCR_WRITABLE = (0xF8, 0xDE)  # IRQ0-2 and IRQ8, IRQ13 cannot be level

ICW1_IC4 = 0x01
ICW1_SNGL = 0x02
ICW1_INIT = 0x10
OCW3_SELECT = 0x08
ICW4_AEOI = 0x02
ICW4_SFNM = 0x10

_STEP_READY, _STEP_ICW2, _STEP_ICW3, _STEP_ICW4 = 0, 2, 3, 4


class _Chip:
    """One 8259A."""

    def __init__(self) -> None:
        self.init_step = _STEP_READY
        self.icw1 = 0
        self.icw3 = 0
        self.icw4 = 0
        self.irq_base = 0
        self.imr = 0xFF
        self.irr = 0
        self.isr = 0
        self.lowest_priority = 7
        self.read_isr = False
        self.poll = False
        self.special_mask = False
        self.rotate_in_aeoi = False
        self.elcr = 0
        self.pin_levels = 0

    def priority_order(self) -> list[int]:
        return [(self.lowest_priority + 1 + i) & 7 for i in range(8)]

    def highest_in_service(self) -> int | None:
        for irq in self.priority_order():
            if self.isr & (1 << irq) and not (self.special_mask and self.imr & (1 << irq)):
                return irq
        return None

    def pending_irq(self) -> int | None:
        """The IRQ this chip would raise now, honouring mask and in-service priority."""
        requests = self.irr & ~self.imr
        in_service = self.highest_in_service()
        for irq in self.priority_order():
            if irq == in_service:
                return None
            if requests & (1 << irq):
                return irq
        return None

    def acknowledge(self, irq: int) -> None:
        bit = 1 << irq
        if not self.elcr & bit:
            self.irr &= ~bit  # the edge latch is consumed; a level request stays while the pin is high
        if self.icw4 & ICW4_AEOI:
            if self.rotate_in_aeoi:
                self.lowest_priority = irq
        else:
            self.isr |= bit

    def non_specific_eoi(self, rotate: bool) -> None:
        for irq in self.priority_order():
            if self.isr & (1 << irq):
                self.isr &= ~(1 << irq)
                if rotate:
                    self.lowest_priority = irq
                return

    def set_pin(self, irq: int, level: int) -> None:
        bit = 1 << irq
        if level and not self.pin_levels & bit:
            self.irr |= bit
        elif not level and self.elcr & bit:
            self.irr &= ~bit
        self.pin_levels = (self.pin_levels | bit) if level else (self.pin_levels & ~bit)

    def write_command(self, value: int) -> None:
        if value & ICW1_INIT:
            self.icw1 = value
            self.init_step = _STEP_ICW2
            self.imr = 0
            self.isr = 0
            self.irr &= self.elcr & self.pin_levels  # edge latches are cleared; active levels remain
            self.lowest_priority = 7
            self.read_isr = False
            self.poll = False
            self.special_mask = False
            self.rotate_in_aeoi = False
            if not value & ICW1_IC4:
                self.icw4 = 0
        elif value & OCW3_SELECT:
            if value & 0x02:
                self.read_isr = bool(value & 0x01)
            self.poll = bool(value & 0x04)
            if value & 0x40:
                self.special_mask = bool(value & 0x20)
        else:
            command = value >> 5
            level = value & 7
            if command == 0b001:
                self.non_specific_eoi(rotate=False)
            elif command == 0b101:
                self.non_specific_eoi(rotate=True)
            elif command == 0b011:
                self.isr &= ~(1 << level)
            elif command == 0b111:
                self.isr &= ~(1 << level)
                self.lowest_priority = level
            elif command == 0b110:
                self.lowest_priority = level
            elif command == 0b100:
                self.rotate_in_aeoi = True
            elif command == 0b000:
                self.rotate_in_aeoi = False

    def write_data(self, value: int) -> None:
        if self.init_step == _STEP_ICW2:
            self.irq_base = value & 0xF8
            if not self.icw1 & ICW1_SNGL:
                self.init_step = _STEP_ICW3
            elif self.icw1 & ICW1_IC4:
                self.init_step = _STEP_ICW4
            else:
                self.init_step = _STEP_READY
        elif self.init_step == _STEP_ICW3:
            self.icw3 = value
            self.init_step = _STEP_ICW4 if self.icw1 & ICW1_IC4 else _STEP_READY
        elif self.init_step == _STEP_ICW4:
            self.icw4 = value & 0x1F
            self.init_step = _STEP_READY
        else:
            self.imr = value


_CHIP_FIELDS = ("init_step", "icw1", "icw3", "icw4", "irq_base", "imr", "irr", "isr",
                "lowest_priority", "read_isr", "poll", "special_mask", "rotate_in_aeoi",
                "elcr", "pin_levels")


@dataclasses.dataclass
class VatpicState(DeviceState):
    """Saved 8259 pair: every field is a 2-entry list, [master, slave]."""

    VERSION = 1
    SECTION = "vatpic"

    init_step: list[int]
    icw1: list[int]
    icw3: list[int]
    icw4: list[int]
    irq_base: list[int]
    imr: list[int]
    irr: list[int]
    isr: list[int]
    lowest_priority: list[int]
    read_isr: list[bool]
    poll: list[bool]
    special_mask: list[bool]
    rotate_in_aeoi: list[bool]
    elcr: list[int]
    pin_levels: list[int]

    def validate(self) -> None:
        for name in _CHIP_FIELDS:
            self.check_list(name, 2)
        for name in ("icw1", "icw3", "icw4", "irq_base", "imr", "irr", "isr", "elcr", "pin_levels"):
            self.check_list(name, 2, 0, 0xFF)
        self.check_list("lowest_priority", 2, 0, 7)
        for i, step in enumerate(self.init_step):
            if step not in (_STEP_READY, _STEP_ICW2, _STEP_ICW3, _STEP_ICW4):
                raise self.fail(f"init_step[{i}]", f"{step} is not an init step (0, 2, 3, 4)")
        for i, base in enumerate(self.irq_base):
            if base & 7:
                raise self.fail(f"irq_base[{i}]", f"{base:#x} is not a multiple of 8")
        for i, elcr in enumerate(self.elcr):
            if elcr & ~ELCR_WRITABLE[i]:
                raise self.fail(f"elcr[{i}]", f"{elcr:#x} makes an always-edge IRQ level-triggered")


class Vatpic:
    """The 8259 pair. Implements ``IrqSink`` over ISA IRQs 0-15."""

    port_ranges = [(MASTER_CMD, 2), (SLAVE_CMD, 2), (ELCR_MASTER, 2)]

    def __init__(self, intr_sink: Callable[[int], None]) -> None:
        self.intr_sink = intr_sink
        self.master = _Chip()
        self.slave = _Chip()

    # --- lines ----------------------------------------------------------------------------

    def _chip(self, irq: int) -> tuple[_Chip, int]:
        if not 0 <= irq < 16:
            raise ValueError(f"vatpic: IRQ {irq} out of range (0..15)")
        if irq == CASCADE_IRQ:
            raise ValueError("vatpic: IRQ 2 is the cascade from the slave; devices use IRQ 9 instead")
        return (self.master, irq) if irq < 8 else (self.slave, irq - 8)

    def assert_irq(self, irq: int) -> None:
        chip, line = self._chip(irq)
        chip.set_pin(line, 1)
        self._update()

    def deassert_irq(self, irq: int) -> None:
        chip, line = self._chip(irq)
        chip.set_pin(line, 0)
        self._update()

    def pulse_irq(self, irq: int) -> None:
        chip, line = self._chip(irq)
        chip.set_pin(line, 1)
        chip.set_pin(line, 0)
        self._update()

    def _cascade(self) -> None:
        self.master.set_pin(CASCADE_IRQ, 1 if self.slave.pending_irq() is not None else 0)

    def _take(self) -> int | None:
        """Acknowledge the pair's highest pending interrupt; return its vector."""
        self._cascade()
        irq = self.master.pending_irq()
        if irq is None:
            return None
        if irq == CASCADE_IRQ:
            slave_irq = self.slave.pending_irq()
            self.master.acknowledge(CASCADE_IRQ)
            self.slave.acknowledge(slave_irq)
            vector = self.slave.irq_base + slave_irq
        else:
            self.master.acknowledge(irq)
            vector = self.master.irq_base + irq
        self._cascade()
        return vector

    def _update(self) -> None:
        taken: set[int] = set()
        while True:
            if self.master.init_step != _STEP_READY or self.master.poll:
                self._cascade()
                return
            vector = self._take()
            if vector is None or vector in taken:
                return  # a level IRQ in auto-EOI mode re-requests at once: once per update, not a hang
            taken.add(vector)
            self.intr_sink(vector)

    # --- ports ----------------------------------------------------------------------------

    def io_read(self, port: int, size: int) -> int:
        check_access("vatpic", f"port {port:#x}", size, (1,))
        if port in (ELCR_MASTER, ELCR_SLAVE):
            return (self.master if port == ELCR_MASTER else self.slave).elcr
        chip = self._port_chip(port)
        if port & 1:
            return chip.imr
        if chip.poll:
            chip.poll = False
            value = self._poll(chip)
            self._update()
            return value
        return chip.isr if chip.read_isr else chip.irr

    def _poll(self, chip: _Chip) -> int:
        if chip is self.slave:
            irq = self.slave.pending_irq()
            if irq is None:
                return 0
            self.slave.acknowledge(irq)
            self._cascade()
            return 0x80 | irq
        self._cascade()
        irq = self.master.pending_irq()
        if irq is None:
            return 0
        if irq == CASCADE_IRQ:
            self.slave.acknowledge(self.slave.pending_irq())
        self.master.acknowledge(irq)
        self._cascade()
        return 0x80 | irq

    def io_write(self, port: int, size: int, value: int) -> None:
        check_access("vatpic", f"port {port:#x}", size, (1,))
        value &= 0xFF
        if port in (ELCR_MASTER, ELCR_SLAVE):
            index = port - ELCR_MASTER
            chip = (self.master, self.slave)[index]
            chip.elcr = value & ELCR_WRITABLE[index]
            chip.irr = (chip.irr & ~chip.elcr) | (chip.elcr & chip.pin_levels)
        else:
            chip = self._port_chip(port)
            if port & 1:
                chip.write_data(value)
            else:
                chip.write_command(value)
        self._update()

    def _port_chip(self, port: int) -> _Chip:
        if port in (MASTER_CMD, MASTER_DATA):
            return self.master
        if port in (SLAVE_CMD, SLAVE_DATA):
            return self.slave
        raise DeviceAccessError(f"vatpic: port {port:#x} is not an 8259 port")

    # --- state ----------------------------------------------------------------------------

    def save(self) -> VatpicState:
        return VatpicState(**{name: [getattr(self.master, name), getattr(self.slave, name)]
                              for name in _CHIP_FIELDS})

    def restore(self, state: VatpicState) -> None:
        state.validate()
        for index, chip in enumerate((self.master, self.slave)):
            for name in _CHIP_FIELDS:
                setattr(chip, name, getattr(state, name)[index])
