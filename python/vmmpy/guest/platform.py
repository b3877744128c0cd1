"""The platform a vmmpy guest program runs on: where it is loaded, where it starts, how it prints,
how it powers off, where its local APIC lives and how fast time runs.

These constants are the contract between the shipped guest programs (``vmmpy.guest.programs``)
and whoever builds the machine they run on (the VM runtime, or ``vmmpy.guest.runner`` in tests).
docs/guests.md says the same in prose. Nothing here runs; it only names numbers.
"""

from __future__ import annotations

PAGE_SIZE = 4096

# ---- loading ------------------------------------------------------------------------------
IMAGE_BASE = 0x10_0000  # programs are assembled with this origin and loaded here (1 MiB)
IMAGE_LIMIT = 0x20_0000  # an image must end at or below 2 MiB
WORKLOAD_BASE = IMAGE_LIMIT  # memory a program sweeps, dirties or hashes starts here by default
ENTRY_SYMBOL = "start"  # execution begins at this label; rip = its address
STACK_TOP = IMAGE_BASE  # the loader sets rsp here; the stack grows down below the image
STACK_SIZE = 64 * 1024  # [STACK_TOP - STACK_SIZE, STACK_TOP) is reserved for the stack
MIN_MEMSIZE = IMAGE_LIMIT  # lowmem must at least hold the stack and a full-size image

# ---- memory layout (as vmmpy.memory / bhyve's vm_setup_memory) ------------------------------
HIGHMEM_BASE = 1 << 32  # memory above lowmem's limit is mapped from 4 GiB

# ---- console: COM1, an ns16550 UART -------------------------------------------------------------
COM1_BASE = 0x3F8
COM1_THR = COM1_BASE + 0  # write a byte here to print it (8-bit out)
COM1_IER = COM1_BASE + 1
COM1_IIR = COM1_BASE + 2
COM1_LCR = COM1_BASE + 3
COM1_MCR = COM1_BASE + 4
COM1_LSR = COM1_BASE + 5
COM1_MSR = COM1_BASE + 6
COM1_SCR = COM1_BASE + 7
COM1_PORTS = range(COM1_BASE, COM1_BASE + 8)
LSR_THRE = 0x20  # transmit holding register empty (always, since transmission is instant)
LSR_TEMT = 0x40
LSR_IDLE = LSR_THRE | LSR_TEMT  # what LSR reads when nothing has been received: 0x60

# ---- power: ACPI PM1a control register -----------------------------------------------------------
PM1A_CNT_PORT = 0x404
PM1_SLP_TYP_SHIFT = 10
PM1_SLP_TYP_MASK = 0x7 << PM1_SLP_TYP_SHIFT
PM1_SLP_EN = 1 << 13
SLP_TYP_S5 = 5  # soft off
POWEROFF_VALUE = (SLP_TYP_S5 << PM1_SLP_TYP_SHIFT) | PM1_SLP_EN  # 0x3400, written with out16


def is_poweroff(port: int, size: int, value: int) -> bool:
    """True when an ``out`` of ``value`` to ``port`` asks for soft-off (S5 with SLP_EN set)."""
    return (
        port == PM1A_CNT_PORT
        and size >= 2
        and bool(value & PM1_SLP_EN)
        and (value & PM1_SLP_TYP_MASK) >> PM1_SLP_TYP_SHIFT == SLP_TYP_S5
    )


from ..vmm.vlapic import BUS_FREQ_HZ  # noqa: E402  (the platform the VM builds)

# ---- time ----------------------------------------------------------------------------------------
TSC_HZ = 1_000_000_000  # one TSC tick per guest nanosecond
# The local APIC timer decrements its current count LAPIC_TIMER_HZ_AT_DIVIDE_1 / divide times a
# second of guest time: the vlapic's bus clock (bhyve's VLAPIC_BUS_FREQ, 128 MiHz).
LAPIC_TIMER_HZ_AT_DIVIDE_1 = BUS_FREQ_HZ

# ---- local APIC (xAPIC, MMIO) -----------------------------------------------------------------------
LAPIC_BASE = 0xFEE0_0000
LAPIC_SIZE = 0x1000
LAPIC_ID = 0x20
LAPIC_VERSION = 0x30
LAPIC_TPR = 0x80
LAPIC_EOI = 0xB0
LAPIC_SVR = 0xF0  # spurious interrupt vector register
LAPIC_LVT_TIMER = 0x320
LAPIC_TIMER_INITIAL_COUNT = 0x380
LAPIC_TIMER_CURRENT_COUNT = 0x390
LAPIC_TIMER_DIVIDE_CONFIG = 0x3E0

SVR_APIC_ENABLE = 1 << 8
LVT_VECTOR_MASK = 0xFF
LVT_MASKED = 1 << 16
LVT_TIMER_MODE_SHIFT = 17
LVT_TIMER_MODE_MASK = 0x3 << LVT_TIMER_MODE_SHIFT
LVT_TIMER_ONE_SHOT = 0 << LVT_TIMER_MODE_SHIFT
LVT_TIMER_PERIODIC = 1 << LVT_TIMER_MODE_SHIFT

# The divide configuration register encodes the divisor in bits 0, 1 and 3 (Intel SDM 10.5.4).
DIVIDE_CONFIG_TO_DIVISOR = {
    0b0000: 2, 0b0001: 4, 0b0010: 8, 0b0011: 16, 0b1000: 32, 0b1001: 64, 0b1010: 128, 0b1011: 1,
}
DIVIDE_BY_1 = 0b1011


def timer_divisor(divide_config: int) -> int:
    """The divisor a value written to the divide configuration register selects."""
    return DIVIDE_CONFIG_TO_DIVISOR[divide_config & 0b1011]


def lapic_timer_ns_per_count(divide_config: int) -> float:
    """Guest nanoseconds per timer count for a divide configuration value."""
    return timer_divisor(divide_config) * TSC_HZ / LAPIC_TIMER_HZ_AT_DIVIDE_1
