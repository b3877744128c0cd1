"""vhpet: capabilities, counter rate, one-shot and periodic comparators, level status,
legacy replacement, 32-bit mode, and save/restore continuity."""

import pytest

from vmmpy.state import persist
from vmmpy.state.persist import PersistError
from vmmpy.vmm.clock import ManualClock, ns_for_ticks
from vmmpy.vmm.interfaces import DeviceAccessError
from vmmpy.vmm.vhpet import HPET_BASE, HPET_FREQ_HZ, Vhpet, VhpetState

from .kernel_devices_harness import RecordingIrq, json_roundtrip, load_state, run_until

CONF, ISR, COUNTER = 0x10, 0x20, 0xF0
LEVEL, ENABLE, PERIODIC, VAL_SET, MODE32 = 1 << 1, 1 << 2, 1 << 3, 1 << 6, 1 << 8


def make(start=0):
    clock = ManualClock(start)
    ioapic, isa = RecordingIrq(clock), RecordingIrq(clock)
    return clock, ioapic, isa, Vhpet(clock, ioapic, isa)


def w(hpet, offset, value, size=8):
    hpet.mmio_write(HPET_BASE + offset, size, value)


def r(hpet, offset, size=8):
    return hpet.mmio_read(HPET_BASE + offset, size)


def tconf(n):
    return 0x100 + 0x20 * n


def tcmp(n):
    return 0x108 + 0x20 * n


def test_capabilities_describe_8_timers_64_bit_legacy_and_period():
    _, _, _, hpet = make()
    cap = r(hpet, 0)
    assert cap >> 32 == 59_604_644 == 10**15 // HPET_FREQ_HZ
    assert (cap >> 8) & 0x1F == 7 and cap & (1 << 13) and cap & (1 << 15) and cap & 0xFF == 1
    assert r(hpet, 4, 4) == cap >> 32
    assert r(hpet, tconf(0)) >> 32 == 0x00FF0000  # routable to I/O APIC pins 16-23
    with pytest.raises(DeviceAccessError, match="vhpet: 2-byte access"):
        r(hpet, 0, 2)


def test_main_counter_runs_at_16_777216_mhz_only_while_enabled():
    clock, _, _, hpet = make()
    clock.set_ns(5_000_000)
    assert r(hpet, COUNTER) == 0
    w(hpet, COUNTER, 1000)  # halted: writable
    w(hpet, CONF, 1)
    clock.set_ns(1_005_000_000)
    assert r(hpet, COUNTER) == 1000 + HPET_FREQ_HZ
    w(hpet, CONF, 0)
    clock.set_ns(2_000_000_000)
    assert r(hpet, COUNTER) == 1000 + HPET_FREQ_HZ
    assert r(hpet, COUNTER + 4, 4) == 0


def test_one_shot_comparator_fires_when_the_counter_reaches_it():
    clock, ioapic, _, hpet = make()
    w(hpet, tconf(2), ENABLE | (20 << 9))
    w(hpet, tcmp(2), 1_677_722)
    w(hpet, CONF, 1)
    run_until(clock, [hpet], 3_000_000_000)
    assert ioapic.events == [(ns_for_ticks(1_677_722, HPET_FREQ_HZ), "pulse", 20)]


def test_periodic_timer_linux_style_programming_never_drifts():
    clock, ioapic, _, hpet = make()
    period = 167_772  # ~10 ms
    w(hpet, tconf(0), ENABLE | PERIODIC | VAL_SET | (21 << 9))
    w(hpet, tcmp(0), 1000 + period)  # with VAL_SET: the comparator
    w(hpet, tcmp(0), period)  # then: the period
    w(hpet, COUNTER, 1000)
    w(hpet, CONF, 1)
    run_until(clock, [hpet], 1_000_000_000)
    times = ioapic.times("pulse", 21)
    assert len(times) == 100 == HPET_FREQ_HZ // period
    assert times == [ns_for_ticks(k * period, HPET_FREQ_HZ) for k in range(1, 101)]
    assert r(hpet, tcmp(0)) == 1000 + 101 * period


def test_level_timer_holds_its_pin_and_status_until_the_guest_clears_it():
    clock, ioapic, _, hpet = make()
    w(hpet, tconf(1), LEVEL | ENABLE | (22 << 9))
    w(hpet, tcmp(1), 100)
    w(hpet, CONF, 1)
    run_until(clock, [hpet], 1_000_000)
    assert ioapic.levels[22] and r(hpet, ISR) == 0b10
    w(hpet, ISR, 0b01)  # clearing another bit changes nothing
    assert ioapic.levels[22]
    w(hpet, ISR, 0b10)
    assert not ioapic.levels[22] and r(hpet, ISR) == 0


def test_legacy_replacement_routes_timers_0_and_1_to_irq0_and_irq8():
    clock, ioapic, isa, hpet = make()
    for n, cmp in ((0, 50), (1, 60)):
        w(hpet, tconf(n), ENABLE | (20 << 9))
        w(hpet, tcmp(n), cmp)
    w(hpet, CONF, 0b11)
    run_until(clock, [hpet], 1_000_000)
    assert [(a, i) for _, a, i in isa.events] == [("pulse", 0), ("pulse", 8)]
    assert ioapic.events == []


def test_32_bit_mode_truncates_the_comparator_and_matches_the_low_half():
    clock, ioapic, _, hpet = make()
    w(hpet, tconf(3), ENABLE | MODE32 | (23 << 9))
    w(hpet, tcmp(3), (5 << 32) | 200)
    assert r(hpet, tcmp(3)) == 200
    w(hpet, COUNTER, (7 << 32) | 100)
    w(hpet, CONF, 1)
    run_until(clock, [hpet], 1_000_000)
    assert ioapic.times("pulse", 23) == [ns_for_ticks(100, HPET_FREQ_HZ)]


def _scenario(clock):
    ioapic, isa = RecordingIrq(clock), RecordingIrq(clock)
    hpet = Vhpet(clock, ioapic, isa)
    w(hpet, tconf(0), ENABLE | PERIODIC | VAL_SET | (20 << 9))
    w(hpet, tcmp(0), 300_000)
    w(hpet, tcmp(0), 300_000)
    w(hpet, tconf(1), LEVEL | ENABLE | (21 << 9))
    w(hpet, tcmp(1), 1_000_000)
    w(hpet, tconf(2), ENABLE | (22 << 9))
    w(hpet, tcmp(2), 2_500_000)
    w(hpet, CONF, 1)
    return ioapic, hpet


def _continue(clock, hpet, end):
    def guest():
        if clock.now_ns() >= 150_000_000 and r(hpet, ISR):
            w(hpet, ISR, 0b10)
            w(hpet, tcmp(1), r(hpet, COUNTER) + 700_000)
    run_until(clock, [hpet], end, guest)
    return [r(hpet, off) for off in (CONF, ISR, COUNTER, tconf(0), tcmp(0), tconf(1), tcmp(1), tcmp(2))]


def test_save_restore_mid_run_continues_exactly():
    end, split = 400_000_000, 123_456_789
    clock_a = ManualClock()
    irq_a, hpet_a = _scenario(clock_a)
    regs_a = _continue(clock_a, hpet_a, end)
    clock_b = ManualClock()
    irq_b, hpet_b = _scenario(clock_b)
    _continue(clock_b, hpet_b, split)
    state = json_roundtrip(hpet_b.save())
    clock_c = ManualClock(split)
    irq_c = RecordingIrq(clock_c)
    irq_c.levels = dict(irq_b.levels)  # the pin's own level is the vioapic's saved state
    hpet_c = Vhpet(clock_c, irq_c, RecordingIrq(clock_c))
    hpet_c.restore(state)
    regs_c = _continue(clock_c, hpet_c, end)
    restored_events = [e for e in irq_c.events if e[1] == "pulse" or e[0] > split]
    assert irq_b.events + restored_events == irq_a.events
    assert len(restored_events) > 10
    assert regs_c == regs_a


def test_restore_refuses_bad_state():
    _, _, _, hpet = make()
    good = persist.dump(hpet.save())
    bad = dict(good, timer_config=[1 << 4] + [0] * 7)
    with pytest.raises(PersistError, match=r"vhpet: timer_config\[0\]: 0x10 sets read-only or reserved bits"):
        load_state(VhpetState, bad)
    bad = dict(good, ticks_processed=5, anchor_ago_ns=0)
    with pytest.raises(PersistError, match=r"vhpet: ticks_processed: 5 is ahead of the counter"):
        load_state(VhpetState, bad)
