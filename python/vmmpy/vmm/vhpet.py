"""vhpet: the HPET at 0xFED00000 (1 KiB of MMIO), 8 timers, 64-bit main counter.

Owns: the capabilities register (revision 1, 8 timers, 64-bit counter, legacy-replacement
capable, period 59604644 fs), the general configuration (ENABLE_CNF, LEG_RT_CNF), the
general interrupt status register (level-triggered status, write 1 to clear), the main
counter at exactly 2**24 Hz = 16.777216 MHz (bhyve's HPET_FREQ; the period field is that
rate's period truncated to whole femtoseconds), and per timer: configuration (level/edge,
interrupt enable, periodic, VAL_SET, 32-bit mode, I/O APIC route), comparator and period.

Interrupts: a timer fires when the main counter reaches its comparator (in 32-bit mode the
low 32 bits). Edge timers pulse their pin; level timers set their status bit and hold their
pin asserted until the guest writes 1 to that bit. Routes: with LEG_RT_CNF, timer 0 drives ISA
IRQ0 and timer 1 ISA IRQ8 on ``isa_irq`` (an ``IsaIrqRouter`` reaches 8259 IRQ0 and I/O APIC
pin 2); otherwise INT_ROUTE_CNF names an I/O APIC pin on ``ioapic``, one of pins 16-23
(INT_ROUTE_CAP); a route outside the capability delivers nothing.

Comparator writes in periodic mode set the period; with VAL_SET_CNF they also set the
comparator (and clear VAL_SET_CNF). A periodic timer adds its period to the comparator on each
match, so it never drifts; a late ``advance`` fires every missed match in order.

Does not own: FSB (MSI) delivery -- FSB_INT_DEL_CAP is 0, the FSB route register is storage.
"""

from __future__ import annotations

import dataclasses

from .clock import ns_for_ticks, ticks_in
from .interfaces import DeviceAccessError, DeviceState, GuestClock, IrqSink, check_access

HPET_BASE = 0xFED00000
HPET_SIZE = 0x400
HPET_FREQ_HZ = 1 << 24
HPET_PERIOD_FS = 10**15 // HPET_FREQ_HZ
TIMER_COUNT = 8
VENDOR_ID = 0x8086

REG_CAPABILITIES = 0x000
REG_CONFIG = 0x010
REG_ISR = 0x020
REG_COUNTER = 0x0F0
REG_TIMER_BASE = 0x100
TIMER_STRIDE = 0x20

CAPABILITIES = (HPET_PERIOD_FS << 32) | (VENDOR_ID << 16) | (1 << 15) | (1 << 13) | ((TIMER_COUNT - 1) << 8) | 1

CONF_ENABLE = 1 << 0
CONF_LEGACY = 1 << 1

TCONF_LEVEL = 1 << 1
TCONF_INT_ENABLE = 1 << 2
TCONF_PERIODIC = 1 << 3
TCONF_PERIODIC_CAP = 1 << 4
TCONF_64BIT_CAP = 1 << 5
TCONF_VAL_SET = 1 << 6
TCONF_32BIT_MODE = 1 << 8
TCONF_ROUTE_SHIFT = 9
TCONF_WRITABLE = 0x3F4E  # level, enable, periodic, VAL_SET, 32-bit mode, route
ROUTE_CAP = 0x00FF0000  # I/O APIC pins 16-23
TCONF_READONLY = (ROUTE_CAP << 32) | TCONF_64BIT_CAP | TCONF_PERIODIC_CAP

_MASK64 = 2**64 - 1


@dataclasses.dataclass
class VhpetState(DeviceState):
    """Saved HPET. The main counter is saved as ``counter_base`` (its value when it last
    started or stopped) plus ``anchor_ago_ns`` (how long before the save it started) and
    ``ticks_processed`` (counter ticks since then whose matches have fired); per-timer fields
    are 8-entry lists (``timer_config`` holds only the writable bits)."""

    VERSION = 1
    SECTION = "vhpet"

    config: int
    isr: int
    counter_base: int
    anchor_ago_ns: int
    ticks_processed: int
    timer_config: list[int]
    comparator: list[int]
    period: list[int]
    fsb_route: list[int]

    def validate(self) -> None:
        self.check_int("config", 0, CONF_ENABLE | CONF_LEGACY)
        self.check_int("isr", 0, (1 << TIMER_COUNT) - 1)
        self.check_int("counter_base", 0, _MASK64)
        self.check_int("anchor_ago_ns", 0, 2**63)
        self.check_int("ticks_processed", 0, 2**63)
        self.check_list("timer_config", TIMER_COUNT, 0, TCONF_WRITABLE)
        for i, conf in enumerate(self.timer_config):
            if conf & ~TCONF_WRITABLE:
                raise self.fail(f"timer_config[{i}]", f"{conf:#x} sets read-only or reserved bits")
        for name in ("comparator", "period", "fsb_route"):
            self.check_list(name, TIMER_COUNT, 0, _MASK64)
        if self.ticks_processed > ticks_in(self.anchor_ago_ns, HPET_FREQ_HZ):
            raise self.fail("ticks_processed", f"{self.ticks_processed} is ahead of the counter "
                            f"({ticks_in(self.anchor_ago_ns, HPET_FREQ_HZ)} ticks since it started)")


class Vhpet:
    mmio_ranges = [(HPET_BASE, HPET_SIZE)]

    def __init__(self, clock: GuestClock, ioapic: IrqSink, isa_irq: IrqSink | None = None) -> None:
        self.clock = clock
        self.ioapic = ioapic
        self.isa_irq = isa_irq
        self.config = 0
        self.isr = 0
        self.counter_base = 0
        self.anchor_ns = clock.now_ns()
        self.ticks_processed = 0
        self.timer_config = [0] * TIMER_COUNT
        self.comparator = [_MASK64] * TIMER_COUNT
        self.period = [0] * TIMER_COUNT
        self.fsb_route = [0] * TIMER_COUNT
        self._asserted: list[tuple[IrqSink, int]] = []

    # --- counter --------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return bool(self.config & CONF_ENABLE)

    def _ticks(self, now_ns: int) -> int:
        return ticks_in(now_ns - self.anchor_ns, HPET_FREQ_HZ)

    def counter(self) -> int:
        if not self.enabled:
            return self.counter_base
        return (self.counter_base + self._ticks(self.clock.now_ns())) & _MASK64

    def _width_mask(self, n: int) -> int:
        return 0xFFFFFFFF if self.timer_config[n] & TCONF_32BIT_MODE else _MASK64

    def _next_match(self, n: int, after: int) -> int:
        """The first counter tick (since the anchor) after ``after`` at which timer n matches."""
        mask = self._width_mask(n)
        return after + 1 + ((self.comparator[n] - (self.counter_base + after + 1)) & mask)

    def _observable(self, n: int) -> bool:
        conf = self.timer_config[n]
        return bool(conf & (TCONF_INT_ENABLE | TCONF_PERIODIC | TCONF_LEVEL))

    # --- events ---------------------------------------------------------------------------

    def _next_tick(self) -> int | None:
        if not self.enabled:
            return None
        ticks = [self._next_match(n, self.ticks_processed) for n in range(TIMER_COUNT) if self._observable(n)]
        return min(ticks) if ticks else None

    def next_event_ns(self) -> int | None:
        tick = self._next_tick()
        return None if tick is None else self.anchor_ns + ns_for_ticks(tick, HPET_FREQ_HZ)

    def advance(self, now_ns: int) -> None:
        """Fire every comparator match at or before ``now_ns``, in counter order (ties by timer)."""
        if not self.enabled:
            return
        target = self._ticks(now_ns)
        while True:
            tick = self._next_tick()
            if tick is None or tick > target:
                break
            for n in range(TIMER_COUNT):
                if self._observable(n) and self._next_match(n, self.ticks_processed) == tick:
                    self._fire(n)
            self.ticks_processed = tick
        self.ticks_processed = max(self.ticks_processed, target)

    def _fire(self, n: int) -> None:
        conf = self.timer_config[n]
        if conf & TCONF_PERIODIC and self.period[n]:
            self.comparator[n] = (self.comparator[n] + self.period[n]) & self._width_mask(n)
        if conf & TCONF_LEVEL:
            self.isr |= 1 << n
            self._sync_lines()
        elif conf & TCONF_INT_ENABLE:
            for sink, pin in self._routes(n):
                sink.pulse_irq(pin)

    def _routes(self, n: int) -> list[tuple[IrqSink, int]]:
        if self.config & CONF_LEGACY and n in (0, 1):
            return [(self.isa_irq, 0 if n == 0 else 8)] if self.isa_irq is not None else []
        pin = (self.timer_config[n] >> TCONF_ROUTE_SHIFT) & 0x1F
        return [(self.ioapic, pin)] if ROUTE_CAP & (1 << pin) else []

    def _sync_lines(self) -> None:
        """Hold asserted exactly the lines of enabled level timers with their status bit set."""
        wanted: list[tuple[IrqSink, int]] = []
        for n in range(TIMER_COUNT):
            conf = self.timer_config[n]
            if self.isr & (1 << n) and conf & TCONF_LEVEL and conf & TCONF_INT_ENABLE:
                for route in self._routes(n):
                    if not any(route[0] is s and route[1] == p for s, p in wanted):
                        wanted.append(route)
        for sink, pin in self._asserted:
            if not any(sink is s and pin == p for s, p in wanted):
                sink.deassert_irq(pin)
        for sink, pin in wanted:
            if not any(sink is s and pin == p for s, p in self._asserted):
                sink.assert_irq(pin)
        self._asserted = wanted

    # --- registers ------------------------------------------------------------------------

    def _read64(self, reg: int) -> int:
        if reg == REG_CAPABILITIES:
            return CAPABILITIES
        if reg == REG_CONFIG:
            return self.config
        if reg == REG_ISR:
            return self.isr
        if reg == REG_COUNTER:
            return self.counter()
        n, field = divmod(reg - REG_TIMER_BASE, TIMER_STRIDE)
        if reg >= REG_TIMER_BASE and n < TIMER_COUNT:
            if field == 0x00:
                return self.timer_config[n] | TCONF_READONLY
            if field == 0x08:
                return self.comparator[n]
            if field == 0x10:
                return self.fsb_route[n]
        return 0

    def _decode(self, gpa: int, size: int) -> tuple[int, int]:
        offset = gpa - HPET_BASE
        if not 0 <= offset < HPET_SIZE:
            raise DeviceAccessError(f"vhpet: address {gpa:#x} is outside the HPET window")
        check_access("vhpet", f"offset {offset:#x}", size, (4, 8))
        if offset % size:
            raise DeviceAccessError(f"vhpet: misaligned {size}-byte access at offset {offset:#x}")
        return offset & ~7, offset & 4

    def mmio_read(self, gpa: int, size: int) -> int:
        reg, shift_bytes = self._decode(gpa, size)
        self.advance(self.clock.now_ns())
        value = self._read64(reg) >> (8 * shift_bytes)
        return value & (_MASK64 if size == 8 else 0xFFFFFFFF)

    def mmio_write(self, gpa: int, size: int, value: int) -> None:
        reg, shift_bytes = self._decode(gpa, size)
        now = self.clock.now_ns()
        self.advance(now)
        mask = (_MASK64 if size == 8 else 0xFFFFFFFF) << (8 * shift_bytes)
        value = (value << (8 * shift_bytes)) & mask

        def merged(old: int) -> int:
            return (old & ~mask) | value

        if reg == REG_CONFIG:
            new = merged(self.config) & (CONF_ENABLE | CONF_LEGACY)
            if new & CONF_ENABLE and not self.enabled:
                self.anchor_ns, self.ticks_processed = now, 0
            elif self.enabled and not new & CONF_ENABLE:
                self.counter_base = self.counter()
            self.config = new
            self._sync_lines()
        elif reg == REG_ISR:
            if shift_bytes == 0:
                self.isr &= ~value  # write 1 to clear
            self._sync_lines()
        elif reg == REG_COUNTER:
            self.counter_base = merged(self.counter())
            self.anchor_ns, self.ticks_processed = now, 0
        elif reg >= REG_TIMER_BASE and (reg - REG_TIMER_BASE) // TIMER_STRIDE < TIMER_COUNT:
            n, field = divmod(reg - REG_TIMER_BASE, TIMER_STRIDE)
            if field == 0x00:
                self.timer_config[n] = merged(self.timer_config[n]) & TCONF_WRITABLE
                if self.timer_config[n] & TCONF_32BIT_MODE:
                    self.comparator[n] &= 0xFFFFFFFF
                    self.period[n] &= 0xFFFFFFFF
                if not self.timer_config[n] & TCONF_LEVEL:
                    self.isr &= ~(1 << n)
                self._sync_lines()
            elif field == 0x08:
                self._write_comparator(n, merged)
            elif field == 0x10:
                self.fsb_route[n] = merged(self.fsb_route[n])

    def _write_comparator(self, n: int, merged) -> None:
        conf = self.timer_config[n]
        width = self._width_mask(n)
        if conf & TCONF_PERIODIC:
            self.period[n] = merged(self.period[n]) & width
            if conf & TCONF_VAL_SET:
                self.comparator[n] = merged(self.comparator[n]) & width
                self.timer_config[n] = conf & ~TCONF_VAL_SET
        else:
            self.comparator[n] = merged(self.comparator[n]) & width

    # --- state ----------------------------------------------------------------------------

    def save(self) -> VhpetState:
        now = self.clock.now_ns()
        return VhpetState(
            config=self.config, isr=self.isr, counter_base=self.counter_base,
            anchor_ago_ns=now - self.anchor_ns if self.enabled else 0,
            ticks_processed=self.ticks_processed if self.enabled else 0,
            timer_config=list(self.timer_config), comparator=list(self.comparator),
            period=list(self.period), fsb_route=list(self.fsb_route))

    def restore(self, state: VhpetState) -> None:
        """Restore, then re-assert the level lines the saved status holds (the vioapic and
        vatpic restore their own pin levels; asserting an asserted pin is a no-op)."""
        state.validate()
        self.config, self.isr = state.config, state.isr
        self.counter_base = state.counter_base
        self.anchor_ns = self.clock.now_ns() - state.anchor_ago_ns
        self.ticks_processed = state.ticks_processed
        self.timer_config = list(state.timer_config)
        self.comparator = list(state.comparator)
        self.period = list(state.period)
        self.fsb_route = list(state.fsb_route)
        self._asserted = []
        self._sync_lines()
