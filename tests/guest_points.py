"""Instruction counts at which a shipped guest does something, found by running it.

A test that stops a guest at an exact instruction count (``--pause-at=N``, ``Machine.pause_at``)
takes N from here, not from a number written by hand: the guest runs once in this process, to
its end, on the same slots, arguments and memory size, and the count is read at the event (a
console line ending, a device register write). A run is a pure function of its instruction
count (docs/devices.md), so a vmmrun started with the same configuration reaches the same event
at the same count. When a guest program changes, its events move and the counts move with them;
the tests then check that the pause landed where they say (the console seen at the pause).
"""

from __future__ import annotations

from dataclasses import dataclass

from vmmpy.devices.uart import CaptureConsole
from vmmpy.guest.programs import load_program
from vmmpy.runtime.config import VmConfig, parse_slot
from vmmpy.runtime.process import EXIT_POWEROFF, Machine

from .inproc import run_to_end

MEMSIZE = 8 << 20


class LineClock(CaptureConsole):
    """A COM1 backend that notes the vCPU's instruction count as each line's newline is written."""

    def __init__(self) -> None:
        super().__init__()
        self.vcpu = None
        self.line_ends: list[int] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        self.line_ends += [self.vcpu.instructions_retired] * data.count(b"\n")


@dataclass(frozen=True)
class GuestRun:
    lines: list[str]  # the console, line by line, each with its newline
    line_ends: list[int]  # the instruction count when each line's newline was written
    register_writes: list[tuple[int, int]]  # (instruction count, offset) of each watched write
    total: int  # instructions retired to power-off


def run_guest(program: str, slots: list[str], args: dict[str, str] | None = None, *, memsize: int = MEMSIZE,
              watch: tuple[int, set[int]] | None = None) -> GuestRun:
    """Run ``program`` to power-off on a machine with ``slots`` (their disk images are written:
    give fresh ones of the size the real run uses). ``watch = (function, offsets)`` records every
    BAR write of ``pci_functions[function]`` at one of ``offsets``."""
    clock = LineClock()
    machine = Machine(VmConfig(name=f"points-{program}", memsize=memsize, slots=[parse_slot(s) for s in slots]),
                      consoles={"com1": clock})
    machine.setup_memory()
    machine.load_program(load_program(program, args or {}, memsize=memsize))
    clock.vcpu = machine.vm.vcpus[0]
    writes: list[tuple[int, int]] = []
    if watch is not None:
        device, offsets = machine.pci_functions[watch[0]], watch[1]
        real = device.bar_write

        def spy(index, offset, size, value):
            if offset in offsets:
                writes.append((clock.vcpu.instructions_retired, offset))
            return real(index, offset, size, value)

        device.bar_write = spy
    machine.start(serve_control=False)
    assert run_to_end(machine) == EXIT_POWEROFF, f"{program} did not power off"
    lines = clock.output.decode().splitlines(keepends=True)
    assert len(lines) == len(clock.line_ends)
    return GuestRun(lines, clock.line_ends, writes, clock.vcpu.instructions_retired)


def pause_in_write_pass(program: str, slots: list[str], args: dict[str, str] | None = None, *,
                        memsize: int = MEMSIZE) -> tuple[int, str]:
    """For the disk drivers (blktest, nvmetest, ahcitest, scsitest), whose first line names the
    disk and whose second says the writes are done: an instruction count halfway through the
    write pass, and the console a guest paused there has printed (the first line)."""
    run = run_guest(program, slots, args, memsize=memsize)
    assert "wrote" in run.lines[1], run.lines
    first, wrote = run.line_ends[0], run.line_ends[1]
    assert wrote - first > 1000, "the write pass is long enough to pause inside"
    return (first + wrote) // 2, run.lines[0]
