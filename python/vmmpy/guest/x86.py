"""A tiny x86-64 encoder: the instructions the KVM guests (``programs/native.py``) use, as bytes.

Not an assembler: each method appends one instruction's encoding (Intel SDM vol. 2 opcodes,
REX.W for 64-bit operands), labels are Python strings, and jumps and calls are rel32, resolved
by :meth:`X86.program`. Memory operands are always ``[base + disp32]`` (ModRM mod=10, with a SIB
byte for rsp/r12 bases), so every form has one encoding. Registers are the amd64 names.
"""

from __future__ import annotations

import struct

from .asm import Program

REGISTERS = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_NUMBER = {name: i for i, name in enumerate(REGISTERS)}
#: Condition codes of Jcc (0F 80+cc).
CONDITIONS = {"o": 0, "no": 1, "b": 2, "ae": 3, "e": 4, "z": 4, "ne": 5, "nz": 5, "be": 6, "a": 7, "s": 8, "ns": 9, "l": 12, "ge": 13, "le": 14, "g": 15}


def _reg(name: str) -> int:
    try:
        return _NUMBER[name]
    except KeyError:
        raise ValueError(f"x86: no 64-bit register named {name!r}") from None


def _rex(reg: int = 0, rm: int = 0, *, w: bool = True) -> bytes:
    value = 0x40 | (8 if w else 0) | ((reg >> 3) << 2) | (rm >> 3)
    return bytes([value]) if value != 0x40 else b""


def _modrm_reg(reg: int, rm: int) -> bytes:
    return bytes([0xC0 | (reg & 7) << 3 | (rm & 7)])


def _modrm_mem(reg: int, base: int, disp: int) -> bytes:
    if not -(1 << 31) <= disp < 1 << 31:
        raise ValueError(f"x86: displacement {disp:#x} does not fit 32 bits")
    sib = b"\x24" if base & 7 == 4 else b""
    return bytes([0x80 | (reg & 7) << 3 | (base & 7)]) + sib + struct.pack("<i", disp)


class X86:
    """Instructions appended in order at ``origin``; :meth:`program` resolves labels."""

    def __init__(self, origin: int) -> None:
        self.origin = origin
        self.code = bytearray()
        self.labels: dict[str, int] = {}
        self._fixups: list[tuple[int, str]] = []  # (offset of a rel32, label)
        self._absolute: list[tuple[int, str]] = []  # (offset of an imm64, label)

    @property
    def here(self) -> int:
        return self.origin + len(self.code)

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"x86: label {name!r} defined twice")
        self.labels[name] = self.here

    def _emit(self, *parts: bytes) -> None:
        for part in parts:
            self.code += part

    def _rel32(self, opcode: bytes, target: str) -> None:
        self._emit(opcode)
        self._fixups.append((len(self.code), target))
        self._emit(b"\0\0\0\0")

    # ---- data movement -------------------------------------------------------------------
    def mov_imm(self, dst: str, value: int) -> None:
        """mov r64, imm64 (REX.W B8+r)."""
        r = _reg(dst)
        self._emit(_rex(rm=r), bytes([0xB8 + (r & 7)]), struct.pack("<Q", value & (1 << 64) - 1))

    def mov_address(self, dst: str, label: str) -> None:
        """mov r64, imm64 of a label's address (which may come later)."""
        self.mov_imm(dst, 0)
        self._absolute.append((len(self.code) - 8, label))

    def mov(self, dst: str, src: str) -> None:
        """mov r64, r64 (REX.W 89 /r)."""
        d, s = _reg(dst), _reg(src)
        self._emit(_rex(s, d), b"\x89", _modrm_reg(s, d))

    def load(self, dst: str, base: str, disp: int = 0) -> None:
        """mov r64, [base + disp] (REX.W 8B /r)."""
        d, b = _reg(dst), _reg(base)
        self._emit(_rex(d, b), b"\x8b", _modrm_mem(d, b, disp))

    def store(self, base: str, disp: int, src: str) -> None:
        """mov [base + disp], r64 (REX.W 89 /r)."""
        s, b = _reg(src), _reg(base)
        self._emit(_rex(s, b), b"\x89", _modrm_mem(s, b, disp))

    def store32(self, base: str, disp: int, src: str) -> None:
        """mov dword [base + disp], r32 (89 /r): a 32-bit device register."""
        s, b = _reg(src), _reg(base)
        self._emit(_rex(s, b, w=False), b"\x89", _modrm_mem(s, b, disp))

    def load_byte_al(self, base: str) -> None:
        """mov al, [base] (8A /r)."""
        b = _reg(base)
        self._emit(_rex(0, b, w=False), b"\x8a", _modrm_mem(0, b, 0))

    def push(self, reg: str) -> None:
        r = _reg(reg)
        self._emit(_rex(rm=r, w=False), bytes([0x50 + (r & 7)]))

    def pop(self, reg: str) -> None:
        r = _reg(reg)
        self._emit(_rex(rm=r, w=False), bytes([0x58 + (r & 7)]))

    # ---- arithmetic ------------------------------------------------------------------------
    def inc(self, reg: str) -> None:
        r = _reg(reg)
        self._emit(_rex(rm=r), b"\xff", _modrm_reg(0, r))

    def dec(self, reg: str) -> None:
        r = _reg(reg)
        self._emit(_rex(rm=r), b"\xff", _modrm_reg(1, r))

    def inc_mem(self, base: str, disp: int = 0) -> None:
        """inc qword [base + disp] (REX.W FF /0): one read-modify-write of guest memory."""
        b = _reg(base)
        self._emit(_rex(rm=b), b"\xff", _modrm_mem(0, b, disp))

    def add_imm(self, reg: str, value: int) -> None:
        """add r64, imm32 (REX.W 81 /0, sign-extended)."""
        r = _reg(reg)
        self._emit(_rex(rm=r), b"\x81", _modrm_reg(0, r), struct.pack("<i", value))

    def and_imm(self, reg: str, value: int) -> None:
        """and r64, imm32 (REX.W 81 /4, sign-extended)."""
        r = _reg(reg)
        self._emit(_rex(rm=r), b"\x81", _modrm_reg(4, r), struct.pack("<i", value))

    def shl(self, reg: str, count: int) -> None:
        r = _reg(reg)
        self._emit(_rex(rm=r), b"\xc1", _modrm_reg(4, r), bytes([count]))

    def shr(self, reg: str, count: int) -> None:
        r = _reg(reg)
        self._emit(_rex(rm=r), b"\xc1", _modrm_reg(5, r), bytes([count]))

    def _alu(self, opcode: int, dst: str, src: str) -> None:
        d, s = _reg(dst), _reg(src)
        self._emit(_rex(s, d), bytes([opcode]), _modrm_reg(s, d))

    def add(self, dst: str, src: str) -> None:
        self._alu(0x01, dst, src)

    def sub(self, dst: str, src: str) -> None:
        self._alu(0x29, dst, src)

    def xor(self, dst: str, src: str) -> None:
        self._alu(0x31, dst, src)

    def or_(self, dst: str, src: str) -> None:
        self._alu(0x09, dst, src)

    def cmp(self, a: str, b: str) -> None:
        """cmp a, b (REX.W 39 /r): flags of a - b."""
        self._alu(0x39, a, b)

    def test(self, a: str, b: str) -> None:
        self._alu(0x85, a, b)

    def div(self, reg: str) -> None:
        """div r64 (REX.W F7 /6): rdx:rax / reg -> rax, remainder rdx."""
        r = _reg(reg)
        self._emit(_rex(rm=r), b"\xf7", _modrm_reg(6, r))

    def imul(self, dst: str, src: str) -> None:
        """imul r64, r64 (REX.W 0F AF /r)."""
        d, s = _reg(dst), _reg(src)
        self._emit(_rex(d, s), b"\x0f\xaf", _modrm_reg(d, s))

    def test_al(self) -> None:
        self._emit(b"\x84\xc0")

    # ---- control -------------------------------------------------------------------------
    def jmp(self, target: str) -> None:
        self._rel32(b"\xe9", target)

    def j(self, condition: str, target: str) -> None:
        self._rel32(bytes([0x0F, 0x80 + CONDITIONS[condition]]), target)

    def call(self, target: str) -> None:
        self._rel32(b"\xe8", target)

    def ret(self) -> None:
        self._emit(b"\xc3")

    def lidt(self, base: str) -> None:
        """lidt [base] (0F 01 /3)."""
        b = _reg(base)
        self._emit(_rex(0, b, w=False), b"\x0f\x01", _modrm_mem(3, b, 0))

    def sti_hlt_cli(self) -> None:
        """sti; hlt; cli: wait for an interrupt, which is taken inside the hlt (sti's shadow
        keeps it from arriving before), and run on with interrupts off."""
        self._emit(b"\xfb\xf4\xfa")

    def iretq(self) -> None:
        self._emit(b"\x48\xcf")

    def rdtsc(self) -> None:
        self._emit(b"\x0f\x31")

    def pause(self) -> None:
        self._emit(b"\xf3\x90")

    # ---- ports ----------------------------------------------------------------------------
    def out_al(self) -> None:
        """out dx, al."""
        self._emit(b"\xee")

    def out_ax(self) -> None:
        """out dx, ax."""
        self._emit(b"\x66\xef")

    def in_al(self) -> None:
        """in al, dx."""
        self._emit(b"\xec")

    # ---- data -------------------------------------------------------------------------------
    def asciz(self, name: str, text: str) -> None:
        self.label(name)
        self._emit(text.encode("ascii") + b"\0")

    def align(self, n: int) -> None:
        while self.here % n:
            self._emit(b"\0")

    def raw(self, data: bytes) -> None:
        self._emit(data)

    def quad(self, name: str, value: int = 0) -> None:
        self.label(name)
        self._emit(struct.pack("<Q", value))

    def program(self) -> Program:
        code = bytearray(self.code)
        for offset, target in self._fixups:
            if target not in self.labels:
                raise ValueError(f"x86: jump to undefined label {target!r}")
            rel = self.labels[target] - (self.origin + offset + 4)
            code[offset:offset + 4] = struct.pack("<i", rel)
        for offset, target in self._absolute:
            if target not in self.labels:
                raise ValueError(f"x86: address of undefined label {target!r}")
            code[offset:offset + 8] = struct.pack("<Q", self.labels[target])
        return Program(bytes(code), dict(self.labels), self.origin)
