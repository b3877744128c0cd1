"""vatpit: periodic IRQ0 counts over guest time, one-shot mode 0, latch and read-back,
channel 2 gate/output via port 0x61, catch-up, and save/restore continuity."""

import pytest

from vmmpy.state import persist
from vmmpy.state.persist import PersistError
from vmmpy.vmm.clock import ManualClock, ns_for_ticks
from vmmpy.vmm.interfaces import DeviceAccessError
from vmmpy.vmm.vatpit import PIT_FREQ_HZ, Vatpit, VatpitState

from .kernel_devices_harness import RecordingIrq, json_roundtrip, load_state, run_until


def make(start_ns=0):
    clock = ManualClock(start_ns)
    irq = RecordingIrq(clock)
    return clock, irq, Vatpit(clock, irq)


def program(pit, channel, mode, count, rw=3):
    pit.io_write(0x43, 1, (channel << 6) | (rw << 4) | (mode << 1))
    if rw in (1, 3):
        pit.io_write(0x40 + channel, 1, count & 0xFF)
    if rw in (2, 3):
        pit.io_write(0x40 + channel, 1, count >> 8)


def read_count(pit, channel):
    lo = pit.io_read(0x40 + channel, 1)
    return lo | (pit.io_read(0x40 + channel, 1) << 8)


@pytest.mark.parametrize("mode,count,expected", [(2, 1193, 1000), (3, 11932, 99), (2, 0, 18)])
def test_periodic_irq0_count_over_one_second_is_exact(mode, count, expected):
    clock, irq, pit = make()
    program(pit, 0, mode, count)
    run_until(clock, [pit], 1_000_000_000)
    times = irq.times("pulse", 0)
    n = count or 65536
    assert len(times) == expected == PIT_FREQ_HZ // n
    assert times == [ns_for_ticks(k * n, PIT_FREQ_HZ) for k in range(1, expected + 1)]


def test_mode0_fires_once_at_terminal_count_and_keeps_counting_down():
    clock, irq, pit = make(1_000)
    program(pit, 0, 0, 1000)
    assert pit.next_event_ns() == 1_000 + ns_for_ticks(1000, PIT_FREQ_HZ)
    run_until(clock, [pit], 1_000 + ns_for_ticks(1010, PIT_FREQ_HZ))
    assert read_count(pit, 0) == 65536 - 10  # wrapped past zero
    run_until(clock, [pit], 100_000_000)
    assert irq.times() == [1_000 + ns_for_ticks(1000, PIT_FREQ_HZ)]


def test_latch_command_freezes_the_value_read():
    clock, _, pit = make()
    program(pit, 0, 2, 50000)
    clock.set_ns(ns_for_ticks(100, PIT_FREQ_HZ))
    pit.io_write(0x43, 1, 0x00)  # latch channel 0
    clock.set_ns(ns_for_ticks(400, PIT_FREQ_HZ))
    assert read_count(pit, 0) == 49900
    assert read_count(pit, 0) == 49600  # latch consumed: live again


def test_lobyte_and_hibyte_only_access_modes():
    clock, _, pit = make()
    program(pit, 1, 2, 0x80, rw=1)  # lobyte only: count 0x80
    clock.set_ns(ns_for_ticks(0x10, PIT_FREQ_HZ))
    assert pit.io_read(0x41, 1) == 0x70
    program(pit, 1, 2, 0x0200, rw=2)  # hibyte only: count 0x200
    clock.set_ns(clock.now_ns() + ns_for_ticks(0x100, PIT_FREQ_HZ) + 1)
    assert pit.io_read(0x41, 1) == 0x01


def test_readback_latches_status_then_count():
    clock, _, pit = make()
    program(pit, 2, 3, 1000)
    pit.io_write(0x61, 1, 0x01)
    clock.set_ns(ns_for_ticks(10, PIT_FREQ_HZ))
    pit.io_write(0x43, 1, 0xC0 | 0x08)  # read back count and status of channel 2
    status = pit.io_read(0x42, 1)
    assert status & 0x3F == (3 << 4) | (3 << 1)
    assert not status & 0x40  # count loaded: not null
    clock.set_ns(ns_for_ticks(20, PIT_FREQ_HZ))
    assert read_count(pit, 2) == 1000 - 2 * 10


def test_channel2_gate_and_out2_time_a_calibration_loop():
    clock, _, pit = make()
    pit.io_write(0x61, 1, 0x00)
    program(pit, 2, 0, 11932)  # ~10 ms
    assert pit.io_read(0x61, 1) & 0x20 == 0
    clock.set_ns(50_000_000)
    assert read_count(pit, 2) == 11932  # gate low: not counting
    pit.io_write(0x61, 1, 0x01)
    end = 50_000_000 + ns_for_ticks(11932, PIT_FREQ_HZ)
    clock.set_ns(end - 1)
    assert pit.io_read(0x61, 1) & 0x20 == 0
    clock.set_ns(end)
    assert pit.io_read(0x61, 1) & 0x21 == 0x21


def test_late_advance_pulses_every_missed_edge_in_order():
    clock, irq, pit = make()
    program(pit, 0, 2, 1193)
    clock.set_ns(10_500_000)
    pit.advance(clock.now_ns())
    assert len(irq.times()) == 10
    assert pit.next_event_ns() == ns_for_ticks(11 * 1193, PIT_FREQ_HZ)


def test_bad_access_is_refused():
    _, _, pit = make()
    with pytest.raises(DeviceAccessError, match="vatpit: 2-byte access to port 0x40"):
        pit.io_read(0x40, 2)


def _scenario(clock):
    irq = RecordingIrq(clock)
    pit = Vatpit(clock, irq)
    program(pit, 0, 2, 2000)
    program(pit, 2, 3, 5000)
    pit.io_write(0x61, 1, 0x01)
    return irq, pit


def _continue(clock, pit, end):
    def guest():
        if clock.now_ns() >= 40_000_000 and pit.channels[0].mode == 2:
            program(pit, 0, 3, 3000)
        if clock.now_ns() >= 30_000_000 and pit.channels[2].gate and clock.now_ns() < 60_000_000:
            pit.io_write(0x61, 1, 0x00)
    run_until(clock, [pit], end, guest)
    pit.io_write(0x43, 1, 0xC0 | 0x0E)
    return [pit.io_read(0x40, 1), pit.io_read(0x40, 1), pit.io_read(0x40, 1),
            pit.io_read(0x42, 1), pit.io_read(0x42, 1), pit.io_read(0x42, 1), pit.io_read(0x61, 1)]


def test_save_restore_mid_run_continues_exactly():
    end, split = 100_000_000, 35_123_456
    clock_a = ManualClock()
    irq_a, pit_a = _scenario(clock_a)
    regs_a = _continue(clock_a, pit_a, end)
    clock_b = ManualClock()
    irq_b, pit_b = _scenario(clock_b)
    _continue(clock_b, pit_b, split)
    state = pit_b.save()
    # the latched values read back above were consumed; save mid-latch too
    state = json_roundtrip(state)
    clock_c = ManualClock(split)
    irq_c = RecordingIrq(clock_c)
    pit_c = Vatpit(clock_c, irq_c)
    pit_c.restore(state)
    regs_c = _continue(clock_c, pit_c, end)
    assert irq_b.events + irq_c.events == irq_a.events
    assert len(irq_c.events) > 20
    assert regs_c == regs_a


def test_restore_refuses_bad_state():
    _, _, pit = make()
    good = persist.dump(pit.save())
    bad = dict(good, mode=[0, 6, 0])
    with pytest.raises(PersistError, match=r"vatpit: mode\[1\]: 6 out of range \(0..5\)"):
        load_state(VatpitState, bad)
    bad = dict(good, gate=[False, True, True])
    with pytest.raises(PersistError, match=r"vatpit: gate\[0\]: channels 0 and 1 have their gates tied high"):
        load_state(VatpitState, bad)


def test_irq0_reaches_the_8259_and_the_ioapic_pin_2_through_the_isa_router():
    from vmmpy.vmm.interfaces import IsaIrqRouter
    from vmmpy.vmm.vatpic import Vatpic
    from vmmpy.vmm.vioapic import IOAPIC_BASE, Vioapic

    from .kernel_devices_harness import FakeLapic

    clock = ManualClock()
    lapic = FakeLapic(0)
    ioapic = Vioapic(lambda dest, logical: [lapic])
    ioapic.mmio_write(IOAPIC_BASE, 4, 0x10 + 2 * 2)
    ioapic.mmio_write(IOAPIC_BASE + 0x10, 4, 0x30)  # pin 2 unmasked, edge, vector 0x30
    vectors = []
    atpic = Vatpic(vectors.append)
    for port, icw2, icw3 in ((0x20, 0x08, 0x04), (0xA0, 0x70, 0x02)):
        for port_offset, value in ((0, 0x11), (1, icw2), (1, icw3), (1, 0x03)):  # auto-EOI
            atpic.io_write(port + port_offset, 1, value)
    pit = Vatpit(clock, IsaIrqRouter(atpic, ioapic))
    program(pit, 0, 2, 11932)
    run_until(clock, [pit], 100_000_000)
    assert vectors == [0x08] * 9  # period 11932 ticks = 10.0002 ms: 9 edges by 100 ms
    assert lapic.received == [(0x30, False)] * 9
