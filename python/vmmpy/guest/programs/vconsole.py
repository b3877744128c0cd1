"""vconsole: a virtio-console driver. It prints ``lines`` lines through the console's
transmit queue (queue 1), one device-readable descriptor per line, waiting for each by
interrupt, then reports on COM1 how many lines and bytes it sent.

virtio-console output::

    vconsole: line 1
    ...
    vconsole: line N

COM1::

    vconsole: sent N lines, B bytes
"""

from __future__ import annotations

from ..asm import Program
from . import _virtio as V
from ._common import ArgReader, Argument, asm_string, assemble_program, check_memory

NAME = "vconsole"
DESCRIPTION = "drives a virtio-console port: prints numbered lines through its transmit queue"
ARGUMENTS = (Argument("lines", "10", "lines to print through the virtio console (1 .. 1000000)"),)
VIRTIO_CONSOLE_DEVICE = 0x1003
RX_RING = 0x20_0000
TX_RING = 0x20_4000
LINE = 0x20_8000


def reference_output(lines: int) -> bytes:
    return b"".join(f"vconsole: line {n}\n".encode() for n in range(1, lines + 1))


def build(args: dict[str, str], memsize: int, lowmem_size: int, highmem_size: int) -> Program:
    a = ArgReader(NAME, args, ARGUMENTS)
    lines = a.integer("lines", minimum=1, maximum=1_000_000)
    check_memory(NAME, lowmem_size, LINE + 4096)
    body = f"""
start:
        movabs rax, (VIRTIO_CONSOLE_DEVICE << 16) | VIRTIO_VENDOR
        call vio_bind
        test rax, rax
        jnz found
        PRINT msg_nodev
        call poweroff
found:
        mov rax, 0
        call vio_start
        mov rax, 0                      ; receiveq: set up, given no buffers
        mov rbx, RX_RING
        call vio_queue
        mov rax, 1                      ; transmitq
        mov rbx, TX_RING
        call vio_queue
        mov r12, rax
        call intx_setup
        call vio_driver_ok
        mov r15, 0                      ; avail index
        mov r14, 0                      ; line number
        mov r13, 0                      ; bytes sent
line:
        cmp r14, LINES
        jae finished
        inc r14
        mov rdi, LINE                   ; "vconsole: line " + decimal + newline
        mov rsi, msg_prefix
copy:
        ld8 rax, [rsi]
        test rax, rax
        jz number
        st8 [rdi], rax
        inc rsi
        inc rdi
        jmp copy
number:
        mov rax, r14                    ; digits backwards into a scratch area, then forwards
        mov rsi, LINE + 256
digit:
        mov rdx, rax
        rem rdx, 10
        add rdx, '0'
        dec rsi
        st8 [rsi], rdx
        div rax, 10
        test rax, rax
        jnz digit
forward:
        ld8 rax, [rsi]
        st8 [rdi], rax
        inc rdi
        inc rsi
        cmp rsi, LINE + 256
        jb forward
        mov rax, 10
        st8 [rdi], rax
        inc rdi
        sub rdi, LINE                   ; rdi = length
        add r13, rdi
        mov rax, TX_RING                ; descriptor 0: the line, device-readable
        mov rbx, LINE
        st64 [rax], rbx
        st32 [rax + 8], rdi
        mov rbx, 0
        st16 [rax + 12], rbx
        mov rdi, vvar_avail
        ld64 rdi, [rdi]
        mov rax, r15
        rem rax, r12
        shl rax, 1
        add rax, rdi
        mov rbx, 0
        st16 [rax + 4], rbx
        inc r15
        st16 [rdi + 2], r15
        mov rax, 1
        call vio_notify
        mov rax, r15
        mov rbx, 1
        call vio_wait_used
        jmp line
finished:
        PRINT msg_sent
        PRINT_DEC r14
        PRINT msg_lines
        PRINT_DEC r13
        PRINT msg_bytes
        call poweroff
msg_nodev:  .asciz {asm_string("vconsole: no virtio-console device on PCI bus 0" + chr(10))}
msg_prefix: .asciz {asm_string("vconsole: line ")}
msg_sent:   .asciz {asm_string("vconsole: sent ")}
msg_lines:  .asciz {asm_string(" lines, ")}
msg_bytes:  .asciz {asm_string(" bytes" + chr(10))}
""" + V.library()
    constants = {**V.CONSTANTS, "VIRTIO_CONSOLE_DEVICE": VIRTIO_CONSOLE_DEVICE, "LINES": lines,
                 "RX_RING": RX_RING, "TX_RING": TX_RING, "LINE": LINE}
    return assemble_program(NAME, body, constants)
