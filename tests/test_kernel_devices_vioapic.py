"""vioapic: register window, redirection entries, masked pins, edge and level semantics,
routing by destination, and save/restore continuity."""

import pytest

from vmmpy.state import persist
from vmmpy.state.persist import PersistError
from vmmpy.vmm.clock import ManualClock
from vmmpy.vmm.interfaces import DeviceAccessError
from vmmpy.vmm.vioapic import IOAPIC_BASE, Vioapic, VioapicState
from vmmpy.vmm.vlapic import XAPIC_BASE, ApicBus, Vlapic

from .kernel_devices_harness import FakeLapic, FakeVcpu, json_roundtrip, load_state

LEVEL, MASKED, LOGICAL = 1 << 15, 1 << 16, 1 << 11


def make(*apic_ids):
    lapics = {i: FakeLapic(i) for i in (apic_ids or (0,))}

    def route(dest, logical):
        if dest == 0xFF:
            return list(lapics.values())
        return [lapics[dest]] if dest in lapics else []

    return Vioapic(route), lapics


def write_reg(ioapic, index, value):
    ioapic.mmio_write(IOAPIC_BASE, 4, index)
    ioapic.mmio_write(IOAPIC_BASE + 0x10, 4, value)


def read_reg(ioapic, index):
    ioapic.mmio_write(IOAPIC_BASE, 4, index)
    return ioapic.mmio_read(IOAPIC_BASE + 0x10, 4)


def program(ioapic, pin, low, dest=0):
    write_reg(ioapic, 0x10 + 2 * pin + 1, dest << 24)
    write_reg(ioapic, 0x10 + 2 * pin, low)


def test_id_version_and_ioregsel():
    ioapic, _ = make()
    assert read_reg(ioapic, 0x01) == 0x00170011  # 24 pins, version 0x11
    write_reg(ioapic, 0x00, 0x0A000000)
    assert read_reg(ioapic, 0x00) == 0x0A000000
    assert read_reg(ioapic, 0x02) == 0x0A000000
    write_reg(ioapic, 0x01, 0)
    assert read_reg(ioapic, 0x01) == 0x00170011
    ioapic.mmio_write(IOAPIC_BASE, 4, 0x23)
    assert ioapic.mmio_read(IOAPIC_BASE, 4) == 0x23
    with pytest.raises(DeviceAccessError, match="vioapic: 8-byte access"):
        ioapic.mmio_read(IOAPIC_BASE + 0x10, 8)


def test_redirection_entries_reset_masked_and_keep_read_only_bits():
    ioapic, _ = make()
    assert all(read_reg(ioapic, 0x10 + 2 * pin) == MASKED for pin in range(24))
    write_reg(ioapic, 0x10 + 2 * 5, 0xFFFFFFFF)
    assert read_reg(ioapic, 0x10 + 2 * 5) == 0x0001AFFF  # delivery status, remote IRR read-only
    write_reg(ioapic, 0x10 + 2 * 5 + 1, 0xFFFFFFFF)
    assert read_reg(ioapic, 0x10 + 2 * 5 + 1) == 0xFF000000


def test_masked_pin_holds_no_interrupt_and_edges_seen_while_masked_are_lost():
    ioapic, lapics = make()
    program(ioapic, 4, MASKED | 0x34)
    ioapic.pulse_irq(4)
    ioapic.assert_irq(4)
    program(ioapic, 4, 0x34)  # unmask an edge pin whose line is high: nothing
    assert lapics[0].received == []
    ioapic.deassert_irq(4)
    ioapic.pulse_irq(4)
    assert lapics[0].received == [(0x34, False)]


def test_each_edge_pulse_delivers_once():
    ioapic, lapics = make()
    program(ioapic, 1, 0x31)
    for _ in range(3):
        ioapic.pulse_irq(1)
    ioapic.assert_irq(1)
    ioapic.assert_irq(1)  # already high: no new edge
    assert lapics[0].received == [(0x31, False)] * 4


def test_level_pin_holds_remote_irr_until_eoi_and_redelivers_while_active():
    ioapic, lapics = make()
    program(ioapic, 9, LEVEL | 0x39)
    ioapic.assert_irq(9)
    assert lapics[0].received == [(0x39, True)]
    assert read_reg(ioapic, 0x10 + 18) & (1 << 14)
    ioapic.eoi(0x39)  # still active: delivered again
    assert lapics[0].received == [(0x39, True)] * 2
    ioapic.deassert_irq(9)
    ioapic.eoi(0x38)  # another vector: nothing changes
    assert read_reg(ioapic, 0x10 + 18) & (1 << 14)
    ioapic.eoi(0x39)
    assert not read_reg(ioapic, 0x10 + 18) & (1 << 14)
    assert len(lapics[0].received) == 2


def test_unmasking_an_active_level_pin_delivers():
    ioapic, lapics = make()
    program(ioapic, 10, MASKED | LEVEL | 0x3A)
    ioapic.assert_irq(10)
    assert lapics[0].received == []
    program(ioapic, 10, LEVEL | 0x3A)
    assert lapics[0].received == [(0x3A, True)]


def test_routes_by_destination_apic_id_and_broadcast():
    ioapic, lapics = make(0, 1, 2)
    program(ioapic, 3, 0x43, dest=2)
    ioapic.pulse_irq(3)
    program(ioapic, 4, 0x44, dest=0xFF)
    ioapic.pulse_irq(4)
    program(ioapic, 5, (1 << 8) | 0x45, dest=0xFF)  # lowest priority: one of them
    ioapic.pulse_irq(5)
    assert lapics[0].received == [(0x44, False), (0x45, False)]
    assert lapics[1].received == [(0x44, False)]
    assert lapics[2].received == [(0x43, False), (0x44, False)]


def test_full_path_level_interrupt_through_real_vlapic_eoi():
    clock = ManualClock()
    bus = ApicBus()
    ioapic = Vioapic(bus.route)
    vcpu = FakeVcpu(clock)
    lapic = Vlapic(clock, vcpu, bus=bus, eoi_sink=ioapic.eoi)
    lapic.mmio_write(XAPIC_BASE + 0xF0, 4, 0x1FF)
    program(ioapic, 11, LEVEL | 0x5B)
    ioapic.assert_irq(11)
    assert lapic.deliver() == 0x5B
    ioapic.deassert_irq(11)
    lapic.mmio_write(XAPIC_BASE + 0xB0, 4, 0)  # EOI -> remote IRR cleared
    assert not read_reg(ioapic, 0x10 + 22) & (1 << 14)
    ioapic.assert_irq(11)
    assert lapic.deliver() == 0x5B


def _scenario():
    ioapic, lapics = make(0, 1)
    program(ioapic, 9, LEVEL | 0x39, dest=1)
    program(ioapic, 2, 0x32)
    program(ioapic, 7, MASKED | 0x37)
    ioapic.assert_irq(9)
    ioapic.pulse_irq(2)
    return ioapic, lapics


def _continue(ioapic):
    ioapic.pulse_irq(2)
    ioapic.eoi(0x39)  # pin 9 still active: redelivered
    ioapic.deassert_irq(9)
    ioapic.eoi(0x39)
    program(ioapic, 7, 0x37)
    ioapic.pulse_irq(7)
    return [read_reg(ioapic, i) for i in range(0x40)]


def test_save_restore_mid_activity_continues_exactly():
    ioapic_a, lapics_a = _scenario()
    regs_a = _continue(ioapic_a)

    ioapic_b, lapics_b = _scenario()
    state = json_roundtrip(ioapic_b.save())
    ioapic_c, lapics_c = make(0, 1)
    ioapic_c.restore(state)
    regs_c = _continue(ioapic_c)
    assert regs_c == regs_a
    for i in (0, 1):
        assert lapics_b[i].received + lapics_c[i].received == lapics_a[i].received
    assert lapics_c[1].received == [(0x39, True)]


def test_restore_refuses_bad_state():
    ioapic, _ = make()
    good = persist.dump(ioapic.save())
    bad = dict(good, redirection=[0x10000] * 26)
    with pytest.raises(PersistError, match=r"vioapic: redirection: redirection entry 25 out of range \(24 pins\)"):
        load_state(VioapicState, bad)
    bad = dict(good, pin_levels=[2] + [0] * 23)
    with pytest.raises(PersistError, match=r"vioapic: pin_levels\[0\]: 2 out of range \(0..1\)"):
        load_state(VioapicState, bad)
    with pytest.raises(PersistError, match="vioapic: payload: expected a mapping, got list"):
        load_state(VioapicState, [1, 2])
