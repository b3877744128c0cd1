"""The assembler: encodings match docs/isa.md and the Rust opcode table, layout directives and
expressions work, and every mistake is reported with its line."""

import struct

import pytest

from vmmpy import _core
from vmmpy.guest import AsmError, assemble
from vmmpy.guest.asm import OPCODES


def words(program):
    """The program as (opcode, a, b, reserved, imm32) tuples, one per 8 bytes."""
    code = program.code
    return [struct.unpack_from("<BBBBi", code, i) for i in range(0, len(code), 8)]


def test_the_opcode_table_is_the_vcpus():
    assert OPCODES == _core.isa_opcodes()


def test_register_forms_and_immediates_encode_as_documented():
    p = assemble("mov rax, rbx\nmov r15, -2\nadd rcx, 7\nxor rdx, rsi\nshl r8, 3\ndec rsp")
    assert words(p) == [
        (0x10, 0, 3, 0, 0),
        (0x11, 15, 0, 0, -2),
        (0x30, 1, 0, 0, 7),
        (0x24, 2, 6, 0, 0),
        (0x35, 8, 0, 0, 3),
        (0x41, 4, 0, 0, 0),
    ]


def test_movabs_is_sixteen_bytes_with_the_value_after_the_header():
    p = assemble("movabs rdi, 0x1122334455667788\nmovabs rax, -1")
    assert len(p.code) == 32
    assert p.code[:8] == bytes([0x12, 7, 0, 0, 0, 0, 0, 0])
    assert struct.unpack_from("<Q", p.code, 8)[0] == 0x1122334455667788
    assert struct.unpack_from("<Q", p.code, 24)[0] == (1 << 64) - 1


def test_memory_operands_take_a_base_and_a_signed_displacement_expression():
    p = assemble(".equ OFF, 16\nld32 rax, [rbx + OFF*2]\nst8 [rsp - 1], rcx\nld64 rdx, [rsi]\nlea rdi, [rbp - 4 + 2]")
    assert words(p) == [(0x62, 0, 3, 0, 32), (0x68, 4, 1, 0, -1), (0x63, 2, 6, 0, 0), (0x13, 7, 5, 0, -2)]


def test_branches_are_relative_to_the_next_instruction_and_labels_can_be_forward():
    p = assemble("top: nop\n jnz top\n call func\n jmp rax\n func: ret", origin=0x1000)
    assert p.symbols == {"top": 0x1000, "func": 0x1020}
    assert words(p)[1] == (0x51, 0, 0, 0, -16)
    assert words(p)[2] == (0x17, 0, 0, 0, 8)
    assert words(p)[3] == (0x1A, 0, 0, 0, 0)


def test_jcc_aliases_follow_amd64():
    p = assemble("a: jz a\njnz a\njc a\njnc a")
    assert [w[0] for w in words(p)] == [OPCODES["je"], OPCODES["jne"], OPCODES["jb"], OPCODES["jae"]]


def test_port_io_takes_an_immediate_port_or_a_port_register():
    p = assemble("in8 rax, 0x60\nin32 rbx, rdx\nout16 0x3f8, rcx\nout8 rdx, rax")
    assert words(p) == [(0x70, 0, 0, 0, 0x60), (0x76, 3, 2, 0, 0), (0x79, 0, 1, 0, 0x3F8), (0x7C, 2, 0, 0, 0)]


def test_control_registers_idtr_and_msrs():
    p = assemble("mov cr3, rax\nmov rbx, cr0\nlidt rcx\nsidt rdx\nrdmsr\nwrmsr\nrdtscp")
    assert words(p)[:4] == [(0x0E, 3, 0, 0, 0), (0x0F, 3, 0, 0, 0), (0x0C, 1, 0, 0, 0), (0x0D, 2, 0, 0, 0)]
    assert [w[0] for w in words(p)[4:]] == [0x0A, 0x0B, 0x09]


def test_data_directives_org_and_align_lay_out_bytes():
    p = assemble(
        """
        .org 0x100
        b:  .byte 1, 0xff, -1
        .align 4
        w:  .word 0x1234
            .dword 0xdeadbeef
        q:  .qword q, $
            .ascii "ab", "c"
            .asciz "\\n\\x41"
            .space 3, 0x7
        end:
        """,
        origin=0x100,
    )
    s = p.symbols
    assert (s["b"], s["w"], s["q"]) == (0x100, 0x104, 0x10A)
    assert p.code[:3] == b"\x01\xff\xff"
    assert p.code[4:10] == b"\x34\x12\xef\xbe\xad\xde"
    assert struct.unpack_from("<QQ", p.code, 10) == (0x10A, 0x112)
    assert p.code[26:] == b"abc\nA\x00\x07\x07\x07"
    assert p.end == s["end"] == 0x100 + len(p.code)


def test_expressions_follow_c_precedence_and_constants_may_refer_forward():
    p = assemble(".equ A, B * 2 + 1\n.equ B, (3 + 4) << 1\n.equ C, ~0 & 0xff | 0x100\nmov rax, A - 'A'")
    assert p.symbols["A"] == 29 and p.symbols["C"] == 0x1FF
    assert words(p) == [(0x11, 0, 0, 0, 29 - 65)]


def test_macros_substitute_parameters_and_unique_labels():
    src = """
    .macro SPIN reg, n
        mov \\reg, \\n
    loop\\@: dec \\reg
        jnz loop\\@
    .endm
    SPIN rcx, 3
    SPIN rdx, 4
    """
    p = assemble(src)
    assert words(p)[0] == (0x11, 1, 0, 0, 3)
    assert words(p)[3] == (0x11, 2, 0, 0, 4)
    assert "loop1" in p.symbols and "loop2" in p.symbols


def test_comments_do_not_eat_semicolons_inside_strings():
    p = assemble('.ascii "a;b" ; a comment\nnop ; another')
    assert p.code[:3] == b"a;b" and p.code[3] == 0x01


def test_program_load_writes_at_the_origin():
    mem = _core.GuestMemory(1 << 20)
    assemble("hlt", origin=0x2000).load(mem)
    assert mem.read(0x2000, 8) == bytes([0x02, 0, 0, 0, 0, 0, 0, 0])


@pytest.mark.parametrize(
    "source, message",
    [
        ("nop\nmov rxx, 1", "line 2: unknown register 'rxx'"),
        ("frobnicate rax", "line 1: unknown instruction 'frobnicate'"),
        ("mov rax, 0x80000000", "immediate 0x80000000 does not fit a sign-extended 32-bit field"),
        ("jmp nowhere", "line 1: undefined symbol 'nowhere'"),
        ("a: nop\na: nop", "line 2: symbol 'a' is already defined on line 1"),
        ("add rax", "line 1: 'add' takes 2 operand(s), got 1"),
        ("ld64 rax, [8]", "needs a base register"),
        ("out8 0x10000, rax", "port 0x10000 is not in 0..0xffff"),
        (".org 0x10\n.org 0x8", "line 2: .org 0x8 is behind the current address 0x10"),
        (".space later\nlater:", "line 1: .space size uses 'later', which is not defined above it"),
        (".byte 256", ".byte value 0x100 does not fit 1 byte(s)"),
        (".align 3", ".align 3 is not a power of two"),
        ("mov cr2, rax", "unknown control register 'cr2'"),
        (".equ X, X + 1\nmov rax, X", "constant 'X' is defined in terms of itself"),
        ('.ascii "open', "unterminated"),
        (".macro M a\nnop", "macro 'M' has no .endm"),
        (".macro M a\nmov rax, \\a\n.endm\nM", "macro 'M' takes 1 arguments, got 0"),
        (".macro M a\nmov rxx, \\a\n.endm\n\nM 1", "line 2 (in macro 'M' expanded at line 5): unknown register 'rxx'"),
        ("mov rax, 1 +", "line 1: expression '1 +' ends where a value was expected"),
    ],
)
def test_errors_name_the_line_and_the_problem(source, message):
    with pytest.raises(AsmError) as info:
        assemble(source)
    assert message in str(info.value)


def test_errors_are_value_errors_with_the_line_number():
    with pytest.raises(ValueError) as info:
        assemble("nop\n\n  push rqq")
    assert info.value.line == 3


def test_expression_arithmetic_is_exact_c_integer_arithmetic():
    """Division truncates toward zero exactly at any size (no float rounding), the remainder
    takes the dividend's sign, and absurd shift counts are refused instead of exhausting memory."""
    program = assemble(".equ BIG, (1 << 62) / 3\n.equ Q, -7 / 2\n.equ R, -7 % 2\nstart: nop\n")
    assert program.symbols["BIG"] == (1 << 62) // 3
    assert (program.symbols["Q"], program.symbols["R"]) == (-3, -1)
    with pytest.raises(AsmError, match="line 1: shift count 4000000000 out of range"):
        assemble(".equ X, 1 << 4000000000\n")
