"""memtouch: dirties memory at a chosen rate, working-set size and pattern, deterministically.

The working set is ``wss`` bytes from 2 MiB. Each write picks a page by the pattern and stores
the write's number (1, 2, 3, ...) as a u64 at the page's first byte, so every write changes the
page. ``random`` and ``hotcold`` draw from an xorshift64 generator (shifts 13, 7, 17) whose state
starts at splitmix64(seed) (1 if that is 0), so a seed always gives the same sequence of pages:

- ``sequential``: pages 0, 1, 2, ... wrapping at the end of the set;
- ``random``: page = x mod pages, x the next xorshift64 output;
- ``hotcold``: 90% of writes to the first 10% of the set (the hot part, at least one page):
  with x the next output, x mod 10 < 9 picks hot page (x / 10) mod hot, otherwise cold page
  hot + (x / 10) mod (pages - hot).

``rate`` paces the writes with rdtsc (a 1 GHz TSC): write n (from 0) waits until the TSC reaches
t0 + n * 1e6 / rate (t0 = the first write's TSC), so ``rate`` pages are written per guest
millisecond. A guest that falls more than 1 ms behind (stopped, or too slow) restarts its
schedule from now instead of catching up in a burst.

Console::

    memtouch: N writes            every `report` writes
    memtouch: done N writes       after `writes` writes, then power off
"""

from __future__ import annotations

from typing import NamedTuple

from .. import platform as P
from ..asm import Program
from ._common import ArgReader, Argument, asm_string, assemble_program, check_memory, pace_constants

NAME = "memtouch"
DESCRIPTION = "dirties memory at a set rate, working-set size and pattern, deterministic from a seed"
PATTERNS = ("sequential", "random", "hotcold")
ARGUMENTS = (
    Argument("wss", "64M", "working-set size in bytes from 2M (page multiple; must fit lowmem)"),
    Argument("pattern", "sequential", "sequential | random | hotcold (90% of writes to the first 10% of the set)"),
    Argument("rate", "0", "pages written per guest millisecond; 0 = as fast as possible"),
    Argument("seed", "1", "seed of the xorshift64 page generator (random, hotcold)"),
    Argument("writes", "0", "total page writes, then power off; 0 = forever"),
    Argument("report", "1000000", "print a progress line every N writes; 0 = never"),
)

MASK64 = (1 << 64) - 1


def splitmix64(seed: int) -> int:
    z = (seed + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def initial_state(seed: int) -> int:
    return splitmix64(seed) or 1


def xorshift64(x: int) -> int:
    x ^= (x << 13) & MASK64
    x ^= x >> 7
    x ^= (x << 17) & MASK64
    return x


def hot_pages(pages: int) -> int:
    return max(1, pages // 10)


def reference_pages(pattern: str, pages: int, seed: int, count: int) -> list[int]:
    """The page indices (0-based in the working set) the first ``count`` writes touch."""
    out, x, hot = [], initial_state(seed), hot_pages(pages)
    for n in range(count):
        if pattern == "sequential":
            out.append(n % pages)
            continue
        x = xorshift64(x)
        if pattern == "random":
            out.append(x % pages)
        elif x % 10 < 9:
            out.append((x // 10) % hot)
        else:
            out.append(hot + (x // 10) % (pages - hot))
    return out


_PICK = {
    # Each leaves the page index in rbx; r12 is the generator state.
    "sequential": """
        mov rbx, rcx
        inc rcx
        cmp rcx, PAGES
        jb pick_done
        mov rcx, 0
""",
    "random": """
        NEXT_RANDOM
        mov rbx, r12
        rem rbx, PAGES
""",
    "hotcold": """
        NEXT_RANDOM
        mov rax, r12
        rem rax, 10
        mov rbx, r12
        div rbx, 10
        cmp rax, 9
        jb pick_hot
        rem rbx, COLD_PAGES
        add rbx, HOT_PAGES
        jmp pick_done
pick_hot:
        rem rbx, HOT_PAGES
""",
}

_NEXT_RANDOM = """
.macro NEXT_RANDOM              ; r12 = xorshift64(r12), clobbers rax
        mov rax, r12
        shl rax, 13
        xor r12, rax
        mov rax, r12
        shr rax, 7
        xor r12, rax
        mov rax, r12
        shl rax, 17
        xor r12, rax
.endm
"""


class Plan(NamedTuple):
    """What the arguments ask for, checked."""

    pages: int
    pattern: str
    rate: int
    seed: int
    writes: int
    report: int


def plan(args: dict[str, str], lowmem_size: int) -> Plan:
    """Read and check memtouch's arguments (the simulated and the x86-64 builds share them)."""
    a = ArgReader(NAME, args, ARGUMENTS)
    wss = a.page_aligned("wss", a.size("wss"))
    pattern = a.choice("pattern", PATTERNS)
    rate = a.integer("rate", maximum=1_000_000_000)
    seed = a.integer("seed")
    writes = a.integer("writes")
    report = a.integer("report", maximum=(1 << 31) - 1)
    check_memory(NAME, lowmem_size)
    pages = wss // P.PAGE_SIZE
    if pages == 0:
        raise a.fail("wss", "must be at least one page (4096 bytes)")
    if pages >= 1 << 31:
        raise a.fail("wss", "must be below 8 TiB")
    if P.WORKLOAD_BASE + wss > lowmem_size:
        raise a.fail("wss", f"does not fit lowmem: 2M + wss must be at most {lowmem_size:#x}")
    if pattern == "hotcold" and pages < 2:
        raise a.fail("wss", "must be at least 2 pages for pattern=hotcold (a hot and a cold part)")
    return Plan(pages, pattern, rate, seed, writes, report)


def build(args: dict[str, str], memsize: int, lowmem_size: int, highmem_size: int) -> Program:
    pages, pattern, rate, seed, writes, report = plan(args, lowmem_size)

    body = [_NEXT_RANDOM, """
start:
        movabs r12, STATE0      ; generator state
        mov r13, 0              ; writes done
        mov r14, REPORT         ; writes to the next report
        mov r15, WORKLOAD_BASE
        mov rcx, 0              ; sequential: next page
        READ_TSC rbp            ; deadline of the next write (paced runs)
        mov rsi, 0              ; deadline's fractional part, in 1/RATE ns
write:"""]
    body.append(_PICK[pattern])
    body.append("pick_done:")
    if rate:
        body.append("        PACE rbp, rsi, r11")
    body.append("""
        inc r13
        mov rax, rbx
        shl rax, 12
        add rax, r15
        st64 [rax], r13""")
    if report:
        body.append("""
        dec r14
        jnz write_reported
        mov r14, REPORT
        PRINT msg_progress
        PRINT_DEC r13
        PRINT msg_writes
write_reported:""")
    if writes == 0:
        body.append("        jmp write")
    else:
        body.append("""
        movabs rax, WRITES
        cmp r13, rax
        jb write
        PRINT msg_done
        PRINT_DEC r13
        PRINT msg_writes
        call poweroff""")
    strings = {"msg_progress": "memtouch: ", "msg_done": "memtouch: done ", "msg_writes": " writes\n"}
    body += [f"{label}: .asciz {asm_string(text)}" for label, text in strings.items()]
    hot = hot_pages(pages)
    constants = {
        "STATE0": initial_state(seed), "REPORT": report, "WORKLOAD_BASE": P.WORKLOAD_BASE, "PAGES": pages,
        "HOT_PAGES": hot, "COLD_PAGES": max(1, pages - hot), "WRITES": writes, **pace_constants(rate),
    }
    return assemble_program(NAME, "\n".join(body) + "\n", constants)
