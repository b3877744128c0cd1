"""console: prints through the UART and sleeps on the local APIC timer.

It installs a vector table (every vector but the timer's goes to a handler that just returns),
software-enables the local APIC (spurious vector register = 0x1FF), sets the timer's divider to 1
and its LVT to periodic on ``vector``, loads the initial count for ``period_us`` (at divide-by-1
the timer counts once per guest nanosecond, so count = period_us * 1000), then ``sti`` and
``hlt`` in a loop. The timer handler counts ticks in memory, writes EOI, prints every ``every``
ticks and, after ``ticks`` ticks, prints that it is done and powers off.

The tick counter lives in the image (label ``tick_count``), so it migrates with memory.

Console::

    console: tick N          every `every` ticks
    console: done            after `ticks` ticks, then power off
"""

from __future__ import annotations

from .. import platform as P
from ..asm import Program
from ._common import ArgReader, Argument, asm_string, assemble_program, check_memory

NAME = "console"
DESCRIPTION = "sleeps on the local APIC timer and prints a line through COM1 every few ticks"
MAX_COUNT = 0xFFFF_FFFF  # the initial count register is 32 bits
LONGEST_PERIOD_US = MAX_COUNT * 1_000_000 // P.LAPIC_TIMER_HZ_AT_DIVIDE_1

ARGUMENTS = (
    Argument("period_us", "1000", f"timer period in guest microseconds (1 .. {LONGEST_PERIOD_US})"),
    Argument("every", "10", "print a line every N ticks; 0 = never"),
    Argument("ticks", "50", "ticks before printing 'console: done' and powering off; 0 = forever"),
    Argument("vector", "0x40", "the timer's interrupt vector (0x20 .. 0xfe)"),
)

def initial_count(period_us: int) -> int:
    """The timer count for a period at divide-by-1."""
    return period_us * P.LAPIC_TIMER_HZ_AT_DIVIDE_1 // 1_000_000


def build(args: dict[str, str], memsize: int, lowmem_size: int, highmem_size: int) -> Program:
    a = ArgReader(NAME, args, ARGUMENTS)
    period_us = a.integer("period_us", minimum=1, maximum=LONGEST_PERIOD_US)
    every = a.integer("every", maximum=(1 << 31) - 1)
    ticks = a.integer("ticks", maximum=(1 << 31) - 1)
    vector = a.integer("vector", minimum=0x20, maximum=0xFE)
    check_memory(NAME, lowmem_size)

    body = """
start:
        mov rax, vector_table
        lidt rax
        movabs rbx, LAPIC_BASE
        mov rax, SVR_APIC_ENABLE | 0xff     ; software enable, spurious vector 0xff
        st32 [rbx + LAPIC_SVR], rax
        mov rax, DIVIDE_BY_1
        st32 [rbx + LAPIC_TIMER_DIVIDE_CONFIG], rax
        mov rax, LVT_TIMER_PERIODIC | VECTOR
        st32 [rbx + LAPIC_LVT_TIMER], rax
        movabs rax, INITIAL_COUNT
        st32 [rbx + LAPIC_TIMER_INITIAL_COUNT], rax
        sti
idle:
        hlt
        jmp idle

timer_handler:
        push rax
        push rbx
        push rdx
        mov rbx, tick_count
        ld64 rax, [rbx]
        inc rax
        st64 [rbx], rax
        movabs rbx, LAPIC_BASE
        mov rdx, 0
        st32 [rbx + LAPIC_EOI], rdx
"""
    if every:
        body += """
        mov rdx, rax
        rem rdx, EVERY          ; (division leaves the flags alone)
        test rdx, rdx
        jnz timer_printed
        PRINT msg_tick
        PRINT_DEC rax
        PRINT msg_newline
timer_printed:
"""
    if ticks:
        body += """
        cmp rax, TICKS
        jb timer_return
        PRINT msg_done
        call poweroff
timer_return:
"""
    body += """
        pop rdx
        pop rbx
        pop rax
        iret

other_interrupt:                ; not ours (or spurious): nothing to acknowledge
        iret

.align 8
tick_count:
        .qword 0
vector_table:
"""
    body += "".join(
        f"        .qword {'timer_handler' if v == vector else 'other_interrupt'}\n" for v in range(256)
    )
    strings = {"msg_tick": "console: tick ", "msg_newline": "\n", "msg_done": "console: done\n"}
    body += "".join(f"{label}: .asciz {asm_string(text)}\n" for label, text in strings.items())
    constants = {"VECTOR": vector, "INITIAL_COUNT": initial_count(period_us), "EVERY": every or 1, "TICKS": ticks}
    return assemble_program(NAME, body, constants)
