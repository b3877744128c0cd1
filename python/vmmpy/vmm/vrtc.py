"""vrtc: the MC146818 real-time clock and CMOS RAM at ports 0x70 (index) and 0x71 (data).

Owns: the index register (bit 7 is the NMI-disable bit, stored and read back), the time and
date registers (seconds, minutes, hours, day of week, day of month, month, year, century at
0x32) in BCD or binary and 24- or 12-hour form per register B, the alarm (with "don't care"
bytes 0xC0-0xFF), register A (UIP, divider, periodic rate), register B (SET, PIE, AIE, UIE,
SQWE, DM, 24/12, DSE), register C (IRQF, PF, AF, UF; reading clears), register D (VRT), and
114 bytes of CMOS RAM at 0x0E-0x7F (byte 0x32 is the century register, not RAM).

Time: the time of day is ``base_secs`` (Unix seconds, configurable as ``epoch_s``, saved)
plus whole guest seconds since ``base_ns``, so it is the same after save/restore. It runs when
the divider is 010 (normal 32.768 kHz time base) and SET is clear. While stopped, the time
registers hold what the guest writes; they are parsed when the clock starts again (a date
that is not a date leaves the previous time). While running, writing one time register
changes the time at once, keeping the sub-second phase; day of week is derived, not stored.
Update-ended events happen on each whole second after ``base_ns``; UIP reads 1 for the 244 us
before each. The periodic interrupt runs from the divider (rate 3..15 = 8192 Hz..2 Hz, 1 and 2
= 256 and 128 Hz), phase-locked to when the divider last started.

Interrupts: IRQF rises when a flag and its enable are both set; each rise pulses ISA IRQ8 on
``irq_sink``. While IRQF stays set no new interrupt can happen, so ``next_event_ns`` is None
and flags are caught up when register C is read. Flags without their enable are kept exact at
every access without generating events.

Does not own: daylight-saving adjustment (DSE is stored), the square-wave output pin.
"""

from __future__ import annotations

import calendar
import dataclasses
import time

from .clock import NS_PER_S, ns_for_ticks, ticks_in
from .interfaces import DeviceAccessError, DeviceState, GuestClock, IrqSink, check_access

RTC_INDEX_PORT = 0x70
RTC_DATA_PORT = 0x71
RTC_IRQ = 8
OSC_HZ = 32768
UIP_WINDOW_NS = 244_000

REG_SEC, REG_SEC_ALARM, REG_MIN, REG_MIN_ALARM, REG_HOUR, REG_HOUR_ALARM = range(6)
REG_DOW, REG_DAY, REG_MONTH, REG_YEAR, REG_A, REG_B, REG_C, REG_D = range(6, 14)
REG_CENTURY = 0x32
NVRAM_START = 0x0E
NVRAM_SIZE = 0x80 - NVRAM_START  # 114 bytes
TIME_REGS = (REG_SEC, REG_MIN, REG_HOUR, REG_DOW, REG_DAY, REG_MONTH, REG_YEAR, REG_CENTURY)
ALARM_REGS = (REG_SEC_ALARM, REG_MIN_ALARM, REG_HOUR_ALARM)

A_UIP = 0x80
A_DIVIDER_NORMAL = 0x20
B_SET, B_PIE, B_AIE, B_UIE, B_SQWE, B_BINARY, B_24H, B_DSE = 0x80, 0x40, 0x20, 0x10, 0x08, 0x04, 0x02, 0x01
C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10
D_VRT = 0x80


def _bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def _from_bcd(raw: int) -> int | None:
    hi, lo = raw >> 4, raw & 0xF
    return None if hi > 9 or lo > 9 else hi * 10 + lo


@dataclasses.dataclass
class VrtcState(DeviceState):
    """Saved RTC. Bytes are lowercase hex: ``nvram`` (114 bytes, 0x0E-0x7F) and
    ``stopped_time_regs`` (the 8 time registers in TIME_REGS order, meaningful while the clock
    is stopped). Times are relative to the save: ``base_ago_ns`` before the save the clock
    read ``base_secs``; the divider started ``divider_anchor_ago_ns`` before; flags are
    exact up to ``synced_ago_ns`` before."""

    VERSION = 1
    SECTION = "vrtc"

    index: int
    reg_a: int
    reg_b: int
    reg_c: int
    alarm: list[int]
    nvram: str
    base_secs: int
    base_ago_ns: int
    frozen_secs: int
    stopped_time_regs: str
    divider_anchor_ago_ns: int
    synced_ago_ns: int

    def validate(self) -> None:
        self.check_int("index", 0, 0xFF)
        self.check_int("reg_a", 0, 0x7F)
        self.check_int("reg_b", 0, 0xFF)
        self.check_int("reg_c", 0, 0xF0)
        if self.reg_c & 0x0F:
            raise self.fail("reg_c", f"{self.reg_c:#x} sets bits 0-3, which always read 0")
        self.check_list("alarm", 3, 0, 0xFF)
        self.check_hex("nvram", NVRAM_SIZE)
        self.check_hex("stopped_time_regs", len(TIME_REGS))
        for name in ("base_secs", "frozen_secs"):
            self.check_int(name, 0, 4102444799)  # through 2099-12-31, the last year the century byte holds
        for name in ("base_ago_ns", "divider_anchor_ago_ns", "synced_ago_ns"):
            self.check_int(name, 0, 2**63)


class Vrtc:
    port_ranges = [(RTC_INDEX_PORT, 2)]

    def __init__(self, clock: GuestClock, irq_sink: IrqSink, epoch_s: int = 0) -> None:
        if not 0 <= epoch_s <= 4102444799:
            raise ValueError(f"vrtc: epoch {epoch_s} s is outside 1970..2099")
        now = clock.now_ns()
        self.clock = clock
        self.irq_sink = irq_sink
        self.index = 0
        self.reg_a = A_DIVIDER_NORMAL | 0x06  # 1024 Hz periodic rate, as after firmware setup
        self.reg_b = B_24H
        self.reg_c = 0
        self.alarm = [0, 0, 0]
        self.nvram = bytearray(NVRAM_SIZE)
        self.base_secs = epoch_s
        self.base_ns = now
        self.frozen_secs = epoch_s
        self.stopped_time_regs = bytearray(len(TIME_REGS))
        self.divider_anchor_ns = now
        self.synced_ns = now

    # --- time of day ----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.divider_running and not self.reg_b & B_SET

    @property
    def divider_running(self) -> bool:
        return self.reg_a & 0x70 == A_DIVIDER_NORMAL

    def time_of_day_s(self, now_ns: int | None = None) -> int:
        """Unix seconds the clock shows at guest time ``now_ns`` (default: now)."""
        now = self.clock.now_ns() if now_ns is None else now_ns
        if not self.running:
            return self.frozen_secs
        return self.base_secs + (now - self.base_ns) // NS_PER_S

    def _encode(self, value: int) -> int:
        return value if self.reg_b & B_BINARY else _bcd(value)

    def _decode(self, raw: int) -> int | None:
        return raw if self.reg_b & B_BINARY else _from_bcd(raw)

    def _encode_hour(self, hour: int) -> int:
        if self.reg_b & B_24H:
            return self._encode(hour)
        return self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)

    def _time_regs(self, secs: int) -> dict[int, int]:
        tm = time.gmtime(secs)
        return {
            REG_SEC: self._encode(tm.tm_sec), REG_MIN: self._encode(tm.tm_min),
            REG_HOUR: self._encode_hour(tm.tm_hour), REG_DOW: self._encode((tm.tm_wday + 1) % 7 + 1),
            REG_DAY: self._encode(tm.tm_mday), REG_MONTH: self._encode(tm.tm_mon),
            REG_YEAR: self._encode(tm.tm_year % 100), REG_CENTURY: self._encode(tm.tm_year // 100),
        }

    def _parse(self, regs: dict[int, int]) -> int | None:
        """Unix seconds for register contents, or None if they are not a date and time."""
        fields = {reg: self._decode(regs[reg]) for reg in TIME_REGS if reg != REG_HOUR}
        if self.reg_b & B_24H:
            hour = self._decode(regs[REG_HOUR])
        else:
            hour12 = self._decode(regs[REG_HOUR] & 0x7F)
            hour = None if hour12 is None or not 1 <= hour12 <= 12 else hour12 % 12 + (12 if regs[REG_HOUR] & 0x80 else 0)
        if hour is None or any(v is None for v in fields.values()):
            return None
        year = fields[REG_CENTURY] * 100 + fields[REG_YEAR]
        month, day = fields[REG_MONTH], fields[REG_DAY]
        if not (1970 <= year <= 2099 and 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]
                and hour < 24 and fields[REG_MIN] < 60 and fields[REG_SEC] < 60):
            return None
        return calendar.timegm((year, month, day, hour, fields[REG_MIN], fields[REG_SEC]))

    def _stop(self, now: int) -> None:
        self.frozen_secs = self.base_secs + (now - self.base_ns) // NS_PER_S
        regs = self._time_regs(self.frozen_secs)
        self.stopped_time_regs = bytearray(regs[reg] for reg in TIME_REGS)

    def _start(self, now: int) -> None:
        parsed = self._parse(dict(zip(TIME_REGS, self.stopped_time_regs)))
        if parsed is not None:
            self.frozen_secs = parsed
        self.base_secs = self.frozen_secs
        self.base_ns = now

    # --- events ---------------------------------------------------------------------------

    def _periodic_cycles(self) -> int | None:
        rate = self.reg_a & 0xF
        if rate == 0 or not self.divider_running:
            return None
        return 1 << ((rate + 7 if rate <= 2 else rate) - 1)

    def _next_periodic(self, after_ns: int) -> int | None:
        cycles = self._periodic_cycles()
        if cycles is None:
            return None
        k = ticks_in(after_ns - self.divider_anchor_ns, OSC_HZ, cycles) + 1
        return self.divider_anchor_ns + ns_for_ticks(k, OSC_HZ, cycles)

    def _next_second(self, after_ns: int) -> int | None:
        if not self.running:
            return None
        return self.base_ns + ((after_ns - self.base_ns) // NS_PER_S + 1) * NS_PER_S

    def _next_irq_event(self, after_ns: int) -> int | None:
        times = []
        if self.reg_b & B_PIE:
            times.append(self._next_periodic(after_ns))
        if self.reg_b & (B_UIE | B_AIE):
            times.append(self._next_second(after_ns))
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def next_event_ns(self) -> int | None:
        if self.reg_c & C_IRQF:
            return None  # nothing can interrupt again until register C is read
        return self._next_irq_event(self.synced_ns)

    def _alarm_matches(self, secs: int) -> bool:
        regs = self._time_regs(secs)
        for _alarm_reg, time_reg, value in zip(ALARM_REGS, (REG_SEC, REG_MIN, REG_HOUR), self.alarm):
            if value & 0xC0 != 0xC0 and value != regs[time_reg]:
                return False
        return True

    def _seconds_between(self, start: int, end: int) -> None:
        """Set UF/AF for every update cycle in (start, end]."""
        if not self.running:
            return
        first = (start - self.base_ns) // NS_PER_S + 1
        last = (end - self.base_ns) // NS_PER_S
        if last < first:
            return
        self.reg_c |= C_UF
        for k in range(first, last + 1):
            if self.reg_c & C_AF:
                break
            if self._alarm_matches(self.base_secs + k):
                self.reg_c |= C_AF

    def _periodic_between(self, start: int, end: int) -> None:
        tick = self._next_periodic(start)
        if tick is not None and tick <= end:
            self.reg_c |= C_PF

    def _update_irqf(self) -> None:
        if not self.reg_c & C_IRQF and self.reg_c & self.reg_b & (C_PF | C_AF | C_UF):
            self.reg_c |= C_IRQF
            self.irq_sink.pulse_irq(RTC_IRQ)

    def advance(self, now_ns: int) -> None:
        """Apply every periodic tick and update cycle up to ``now_ns``, in order; pulse IRQ8
        on each rise of IRQF."""
        start = self.synced_ns
        if now_ns <= start:
            return
        if not self.reg_b & B_PIE:
            self._periodic_between(start, now_ns)
        if not self.reg_b & (B_UIE | B_AIE):
            self._seconds_between(start, now_ns)
        cursor = start
        while not self.reg_c & C_IRQF:
            t = self._next_irq_event(cursor)
            if t is None or t > now_ns:
                break
            if self.reg_b & B_PIE and self._next_periodic(cursor) == t:
                self.reg_c |= C_PF
            if self.reg_b & (B_UIE | B_AIE) and self._next_second(cursor) == t:
                self._seconds_between(cursor, t)
            cursor = t
            self._update_irqf()
        if self.reg_b & B_PIE:
            self._periodic_between(cursor, now_ns)
        if self.reg_b & (B_UIE | B_AIE):
            self._seconds_between(cursor, now_ns)
        self.synced_ns = now_ns

    # --- ports ----------------------------------------------------------------------------

    def io_read(self, port: int, size: int) -> int:
        check_access("vrtc", f"port {port:#x}", size, (1,))
        if port == RTC_INDEX_PORT:
            return self.index
        self._check_data_port(port)
        now = self.clock.now_ns()
        self.advance(now)
        reg = self.index & 0x7F
        if reg in TIME_REGS:
            if not self.running:
                return self.stopped_time_regs[TIME_REGS.index(reg)]
            return self._time_regs(self.time_of_day_s(now))[reg]
        if reg in ALARM_REGS:
            return self.alarm[ALARM_REGS.index(reg)]
        if reg == REG_A:
            uip = self.running and (now - self.base_ns) % NS_PER_S >= NS_PER_S - UIP_WINDOW_NS
            return self.reg_a | (A_UIP if uip else 0)
        if reg == REG_B:
            return self.reg_b
        if reg == REG_C:
            value, self.reg_c = self.reg_c, 0
            return value
        if reg == REG_D:
            return D_VRT
        return self.nvram[reg - NVRAM_START]

    def io_write(self, port: int, size: int, value: int) -> None:
        check_access("vrtc", f"port {port:#x}", size, (1,))
        value &= 0xFF
        if port == RTC_INDEX_PORT:
            self.index = value
            return
        self._check_data_port(port)
        now = self.clock.now_ns()
        self.advance(now)
        reg = self.index & 0x7F
        if reg in TIME_REGS:
            self._write_time(reg, value, now)
        elif reg in ALARM_REGS:
            self.alarm[ALARM_REGS.index(reg)] = value
        elif reg in (REG_A, REG_B):
            was_running, was_dividing = self.running, self.divider_running
            if reg == REG_A:
                self.reg_a = value & 0x7F
            else:
                self.reg_b = value & ~B_UIE if value & B_SET else value
            if self.divider_running and not was_dividing:
                self.divider_anchor_ns = now
            if was_running and not self.running:
                self._stop(now)
            elif self.running and not was_running:
                self._start(now)
            self._update_irqf()
        elif reg >= NVRAM_START:
            self.nvram[reg - NVRAM_START] = value
        # registers C and D are read-only

    def _write_time(self, reg: int, value: int, now: int) -> None:
        if not self.running:
            self.stopped_time_regs[TIME_REGS.index(reg)] = value
            return
        regs = self._time_regs(self.time_of_day_s(now))
        regs[reg] = value
        parsed = self._parse(regs)
        if parsed is not None:
            self.base_secs = parsed - (now - self.base_ns) // NS_PER_S

    @staticmethod
    def _check_data_port(port: int) -> None:
        if port != RTC_DATA_PORT:
            raise DeviceAccessError(f"vrtc: port {port:#x} is not an RTC port (0x70-0x71)")

    # --- state ----------------------------------------------------------------------------

    def save(self) -> VrtcState:
        now = self.clock.now_ns()
        return VrtcState(
            index=self.index, reg_a=self.reg_a, reg_b=self.reg_b, reg_c=self.reg_c,
            alarm=list(self.alarm), nvram=self.nvram.hex(), base_secs=self.base_secs,
            base_ago_ns=now - self.base_ns, frozen_secs=self.frozen_secs,
            stopped_time_regs=self.stopped_time_regs.hex(),
            divider_anchor_ago_ns=now - self.divider_anchor_ns, synced_ago_ns=now - self.synced_ns)

    def restore(self, state: VrtcState) -> None:
        state.validate()
        now = self.clock.now_ns()
        self.index, self.reg_a, self.reg_b, self.reg_c = state.index, state.reg_a, state.reg_b, state.reg_c
        self.alarm = list(state.alarm)
        self.nvram = bytearray.fromhex(state.nvram)
        self.base_secs, self.base_ns = state.base_secs, now - state.base_ago_ns
        self.frozen_secs = state.frozen_secs
        self.stopped_time_regs = bytearray.fromhex(state.stopped_time_regs)
        self.divider_anchor_ns = now - state.divider_anchor_ago_ns
        self.synced_ns = now - state.synced_ago_ns
