"""vatpit: the 8254 programmable interval timer at 0x40-0x43, plus port 0x61's timer bits.

Owns: three channels clocked at 1.193182 MHz derived from guest nanoseconds; control words
(mode, lobyte/hibyte/lobyte-then-hibyte access, BCD), the counter-latch command, the
read-back command (count and/or status), modes 0 (interrupt on terminal count), 1 (gate-
triggered one-shot), 2 (rate generator), 3 (square wave), 4 (software strobe) and 5 (gate-
triggered strobe); channel 2's gate and output through port 0x61 (bit 0 gate, bit 1 speaker
data, bit 4 the refresh toggle every 15.085 us, bit 5 OUT2). Channel 0's output rising edges
pulse ISA IRQ0 on ``irq_sink`` (an ``IrqSink``, normally an ``IsaIrqRouter``).

Timing: counting starts when the count is written (modes 2 and 3 included: a new count takes
effect at once rather than at the end of the running period). Edges happen at exact counter
ticks, computed from the tick number, so a periodic IRQ0 never drifts. A late ``advance``
catches up: every missed edge is pulsed, in order (downstream edge latches coalesce them as
hardware would). In mode 3 with an odd count the high half is one tick longer, as on the 8254;
the count read back decrements by two from the even value below the count.

Does not own: the speaker, NMI status bits of port 0x61, channel 1's DRAM refresh.
"""

from __future__ import annotations

import dataclasses

from .clock import ns_for_ticks, ticks_in
from .interfaces import DeviceAccessError, DeviceState, GuestClock, IrqSink, check_access

PIT_FREQ_HZ = 1_193_182
PIT_BASE = 0x40
PIT_CONTROL = 0x43
PORT_NMI_SC = 0x61
REFRESH_TOGGLE_NS = 15_085
CHANNELS = 3

RW_LATCH, RW_LOBYTE, RW_HIBYTE, RW_LOHI = 0, 1, 2, 3


def _from_bcd(raw: int) -> int:
    return sum(((raw >> (4 * i)) & 0xF) * 10**i for i in range(4))


def _to_bcd(value: int) -> int:
    return sum(((value // 10**i) % 10) << (4 * i) for i in range(4))


class _Channel:
    def __init__(self, index: int) -> None:
        self.index = index
        self.mode = 0
        self.rw = RW_LOHI
        self.bcd = False
        self.reload = 0
        self.loaded = False
        self.counting = False
        self.anchor_ns = 0
        self.anchor_count = 0
        self.terminal_reached = False
        self.edges = 0
        self.frozen_count = 0
        self.frozen_out = False
        self.null_count = True
        self.latch_count = -1
        self.latch_status = -1
        self.read_hi = False
        self.write_hi = False
        self.write_lo = 0
        self.gate = index != 2  # channels 0 and 1 have their gates tied high

    @property
    def modulus(self) -> int:
        return 10000 if self.bcd else 65536

    @property
    def initial(self) -> int:
        value = _from_bcd(self.reload) if self.bcd else self.reload
        return value or self.modulus

    def count_and_out(self, now_ns: int) -> tuple[int, bool]:
        if not self.counting:
            return self.frozen_count, self.frozen_out
        e = ticks_in(now_ns - self.anchor_ns, PIT_FREQ_HZ)
        n, c0 = self.initial, self.anchor_count
        if self.mode in (0, 1):
            return (c0 - e) % self.modulus, self.terminal_reached or e >= c0
        if self.mode in (4, 5):
            return (c0 - e) % self.modulus, self.terminal_reached or e != c0
        phase = e % n
        if self.mode == 2:
            return n - phase, phase != n - 1
        high = (n + 1) // 2
        even = n & ~1
        if phase < high:
            return even - 2 * phase, True
        return even - 2 * (phase - high), False

    def next_edge_tick(self) -> int | None:
        if not self.counting:
            return None
        if self.mode in (0, 1):
            return None if self.terminal_reached or self.edges else self.anchor_count
        if self.mode in (4, 5):
            return None if self.terminal_reached or self.edges else self.anchor_count + 1
        return (self.edges + 1) * self.initial

    def start(self, now_ns: int, count: int) -> None:
        self.counting = True
        self.anchor_ns = now_ns
        self.anchor_count = count
        self.edges = 0

    def freeze(self, now_ns: int) -> None:
        count, out = self.count_and_out(now_ns)
        if self.mode in (0, 1, 4, 5):
            e = ticks_in(now_ns - self.anchor_ns, PIT_FREQ_HZ)
            self.terminal_reached = self.terminal_reached or e >= self.anchor_count
        self.frozen_count, self.frozen_out = count, out
        self.counting = False

    def status(self, now_ns: int) -> int:
        _, out = self.count_and_out(now_ns)
        return (out << 7) | (self.null_count << 6) | (self.rw << 4) | (self.mode << 1) | int(self.bcd)


_CHANNEL_FIELDS = ("mode", "rw", "bcd", "reload", "loaded", "counting", "anchor_count",
                   "terminal_reached", "edges", "frozen_count", "frozen_out", "null_count",
                   "latch_count", "latch_status", "read_hi", "write_hi", "write_lo", "gate")


@dataclasses.dataclass
class VatpitState(DeviceState):
    """Saved 8254: every field but ``speaker_data`` is a 3-entry list, one per channel.
    ``anchor_ago_ns`` is how long before the save each channel started counting;
    ``latch_count``/``latch_status`` are -1 when nothing is latched."""

    VERSION = 1
    SECTION = "vatpit"

    mode: list[int]
    rw: list[int]
    bcd: list[bool]
    reload: list[int]
    loaded: list[bool]
    counting: list[bool]
    anchor_count: list[int]
    anchor_ago_ns: list[int]
    terminal_reached: list[bool]
    edges: list[int]
    frozen_count: list[int]
    frozen_out: list[bool]
    null_count: list[bool]
    latch_count: list[int]
    latch_status: list[int]
    read_hi: list[bool]
    write_hi: list[bool]
    write_lo: list[int]
    gate: list[bool]
    speaker_data: bool

    def validate(self) -> None:
        for name in _CHANNEL_FIELDS + ("anchor_ago_ns",):
            self.check_list(name, CHANNELS)
        self.check_list("mode", CHANNELS, 0, 5)
        self.check_list("rw", CHANNELS, 1, 3)
        self.check_list("reload", CHANNELS, 0, 0xFFFF)
        self.check_list("anchor_count", CHANNELS, 0, 65536)
        self.check_list("anchor_ago_ns", CHANNELS, 0, 2**63)
        self.check_list("edges", CHANNELS, 0, 2**63)
        self.check_list("frozen_count", CHANNELS, 0, 0xFFFF)
        self.check_list("latch_count", CHANNELS, -1, 0xFFFF)
        self.check_list("latch_status", CHANNELS, -1, 0xFF)
        self.check_list("write_lo", CHANNELS, 0, 0xFF)
        for i in (0, 1):
            if not self.gate[i]:
                raise self.fail(f"gate[{i}]", "channels 0 and 1 have their gates tied high")


class Vatpit:
    """The 8254 PIT. Channel 0 drives ISA IRQ0 through ``irq_sink.pulse_irq(0)``."""

    port_ranges = [(PIT_BASE, 4), (PORT_NMI_SC, 1)]

    def __init__(self, clock: GuestClock, irq_sink: IrqSink) -> None:
        self.clock = clock
        self.irq_sink = irq_sink
        self.channels = [_Channel(i) for i in range(CHANNELS)]
        self.speaker_data = False

    # --- events ---------------------------------------------------------------------------

    def next_event_ns(self) -> int | None:
        channel = self.channels[0]
        tick = channel.next_edge_tick()
        if tick is None:
            return None
        return channel.anchor_ns + ns_for_ticks(tick, PIT_FREQ_HZ)

    def advance(self, now_ns: int) -> None:
        """Pulse IRQ0 once for every channel-0 rising edge due at or before ``now_ns``."""
        while True:
            due = self.next_event_ns()
            if due is None or due > now_ns:
                return
            self.channels[0].edges += 1
            self.irq_sink.pulse_irq(0)

    # --- ports ----------------------------------------------------------------------------

    def io_read(self, port: int, size: int) -> int:
        check_access("vatpit", f"port {port:#x}", size, (1,))
        now = self.clock.now_ns()
        self.advance(now)
        if port == PORT_NMI_SC:
            channel = self.channels[2]
            _, out2 = channel.count_and_out(now)
            refresh = (now // REFRESH_TOGGLE_NS) & 1
            return int(channel.gate) | (self.speaker_data << 1) | (refresh << 4) | (out2 << 5)
        if port == PIT_CONTROL:
            return 0xFF  # the 8254 control register cannot be read
        channel = self._channel(port)
        if channel.latch_status >= 0:
            value, channel.latch_status = channel.latch_status, -1
            return value
        if channel.latch_count >= 0:
            value = channel.latch_count
            if channel.rw != RW_LOHI or channel.read_hi:
                channel.latch_count = -1
        else:
            count, _ = channel.count_and_out(now)
            count %= channel.modulus
            value = _to_bcd(count) if channel.bcd else count
        return self._read_byte(channel, value)

    @staticmethod
    def _read_byte(channel: _Channel, value: int) -> int:
        if channel.rw == RW_LOBYTE:
            return value & 0xFF
        if channel.rw == RW_HIBYTE:
            return value >> 8
        channel.read_hi = not channel.read_hi
        return value >> 8 if not channel.read_hi else value & 0xFF

    def io_write(self, port: int, size: int, value: int) -> None:
        check_access("vatpit", f"port {port:#x}", size, (1,))
        value &= 0xFF
        now = self.clock.now_ns()
        self.advance(now)
        if port == PORT_NMI_SC:
            self._set_gate2(bool(value & 1), now)
            self.speaker_data = bool(value & 2)
        elif port == PIT_CONTROL:
            self._control(value, now)
        else:
            self._write_count(self._channel(port), value, now)

    def _channel(self, port: int) -> _Channel:
        if not PIT_BASE <= port < PIT_BASE + CHANNELS:
            raise DeviceAccessError(f"vatpit: port {port:#x} is not an 8254 port")
        return self.channels[port - PIT_BASE]

    def _control(self, value: int, now: int) -> None:
        select = value >> 6
        if select == 3:
            for index in range(CHANNELS):
                if value & (2 << index):
                    channel = self.channels[index]
                    if not value & 0x20 and channel.latch_count < 0:
                        self._latch(channel, now)
                    if not value & 0x10 and channel.latch_status < 0:
                        channel.latch_status = channel.status(now)
            return
        channel = self.channels[select]
        rw = (value >> 4) & 3
        if rw == RW_LATCH:
            if channel.latch_count < 0:
                self._latch(channel, now)
            return
        channel.freeze(now)
        mode = (value >> 1) & 7
        channel.mode = mode - 4 if mode >= 6 else mode
        channel.rw = rw
        channel.bcd = bool(value & 1)
        channel.loaded = False
        channel.terminal_reached = False
        channel.frozen_count = 0
        channel.frozen_out = channel.mode != 0
        channel.null_count = True
        channel.latch_count = channel.latch_status = -1
        channel.read_hi = channel.write_hi = False

    @staticmethod
    def _latch(channel: _Channel, now: int) -> None:
        count, _ = channel.count_and_out(now)
        count %= channel.modulus
        channel.latch_count = _to_bcd(count) if channel.bcd else count
        channel.read_hi = False

    def _write_count(self, channel: _Channel, value: int, now: int) -> None:
        if channel.rw == RW_LOBYTE:
            raw = value
        elif channel.rw == RW_HIBYTE:
            raw = value << 8
        elif not channel.write_hi:
            channel.write_lo = value
            channel.write_hi = True
            return
        else:
            channel.write_hi = False
            raw = channel.write_lo | (value << 8)
        channel.reload = raw
        channel.loaded = True
        channel.null_count = False
        channel.terminal_reached = False
        if channel.mode in (1, 5) or not channel.gate:
            channel.counting = False
            channel.frozen_count = channel.initial % channel.modulus
            channel.frozen_out = channel.mode != 0
        else:
            channel.start(now, channel.initial)

    def _set_gate2(self, gate: bool, now: int) -> None:
        channel = self.channels[2]
        if gate == channel.gate:
            return
        channel.gate = gate
        if not channel.loaded:
            return
        if not gate:
            if channel.counting:
                channel.freeze(now)
            if channel.mode in (2, 3):
                channel.frozen_out = True
        elif channel.mode in (0, 4):
            channel.start(now, channel.frozen_count)
        else:
            channel.terminal_reached = False
            channel.start(now, channel.initial)

    # --- state ----------------------------------------------------------------------------

    def save(self) -> VatpitState:
        now = self.clock.now_ns()
        fields = {name: [getattr(ch, name) for ch in self.channels] for name in _CHANNEL_FIELDS}
        fields["anchor_ago_ns"] = [max(0, now - ch.anchor_ns) if ch.counting else 0 for ch in self.channels]
        return VatpitState(speaker_data=self.speaker_data, **fields)

    def restore(self, state: VatpitState) -> None:
        state.validate()
        now = self.clock.now_ns()
        for index, channel in enumerate(self.channels):
            for name in _CHANNEL_FIELDS:
                setattr(channel, name, getattr(state, name)[index])
            channel.anchor_ns = now - state.anchor_ago_ns[index]
        self.speaker_data = state.speaker_data
