"""vlapic: one local APIC (xAPIC MMIO mode) per vCPU, plus the APIC bus joining them.

Owns: IRR/ISR/TMR (256-bit), TPR/PPR, the spurious-vector register and software enable, the
LVT (timer, thermal, perfmon, LINT0, LINT1, error), the timer (one-shot and periodic, divide
configuration, initial/current count), EOI (with the level-triggered EOI broadcast to the
I/O APIC), ID/version/LDR/DFR/ESR, and the ICR for fixed and lowest-priority IPIs between
vlapics on one ``ApicBus``. Registers live at their xAPIC offsets in the 4 KiB page at
0xFEE00000 and take aligned 4-byte accesses.

Does not own: x2APIC MSRs, TSC-deadline timer mode, INIT/NMI/SMI IPIs (those ICR writes are
accepted and not delivered; a STARTUP IPI goes to ``startup_sink``, which starts the AP), the
vCPU's interrupt flag (the run loop calls ``deliver()`` only when the vCPU can take one).

Delivery: ``deliver()`` takes the highest IRR vector whose priority class is above PPR, moves
it IRR -> ISR and calls ``vcpu.inject_interrupt(vector)``; it returns that vector or None. It
delivers at most one vector per call because, once accepted, nothing left in IRR can beat the
new PPR. ``pending_vector()`` tells the same without accepting.

Timer: counts at BUS_FREQ_HZ / divisor. A late ``advance`` fires every missed expiry in time
order; expiries not yet delivered coalesce in the IRR bit, as on hardware.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .clock import ns_for_ticks, ticks_in
from .interfaces import DeviceAccessError, DeviceState, GuestClock, LapicTarget, Vcpu, check_access

XAPIC_BASE = 0xFEE00000
XAPIC_SIZE = 0x1000
BUS_FREQ_HZ = 128 * 1024 * 1024  # the timer's input clock before the divider (bhyve's VLAPIC_BUS_FREQ)

# register offsets (xAPIC)
REG_ID = 0x020
REG_VERSION = 0x030
REG_TPR = 0x080
REG_APR = 0x090
REG_PPR = 0x0A0
REG_EOI = 0x0B0
REG_LDR = 0x0D0
REG_DFR = 0x0E0
REG_SVR = 0x0F0
REG_ISR0 = 0x100
REG_TMR0 = 0x180
REG_IRR0 = 0x200
REG_ESR = 0x280
REG_ICR_LO = 0x300
REG_ICR_HI = 0x310
REG_LVT_TIMER = 0x320
REG_LVT_ERROR = 0x370
REG_TIMER_ICR = 0x380
REG_TIMER_CCR = 0x390
REG_TIMER_DCR = 0x3E0

LVT_COUNT = 6  # timer, thermal, perfmon, LINT0, LINT1, error at 0x320..0x370
LVT_TIMER, LVT_THERMAL, LVT_PERFMON, LVT_LINT0, LVT_LINT1, LVT_ERROR = range(LVT_COUNT)
LVT_WRITABLE = (0x000300FF, 0x000107FF, 0x000107FF, 0x0001A7FF, 0x0001A7FF, 0x000100FF)
LVT_MASKED = 1 << 16
LVT_TIMER_PERIODIC = 1 << 17
APIC_VERSION = 0x14 | ((LVT_COUNT - 1) << 16)

SVR_ENABLE = 1 << 8
SVR_WRITABLE = 0x1FF
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6
ICR_LO_WRITABLE = 0x000CCFFF  # vector, delivery mode, dest mode, level, trigger, shorthand

DELIVERY_FIXED = 0
DELIVERY_LOWEST_PRIORITY = 1
DELIVERY_STARTUP = 6

_MASK32 = 0xFFFFFFFF


def timer_divisor(dcr: int) -> int:
    """The divide configuration register's divisor (bits 3,1,0)."""
    index = ((dcr & 0x8) >> 1) | (dcr & 0x3)
    return 1 if index == 7 else 2 << index


def _highest(bits: int) -> int | None:
    return bits.bit_length() - 1 if bits else None


def _words(bits: int) -> list[int]:
    return [(bits >> (32 * i)) & _MASK32 for i in range(8)]


def _from_words(words: list[int]) -> int:
    return sum(w << (32 * i) for i, w in enumerate(words))


class ApicBus:
    """The local APICs of one VM, addressed by physical APIC ID or flat logical destination."""

    def __init__(self) -> None:
        self._lapics: list[Vlapic] = []

    def register(self, lapic: Vlapic) -> None:
        if any(other.apic_id == lapic.apic_id for other in self._lapics):
            raise ValueError(f"apic bus: APIC ID {lapic.apic_id} is already registered")
        self._lapics.append(lapic)

    def all(self) -> list[Vlapic]:
        return sorted(self._lapics, key=lambda lapic: lapic.apic_id)

    def route(self, dest: int, logical: bool) -> list[LapicTarget]:
        """Physical: dest is an APIC ID, 0xFF broadcasts. Logical (flat model): dest is a
        bitmask matched against each LDR's bits 31:24."""
        if logical:
            return [apic for apic in self.all() if (apic.ldr >> 24) & dest]
        if dest == 0xFF:
            return list(self.all())
        return [apic for apic in self.all() if apic.apic_id == dest]


@dataclasses.dataclass
class VlapicState(DeviceState):
    """Saved local APIC. IRR/ISR/TMR are 8 32-bit words each, word i holding vectors
    32i..32i+31 (the register layout). The timer is saved relative to guest time: its anchor
    is ``timer_anchor_ago_ns`` before the save."""

    VERSION = 1
    SECTION = "vlapic"

    apic_id: int
    ldr: int
    dfr: int
    tpr: int
    svr: int
    esr: int
    esr_pending: int
    irr: list[int]
    isr: list[int]
    tmr: list[int]
    lvt: list[int]
    icr_low: int
    icr_high: int
    timer_initial_count: int
    timer_divide_config: int
    timer_anchor_count: int
    timer_anchor_ago_ns: int
    timer_expiries: int

    def validate(self) -> None:
        self.check_int("apic_id", 0, 0xFF)
        for name in ("ldr", "dfr", "svr", "esr", "esr_pending", "icr_low", "icr_high",
                     "timer_initial_count", "timer_anchor_count"):
            self.check_int(name, 0, _MASK32)
        self.check_int("tpr", 0, 0xFF)
        self.check_int("timer_divide_config", 0, 0xB)
        self.check_int("timer_anchor_ago_ns", 0, 2**63)
        self.check_int("timer_expiries", 0, 2**63)
        for name in ("irr", "isr", "tmr"):
            self.check_list(name, 8, 0, _MASK32)
        self.check_list("lvt", LVT_COUNT, 0, _MASK32)
        if self.timer_anchor_count > self.timer_initial_count:
            raise self.fail("timer_anchor_count",
                            f"{self.timer_anchor_count} exceeds the initial count {self.timer_initial_count}")


class Vlapic:
    """One local APIC. ``eoi_sink(vector)`` is told of EOIs of level-triggered vectors."""

    mmio_ranges = [(XAPIC_BASE, XAPIC_SIZE)]

    def __init__(self, clock: GuestClock, vcpu: Vcpu, apic_id: int = 0, bus: ApicBus | None = None,
                 eoi_sink: Callable[[int], None] | None = None,
                 startup_sink: Callable[[int, int], None] | None = None,
                 intr_sink: Callable[[int], None] | None = None) -> None:
        if not 0 <= apic_id <= 0xFE:
            raise ValueError(f"vlapic: APIC ID {apic_id} out of range (0..254)")
        self.clock = clock
        self.vcpu = vcpu
        self.eoi_sink = eoi_sink
        self.startup_sink = startup_sink  # (apic id, vector) of a STARTUP IPI this APIC sends
        self.intr_sink = intr_sink  # told this APIC's id when an interrupt enters its IRR
        self.apic_id = apic_id
        self.bus = bus if bus is not None else ApicBus()
        self.ldr = 0
        self.dfr = _MASK32
        self.tpr = 0
        self.svr = 0xFF  # software-disabled at reset
        self.esr = 0
        self.esr_pending = 0
        self.irr = 0
        self.isr = 0
        self.tmr = 0
        self.lvt = [LVT_MASKED] * LVT_COUNT
        self.icr_low = 0
        self.icr_high = 0
        self.timer_initial_count = 0
        self.timer_divide_config = 0
        self.timer_anchor_ns = clock.now_ns()
        self.timer_anchor_count = 0
        self.timer_expiries = 0
        self.bus.register(self)

    # --- priority and delivery ------------------------------------------------------------

    @property
    def software_enabled(self) -> bool:
        return bool(self.svr & SVR_ENABLE)

    @property
    def ppr(self) -> int:
        isrv = _highest(self.isr) or 0
        if (self.tpr & 0xF0) >= (isrv & 0xF0):
            return self.tpr
        return isrv & 0xF0

    def set_intr(self, vector: int, level_triggered: bool = False) -> None:
        """Accept an interrupt message into IRR (TMR records its trigger mode)."""
        if not 0 <= vector <= 0xFF:
            raise ValueError(f"vlapic {self.apic_id}: vector {vector} out of range (0..255)")
        if not self.software_enabled:
            return  # a software-disabled APIC accepts no fixed interrupts
        if vector < 16:
            self._error(ESR_RECEIVE_ILLEGAL_VECTOR)
            return
        self.irr |= 1 << vector
        if level_triggered:
            self.tmr |= 1 << vector
        else:
            self.tmr &= ~(1 << vector)
        if self.intr_sink is not None:
            self.intr_sink(self.apic_id)

    def pending_vector(self) -> int | None:
        """The vector ``deliver()`` would inject now, or None."""
        if not self.software_enabled:
            return None
        vector = _highest(self.irr)
        if vector is None or (vector & 0xF0) <= (self.ppr & 0xF0):
            return None
        return vector

    def deliver(self) -> int | None:
        """Move the deliverable vector IRR -> ISR and inject it into the vCPU."""
        vector = self.pending_vector()
        if vector is None:
            return None
        self.irr &= ~(1 << vector)
        self.isr |= 1 << vector
        self.vcpu.inject_interrupt(vector)
        return vector

    def _eoi(self) -> None:
        vector = _highest(self.isr)
        if vector is None:
            return
        self.isr &= ~(1 << vector)
        if self.tmr & (1 << vector) and self.eoi_sink is not None:
            self.eoi_sink(vector)

    def _error(self, bit: int) -> None:
        self.esr_pending |= bit
        lvt = self.lvt[LVT_ERROR]
        if not lvt & LVT_MASKED:
            self.set_intr(lvt & 0xFF)

    # --- timer ----------------------------------------------------------------------------

    def _divisor(self) -> int:
        return timer_divisor(self.timer_divide_config)

    def _timer_ticks(self, now_ns: int) -> int:
        return ticks_in(now_ns - self.timer_anchor_ns, BUS_FREQ_HZ, self._divisor())

    def _timer_periodic(self) -> bool:
        return bool(self.lvt[LVT_TIMER] & LVT_TIMER_PERIODIC)

    def _next_expiry_tick(self) -> int | None:
        if self.timer_anchor_count == 0:
            return None
        if self._timer_periodic():
            return self.timer_anchor_count + self.timer_expiries * self.timer_initial_count
        return self.timer_anchor_count if self.timer_expiries == 0 else None

    def timer_current_count(self) -> int:
        now = self.clock.now_ns()
        if self.timer_anchor_count == 0:
            return 0
        elapsed = self._timer_ticks(now)
        if elapsed < self.timer_anchor_count:
            return self.timer_anchor_count - elapsed
        if not self._timer_periodic():
            return 0
        return self.timer_initial_count - (elapsed - self.timer_anchor_count) % self.timer_initial_count

    def _rebase_timer(self, now_ns: int) -> None:
        """Restart counting from the current count at the last tick boundary (divider or mode
        change), keeping the tick phase."""
        count = self.timer_current_count()
        elapsed = self._timer_ticks(now_ns)
        self.timer_anchor_ns += ns_for_ticks(elapsed, BUS_FREQ_HZ, self._divisor())
        self.timer_anchor_count = count
        self.timer_expiries = 0

    def next_event_ns(self) -> int | None:
        tick = self._next_expiry_tick()
        if tick is None:
            return None
        return self.timer_anchor_ns + ns_for_ticks(tick, BUS_FREQ_HZ, self._divisor())

    def advance(self, now_ns: int) -> None:
        """Fire every timer expiry due at or before ``now_ns``, in order, once each."""
        while True:
            due = self.next_event_ns()
            if due is None or due > now_ns:
                return
            self.timer_expiries += 1
            lvt = self.lvt[LVT_TIMER]
            if not lvt & LVT_MASKED:
                self.set_intr(lvt & 0xFF)

    # --- registers ------------------------------------------------------------------------

    def _offset(self, gpa: int, size: int) -> int:
        offset = gpa - XAPIC_BASE
        if not 0 <= offset < XAPIC_SIZE:
            raise DeviceAccessError(f"vlapic {self.apic_id}: address {gpa:#x} is outside the APIC page")
        check_access(f"vlapic {self.apic_id}", f"offset {offset:#x}", size, (4,))
        if offset & 0xF:
            raise DeviceAccessError(f"vlapic {self.apic_id}: misaligned access at offset {offset:#x}")
        return offset

    def mmio_read(self, gpa: int, size: int) -> int:
        offset = self._offset(gpa, size)
        self.advance(self.clock.now_ns())
        if offset == REG_ID:
            return self.apic_id << 24
        if offset == REG_VERSION:
            return APIC_VERSION
        if offset == REG_TPR:
            return self.tpr
        if offset == REG_PPR:
            return self.ppr
        if offset == REG_LDR:
            return self.ldr
        if offset == REG_DFR:
            return self.dfr
        if offset == REG_SVR:
            return self.svr
        if REG_ISR0 <= offset < REG_ISR0 + 0x80:
            return (self.isr >> (32 * ((offset - REG_ISR0) >> 4))) & _MASK32
        if REG_TMR0 <= offset < REG_TMR0 + 0x80:
            return (self.tmr >> (32 * ((offset - REG_TMR0) >> 4))) & _MASK32
        if REG_IRR0 <= offset < REG_IRR0 + 0x80:
            return (self.irr >> (32 * ((offset - REG_IRR0) >> 4))) & _MASK32
        if offset == REG_ESR:
            return self.esr
        if offset == REG_ICR_LO:
            return self.icr_low
        if offset == REG_ICR_HI:
            return self.icr_high
        if REG_LVT_TIMER <= offset <= REG_LVT_ERROR:
            return self.lvt[(offset - REG_LVT_TIMER) >> 4]
        if offset == REG_TIMER_ICR:
            return self.timer_initial_count
        if offset == REG_TIMER_CCR:
            return self.timer_current_count()
        if offset == REG_TIMER_DCR:
            return self.timer_divide_config
        return 0  # APR, EOI (write-only) and reserved offsets read as zero

    def mmio_write(self, gpa: int, size: int, value: int) -> None:
        offset = self._offset(gpa, size)
        value &= _MASK32
        now = self.clock.now_ns()
        self.advance(now)
        if offset == REG_ID:
            self.apic_id = value >> 24
        elif offset == REG_TPR:
            self.tpr = value & 0xFF
        elif offset == REG_EOI:
            self._eoi()
        elif offset == REG_LDR:
            self.ldr = value & 0xFF000000
        elif offset == REG_DFR:
            self.dfr = value | 0x0FFFFFFF
        elif offset == REG_SVR:
            self.svr = value & SVR_WRITABLE
            if not self.software_enabled:
                self.lvt = [entry | LVT_MASKED for entry in self.lvt]
        elif offset == REG_ESR:
            self.esr, self.esr_pending = self.esr_pending, 0
        elif offset == REG_ICR_LO:
            self.icr_low = value & ICR_LO_WRITABLE
            self._send_ipi()
        elif offset == REG_ICR_HI:
            self.icr_high = value & 0xFF000000
        elif REG_LVT_TIMER <= offset <= REG_LVT_ERROR:
            index = (offset - REG_LVT_TIMER) >> 4
            entry = value & LVT_WRITABLE[index]
            if not self.software_enabled:
                entry |= LVT_MASKED
            if index == LVT_TIMER and (entry ^ self.lvt[index]) & LVT_TIMER_PERIODIC:
                self._rebase_timer(now)
            self.lvt[index] = entry
        elif offset == REG_TIMER_ICR:
            self.timer_initial_count = value
            self.timer_anchor_ns = now
            self.timer_anchor_count = value
            self.timer_expiries = 0
        elif offset == REG_TIMER_DCR:
            self._rebase_timer(now)
            self.timer_divide_config = value & 0xB
        # read-only and reserved offsets ignore writes

    def _send_ipi(self) -> None:
        vector = self.icr_low & 0xFF
        mode = (self.icr_low >> 8) & 7
        logical = bool(self.icr_low & (1 << 11))
        shorthand = (self.icr_low >> 18) & 3
        if mode == DELIVERY_STARTUP:
            # A STARTUP IPI starts the addressed application processors at vector * 4 KiB
            # (bhyve starts APs so); INIT needs no action: an AP waits for STARTUP anyway.
            if self.startup_sink is not None:
                for target in self._ipi_targets(shorthand, logical):
                    if target is not self:
                        self.startup_sink(target.apic_id, vector)
            return
        if mode not in (DELIVERY_FIXED, DELIVERY_LOWEST_PRIORITY):
            return  # NMI/SMI/INIT are not emulated here
        if vector < 16:
            self._error(ESR_SEND_ILLEGAL_VECTOR)
            return
        targets = self._ipi_targets(shorthand, logical)
        if mode == DELIVERY_LOWEST_PRIORITY and targets:
            targets = [min(targets, key=lambda t: t.apic_id)]
        for target in targets:
            target.set_intr(vector, False)

    def _ipi_targets(self, shorthand: int, logical: bool) -> list[LapicTarget]:
        if shorthand == 1:
            return [self]
        if shorthand == 2:
            return list(self.bus.all())
        if shorthand == 3:
            return [apic for apic in self.bus.all() if apic is not self]
        return list(self.bus.route(self.icr_high >> 24, logical))

    # --- state ----------------------------------------------------------------------------

    def save(self) -> VlapicState:
        now = self.clock.now_ns()
        return VlapicState(
            apic_id=self.apic_id, ldr=self.ldr, dfr=self.dfr, tpr=self.tpr, svr=self.svr,
            esr=self.esr, esr_pending=self.esr_pending,
            irr=_words(self.irr), isr=_words(self.isr), tmr=_words(self.tmr),
            lvt=list(self.lvt), icr_low=self.icr_low, icr_high=self.icr_high,
            timer_initial_count=self.timer_initial_count,
            timer_divide_config=self.timer_divide_config,
            timer_anchor_count=self.timer_anchor_count,
            timer_anchor_ago_ns=now - self.timer_anchor_ns,
            timer_expiries=self.timer_expiries,
        )

    def restore(self, state: VlapicState) -> None:
        state.validate()
        if state.apic_id != self.apic_id:
            raise state.fail("apic_id", f"saved APIC ID {state.apic_id} does not match this vlapic's {self.apic_id}")
        self.ldr, self.dfr, self.tpr, self.svr = state.ldr, state.dfr, state.tpr, state.svr
        self.esr, self.esr_pending = state.esr, state.esr_pending
        self.irr, self.isr, self.tmr = _from_words(state.irr), _from_words(state.isr), _from_words(state.tmr)
        self.lvt = list(state.lvt)
        self.icr_low, self.icr_high = state.icr_low, state.icr_high
        self.timer_initial_count = state.timer_initial_count
        self.timer_divide_config = state.timer_divide_config
        self.timer_anchor_count = state.timer_anchor_count
        self.timer_anchor_ns = self.clock.now_ns() - state.timer_anchor_ago_ns
        self.timer_expiries = state.timer_expiries
