"""A two-pass assembler for the simulated ISA (docs/isa.md).

It owns the text syntax only: mnemonics and operands to instruction bytes, labels, constants,
directives and macros. It knows nothing of memory or vCPUs; ``Program.load`` just writes the
bytes through any object with ``write(gpa, data)``.

Syntax, one statement per line, ``;`` starts a comment::

    .equ COM1, 0x3f8            ; constant (also ``.equ NAME value``)
    .org 0x1000                 ; move the location counter forward (gap is zero-filled)
    start:  mov rax, 42         ; label, then an instruction
            movabs rbx, 0x1122334455667788
            ld64 rcx, [rbx + 8*2]
            st8 [rsp - 1], rax
            out8 COM1, rax      ; or ``out8 rdx, rax`` (port in a register)
            jnz start
    .align 8
    msg:    .asciz "hi\\n"
            .qword start, msg + 1
            .space 16, 0xff
    .macro PUTC ch              ; macros: parameters as \\ch, \\@ is a unique number
            mov rax, \\ch
            out8 COM1, rax
    .endm
            PUTC 'A'

Expressions: integers (``42``, ``0x2a``, ``0b101``, ``0o52``, ``'A'``, ``1_000``), symbols, ``$``
(the address of the current statement), unary ``-`` and ``~``, binary ``* / %``, ``+ -``,
``<< >>``, ``&``, ``|`` (C precedence) and parentheses. Errors say the line: ``line 12: unknown
register 'rxx'``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["OPCODES", "REGISTERS", "AsmError", "Program", "assemble"]

REGISTERS = {
    name: number
    for number, name in enumerate(
        ["rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
    )
}
CONTROL_REGISTERS = {"cr0": 0, "cr3": 3, "cr4": 4}

# The opcode table, keyed as the Rust side's `isa::MNEMONICS` (tests compare the two).
OPCODES = {
    "nop": 0x01, "hlt": 0x02, "pause": 0x03, "cli": 0x04, "sti": 0x05, "iret": 0x06, "ret": 0x07,
    "rdtsc": 0x08, "rdtscp": 0x09, "rdmsr": 0x0A, "wrmsr": 0x0B, "lidt": 0x0C, "sidt": 0x0D,
    "mov cr, reg": 0x0E, "mov reg, cr": 0x0F,
    "mov reg, reg": 0x10, "mov reg, imm": 0x11, "movabs": 0x12, "lea": 0x13, "push": 0x14, "pop": 0x15,
    "call rel": 0x17, "call reg": 0x18, "jmp rel": 0x19, "jmp reg": 0x1A,
    "inc": 0x40, "dec": 0x41, "neg": 0x42, "not": 0x43,
    "ld8": 0x60, "ld16": 0x61, "ld32": 0x62, "ld64": 0x63,
    "st8": 0x68, "st16": 0x69, "st32": 0x6A, "st64": 0x6B,
    "in8 imm": 0x70, "in16 imm": 0x71, "in32 imm": 0x72, "in8 reg": 0x74, "in16 reg": 0x75, "in32 reg": 0x76,
    "out8 imm": 0x78, "out16 imm": 0x79, "out32 imm": 0x7A, "out8 reg": 0x7C, "out16 reg": 0x7D, "out32 reg": 0x7E,
}
_ALU = ["add", "sub", "and", "or", "xor", "shl", "shr", "sar", "mul", "div", "rem", "idiv", "irem", "cmp", "test"]
for _i, _name in enumerate(_ALU):
    OPCODES[_name] = 0x20 + _i
    OPCODES[_name + " imm"] = 0x30 + _i
_JCC = ["je", "jne", "jl", "jle", "jg", "jge", "jb", "jbe", "ja", "jae", "js", "jns", "jo", "jno"]
for _i, _name in enumerate(_JCC):
    OPCODES[_name] = 0x50 + _i
_JCC_ALIASES = {"jz": "je", "jnz": "jne", "jc": "jb", "jnc": "jae"}

_NO_OPERANDS = {"nop", "hlt", "pause", "cli", "sti", "iret", "ret", "rdtsc", "rdtscp", "rdmsr", "wrmsr"}
_ONE_REGISTER = {"lidt", "sidt", "push", "pop", "inc", "dec", "neg", "not"}
_LOADS = {"ld8", "ld16", "ld32", "ld64"}
_STORES = {"st8", "st16", "st32", "st64"}
_IO_SIZES = {"8": 0, "16": 1, "32": 2}

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


class AsmError(ValueError):
    """An assembly error; ``str()`` starts with the line number."""

    def __init__(self, line: int, message: str, context: str = ""):
        self.line = line
        self.message = message
        super().__init__(f"line {line}{context}: {message}")


@dataclass(frozen=True)
class Program:
    """Assembled bytes placed at ``origin``, and every label and constant."""

    code: bytes
    symbols: dict[str, int] = field(default_factory=dict)
    origin: int = 0

    @property
    def end(self) -> int:
        return self.origin + len(self.code)

    def load(self, memory) -> None:
        """Write the code into guest memory (anything with ``write(gpa, data)``)."""
        memory.write(self.origin, self.code)


# ---- source lines and macros -----------------------------------------------------------------


@dataclass
class _Line:
    number: int
    text: str
    context: str = ""  # " (in macro 'NAME' expanded at line N)"


def _strip_comment(text: str) -> str:
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == "\\":
                continue
            if ch == quote and text[i - 1] != "\\":
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == ";":
            return text[:i]
    return text


def _split_operands(text: str, line: _Line) -> list[str]:
    """Split on commas outside brackets, parentheses and quotes."""
    parts, depth, quote, current = [], 0, None, []
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            current.append(ch)
            if ch == "\\" and i + 1 < len(text):
                current.append(text[i + 1])
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
            current.append(ch)
        elif ch in "[(":
            depth += 1
            current.append(ch)
        elif ch in "])":
            depth -= 1
            current.append(ch)
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
        i += 1
    if quote:
        raise AsmError(line.number, f"unterminated {quote}string{quote}", line.context)
    tail = "".join(current).strip()
    if tail or parts:
        parts.append(tail)
    if any(p == "" for p in parts):
        raise AsmError(line.number, f"empty operand in '{text.strip()}'", line.context)
    return parts


_IDENT = r"[A-Za-z_.][A-Za-z0-9_.$]*"
_LABEL_RE = re.compile(rf"^\s*({_IDENT})\s*:(.*)$")


def _expand_macros(source: str) -> list[_Line]:
    lines = [_Line(n, _strip_comment(t)) for n, t in enumerate(source.splitlines(), start=1)]
    macros: dict[str, tuple[list[str], list[_Line], int]] = {}
    out: list[_Line] = []
    counter = [0]

    def expand(seq: list[_Line], depth: int) -> None:
        i = 0
        while i < len(seq):
            line = seq[i]
            words = line.text.split(None, 1)
            head = words[0].lower() if words else ""
            if head == ".macro":
                spec = words[1].strip() if len(words) > 1 else ""
                m = re.match(rf"^({_IDENT})\s*(.*)$", spec)
                if not m:
                    raise AsmError(line.number, ".macro needs a name", line.context)
                name = m.group(1)
                params = [p.strip() for p in m.group(2).split(",")] if m.group(2).strip() else []
                body, j = [], i + 1
                while j < len(seq) and seq[j].text.split(None, 1)[:1] != [".endm"]:
                    body.append(seq[j])
                    j += 1
                if j == len(seq):
                    raise AsmError(line.number, f"macro '{name}' has no .endm", line.context)
                macros[name] = (params, body, line.number)
                i = j + 1
                continue
            if head == ".endm":
                raise AsmError(line.number, ".endm without .macro", line.context)
            label = _LABEL_RE.match(line.text)
            rest = label.group(2) if label else line.text
            words = rest.split(None, 1)
            if words and words[0] in macros:
                if depth > 32:
                    raise AsmError(line.number, f"macro '{words[0]}' expands too deeply (recursive?)", line.context)
                params, body, _defined = macros[words[0]]
                args = _split_operands(words[1], line) if len(words) > 1 else []
                if len(args) != len(params):
                    raise AsmError(
                        line.number, f"macro '{words[0]}' takes {len(params)} arguments, got {len(args)}", line.context
                    )
                if label:
                    out.append(_Line(line.number, label.group(1) + ":", line.context))
                counter[0] += 1
                expanded = []
                for b in body:
                    text = b.text.replace("\\@", str(counter[0]))
                    for p, a in sorted(zip(params, args), key=lambda pa: -len(pa[0])):
                        text = text.replace("\\" + p, a)
                    ctx = f" (in macro '{words[0]}' expanded at line {line.number})"
                    expanded.append(_Line(b.number, text, ctx))
                expand(expanded, depth + 1)
            else:
                out.append(line)
            i += 1

    expand(lines, 0)
    return out


# ---- expressions ------------------------------------------------------------------------------

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>0[xX][0-9a-fA-F_]+|0[bB][01_]+|0[oO][0-7_]+|[0-9][0-9_]*)"
    r"|(?P<char>'(?:\\.|[^'\\])')"
    rf"|(?P<ident>{_IDENT})"
    r"|(?P<op><<|>>|[-+*/%&|~()$]))"
)
_BINARY = {"|": 1, "&": 2, "<<": 3, ">>": 3, "+": 4, "-": 4, "*": 5, "/": 5, "%": 5}


class _Unresolved(Exception):
    def __init__(self, name: str):
        self.name = name


def _char_value(literal: str, line: _Line) -> int:
    data = _unescape(literal[1:-1], line)
    if len(data) != 1:
        raise AsmError(line.number, f"character literal {literal} is not one byte", line.context)
    return data[0]


def _tokenize(text: str, line: _Line) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            raise AsmError(line.number, f"cannot read expression '{text.strip()}' at '{text[pos:].strip()}'", line.context)
        kind = m.lastgroup
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    return tokens


def _evaluate(text: str, lookup: Callable[[str], int], here: int, line: _Line) -> int:
    tokens = _tokenize(text, line)
    if not tokens:
        raise AsmError(line.number, "missing expression", line.context)
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else (None, None)

    def primary() -> int:
        nonlocal pos
        kind, value = peek()
        if kind is None:
            raise AsmError(line.number, f"expression '{text.strip()}' ends where a value was expected", line.context)
        pos += 1
        if kind == "num":
            return int(value.replace("_", ""), 0)
        if kind == "char":
            return _char_value(value, line)
        if kind == "ident":
            if value.lower() in REGISTERS:
                raise AsmError(line.number, f"register '{value}' where a number was expected", line.context)
            return lookup(value)
        if value == "$":
            return here
        if value == "(":
            result = binary(0)
            if peek()[1] != ")":
                raise AsmError(line.number, f"missing ')' in '{text.strip()}'", line.context)
            pos += 1
            return result
        if value == "-":
            return -primary()
        if value == "~":
            return ~primary()
        if value == "+":
            return primary()
        raise AsmError(line.number, f"unexpected {value!r} in expression '{text.strip()}'", line.context)

    def binary(min_prec: int) -> int:
        nonlocal pos
        left = primary()
        while True:
            op = peek()[1]
            prec = _BINARY.get(op) if peek()[0] == "op" else None
            if prec is None or prec < min_prec:
                return left
            pos += 1
            right = binary(prec + 1)
            if op in ("/", "%") and right == 0:
                raise AsmError(line.number, f"division by zero in '{text.strip()}'", line.context)
            if op in ("<<", ">>") and not 0 <= right < 128:
                raise AsmError(line.number, f"shift count {right} out of range (0..127) in '{text.strip()}'", line.context)
            left = _apply(op, left, right)

    result = binary(0)
    if pos != len(tokens):
        raise AsmError(line.number, f"unexpected {tokens[pos][1]!r} in expression '{text.strip()}'", line.context)
    return result


def _apply(op: str, left: int, right: int) -> int:
    """A binary operator with C's integer semantics: division truncates toward zero (exactly, for
    any size) and the remainder takes the dividend's sign."""
    if op in ("/", "%"):
        quotient = abs(left) // abs(right)
        if (left < 0) != (right < 0):
            quotient = -quotient
        return quotient if op == "/" else left - right * quotient
    if op == "|":
        return left | right
    if op == "&":
        return left & right
    if op == "<<":
        return left << right
    if op == ">>":
        return left >> right
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    return left * right


def _unescape(body: str, line: _Line) -> bytes:
    out, i = bytearray(), 0
    simple = {"n": 10, "t": 9, "r": 13, "0": 0, "\\": 92, '"': 34, "'": 39}
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out += ch.encode("utf-8")
            i += 1
            continue
        if i + 1 >= len(body):
            raise AsmError(line.number, "string ends in a lone backslash", line.context)
        esc = body[i + 1]
        if esc in simple:
            out.append(simple[esc])
            i += 2
        elif esc == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", body[i + 2 : i + 4]):
            out.append(int(body[i + 2 : i + 4], 16))
            i += 4
        else:
            raise AsmError(line.number, f"unknown escape '\\{esc}'", line.context)
    return bytes(out)


def _string(text: str, line: _Line) -> bytes:
    text = text.strip()
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise AsmError(line.number, f"expected a \"string\", got {text!r}", line.context)
    return _unescape(text[1:-1], line)


# ---- the assembler ----------------------------------------------------------------------------


def _instruction(opcode: int, a: int = 0, b: int = 0, imm: int = 0) -> bytes:
    return bytes([opcode, a, b, 0]) + (imm & 0xFFFF_FFFF).to_bytes(4, "little")


class _Assembler:
    def __init__(self, source: str, origin: int):
        self.lines = _expand_macros(source)
        self.origin = origin
        self.labels: dict[str, tuple[int, int]] = {}  # name -> (value, line)
        self.equs: dict[str, tuple[str, _Line]] = {}
        self.resolving: set[str] = set()
        self.final = False

    # symbols
    def lookup(self, name: str, line: _Line) -> int:
        if name in self.labels:
            return self.labels[name][0]
        if name in self.equs:
            if name in self.resolving:
                raise AsmError(line.number, f"constant '{name}' is defined in terms of itself", line.context)
            text, where = self.equs[name]
            self.resolving.add(name)
            try:
                return _evaluate(text, lambda n: self.lookup(n, where), 0, where)
            finally:
                self.resolving.discard(name)
        if self.final:
            raise AsmError(line.number, f"undefined symbol '{name}'", line.context)
        raise _Unresolved(name)

    def value(self, text: str, line: _Line, here: int) -> int:
        return _evaluate(text, lambda n: self.lookup(n, line), here, line)

    def known_now(self, text: str, line: _Line, here: int, what: str) -> int:
        """An expression whose value pass 1 needs (sizes, .org, .align)."""
        try:
            return self.value(text, line, here)
        except _Unresolved as e:
            raise AsmError(line.number, f"{what} uses '{e.name}', which is not defined above it", line.context) from None

    def register(self, text: str, line: _Line) -> int:
        name = text.strip().lower()
        if name not in REGISTERS:
            raise AsmError(line.number, f"unknown register '{text.strip()}'", line.context)
        return REGISTERS[name]

    def memory(self, text: str, line: _Line, here: int) -> tuple[int, int]:
        """``[base]`` or ``[base +/- expr]`` -> (base register, displacement)."""
        text = text.strip()
        if not (text.startswith("[") and text.endswith("]")):
            raise AsmError(line.number, f"expected a memory operand like [rbx + 8], got '{text}'", line.context)
        inner = text[1:-1].strip()
        m = re.match(r"^([A-Za-z0-9]+)\s*(.*)$", inner)
        if not m or m.group(1).lower() not in REGISTERS:
            raise AsmError(line.number, f"memory operand '{text}' needs a base register first", line.context)
        base = REGISTERS[m.group(1).lower()]
        rest = m.group(2).strip()
        if not rest:
            return base, 0
        if rest[0] not in "+-":
            raise AsmError(line.number, f"memory operand '{text}': expected + or - after the base register", line.context)
        disp = self.value("0 " + rest, line, here) if self.final else 0
        return base, self.imm32(disp, line, "displacement")

    def imm32(self, value: int, line: _Line, what: str = "immediate") -> int:
        if not INT32_MIN <= value <= INT32_MAX:
            raise AsmError(
                line.number,
                f"{what} {value:#x} does not fit a sign-extended 32-bit field ({INT32_MIN}..{INT32_MAX})"
                + ("; use movabs for 64-bit values" if what == "immediate" else ""),
                line.context,
            )
        return value

    def imm(self, text: str, line: _Line, here: int) -> int:
        return self.imm32(self.value(text, line, here), line) if self.final else 0

    def is_register(self, text: str) -> bool:
        return text.strip().lower() in REGISTERS

    # statements
    def statement(self, mnemonic: str, operands: list[str], line: _Line, here: int) -> bytes:
        m = mnemonic.lower()
        m = _JCC_ALIASES.get(m, m)

        def want(count: int) -> None:
            if len(operands) != count:
                raise AsmError(line.number, f"'{mnemonic}' takes {count} operand(s), got {len(operands)}", line.context)

        def relative(text: str) -> int:
            if not self.final:
                return 0
            return self.imm32(self.value(text, line, here) - (here + 8), line, "branch offset")

        if m in _NO_OPERANDS:
            want(0)
            return _instruction(OPCODES[m])
        if m in _ONE_REGISTER:
            want(1)
            return _instruction(OPCODES[m], self.register(operands[0], line))
        if m == "mov":
            want(2)
            dst, src = operands[0].strip().lower(), operands[1].strip().lower()
            if dst in CONTROL_REGISTERS:
                return _instruction(OPCODES["mov cr, reg"], CONTROL_REGISTERS[dst], self.register(src, line))
            if src in CONTROL_REGISTERS:
                return _instruction(OPCODES["mov reg, cr"], self.register(dst, line), CONTROL_REGISTERS[src])
            if re.fullmatch(r"cr\d+", dst) or re.fullmatch(r"cr\d+", src):
                bad = dst if re.fullmatch(r"cr\d+", dst) else src
                raise AsmError(line.number, f"unknown control register '{bad}' (the vCPU has cr0, cr3, cr4)", line.context)
            a = self.register(operands[0], line)
            if self.is_register(src):
                return _instruction(OPCODES["mov reg, reg"], a, self.register(src, line))
            return _instruction(OPCODES["mov reg, imm"], a, 0, self.imm(operands[1], line, here))
        if m == "movabs":
            want(2)
            a = self.register(operands[0], line)
            value = self.value(operands[1], line, here) if self.final else 0
            if not -(1 << 63) <= value < (1 << 64):
                raise AsmError(line.number, f"movabs value {value:#x} does not fit 64 bits", line.context)
            return _instruction(OPCODES["movabs"], a) + (value & (1 << 64) - 1).to_bytes(8, "little")
        if m == "lea" or m in _LOADS:
            want(2)
            base, disp = self.memory(operands[1], line, here)
            return _instruction(OPCODES[m], self.register(operands[0], line), base, disp)
        if m in _STORES:
            want(2)
            base, disp = self.memory(operands[0], line, here)
            return _instruction(OPCODES[m], base, self.register(operands[1], line), disp)
        if m in ("call", "jmp"):
            want(1)
            if self.is_register(operands[0]):
                return _instruction(OPCODES[m + " reg"], self.register(operands[0], line))
            return _instruction(OPCODES[m + " rel"], 0, 0, relative(operands[0]))
        if m in _JCC:
            want(1)
            if self.is_register(operands[0]):
                raise AsmError(line.number, f"'{mnemonic}' takes a label, not a register", line.context)
            return _instruction(OPCODES[m], 0, 0, relative(operands[0]))
        if m in _ALU:
            want(2)
            a = self.register(operands[0], line)
            if self.is_register(operands[1]):
                return _instruction(OPCODES[m], a, self.register(operands[1], line))
            return _instruction(OPCODES[m + " imm"], a, 0, self.imm(operands[1], line, here))
        io = re.fullmatch(r"(in|out)(8|16|32)", m)
        if io:
            want(2)
            direction, size = io.group(1), io.group(2)
            reg_text, port_text = (operands[0], operands[1]) if direction == "in" else (operands[1], operands[0])
            value_reg = self.register(reg_text, line)
            if self.is_register(port_text):
                port_reg = self.register(port_text, line)
                if direction == "in":
                    return _instruction(OPCODES[f"in{size} reg"], value_reg, port_reg)
                return _instruction(OPCODES[f"out{size} reg"], port_reg, value_reg)
            port = self.value(port_text, line, here) if self.final else 0
            if not 0 <= port <= 0xFFFF:
                raise AsmError(line.number, f"port {port:#x} is not in 0..0xffff", line.context)
            if direction == "in":
                return _instruction(OPCODES[f"in{size} imm"], value_reg, 0, port)
            return _instruction(OPCODES[f"out{size} imm"], 0, value_reg, port)
        raise AsmError(line.number, f"unknown instruction '{mnemonic}'", line.context)

    def data(self, directive: str, args: str, line: _Line, here: int) -> bytes:
        width = {".byte": 1, ".word": 2, ".dword": 4, ".qword": 8}.get(directive)
        if width:
            out = bytearray()
            for item in _split_operands(args, line):
                value = self.value(item, line, here + len(out)) if self.final else 0
                if not -(1 << (8 * width - 1)) <= value < (1 << (8 * width)):
                    raise AsmError(line.number, f"{directive} value {value:#x} does not fit {width} byte(s)", line.context)
                out += (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
            return bytes(out)
        if directive in (".ascii", ".asciz"):
            data = b"".join(_string(s, line) for s in _split_operands(args, line))
            return data + (b"\0" if directive == ".asciz" else b"")
        if directive == ".space":
            parts = _split_operands(args, line)
            if len(parts) not in (1, 2):
                raise AsmError(line.number, ".space takes a size and an optional fill byte", line.context)
            size = self.known_now(parts[0], line, here, ".space size")
            fill = self.value(parts[1], line, here) if len(parts) == 2 and self.final else 0
            if size < 0 or not 0 <= fill <= 0xFF:
                raise AsmError(line.number, f".space {size}, {fill}: size must be >= 0 and fill a byte", line.context)
            return bytes([fill]) * size
        raise AsmError(line.number, f"unknown directive '{directive}'", line.context)

    def run_pass(self, final: bool) -> bytearray:
        self.final = final
        out = bytearray()
        pc = self.origin
        for line in self.lines:
            text = line.text
            label = _LABEL_RE.match(text)
            if label:
                name, text = label.group(1), label.group(2)
                if not final:
                    if name in self.labels or name in self.equs:
                        first = self.labels[name][1] if name in self.labels else self.equs[name][1].number
                        raise AsmError(line.number, f"symbol '{name}' is already defined on line {first}", line.context)
                    if name.lower() in REGISTERS:
                        raise AsmError(line.number, f"'{name}' is a register and cannot be a label", line.context)
                    self.labels[name] = (pc, line.number)
            words = text.strip().split(None, 1)
            if not words:
                continue
            head, args = words[0], (words[1] if len(words) > 1 else "")
            directive = head.lower()
            if directive == ".equ":
                m = re.match(rf"^({_IDENT})\s*(?:,\s*|\s+)(.+)$", args.strip())
                if not m:
                    raise AsmError(line.number, ".equ needs a name and a value: .equ NAME, value", line.context)
                if not final:
                    name = m.group(1)
                    if name in self.labels or name in self.equs:
                        raise AsmError(line.number, f"symbol '{name}' is already defined", line.context)
                    self.equs[name] = (m.group(2), line)
                continue
            if directive == ".org":
                target = self.known_now(args, line, pc, ".org")
                if target < pc:
                    raise AsmError(line.number, f".org {target:#x} is behind the current address {pc:#x}", line.context)
                out += bytes(target - pc)
                pc = target
                continue
            if directive == ".align":
                align = self.known_now(args, line, pc, ".align")
                if align <= 0 or align & (align - 1):
                    raise AsmError(line.number, f".align {align} is not a power of two", line.context)
                pad = -pc % align
                out += bytes(pad)
                pc += pad
                continue
            if directive.startswith("."):
                chunk = self.data(directive, args, line, pc)
            else:
                operands = _split_operands(args, line) if args.strip() else []
                try:
                    chunk = self.statement(head, operands, line, pc)
                except _Unresolved:
                    raise AssertionError("pass 1 never evaluates operands") from None
            out += chunk
            pc += len(chunk)
        return out

    def assemble(self) -> Program:
        first = self.run_pass(final=False)
        code = self.run_pass(final=True)
        assert len(first) == len(code), "both passes lay out the same sizes"
        symbols = {name: value for name, (value, _) in self.labels.items()}
        for name, (_, where) in self.equs.items():
            symbols[name] = self.lookup(name, where)
        return Program(code=bytes(code), symbols=symbols, origin=self.origin)


def assemble(source: str, origin: int = 0) -> Program:
    """Assemble ``source`` for placement at guest-physical address ``origin``."""
    if origin < 0:
        raise ValueError(f"origin {origin:#x} is negative")
    return _Assembler(source, origin).assemble()
