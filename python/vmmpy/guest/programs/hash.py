"""hash: folds its memory into a running 64-bit hash, writing hash-derived values back, and prints
the hash at the end. Any byte it wrote that comes back wrong or stale changes the result.

The computation, exactly (``reference_hash`` is it in Python)::

    h = seed
    stride = 4096 / qwords
    for round in 0 .. rounds-1, then once more read-only:
        for each page p in [start, end), ascending:
            for k in 0 .. qwords-1:
                h = mix(h, u64 at p + k * stride)
            if not the read-only pass:
                u64 at p + (round mod qwords) * stride = h
    mix(h, v) = z ^ (z >> 31) where z = (((h ^ v) + 0x9e3779b97f4a7c15) * 0xbf58476d1ce4e5b9) mod 2**64

(The added constant keeps the hash moving over zeroed memory: mix(0, 0) is not 0.)

Every qword the guest writes lies on a slot it reads, and the final read-only pass reads the
last round's writes, so the printed hash depends on every value written.

Console::

    hash: 0x0123456789abcdef
"""

from __future__ import annotations

from collections.abc import Callable

from .. import platform as P
from ..asm import Program
from ._common import ArgReader, Argument, asm_string, assemble_program, check_memory

NAME = "hash"
DESCRIPTION = "reads and rewrites its memory round after round, printing a 64-bit hash of it all at the end"
ARGUMENTS = (
    Argument("start", "2M", "first byte hashed (page aligned, at least 2M)"),
    Argument("end", "end of lowmem", "end of the hashed range (page aligned, exclusive)"),
    Argument("rounds", "4", "read-mix-write rounds before the final read-only pass"),
    Argument("seed", "0", "the hash's initial value"),
    Argument("qwords", "8", "qwords read per page per round, evenly spaced: 1, 2, 4, ... 512"),
)

MIX_INCREMENT = 0x9E3779B97F4A7C15
MIX_MULTIPLIER = 0xBF58476D1CE4E5B9
MASK64 = (1 << 64) - 1


def mix(h: int, value: int) -> int:
    z = ((((h ^ value) + MIX_INCREMENT) & MASK64) * MIX_MULTIPLIER) & MASK64
    return z ^ (z >> 31)


def reference_hash(
    start: int, end: int, rounds: int, seed: int, qwords: int = 8,
    read_qword: Callable[[int], int] | None = None,
) -> int:
    """The hash the guest prints, for memory whose initial qwords ``read_qword(gpa)`` gives
    (zero everywhere by default). Pages of the range are simulated in a dict."""
    stride = P.PAGE_SIZE // qwords
    memory: dict[int, int] = {}

    def load(gpa: int) -> int:
        if gpa not in memory:
            memory[gpa] = read_qword(gpa) if read_qword else 0
        return memory[gpa]

    h = seed & MASK64
    for round_ in range(rounds + 1):
        for page in range(start, end, P.PAGE_SIZE):
            for k in range(qwords):
                h = mix(h, load(page + k * stride))
            if round_ < rounds:
                memory[page + (round_ % qwords) * stride] = h
    return h


def _page_body(qwords: int, stride: int) -> str:
    lines = []
    for k in range(qwords):
        lines += [
            f"        ld64 rax, [rsi + {k * stride}]",
            "        xor r12, rax",
            "        add r12, r11",
            "        mul r12, r13",
            "        mov rax, r12",
            "        shr rax, 31",
            "        xor r12, rax",
        ]
    return "\n".join(lines) + "\n"


def build(args: dict[str, str], memsize: int, lowmem_size: int, highmem_size: int) -> Program:
    a = ArgReader(NAME, args, ARGUMENTS)
    start = a.page_aligned("start", a.size("start"))
    end = a.page_aligned("end", a.size("end", default=lowmem_size))
    rounds = a.integer("rounds", maximum=(1 << 31) - 1)
    seed = a.integer("seed")
    qwords = a.integer("qwords", minimum=1, maximum=P.PAGE_SIZE // 8)
    check_memory(NAME, lowmem_size)
    if qwords & (qwords - 1):
        raise a.fail("qwords", "must be a power of two (1, 2, 4, ... 512)")
    if start < P.WORKLOAD_BASE:
        raise a.fail("start", f"must be at least {P.WORKLOAD_BASE:#x} (below it are the stack and the program image)")
    if end > lowmem_size:
        raise a.fail("end", f"is past the end of lowmem ({lowmem_size:#x})")
    if end <= start:
        raise a.fail("end", f"must be above start ({start:#x})")
    stride = P.PAGE_SIZE // qwords
    page = _page_body(qwords, stride)
    body = f"""
start:
        movabs r12, SEED        ; the running hash
        movabs r11, MIX_INCREMENT
        movabs r13, MIX_MULTIPLIER
        mov r14, 0              ; rounds done
round:
        cmp r14, ROUNDS
        jae final_pass
        mov r15, r14            ; r15 = offset of this round's write slot
        rem r15, QWORDS
        mul r15, STRIDE
        movabs rsi, START
        movabs rdi, END
round_page:
{page}
        mov rax, rsi
        add rax, r15
        st64 [rax], r12
        add rsi, PAGE_SIZE
        cmp rsi, rdi
        jb round_page
        inc r14
        jmp round
final_pass:
        movabs rsi, START
        movabs rdi, END
final_page:
{page}
        add rsi, PAGE_SIZE
        cmp rsi, rdi
        jb final_page
        PRINT msg_hash
        PRINT_HEX16 r12
        PRINT msg_newline
        call poweroff
msg_hash: .asciz {asm_string("hash: 0x")}
msg_newline: .asciz {asm_string(chr(10))}
"""
    constants = {
        "SEED": seed, "MIX_INCREMENT": MIX_INCREMENT, "MIX_MULTIPLIER": MIX_MULTIPLIER, "ROUNDS": rounds, "QWORDS": qwords,
        "STRIDE": stride, "START": start, "END": end,
    }
    return assemble_program(NAME, body, constants)
