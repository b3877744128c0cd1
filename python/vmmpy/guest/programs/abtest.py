"""abtest: the migration oracle. A little-endian u64 counter in the first 8 bytes of every page of
[start, end) (and optionally all of highmem) is read, incremented and written back once per
sweep, pages in ascending order. After ``sweeps`` sweeps every counter must equal ``sweeps``;
the guest reads each one back and says so, or names the first page that does not.

Because each counter is read-modify-written in guest memory, a page lost, stale or duplicated
across a checkpoint or a migration leaves a counter behind or ahead of the others, and the
final check reports it. The sweep counter itself lives in a register (r8), so it travels with
the vCPU state.

``rate`` paces the sweep as memtouch paces its writes: page n of the run (from 0) waits until the
TSC (1 GHz) reaches t0 + n * 1e6 / rate, so ``rate`` pages are incremented per guest millisecond,
and a guest that falls more than 1 ms behind restarts its schedule from now. Unpaced (0), it
rewrites pages as fast as the vCPU runs.

Console::

    abtest: sweep N                                 every `report` sweeps
    abtest: done K sweeps over P pages, all counters K
    abtest: MISMATCH page 0xGPA counter C expected K
"""

from __future__ import annotations

from typing import NamedTuple

from .. import platform as P
from ..asm import Program
from ._common import ArgReader, Argument, asm_string, assemble_program, check_memory, pace_constants

NAME = "abtest"
DESCRIPTION = "migration oracle: per-page u64 counters incremented every sweep, verified at the end"
ARGUMENTS = (
    Argument("start", "2M", "first byte swept (page aligned, at least 2M)"),
    Argument("end", "end of lowmem", "end of the swept lowmem range (page aligned, exclusive)"),
    Argument("highmem", "no", "yes: also sweep all of highmem (4G .. 4G + highmem size) after the lowmem range"),
    Argument("sweeps", "0", "number of sweeps, then verify and power off; 0 = sweep forever"),
    Argument("report", "1", "print a progress line every N sweeps; 0 = never"),
    Argument("rate", "0", "pages incremented per guest millisecond; 0 = as fast as possible"),
)

UNROLL = 8  # pages per loop iteration in the sweep
SWEEP_REGISTER = "r8"  # sweeps completed so far


def sweep_ranges(start: int, end: int, highmem: bool, highmem_size: int) -> list[tuple[int, int]]:
    """The (first GPA, page count) ranges one sweep walks, in order."""
    ranges = [(start, (end - start) // P.PAGE_SIZE)]
    if highmem:
        ranges.append((P.HIGHMEM_BASE, highmem_size // P.PAGE_SIZE))
    return ranges


def _sweep_range(index: int, base: int, pages: int) -> str:
    """Increment the counter of every page in one range: UNROLL pages per iteration, then the
    remainder straight-line."""
    groups, tail = divmod(pages, UNROLL)
    lines = [f"        movabs rsi, {base:#x}"]
    if groups:
        lines.append(f"        movabs rdi, {base + groups * UNROLL * P.PAGE_SIZE:#x}")
        lines.append(f"sweep_range{index}:")
        for k in range(UNROLL):
            lines += [
                f"        ld64 rax, [rsi + {k * P.PAGE_SIZE}]",
                "        inc rax",
                f"        st64 [rsi + {k * P.PAGE_SIZE}], rax",
            ]
        lines += [
            f"        add rsi, {UNROLL * P.PAGE_SIZE}",
            "        cmp rsi, rdi",
            f"        jb sweep_range{index}",
        ]
    for k in range(tail):
        lines += [f"        ld64 rax, [rsi + {k * P.PAGE_SIZE}]", "        inc rax", f"        st64 [rsi + {k * P.PAGE_SIZE}], rax"]
    return "\n".join(lines) + "\n"


def _sweep_range_paced(index: int, base: int, pages: int) -> str:
    """Increment the counter of every page in one range, one page per PACE (rbp the deadline,
    r12 its fraction)."""
    return f"""
        movabs rsi, {base:#x}
        movabs rdi, {base + pages * P.PAGE_SIZE:#x}
sweep_range{index}:
        PACE rbp, r12, r11
        ld64 rax, [rsi]
        inc rax
        st64 [rsi], rax
        add rsi, PAGE_SIZE
        cmp rsi, rdi
        jb sweep_range{index}
"""


def _verify_range(index: int, base: int, pages: int) -> str:
    """Check every counter of one range equals r10 (the sweep count); jump to mismatch if not."""
    return f"""
        movabs rsi, {base:#x}
        movabs rdi, {base + pages * P.PAGE_SIZE:#x}
verify_range{index}:
        ld64 rax, [rsi]
        cmp rax, r10
        jne mismatch
        add rsi, PAGE_SIZE
        cmp rsi, rdi
        jb verify_range{index}
"""


class Plan(NamedTuple):
    """What the arguments ask for, checked: the ranges one sweep walks and the counts."""

    ranges: list[tuple[int, int]]
    sweeps: int
    report: int
    rate: int


def plan(args: dict[str, str], lowmem_size: int, highmem_size: int) -> Plan:
    """Read and check abtest's arguments (the simulated and the x86-64 builds share them)."""
    a = ArgReader(NAME, args, ARGUMENTS)
    start = a.page_aligned("start", a.size("start"))
    end = a.page_aligned("end", a.size("end", default=lowmem_size))
    highmem = a.yes_no("highmem")
    sweeps = a.integer("sweeps")
    report = a.integer("report", maximum=(1 << 31) - 1)
    rate = a.integer("rate", maximum=1_000_000_000)
    check_memory(NAME, lowmem_size)
    if start < P.WORKLOAD_BASE:
        raise a.fail("start", f"must be at least {P.WORKLOAD_BASE:#x} (below it are the stack and the program image)")
    if end > lowmem_size:
        raise a.fail("end", f"is past the end of lowmem ({lowmem_size:#x})")
    if end <= start:
        raise a.fail("end", f"must be above start ({start:#x})")
    if highmem and highmem_size == 0:
        raise a.fail("highmem", "this VM has no highmem (its memory fits below the lowmem limit)")
    return Plan(sweep_ranges(start, end, highmem, highmem_size), sweeps, report, rate)


def build(args: dict[str, str], memsize: int, lowmem_size: int, highmem_size: int) -> Program:
    ranges, sweeps, report, rate = plan(args, lowmem_size, highmem_size)
    total_pages = sum(pages for _, pages in ranges)
    body = ["start:", "        mov r8, 0               ; sweeps done", "        mov r9, REPORT          ; sweeps to the next report"]
    if rate:
        body += ["        READ_TSC rbp            ; deadline of the next page", "        mov r12, 0              ; its fraction, in 1/RATE ns"]
    body.append("sweep:")
    sweep_range = _sweep_range_paced if rate else _sweep_range
    body += [sweep_range(i, base, pages) for i, (base, pages) in enumerate(ranges)]
    body.append("        inc r8")
    if report:
        body.append("""
        dec r9
        jnz sweep_reported
        mov r9, REPORT
        PRINT msg_sweep
        PRINT_DEC r8
        PRINT msg_newline
sweep_reported:""")
    if sweeps == 0:
        body.append("        jmp sweep")
    else:
        body.append("""
        movabs r10, SWEEPS
        cmp r8, r10
        jb sweep""")
        body += [_verify_range(i, base, pages) for i, (base, pages) in enumerate(ranges)]
        body.append("""
        PRINT msg_done
        PRINT_DEC r10
        PRINT msg_over
        movabs rbx, TOTAL_PAGES
        PRINT_DEC rbx
        PRINT msg_all
        PRINT_DEC r10
        PRINT msg_newline
        call poweroff
mismatch:                       ; rsi = the page, rax = its counter, r10 = expected
        PRINT msg_mismatch
        PRINT_HEX rsi
        PRINT msg_counter
        PRINT_DEC rax
        PRINT msg_expected
        PRINT_DEC r10
        PRINT msg_newline
        call poweroff""")
    strings = {
        "msg_sweep": "abtest: sweep ", "msg_newline": "\n", "msg_done": "abtest: done ",
        "msg_over": " sweeps over ", "msg_all": " pages, all counters ", "msg_mismatch": "abtest: MISMATCH page 0x",
        "msg_counter": " counter ", "msg_expected": " expected ",
    }
    body += [f"{label}: .asciz {asm_string(text)}" for label, text in strings.items()]
    constants = {"REPORT": report, "SWEEPS": sweeps, "TOTAL_PAGES": total_pages, **pace_constants(rate)}
    return assemble_program(NAME, "\n".join(body) + "\n", constants)


def check_counters(memory, ranges: list[tuple[int, int]], sweeps_done: int) -> int | None:
    """Check abtest's counters from the host, with the guest stopped at any instruction.

    ``memory`` is a ``_core.GuestMemory`` (or ``vmmpy.GuestMemory``); ``ranges`` is what
    :func:`sweep_ranges` gives for the program's arguments; ``sweeps_done`` is the value of the
    vCPU's ``SWEEP_REGISTER``. Pages are swept in order, so the counters must read
    sweeps_done + 1 for a prefix of the pages and sweeps_done for the rest. Returns None when
    they do, else the GPA of the first page that does not. (Weaker than the guest's own final
    check, which is exact: a lost page at the very end of the prefix looks like a sweep one page
    less advanced.)
    """
    import numpy as np

    core = getattr(memory, "core", memory)
    step = P.PAGE_SIZE // 8
    counters, addresses = [], []
    for base, pages in ranges:
        seg = next((s for s in core.segments if s.gpa <= base and base + pages * P.PAGE_SIZE <= s.gpa + s.size), None)
        if seg is None:
            raise ValueError(f"abtest range {base:#x} + {pages} pages is not inside one memory segment")
        first = (base - seg.gpa) // 8
        counters.append(np.frombuffer(seg, dtype="<u8")[first : first + pages * step : step].copy())
        addresses.append(base + np.arange(pages, dtype=np.uint64) * P.PAGE_SIZE)
    values, where = np.concatenate(counters), np.concatenate(addresses)
    ahead = values == sweeps_done + 1
    prefix = values.size if ahead.all() else int(np.argmin(ahead))
    bad = np.nonzero(values[prefix:] != sweeps_done)[0]
    return int(where[prefix + bad[0]]) if bad.size else None
