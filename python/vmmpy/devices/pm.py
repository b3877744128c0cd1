"""ACPI power management as bhyve's pm.c does it: PM1a control at port 0x404 (sleep type 5 with
SLP_EN powers the guest off) and the reset control register at 0xCF9 (0x06 resets it).

The device only tells its ``suspend(how)`` callback; the VM does the suspending.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ..vmm.ioctl import SuspendHow
from .base import Device

PM1A_CNT_PORT = 0x404
RESET_PORT = 0xCF9
SLP_EN = 1 << 13
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7
SLP_TYP_S5 = 5  # soft off
POWEROFF_VALUE = SLP_EN | (SLP_TYP_S5 << SLP_TYP_SHIFT)  # 0x3400
RESET_CPU = 0x04
RESET_SYSTEM = 0x02


@dataclass
class PmState:
    VERSION: ClassVar[int] = 1
    MIN_VERSION: ClassVar[int] = 1

    pm1_control: int
    reset_control: int


class PowerManagement(Device):
    SECTION = "pm"
    STATE = PmState

    def __init__(self, suspend: Callable[[SuspendHow], None]) -> None:
        self.port_ranges = [(PM1A_CNT_PORT, 2), (RESET_PORT, 1)]
        self.suspend = suspend
        self.pm1_control = 0
        self.reset_control = 0

    def io_read(self, port: int, size: int) -> int:
        if port == RESET_PORT:
            return self.reset_control
        value = self.pm1_control >> (8 * (port - PM1A_CNT_PORT))
        return value & ((1 << (8 * size)) - 1)

    def io_write(self, port: int, size: int, value: int) -> None:
        if port == RESET_PORT:
            self.reset_control = value & 0x0E
            if value & RESET_CPU:
                self.suspend(SuspendHow.RESET)
            return
        if port != PM1A_CNT_PORT or size != 2:
            return  # byte writes to the control register halves are not a sleep request
        sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK
        self.pm1_control = value & ~SLP_EN & 0xFFFF
        if value & SLP_EN and sleep_type == SLP_TYP_S5:
            self.suspend(SuspendHow.POWEROFF)

    def save(self) -> PmState:
        return PmState(self.pm1_control, self.reset_control)

    def restore(self, state: PmState) -> None:
        self.pm1_control = state.pm1_control & 0xFFFF
        self.reset_control = state.reset_control & 0xFF
