"""Run a guest program on a bare vCPU, without a VM: for tests and tools.

``run_bare`` loads a program into a ``_core.GuestMemory``, points one ``_core.Vcpu`` at it as the
platform's loader does (``vmmpy.guest.platform``: rip = ``start``, rsp = 1 MiB) and handles just
enough of the platform itself: COM1 output is collected, LSR reads 0x60, a write of S5 to the
PM1a control port powers off, ``hlt`` with interrupts off halts. With ``lapic=FakeLapic()`` it
also emulates the local APIC's registers and timer, firing the timer by injecting its vector
when the guest TSC reaches the deadline (a halted guest skips ahead to it).

It is not the VM's run loop (that lives in ``runtime/``); it has no devices, no threads and no
host time, so the same program and arguments always give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from .. import _core
from . import platform as P
from .asm import Program

DEFAULT_CHUNK = 1 << 22  # instructions per run() call between checks


class FakeLapic:
    """The local APIC's registers and its timer, enough for a program to program them.

    Every access is recorded in ``accesses`` as (offset, is_write, value) so tests can check what
    the guest wrote. The timer counts ``LAPIC_TIMER_HZ_AT_DIVIDE_1 / divisor`` per second of guest
    time, and guest time is the TSC (1 GHz): ``count`` counts last
    ``count * divisor * TSC_HZ / LAPIC_TIMER_HZ_AT_DIVIDE_1`` TSC ticks (rounded up).
    """

    def __init__(self, apic_id: int = 0):
        self.regs: dict[int, int] = {
            P.LAPIC_ID: apic_id << 24,
            P.LAPIC_VERSION: 0x0005_0014,  # version 0x14, 6 LVT entries (max LVT index 5)
            P.LAPIC_TPR: 0,
            P.LAPIC_SVR: 0xFF,
            P.LAPIC_LVT_TIMER: P.LVT_MASKED,
            P.LAPIC_TIMER_INITIAL_COUNT: 0,
            P.LAPIC_TIMER_DIVIDE_CONFIG: 0,
        }
        self.accesses: list[tuple[int, bool, int | None]] = []
        self.deadline: int | None = None  # guest TSC at which the timer next fires
        self.armed_at = 0  # guest TSC at which the current count was loaded
        self.eoi_count = 0
        self.fired = 0

    # -- timer -------------------------------------------------------------------------------
    def ticks_for(self, count: int) -> int:
        """TSC ticks that ``count`` timer counts last, in exact integer arithmetic."""
        divisor = P.timer_divisor(self.regs[P.LAPIC_TIMER_DIVIDE_CONFIG])
        return -(-count * divisor * P.TSC_HZ // P.LAPIC_TIMER_HZ_AT_DIVIDE_1)

    @property
    def enabled(self) -> bool:
        return bool(self.regs[P.LAPIC_SVR] & P.SVR_APIC_ENABLE)

    def _arm(self, now: int) -> None:
        count = self.regs[P.LAPIC_TIMER_INITIAL_COUNT]
        self.armed_at = now
        self.deadline = now + self.ticks_for(count) if count else None

    def timer_vector_if_due(self, now: int) -> int | None:
        """If the timer has expired by ``now``: reload (periodic) or stop (one-shot), and return the
        vector to inject, or None when masked or the APIC is software-disabled."""
        if self.deadline is None or now < self.deadline:
            return None
        lvt = self.regs[P.LAPIC_LVT_TIMER]
        if (lvt & P.LVT_TIMER_MODE_MASK) == P.LVT_TIMER_PERIODIC:
            self.armed_at = self.deadline
            self.deadline += self.ticks_for(self.regs[P.LAPIC_TIMER_INITIAL_COUNT])
        else:
            self.deadline = None
        if lvt & P.LVT_MASKED or not self.enabled:
            return None
        self.fired += 1
        return lvt & P.LVT_VECTOR_MASK

    def current_count(self, now: int) -> int:
        if self.deadline is None:
            return 0
        divisor = P.timer_divisor(self.regs[P.LAPIC_TIMER_DIVIDE_CONFIG])
        return max(0, (self.deadline - now) * P.LAPIC_TIMER_HZ_AT_DIVIDE_1 // (divisor * P.TSC_HZ))

    # -- MMIO ----------------------------------------------------------------------------------
    def read(self, offset: int, now: int) -> int:
        value = self.current_count(now) if offset == P.LAPIC_TIMER_CURRENT_COUNT else self.regs.get(offset, 0)
        self.accesses.append((offset, False, value))
        return value

    def write(self, offset: int, value: int, now: int) -> None:
        self.accesses.append((offset, True, value))
        value &= 0xFFFF_FFFF
        if offset == P.LAPIC_EOI:
            self.eoi_count += 1
        elif offset == P.LAPIC_TIMER_INITIAL_COUNT:
            self.regs[offset] = value
            self._arm(now)
        elif offset == P.LAPIC_LVT_TIMER:
            self.regs[offset] = value & (P.LVT_VECTOR_MASK | P.LVT_MASKED | P.LVT_TIMER_MODE_MASK)
        elif offset in (P.LAPIC_ID, P.LAPIC_VERSION, P.LAPIC_TIMER_CURRENT_COUNT):
            pass  # read-only
        else:
            self.regs[offset] = value

    def writes_to(self, offset: int) -> list[int]:
        return [v for off, w, v in self.accesses if w and off == offset]


class RunResult(NamedTuple):
    console: bytes
    exit_reason: str  # "poweroff", "halted", "idle", "budget", "fault:<kind>", "unhandled:<what>"
    instructions: int
    vcpu: _core.Vcpu
    memory: _core.GuestMemory


@dataclass
class _Uart:
    """COM1 as far as a program can see it: THR, LSR, and scratch registers that keep writes."""

    output: bytearray = field(default_factory=bytearray)
    regs: dict[int, int] = field(default_factory=dict)

    def write(self, port: int, value: int) -> None:
        dlab = self.regs.get(P.COM1_LCR, 0) & 0x80
        if port == P.COM1_THR and not dlab:
            self.output.append(value & 0xFF)
        else:
            self.regs[port] = value & 0xFF

    def read(self, port: int) -> int:
        if port == P.COM1_LSR:
            return P.LSR_IDLE
        if port == P.COM1_IIR:
            return 0x01  # no interrupt pending
        if port == P.COM1_THR and not self.regs.get(P.COM1_LCR, 0) & 0x80:
            return 0  # receive buffer: nothing received
        return self.regs.get(port, 0)


def boot(program: Program, memory: _core.GuestMemory, *, vendor: str = "intel", tsc: str = "instructions") -> _core.Vcpu:
    """Load ``program`` into ``memory`` and return a vCPU set up as the platform's loader does."""
    if P.ENTRY_SYMBOL not in program.symbols:
        raise ValueError(f"program has no '{P.ENTRY_SYMBOL}' label to start at")
    program.load(memory)
    cpu = _core.Vcpu(memory, vendor=vendor, tsc=tsc)
    cpu.set_register("rip", program.symbols[P.ENTRY_SYMBOL])
    cpu.set_register("rsp", P.STACK_TOP)
    return cpu


def run_bare(
    program: Program,
    memsize: int,
    budget: int,
    *,
    memory: _core.GuestMemory | None = None,
    lowmem_limit: int | None = None,
    lapic: FakeLapic | None = None,
    vendor: str = "intel",
    tsc: str = "instructions",
    chunk: int = DEFAULT_CHUNK,
) -> RunResult:
    """Run ``program`` for at most ``budget`` instructions on a fresh single vCPU.

    ``memory`` reuses an existing GuestMemory (for example one a test pre-filled); otherwise one
    of ``memsize`` bytes is made (``lowmem_limit`` as ``_core.GuestMemory`` takes it). Returns
    (console bytes, exit reason, instructions retired, the vCPU, the memory).
    """
    if memory is None:
        kwargs = {} if lowmem_limit is None else {"lowmem_limit": lowmem_limit}
        memory = _core.GuestMemory(memsize, **kwargs)
    cpu = boot(program, memory, vendor=vendor, tsc=tsc)
    return run_vcpu(cpu, memory, budget, lapic=lapic, chunk=chunk)


def run_vcpu(
    cpu: _core.Vcpu,
    memory: _core.GuestMemory,
    budget: int,
    *,
    lapic: FakeLapic | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> RunResult:
    """Run an already loaded (or restored) vCPU for at most ``budget`` more instructions,
    handling the platform's exits as ``run_bare`` does. ``instructions`` in the result counts
    this call's instructions only; the console holds this call's output only."""
    uart = _Uart()
    first = cpu.instructions_retired

    def done(reason: str) -> RunResult:
        return RunResult(bytes(uart.output), reason, cpu.instructions_retired - first, cpu, memory)

    while True:
        left = budget - (cpu.instructions_retired - first)
        if left <= 0:
            return done("budget")
        step = min(left, chunk)
        if lapic is not None and lapic.deadline is not None:
            step = max(1, min(step, lapic.deadline - cpu.tsc))
        exit = cpu.run(step)
        if lapic is not None:
            vector = lapic.timer_vector_if_due(cpu.tsc)
            if vector is not None:
                cpu.inject_interrupt(vector)
        kind = exit.kind
        if kind == "budget":
            continue
        if kind == "inout":
            port, size = exit.port, exit.size
            if not exit.is_in:
                if P.is_poweroff(port, size, exit.value):
                    return done("poweroff")
                if port in P.COM1_PORTS and size == 1:
                    uart.write(port, exit.value)
                elif port == P.PM1A_CNT_PORT:
                    pass  # any other PM1a control write: nothing to do
                else:
                    return done(f"unhandled:out{size * 8} port {port:#x}")
            elif port in P.COM1_PORTS and size == 1:
                cpu.complete_read(uart.read(port))
            elif port == P.PM1A_CNT_PORT:
                cpu.complete_read(0)
            else:
                return done(f"unhandled:in{size * 8} port {port:#x}")
        elif kind == "mmio":
            offset = exit.gpa - P.LAPIC_BASE
            if lapic is None or not 0 <= offset < P.LAPIC_SIZE or exit.size != 4:
                what = "write" if exit.is_write else "read"
                return done(f"unhandled:mmio {what} {exit.size} bytes at {exit.gpa:#x}")
            if exit.is_write:
                lapic.write(offset, exit.value, cpu.tsc)
            else:
                cpu.complete_read(lapic.read(offset, cpu.tsc))
        elif kind == "hlt":
            if not cpu.registers()["rflags"] & (1 << 9):
                return done("halted")
            if lapic is None or lapic.deadline is None:
                return done("idle")  # waiting for an interrupt nothing will send
            # Nothing runs while halted: skip guest time ahead to the timer's deadline.
            skip = lapic.deadline - cpu.tsc
            if skip > 0:
                cpu.tsc_offset = (cpu.tsc_offset + skip) % (1 << 64)
            vector = lapic.timer_vector_if_due(cpu.tsc)
            if vector is None:
                return done("idle")  # the timer is masked or the APIC disabled: nothing wakes it
            cpu.inject_interrupt(vector)
        elif kind == "fault":
            return done(f"fault:{exit.fault} at {exit.rip:#x}")
        else:
            return done(f"unhandled:{kind}")
