"""What every shipped guest program shares: reading and checking its ``--guest-arg`` values, the
platform constants as assembler ``.equ`` lines, and a small assembly library (print a byte, a
string, a number in decimal or hex; power off).

It owns no program: each program module builds its own source from these pieces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ...units import parse_size
from .. import platform as P
from ..asm import Program, assemble

U64_MAX = (1 << 64) - 1


@dataclass(frozen=True)
class Argument:
    """One documented guest argument: its name, its default as a user would write it, and help."""

    name: str
    default: str
    help: str


class ArgReader:
    """Reads a program's arguments (all strings, as ``--guest-arg KEY=VALUE`` gives them), checks
    each one, and refuses names the program does not take. Every error names the program, the
    argument, the value given and what is allowed."""

    def __init__(self, program: str, args: Mapping[str, str] | None, arguments: tuple[Argument, ...]):
        self.program = program
        self.args = dict(args or {})
        self.arguments = {a.name: a for a in arguments}
        for key, value in self.args.items():
            if key not in self.arguments:
                takes = ", ".join(self.arguments) or "no arguments"
                raise ValueError(f"{program}: unknown argument '{key}' (it takes {takes})")
            if not isinstance(value, str):
                raise ValueError(f"{program}: argument {key} must be given as a string, got {value!r}")

    def fail(self, name: str, message: str) -> ValueError:
        shown = self.args.get(name, self.arguments[name].default)
        return ValueError(f"{self.program}: argument {name}={shown}: {message}")

    def _text(self, name: str, default: str | None) -> str:
        text = self.args.get(name)
        if text is None:
            text = self.arguments[name].default if default is None else default
        return text.strip()

    def integer(self, name: str, *, minimum: int = 0, maximum: int = U64_MAX, default: str | None = None) -> int:
        """A whole number, decimal or 0x-hex, with ``_`` separators allowed."""
        text = self._text(name, default)
        try:
            value = int(text.replace("_", ""), 0)
        except ValueError:
            raise self.fail(name, "is not a whole number (write it in decimal or as 0x...)") from None
        if not minimum <= value <= maximum:
            raise self.fail(name, f"must be in {minimum}..{maximum}")
        return value

    def size(self, name: str, *, default: str | int | None = None) -> int:
        """A byte count or address: ``64M``, ``2G``, ``4096``, ``0x200000``."""
        text = self._text(name, None if default is None else str(default))
        try:
            if text.lower().startswith("0x"):
                return int(text, 16)
            return parse_size(text, what=f"argument {name}")
        except ValueError:
            raise self.fail(name, "is not a size (write bytes like 4096 or 0x200000, or 64M, 2G)") from None

    def choice(self, name: str, choices: tuple[str, ...]) -> str:
        text = self._text(name, None).lower()
        if text not in choices:
            raise self.fail(name, f"must be one of {', '.join(choices)}")
        return text

    def yes_no(self, name: str) -> bool:
        text = self._text(name, None).lower()
        if text in ("yes", "y", "true", "on", "1"):
            return True
        if text in ("no", "n", "false", "off", "0"):
            return False
        raise self.fail(name, "must be yes or no")

    def page_aligned(self, name: str, value: int) -> int:
        if value % P.PAGE_SIZE:
            raise self.fail(name, f"must be a multiple of the page size ({P.PAGE_SIZE}); {value:#x} is not")
        return value


def check_memory(program: str, lowmem_size: int, needed_end: int = P.IMAGE_LIMIT) -> None:
    """Refuse a VM whose lowmem cannot hold the stack, the image and ``needed_end`` bytes."""
    need = max(needed_end, P.MIN_MEMSIZE)
    if lowmem_size < need:
        raise ValueError(f"{program}: needs at least {need // (1 << 20)} MiB of lowmem ({need:#x} bytes); this VM has {lowmem_size:#x}")


def platform_equs() -> str:
    """The platform constants programs use, as ``.equ`` lines."""
    names = (
        "PAGE_SIZE", "COM1_THR", "COM1_LSR", "LSR_THRE", "PM1A_CNT_PORT", "POWEROFF_VALUE",
        "LAPIC_BASE", "LAPIC_ID", "LAPIC_VERSION", "LAPIC_TPR", "LAPIC_EOI", "LAPIC_SVR", "LAPIC_LVT_TIMER",
        "LAPIC_TIMER_INITIAL_COUNT", "LAPIC_TIMER_CURRENT_COUNT", "LAPIC_TIMER_DIVIDE_CONFIG",
        "SVR_APIC_ENABLE", "LVT_MASKED", "LVT_TIMER_PERIODIC", "DIVIDE_BY_1",
    )
    return "\n".join(f".equ {name}, {getattr(P, name):#x}" for name in names) + "\n"


# The library. Every routine preserves every register it does not return in, so a program can
# call it from anywhere, an interrupt handler included. Labels start with "lib_".
LIBRARY = r"""
; ---- library: console and power ------------------------------------------------------------
; putc: print the low byte of rax
putc:
        out8 COM1_THR, rax
        ret

; puts: print the NUL-terminated string at rsi
puts:
        push rax
        push rsi
lib_puts_next:
        ld8 rax, [rsi]
        test rax, rax
        jz lib_puts_done
        out8 COM1_THR, rax
        inc rsi
        jmp lib_puts_next
lib_puts_done:
        pop rsi
        pop rax
        ret

; print_dec: print rax as an unsigned decimal number
print_dec:
        push rax
        push rcx
        push rdx
        push rbx
        mov rbx, rsp            ; digits are built downwards from here, in 24 bytes of stack
        sub rsp, 24
        mov rcx, rbx
lib_dec_digit:
        mov rdx, rax
        rem rdx, 10
        add rdx, '0'
        dec rcx
        st8 [rcx], rdx
        div rax, 10
        test rax, rax
        jnz lib_dec_digit
lib_dec_out:
        ld8 rax, [rcx]
        out8 COM1_THR, rax
        inc rcx
        cmp rcx, rbx
        jb lib_dec_out
        add rsp, 24
        pop rbx
        pop rdx
        pop rcx
        pop rax
        ret

; print_hex16: print rax as 16 lowercase hex digits (no 0x)
print_hex16:
        push rcx
        mov rcx, 16
        call print_hex_min
        pop rcx
        ret

; print_hex: print rax in lowercase hex without leading zeros (no 0x)
print_hex:
        push rcx
        mov rcx, 1
        call print_hex_min
        pop rcx
        ret

; print_hex_min: print rax in lowercase hex, at least rcx (1..16) digits
print_hex_min:
        push rax
        push rdx
        push rbx
        push rsi
        mov rsi, 0              ; 1 once a digit has been printed
        mov rbx, 60             ; shift of the digit being looked at
lib_hex_digit:
        mov rdx, rax
        shr rdx, rbx
        and rdx, 15
        test rsi, rsi
        jnz lib_hex_print
        test rdx, rdx
        jnz lib_hex_print
        push rbx                ; a leading zero: print it only inside the minimum width
        shr rbx, 2
        inc rbx
        cmp rbx, rcx
        pop rbx
        ja lib_hex_next
lib_hex_print:
        mov rsi, 1
        cmp rdx, 10
        jb lib_hex_decimal
        add rdx, 'a' - 10 - '0'
lib_hex_decimal:
        add rdx, '0'
        push rax
        mov rax, rdx
        out8 COM1_THR, rax
        pop rax
lib_hex_next:
        sub rbx, 4
        jns lib_hex_digit
        pop rsi
        pop rbx
        pop rdx
        pop rax
        ret

; poweroff: ask the platform for soft-off (ACPI S5); if that returns, halt for good
poweroff:
        mov rax, POWEROFF_VALUE
        out16 PM1A_CNT_PORT, rax
lib_dead:
        cli
        hlt
        jmp lib_dead
"""

MACROS = r"""
.macro PRINT msg                ; print the string at label msg
        push rsi
        mov rsi, \msg
        call puts
        pop rsi
.endm
.macro PRINT_DEC reg            ; print a register in decimal
        push rax
        mov rax, \reg
        call print_dec
        pop rax
.endm
.macro PRINT_HEX reg            ; print a register in hex, no leading zeros
        push rax
        mov rax, \reg
        call print_hex
        pop rax
.endm
.macro PRINT_HEX16 reg          ; print a register as 16 hex digits
        push rax
        mov rax, \reg
        call print_hex16
        pop rax
.endm
.macro MIX acc, value, scratch  ; acc = mix(acc, value), hash.mix; value may be scratch, which
                                ; is clobbered. Needs MIX_INCREMENT, MIX_MULTIPLIER (program side)
        xor \acc, \value
        movabs \scratch, MIX_INCREMENT
        add \acc, \scratch
        movabs \scratch, MIX_MULTIPLIER
        mul \acc, \scratch
        mov \scratch, \acc
        shr \scratch, 31
        xor \acc, \scratch
.endm
.macro READ_TSC dst             ; dst = the 64-bit TSC, clobbers rax, rdx
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov \dst, rax
.endm
.macro PACE deadline, fraction, scratch ; wait for the TSC to reach deadline, then move it on by
                                ; 1e6 / RATE ns (the fraction carried in 1/RATE ns); clobbers
                                ; rax, rdx, scratch. Needs pace_constants(rate) (program side)
pace_wait\@:
        READ_TSC \scratch
        cmp \scratch, \deadline
        jae pace_late\@
        pause
        jmp pace_wait\@
pace_late\@:                    ; more than RESYNC_NS behind: restart the schedule from now
        mov rax, \scratch
        sub rax, \deadline
        cmp rax, RESYNC_NS
        jbe pace_next\@
        mov \deadline, \scratch
        mov \fraction, 0
pace_next\@:
        add \deadline, NS_WHOLE
        add \fraction, NS_FRACTION
        cmp \fraction, RATE
        jb pace_done\@
        sub \fraction, RATE
        inc \deadline
pace_done\@:
.endm
"""

#: A paced program that falls further behind its schedule than this restarts it from now,
#: instead of catching up in a burst (a guest stopped for a checkpoint or a migration).
RESYNC_NS = 1_000_000


def pace_constants(rate: int) -> dict[str, int]:
    """The constants the PACE macro reads, for ``rate`` events per guest millisecond (1 GHz TSC)."""
    rate = max(rate, 1)
    return {"RATE": rate, "NS_WHOLE": 1_000_000 // rate, "NS_FRACTION": 1_000_000 % rate, "RESYNC_NS": RESYNC_NS}


def asm_string(text: str) -> str:
    """A Python string as an assembler ``.asciz`` operand."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def assemble_program(program: str, body: str, constants: Mapping[str, int]) -> Program:
    """Assemble a program's body after the platform constants, its own constants and the macros,
    followed by the library, at the platform's image base; check the image fits its window."""
    header = platform_equs() + "".join(f".equ {k}, {v:#x}\n" for k, v in constants.items())
    source = header + MACROS + body + LIBRARY
    image = assemble(source, origin=P.IMAGE_BASE)
    if P.ENTRY_SYMBOL not in image.symbols:
        raise AssertionError(f"{program}: the program has no '{P.ENTRY_SYMBOL}' label")
    if image.end > P.IMAGE_LIMIT:
        raise ValueError(
            f"{program}: the image is {len(image.code)} bytes and would end at {image.end:#x}, "
            f"past the image window's end {P.IMAGE_LIMIT:#x}; choose smaller arguments"
        )
    return image
