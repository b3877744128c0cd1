"""vatpic: ICW init sequence, masks, EOI modes, priority, cascade, ELCR level sensing, poll,
auto-EOI, and save/restore continuity."""

import pytest

from vmmpy.state import persist
from vmmpy.state.persist import PersistError
from vmmpy.vmm.interfaces import DeviceAccessError
from vmmpy.vmm.vatpic import Vatpic, VatpicState

from .kernel_devices_harness import json_roundtrip, load_state


def make(aeoi=False):
    vectors = []
    pic = Vatpic(vectors.append)
    icw4 = 0x03 if aeoi else 0x01
    for port, icw2, icw3 in ((0x20, 0x20, 0x04), (0xA0, 0x28, 0x02)):
        pic.io_write(port, 1, 0x11)
        pic.io_write(port + 1, 1, icw2)
        pic.io_write(port + 1, 1, icw3)
        pic.io_write(port + 1, 1, icw4)
    return pic, vectors


def isr(pic, port=0x20):
    pic.io_write(port, 1, 0x0B)
    return pic.io_read(port, 1)


def irr(pic, port=0x20):
    pic.io_write(port, 1, 0x0A)
    return pic.io_read(port, 1)


def test_init_sequence_sets_vector_bases_and_clears_masks():
    pic, vectors = make()
    assert pic.io_read(0x21, 1) == 0 and pic.io_read(0xA1, 1) == 0
    pic.pulse_irq(1)
    pic.pulse_irq(12)
    assert vectors == [0x21]  # IRQ12 is lower priority than IRQ1 in service: waits
    pic.io_write(0x20, 1, 0x20)
    assert vectors == [0x21, 0x2C]


def test_nothing_is_raised_before_initialisation_completes():
    vectors = []
    pic = Vatpic(vectors.append)
    pic.io_write(0x20, 1, 0x11)
    pic.io_write(0x21, 1, 0x40)
    pic.pulse_irq(3)  # ICW3/ICW4 still expected
    assert vectors == []
    pic.io_write(0x21, 1, 0x04)
    pic.io_write(0x21, 1, 0x01)
    assert vectors == [0x43]


def test_ocw1_mask_holds_an_edge_until_unmasked():
    pic, vectors = make()
    pic.io_write(0x21, 1, 0x02)
    assert pic.io_read(0x21, 1) == 0x02
    pic.pulse_irq(1)
    assert vectors == [] and irr(pic) == 0x02
    pic.io_write(0x21, 1, 0x00)
    assert vectors == [0x21] and irr(pic) == 0 and isr(pic) == 0x02


def test_priority_holds_lower_irq_until_non_specific_eoi():
    pic, vectors = make()
    pic.pulse_irq(3)
    pic.pulse_irq(5)
    pic.pulse_irq(1)  # higher than 3: nests
    assert vectors == [0x23, 0x21]
    assert isr(pic) == 0x0A
    pic.io_write(0x20, 1, 0x20)  # non-specific EOI ends IRQ1, the highest in service
    assert isr(pic) == 0x08 and vectors == [0x23, 0x21]
    pic.io_write(0x20, 1, 0x20)
    assert vectors == [0x23, 0x21, 0x25]


def test_specific_eoi_clears_the_named_irq():
    pic, vectors = make()
    pic.pulse_irq(3)
    pic.pulse_irq(1)
    pic.io_write(0x20, 1, 0x60 | 3)  # specific EOI for IRQ3 while IRQ1 is also in service
    assert isr(pic) == 0x02


def test_cascade_delivers_slave_vectors_and_needs_both_eois():
    pic, vectors = make()
    pic.pulse_irq(10)
    assert vectors == [0x2A]
    assert isr(pic) == 0x04 and isr(pic, 0xA0) == 0x04
    pic.pulse_irq(11)
    assert vectors == [0x2A]
    pic.io_write(0xA0, 1, 0x20)
    assert vectors == [0x2A]  # master still has the cascade in service
    pic.io_write(0x20, 1, 0x20)
    assert vectors == [0x2A, 0x2B]


def test_elcr_level_irq_redelivers_after_eoi_while_high():
    pic, vectors = make()
    pic.io_write(0x4D1, 1, 0xFF)
    assert pic.io_read(0x4D1, 1) == 0xDE  # IRQ8 and IRQ13 stay edge
    pic.assert_irq(9)
    assert vectors == [0x29]
    for port in (0xA0, 0x20):
        pic.io_write(port, 1, 0x20)
    assert vectors == [0x29, 0x29]
    pic.deassert_irq(9)
    for port in (0xA0, 0x20):
        pic.io_write(port, 1, 0x20)
    assert vectors == [0x29, 0x29]
    assert irr(pic, 0xA0) == 0


def test_edge_irq_is_latched_once_per_rising_edge():
    pic, vectors = make()
    pic.assert_irq(4)
    pic.io_write(0x20, 1, 0x20)
    assert vectors == [0x24]  # line still high but no new edge
    pic.deassert_irq(4)
    pic.assert_irq(4)
    assert vectors == [0x24, 0x24]


def test_auto_eoi_leaves_nothing_in_service():
    pic, vectors = make(aeoi=True)
    pic.pulse_irq(3)
    pic.pulse_irq(4)
    assert vectors == [0x23, 0x24] and isr(pic) == 0


def test_poll_command_acknowledges_without_the_sink():
    pic, vectors = make()
    pic.io_write(0x21, 1, 0xFF)
    pic.pulse_irq(6)
    pic.io_write(0x20, 1, 0x0C)  # OCW3 poll
    pic.io_write(0x21, 1, 0x00)  # unmask: poll mode keeps the sink quiet
    assert pic.io_read(0x20, 1) == 0x86
    assert vectors == [] and isr(pic) == 0x40


def test_rotate_on_non_specific_eoi_makes_the_served_irq_lowest():
    pic, vectors = make()
    pic.pulse_irq(1)
    pic.io_write(0x20, 1, 0xA0)  # rotate on non-specific EOI: IRQ1 now lowest, IRQ2 highest
    pic.io_write(0x21, 1, 0xFF)
    pic.pulse_irq(0)
    pic.pulse_irq(3)
    pic.io_write(0x21, 1, 0x00)
    assert vectors == [0x21, 0x23]


def test_bad_port_and_size_are_refused():
    pic, _ = make()
    with pytest.raises(DeviceAccessError, match="vatpic: 2-byte access to port 0x20"):
        pic.io_read(0x20, 2)
    with pytest.raises(ValueError, match="IRQ 2 is the cascade"):
        pic.assert_irq(2)


def _scenario():
    pic, vectors = make()
    pic.io_write(0x4D1, 1, 0x02)  # IRQ9 level
    pic.assert_irq(9)
    pic.pulse_irq(3)
    pic.pulse_irq(4)
    pic.io_write(0x21, 1, 0x80)
    pic.pulse_irq(7)  # masked: latched in IRR
    return pic, vectors


def _continue(pic):
    pic.io_write(0xA0, 1, 0x20)
    pic.io_write(0x20, 1, 0x20)  # ends IRQ9's cascade; still high -> again
    pic.deassert_irq(9)
    pic.io_write(0xA0, 1, 0x20)
    pic.io_write(0x20, 1, 0x20)
    pic.io_write(0x20, 1, 0x20)
    pic.io_write(0x21, 1, 0x00)
    pic.pulse_irq(5)
    return [isr(pic), irr(pic), isr(pic, 0xA0), irr(pic, 0xA0), pic.io_read(0x21, 1), pic.io_read(0x4D1, 1)]


def test_save_restore_mid_activity_continues_exactly():
    pic_a, vectors_a = _scenario()
    regs_a = _continue(pic_a)
    pic_b, vectors_b = _scenario()
    state = json_roundtrip(pic_b.save())
    vectors_c = []
    pic_c = Vatpic(vectors_c.append)
    pic_c.restore(state)
    regs_c = _continue(pic_c)
    assert vectors_b + vectors_c == vectors_a
    assert regs_c == regs_a
    assert len(vectors_c) >= 2


def test_restore_refuses_bad_state():
    pic, _ = make()
    good = persist.dump(pic.save())
    bad = dict(good, irq_base=[0x20, 0x2C])
    with pytest.raises(PersistError, match=r"vatpic: irq_base\[1\]: 0x2c is not a multiple of 8"):
        load_state(VatpicState, bad)
    bad = dict(good, elcr=[0x01, 0])
    with pytest.raises(PersistError, match=r"vatpic: elcr\[0\]: 0x1 makes an always-edge IRQ level"):
        load_state(VatpicState, bad)
    bad = dict(good, read_isr=[1, 0])
    with pytest.raises(PersistError, match=r"vatpic: read_isr\[0\]: expected a bool, got 1"):
        load_state(VatpicState, bad)
