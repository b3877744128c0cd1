"""vpmtmr: the counter at given guest times, wraparound, partial reads, save/restore."""

import pytest

from vmmpy.state import persist
from vmmpy.state.persist import PersistError
from vmmpy.vmm.clock import ManualClock, ns_for_ticks
from vmmpy.vmm.interfaces import DeviceAccessError
from vmmpy.vmm.vpmtmr import PMTMR_FREQ_HZ, Vpmtmr, VpmtmrState

from .kernel_devices_harness import json_roundtrip, load_state


def test_counter_runs_at_3_579545_mhz_of_guest_time():
    clock = ManualClock(7)
    pm = Vpmtmr(clock)
    assert pm.io_read(0x408, 4) == 0
    clock.set_ns(7 + 1_000)
    assert pm.io_read(0x408, 4) == 3  # 3.58 ticks per microsecond, floor
    clock.set_ns(7 + 1_000_000_000)
    assert pm.io_read(0x408, 4) == 3_579_545


def test_counter_wraps_at_32_bits():
    clock = ManualClock()
    pm = Vpmtmr(clock)
    wrap = ns_for_ticks(2**32, PMTMR_FREQ_HZ)
    clock.set_ns(wrap - 1)
    assert pm.io_read(0x408, 4) == 2**32 - 1
    clock.set_ns(wrap)
    assert pm.io_read(0x408, 4) == 0
    clock.set_ns(wrap + 1_000_000_000)
    assert pm.io_read(0x408, 4) == 3_579_545


def test_byte_and_word_reads_see_the_same_counter():
    clock = ManualClock()
    pm = Vpmtmr(clock, initial_value=0x12345678)
    assert pm.io_read(0x408, 2) == 0x5678
    assert pm.io_read(0x40A, 2) == 0x1234
    assert pm.io_read(0x40B, 1) == 0x12
    with pytest.raises(DeviceAccessError, match="vpmtmr: 4-byte access at port 0x409 runs past 0x40b"):
        pm.io_read(0x409, 4)
    with pytest.raises(DeviceAccessError, match="vpmtmr: port 0x40c is not the PM timer"):
        pm.io_read(0x40C, 1)


def test_save_restore_continues_the_same_count():
    clock = ManualClock()
    pm = Vpmtmr(clock)
    clock.set_ns(123_456_789)
    state = json_roundtrip(pm.save())
    clock_b = ManualClock(123_456_789)
    pm_b = Vpmtmr(clock_b)
    pm_b.restore(state)
    for t in (123_456_789, 500_000_001, 2_000_000_000):
        clock.set_ns(t)
        clock_b.set_ns(t)
        assert pm_b.io_read(0x408, 4) == pm.io_read(0x408, 4)


def test_restore_refuses_bad_state():
    good = persist.dump(Vpmtmr(ManualClock()).save())
    with pytest.raises(PersistError, match=r"vpmtmr: base_value: 4294967296 out of range"):
        load_state(VpmtmrState, dict(good, base_value=2**32))
    with pytest.raises(PersistError, match=r"vpmtmr: anchor_ago_ns: -1 out of range"):
        load_state(VpmtmrState, dict(good, anchor_ago_ns=-1))
