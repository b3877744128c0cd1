"""vrtc: date/time for a configured epoch ticking with guest time, BCD/binary and 12/24 h,
SET, periodic rate, update and alarm interrupts, register C, NVRAM, save/restore."""

import calendar

import pytest

from vmmpy.state import persist
from vmmpy.state.persist import PersistError
from vmmpy.vmm.clock import ManualClock
from vmmpy.vmm.vrtc import Vrtc, VrtcState

from .kernel_devices_harness import RecordingIrq, json_roundtrip, load_state, run_until

LEAP_EVE = calendar.timegm((2024, 2, 29, 23, 59, 58))
S = 1_000_000_000


def make(epoch=LEAP_EVE, start=0):
    clock = ManualClock(start)
    irq = RecordingIrq(clock)
    return clock, irq, Vrtc(clock, irq, epoch_s=epoch)


def rd(rtc, reg):
    rtc.io_write(0x70, 1, reg)
    return rtc.io_read(0x71, 1)


def wr(rtc, reg, value):
    rtc.io_write(0x70, 1, reg)
    rtc.io_write(0x71, 1, value)


def date(rtc):
    return [rd(rtc, reg) for reg in (0x32, 9, 8, 7, 6, 4, 2, 0)]


def test_reads_the_configured_epoch_in_bcd_and_ticks_over_a_leap_day():
    clock, _, rtc = make()
    assert date(rtc) == [0x20, 0x24, 0x02, 0x29, 5, 0x23, 0x59, 0x58]  # Thursday
    clock.set_ns(2 * S - 1)
    assert rd(rtc, 0) == 0x59
    clock.set_ns(2 * S)
    assert date(rtc) == [0x20, 0x24, 0x03, 0x01, 6, 0x00, 0x00, 0x00]


def test_binary_and_12_hour_formats():
    _, _, rtc = make()
    wr(rtc, 0xB, 0x04)  # binary, 12-hour
    assert rd(rtc, 4) == 0x80 | 11 and rd(rtc, 0) == 58 and rd(rtc, 9) == 24


def test_set_stops_the_clock_and_written_time_runs_from_release():
    clock, _, rtc = make()
    wr(rtc, 0xB, 0x82)  # SET
    for reg, value in ((0, 0x30), (2, 0x15), (4, 0x08), (7, 0x31), (8, 0x12), (9, 0x99), (0x32, 0x19)):
        wr(rtc, reg, value)
    clock.set_ns(5 * S)
    assert rd(rtc, 0) == 0x30  # stopped
    wr(rtc, 0xB, 0x02)
    assert rtc.time_of_day_s() == calendar.timegm((1999, 12, 31, 8, 15, 30))
    clock.set_ns(5 * S + 3 * S)
    assert rd(rtc, 0) == 0x33


def test_writing_one_field_while_running_keeps_the_rest_and_the_phase():
    clock, _, rtc = make()
    clock.set_ns(S // 2)
    wr(rtc, 2, 0x10)  # minutes := 10
    assert rtc.time_of_day_s() == calendar.timegm((2024, 2, 29, 23, 10, 58))
    clock.set_ns(S)
    assert rd(rtc, 0) == 0x59


def test_uip_is_set_in_the_244_us_before_each_update():
    clock, _, rtc = make()
    clock.set_ns(S - 244_001)
    assert not rd(rtc, 0xA) & 0x80
    clock.set_ns(S - 244_000)
    assert rd(rtc, 0xA) & 0x80


def test_periodic_interrupt_at_1024_hz_exact_with_handler_reading_c():
    clock, irq, rtc = make()
    wr(rtc, 0xB, 0x42)  # PIE

    def handler():
        assert irq.events[-1][0] == clock.now_ns()
        assert rd(rtc, 0xC) & 0xC0 == 0xC0

    run_until(clock, [rtc], S, handler)
    times = irq.times("pulse", 8)
    assert len(times) == 1024
    assert times == [-((-k * S) // 1024) for k in range(1, 1025)]


@pytest.mark.parametrize("rate,per_second", [(3, 8192), (15, 2), (1, 256)])
def test_periodic_rate_select(rate, per_second):
    clock, irq, rtc = make()
    wr(rtc, 0xA, 0x20 | rate)
    wr(rtc, 0xB, 0x42)
    run_until(clock, [rtc], S, lambda: rd(rtc, 0xC))
    assert len(irq.times()) == per_second


def test_unread_register_c_means_one_interrupt_only():
    clock, irq, rtc = make()
    wr(rtc, 0xB, 0x42)
    run_until(clock, [rtc], S // 10)
    assert len(irq.times()) == 1
    assert rtc.next_event_ns() is None
    assert rd(rtc, 0xC) == 0xC0 and rd(rtc, 0xC) == 0


def test_periodic_flag_without_pie_is_set_but_raises_nothing():
    clock, irq, rtc = make()
    clock.set_ns(S // 100)
    assert rd(rtc, 0xC) == 0x40 | 0x10 * 0  # PF, no IRQF
    assert irq.events == []


def test_update_and_alarm_interrupts_on_whole_seconds():
    clock, irq, rtc = make()
    wr(rtc, 0xA, 0x20)  # no periodic
    wr(rtc, 1, 0x02)  # alarm at 00:00:02 ...
    wr(rtc, 3, 0x00)
    wr(rtc, 5, 0xC0)  # ... of any hour
    wr(rtc, 0xB, 0x22)  # AIE
    flags = []
    run_until(clock, [rtc], 10 * S, lambda: flags.append((clock.now_ns(), rd(rtc, 0xC))))
    assert irq.times() == [4 * S]  # 23:59:58 + 4 s = 00:00:02
    assert (4 * S, 0xB0) in flags  # IRQF | AF | UF
    wr(rtc, 0xB, 0x12)  # UIE
    run_until(clock, [rtc], 13 * S, lambda: rd(rtc, 0xC))
    assert irq.times() == [4 * S, 11 * S, 12 * S, 13 * S]


def test_nvram_holds_114_bytes_and_index_keeps_the_nmi_bit():
    _, _, rtc = make()
    for reg in range(0x0E, 0x80):
        if reg != 0x32:
            wr(rtc, reg, reg ^ 0x5A)
    assert all(rd(rtc, reg) == reg ^ 0x5A for reg in range(0x0E, 0x80) if reg != 0x32)
    rtc.io_write(0x70, 1, 0x80 | 0x20)
    assert rtc.io_read(0x70, 1) == 0xA0 and rtc.io_read(0x71, 1) == 0x20 ^ 0x5A
    assert rd(rtc, 0xD) == 0x80


def _scenario(clock):
    irq = RecordingIrq(clock)
    rtc = Vrtc(clock, irq, epoch_s=LEAP_EVE)
    wr(rtc, 0xA, 0x2A)  # 64 Hz
    wr(rtc, 0xB, 0x52)  # PIE | UIE
    wr(rtc, 0x40, 0x77)
    return irq, rtc


def _continue(clock, rtc, end, dump=True):
    def handler():
        rd(rtc, 0xC)
        if rtc.time_of_day_s() % 2:
            rd(rtc, 0)  # the guest also reads the time on odd seconds
    run_until(clock, [rtc], end, handler)
    if not dump:
        return None  # reading register C here would clear flags the uninterrupted run still has
    return date(rtc) + [rd(rtc, 0xA) & 0x7F, rd(rtc, 0xB), rd(rtc, 0xC), rd(rtc, 0x40)]


def test_save_restore_mid_run_continues_exactly():
    end, split = 3_500_000_000, 1_234_567_891
    clock_a = ManualClock()
    irq_a, rtc_a = _scenario(clock_a)
    regs_a = _continue(clock_a, rtc_a, end)
    clock_b = ManualClock()
    irq_b, rtc_b = _scenario(clock_b)
    _continue(clock_b, rtc_b, split, dump=False)
    state = json_roundtrip(rtc_b.save())
    clock_c = ManualClock(split)
    irq_c = RecordingIrq(clock_c)
    rtc_c = Vrtc(clock_c, irq_c, epoch_s=0)
    rtc_c.restore(state)
    regs_c = _continue(clock_c, rtc_c, end)
    assert irq_b.events + irq_c.events == irq_a.events
    assert len(irq_c.events) > 50
    assert regs_c == regs_a
    assert regs_c[:8] == [0x20, 0x24, 0x03, 0x01, 6, 0x00, 0x00, 0x01]


def test_restore_refuses_bad_state():
    _, _, rtc = make()
    good = persist.dump(rtc.save())
    with pytest.raises(PersistError, match=r"vrtc: nvram: holds 113 bytes, expected 114"):
        load_state(VrtcState, dict(good, nvram="00" * 113))
    with pytest.raises(PersistError, match=r"vrtc: nvram: not a hex string"):
        load_state(VrtcState, dict(good, nvram="zz" * 114))
    with pytest.raises(PersistError, match=r"vrtc: reg_c: 0xf sets bits 0-3"):
        load_state(VrtcState, dict(good, reg_c=0x0F))
