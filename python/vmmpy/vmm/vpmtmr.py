"""vpmtmr: the ACPI power-management timer at port 0x408.

Owns: a free-running 32-bit up-counter at 3.579545 MHz derived from guest nanoseconds (the
FADT should set TMR_VAL_EXT), readable as a dword at 0x408 or in 1/2-byte pieces at
0x408-0x40B. The counter wraps at 2**32 (about 20 minutes).

Does not own: PM1 status/enable (TMR_STS, the carry interrupt) -- those live with the ACPI
PM1 event block in userspace, not here.
"""

from __future__ import annotations

import dataclasses

from .clock import ticks_in
from .interfaces import DeviceAccessError, DeviceState, GuestClock, check_access

PMTMR_PORT = 0x408
PMTMR_FREQ_HZ = 3_579_545
PMTMR_BITS = 32
_MASK = (1 << PMTMR_BITS) - 1


@dataclasses.dataclass
class VpmtmrState(DeviceState):
    """Saved PM timer: the counter value ``base_value`` it had ``anchor_ago_ns`` before the save."""

    VERSION = 1
    SECTION = "vpmtmr"

    base_value: int
    anchor_ago_ns: int

    def validate(self) -> None:
        self.check_int("base_value", 0, _MASK)
        self.check_int("anchor_ago_ns", 0, 2**63)


class Vpmtmr:
    port_ranges = [(PMTMR_PORT, 4)]

    def __init__(self, clock: GuestClock, initial_value: int = 0) -> None:
        self.clock = clock
        self.base_value = initial_value & _MASK
        self.anchor_ns = clock.now_ns()

    def counter(self) -> int:
        elapsed = self.clock.now_ns() - self.anchor_ns
        return (self.base_value + ticks_in(elapsed, PMTMR_FREQ_HZ)) & _MASK

    def io_read(self, port: int, size: int) -> int:
        offset = port - PMTMR_PORT
        if not 0 <= offset < 4:
            raise DeviceAccessError(f"vpmtmr: port {port:#x} is not the PM timer (0x408-0x40b)")
        check_access("vpmtmr", f"port {port:#x}", size, (1, 2, 4))
        if offset + size > 4:
            raise DeviceAccessError(f"vpmtmr: {size}-byte access at port {port:#x} runs past 0x40b")
        return (self.counter() >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def io_write(self, port: int, size: int, value: int) -> None:
        self.io_read(port, size)  # validates the access; the counter is read-only

    def save(self) -> VpmtmrState:
        now = self.clock.now_ns()
        return VpmtmrState(base_value=self.base_value, anchor_ago_ns=now - self.anchor_ns)

    def restore(self, state: VpmtmrState) -> None:
        state.validate()
        self.base_value = state.base_value
        self.anchor_ns = self.clock.now_ns() - state.anchor_ago_ns
