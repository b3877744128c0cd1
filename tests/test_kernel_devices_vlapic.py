"""vlapic: registers at xAPIC offsets, timer at exact guest times, priority, TPR, EOI, IPIs,
and save/restore continuity."""

import pytest

from vmmpy.state import persist
from vmmpy.state.persist import PersistError
from vmmpy.vmm.clock import ManualClock, ns_for_ticks
from vmmpy.vmm.interfaces import DeviceAccessError, DeviceStateError
from vmmpy.vmm.vlapic import BUS_FREQ_HZ, XAPIC_BASE, ApicBus, Vlapic, VlapicState, timer_divisor

from .kernel_devices_harness import FakeVcpu, json_roundtrip, load_state, run_until

ID, VER, TPR, PPR, EOI, SVR, ESR = 0x20, 0x30, 0x80, 0xA0, 0xB0, 0xF0, 0x280
ICR_LO, ICR_HI, LVT_TIMER, LVT_ERROR, TICR, TCCR, TDCR = 0x300, 0x310, 0x320, 0x370, 0x380, 0x390, 0x3E0
ISR0, IRR0 = 0x100, 0x200


def make(apic_id=0, bus=None, eoi_sink=None, clock=None):
    clock = clock or ManualClock()
    vcpu = FakeVcpu(clock)
    lapic = Vlapic(clock, vcpu, apic_id=apic_id, bus=bus, eoi_sink=eoi_sink)
    return clock, vcpu, lapic


def wr(lapic, offset, value):
    lapic.mmio_write(XAPIC_BASE + offset, 4, value)


def rd(lapic, offset):
    return lapic.mmio_read(XAPIC_BASE + offset, 4)


def enable(lapic):
    wr(lapic, SVR, 0x1FF)


def test_identity_and_version_registers():
    _, _, lapic = make(apic_id=3)
    assert rd(lapic, ID) == 3 << 24
    assert rd(lapic, VER) & 0xFF == 0x14
    assert (rd(lapic, VER) >> 16) & 0xFF == 5  # six LVT entries
    wr(lapic, VER, 0)
    assert rd(lapic, VER) & 0xFF == 0x14  # read-only


def test_reset_state_is_software_disabled_with_masked_lvts():
    _, vcpu, lapic = make()
    assert rd(lapic, SVR) == 0xFF
    for offset in range(LVT_TIMER, LVT_ERROR + 0x10, 0x10):
        assert rd(lapic, offset) & (1 << 16)
    lapic.set_intr(0x40)
    assert lapic.deliver() is None and vcpu.injected == []


def test_disabling_masks_every_lvt_and_lvt_writes_keep_only_defined_bits():
    _, _, lapic = make()
    enable(lapic)
    wr(lapic, LVT_TIMER, 0xFFFFFFFF)
    assert rd(lapic, LVT_TIMER) == 0x000300FF  # vector, mask, periodic; no TSC-deadline
    wr(lapic, LVT_TIMER, 0x20040)
    assert rd(lapic, LVT_TIMER) == 0x20040
    wr(lapic, SVR, 0xFF)
    assert rd(lapic, LVT_TIMER) == 0x30040


def test_bad_access_sizes_and_alignment_are_refused():
    _, _, lapic = make()
    with pytest.raises(DeviceAccessError, match="vlapic 0: 2-byte access to offset 0x20"):
        lapic.mmio_read(XAPIC_BASE + ID, 2)
    with pytest.raises(DeviceAccessError, match="misaligned"):
        lapic.mmio_read(XAPIC_BASE + 0x24, 4)


def test_divide_configuration_decodes_all_divisors():
    assert [timer_divisor(v) for v in (0, 1, 2, 3, 8, 9, 0xA, 0xB)] == [2, 4, 8, 16, 32, 64, 128, 1]


def test_one_shot_timer_fires_once_at_the_exact_guest_time():
    clock, vcpu, lapic = make(clock=ManualClock(5_000))
    enable(lapic)
    wr(lapic, TDCR, 0x3)  # divide by 16: 8 388 608 Hz
    wr(lapic, LVT_TIMER, 0x40)
    wr(lapic, TICR, 8_388_608)  # one second
    assert lapic.next_event_ns() == 5_000 + 1_000_000_000
    clock.set_ns(5_000 + 500_000_000)
    assert rd(lapic, TCCR) == 4_194_304
    lapic.advance(5_000 + 999_999_999)
    assert lapic.deliver() is None
    clock.set_ns(5_000 + 1_000_000_000)
    lapic.advance(clock.now_ns())
    assert lapic.deliver() == 0x40
    assert vcpu.injected == [(1_000_005_000, 0x40)]
    assert rd(lapic, TCCR) == 0 and lapic.next_event_ns() is None


def test_periodic_timer_never_drifts_over_a_thousand_periods():
    clock, vcpu, lapic = make()
    enable(lapic)
    wr(lapic, TDCR, 0xA)  # divide by 128: 1 048 576 Hz
    wr(lapic, LVT_TIMER, 0x20000 | 0x41)
    wr(lapic, TICR, 1024)  # 1/1024 s = 976 562.5 ns, not a whole number of ns

    def guest_handler():
        if lapic.deliver() is not None:
            wr(lapic, EOI, 0)

    run_until(clock, [lapic], 1_000_000_000, guest_handler)
    times = [t for t, _ in vcpu.injected]
    assert len(times) == 1024
    assert times == [-((-k * 1_000_000_000) // 1024) for k in range(1, 1025)]
    assert times[-1] == 1_000_000_000


def test_late_advance_catches_up_every_expiry_and_coalesces_in_irr():
    clock, vcpu, lapic = make()
    enable(lapic)
    wr(lapic, TDCR, 0xA)
    wr(lapic, LVT_TIMER, 0x20000 | 0x41)
    wr(lapic, TICR, 1048)  # ~1 ms
    clock.set_ns(10_500_000)
    lapic.advance(clock.now_ns())
    assert lapic.timer_expiries == 10
    assert lapic.deliver() == 0x41 and lapic.deliver() is None
    nxt = lapic.next_event_ns()
    assert nxt == ns_for_ticks(11 * 1048, BUS_FREQ_HZ, 128) and nxt > clock.now_ns()


def test_current_count_reloads_in_periodic_mode():
    clock, _, lapic = make()
    enable(lapic)
    wr(lapic, TDCR, 0xB)  # divide by 1
    wr(lapic, LVT_TIMER, 0x20000 | 0x41)
    wr(lapic, TICR, 1000)
    clock.set_ns(ns_for_ticks(1000 + 250, BUS_FREQ_HZ))
    assert rd(lapic, TCCR) == 750


def test_higher_priority_preempts_and_lower_waits_for_eoi():
    _, vcpu, lapic = make()
    enable(lapic)
    lapic.set_intr(0x50)
    assert lapic.deliver() == 0x50
    lapic.set_intr(0x45)  # lower class than the one in service
    lapic.set_intr(0x55)  # same class: also held
    assert lapic.deliver() is None
    lapic.set_intr(0x61)
    assert lapic.deliver() == 0x61
    assert rd(lapic, ISR0 + 0x30) == (1 << (0x61 - 0x60)) and rd(lapic, ISR0 + 0x20) == (1 << (0x50 - 0x40))
    assert rd(lapic, PPR) == 0x60
    wr(lapic, EOI, 0)  # ends 0x61
    assert lapic.deliver() is None  # 0x55 and 0x45 are not above 0x50's class
    wr(lapic, EOI, 0)  # ends 0x50
    assert lapic.deliver() == 0x55
    wr(lapic, EOI, 0)
    assert lapic.deliver() == 0x45
    assert [v for _, v in vcpu.injected] == [0x50, 0x61, 0x55, 0x45]


def test_tpr_masks_lower_classes_until_lowered():
    _, vcpu, lapic = make()
    enable(lapic)
    wr(lapic, TPR, 0x50)
    lapic.set_intr(0x45)
    assert lapic.pending_vector() is None and rd(lapic, PPR) == 0x50
    assert rd(lapic, IRR0 + 0x20) == 1 << 5
    lapic.set_intr(0x61)
    assert lapic.deliver() == 0x61
    wr(lapic, EOI, 0)
    wr(lapic, TPR, 0)
    assert lapic.deliver() == 0x45


def test_eoi_of_level_vector_is_broadcast_to_the_ioapic_only_for_level():
    eois = []
    _, _, lapic = make(eoi_sink=eois.append)
    enable(lapic)
    lapic.set_intr(0x30, level_triggered=True)
    lapic.deliver()
    wr(lapic, EOI, 0)
    lapic.set_intr(0x31, level_triggered=False)
    lapic.deliver()
    wr(lapic, EOI, 0)
    assert eois == [0x30]


def test_fixed_ipi_reaches_only_the_destination_apic():
    bus = ApicBus()
    clock = ManualClock()
    _, vcpu0, lapic0 = make(0, bus, clock=clock)
    _, vcpu1, lapic1 = make(1, bus, clock=clock)
    _, vcpu2, lapic2 = make(2, bus, clock=clock)
    for lapic in (lapic0, lapic1, lapic2):
        enable(lapic)
    wr(lapic0, ICR_HI, 1 << 24)
    wr(lapic0, ICR_LO, 0x70)
    assert [apic.deliver() for apic in (lapic0, lapic1, lapic2)] == [None, 0x70, None]
    wr(lapic1, ICR_LO, (3 << 18) | 0x71)  # all excluding self
    assert [apic.deliver() for apic in (lapic0, lapic1, lapic2)] == [0x71, None, 0x71]
    wr(lapic2, ICR_LO, (1 << 18) | 0x72)  # self
    wr(lapic2, EOI, 0)
    assert lapic2.deliver() == 0x72


def test_illegal_vectors_latch_esr_and_signal_the_error_lvt():
    _, _, lapic = make()
    enable(lapic)
    wr(lapic, LVT_ERROR, 0xFE)
    wr(lapic, ICR_LO, (1 << 18) | 0x05)
    wr(lapic, ESR, 0)
    assert rd(lapic, ESR) == 1 << 5
    assert lapic.deliver() == 0xFE


def _periodic_scenario(clock):
    vcpu = FakeVcpu(clock)
    lapic = Vlapic(clock, vcpu)
    enable(lapic)
    wr(lapic, TDCR, 0x9)  # divide by 64
    wr(lapic, LVT_TIMER, 0x20000 | 0x48)
    wr(lapic, TICR, 20_000)
    wr(lapic, TPR, 0x20)
    lapic.set_intr(0x90)
    lapic.deliver()  # 0x90 stays in service: the timer's 0x48 waits in IRR
    return vcpu, lapic


def _continue(clock, vcpu, lapic, end):
    def guest():
        if clock.now_ns() >= 70_000_000 and lapic.isr >> 0x90 & 1:
            wr(lapic, EOI, 0)  # the guest finishes 0x90 part way through
        vector = lapic.deliver()
        if vector is not None:
            wr(lapic, EOI, 0)

    run_until(clock, [lapic], end, guest)


def _registers(lapic):
    offsets = [ID, TPR, PPR, SVR, ESR, ICR_LO, LVT_TIMER, TICR, TCCR, TDCR] + \
              [base + 0x10 * i for base in (ISR0, IRR0) for i in range(8)]
    return [rd(lapic, off) for off in offsets]


def test_save_restore_mid_run_continues_exactly():
    end, split = 300_000_000, 123_456_789
    clock_a = ManualClock()
    vcpu_a, lapic_a = _periodic_scenario(clock_a)
    _continue(clock_a, vcpu_a, lapic_a, end)

    clock_b = ManualClock()
    vcpu_b, lapic_b = _periodic_scenario(clock_b)
    _continue(clock_b, vcpu_b, lapic_b, split)
    state = json_roundtrip(lapic_b.save())
    clock_c = ManualClock(split)
    vcpu_c = FakeVcpu(clock_c)
    lapic_c = Vlapic(clock_c, vcpu_c)
    lapic_c.restore(state)
    count_before = len(vcpu_b.injected)
    _continue(clock_c, vcpu_c, lapic_c, end)

    assert len(vcpu_a.injected) > 20
    assert vcpu_b.injected + vcpu_c.injected == vcpu_a.injected
    assert count_before < len(vcpu_a.injected)
    assert _registers(lapic_c) == _registers(lapic_a)


def test_restore_refuses_bad_state_naming_section_and_field():
    _, _, lapic = make()
    good = persist.dump(lapic.save())
    bad = dict(good, irr=[0] * 7)
    with pytest.raises(PersistError, match=r"vlapic: irr: has 7 entries, expected 8"):
        load_state(VlapicState, bad)
    bad = dict(good, tpr=256)
    with pytest.raises(PersistError, match=r"vlapic: tpr: 256 out of range \(0..255\)"):
        load_state(VlapicState, bad)
    bad = dict(good, svr="0xff")
    with pytest.raises(PersistError, match=r"vlapic: svr: expected an int, got '0xff'"):
        load_state(VlapicState, bad)
    with pytest.raises(PersistError, match=r"vlapic: section version 2 is newer than this vmmpy reads \(versions 1 to 1\)"):
        load_state(VlapicState, good, version=2)
    fields = dict(good)
    del fields["lvt"]
    with pytest.raises(PersistError, match=r"vlapic: missing field 'lvt'"):
        load_state(VlapicState, fields)
    with pytest.raises(PersistError, match=r"vlapic: unknown field 'x2apic'"):
        load_state(VlapicState, dict(good, x2apic=1))
    _, _, other = make(apic_id=4)
    with pytest.raises(DeviceStateError, match="apic_id: saved APIC ID 0 does not match this vlapic's 4"):
        other.restore(load_state(VlapicState, good))
