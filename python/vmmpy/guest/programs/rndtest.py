"""rndtest: a virtio-rnd driver. It asks the device for ``bytes`` bytes in requests of
``chunk`` bytes (one device-writable descriptor each, ``batch`` per notify, completion by
interrupt), checks every request came back full (used length = buffer length), and prints a
digest of the bytes: ``h = 0``, then ``h = mix(h, q)`` for every little-endian qword received,
in order (``mix`` as in the hash program). With the device's ``seed=N`` the stream and so the
digest are reproducible (``reference_digest``); from host entropy only the count is.

Console::

    rndtest: received N bytes in R requests, digest 0x0123456789abcdef
    rndtest: short request: L of C bytes        (instead, if the device gave less)
"""

from __future__ import annotations

from ...devices.virtio_rnd import SeededStream
from ..asm import Program
from . import _virtio as V
from ._common import ArgReader, Argument, asm_string, assemble_program, check_memory
from .hash import MIX_INCREMENT, MIX_MULTIPLIER, mix

NAME = "rndtest"
DESCRIPTION = "drives a virtio-rnd device: requests random bytes, checks each request came back full, prints a digest"
ARGUMENTS = (
    Argument("bytes", "64K", "bytes to fetch (a multiple of chunk)"),
    Argument("chunk", "512", "bytes per request (a multiple of 8, 8 .. 4096)"),
    Argument("batch", "4", "requests per notify (1 .. 32)"),
)
VIRTIO_RND_DEVICE = 0x1005
RING = 0x20_0000
USED_LEN = 0x20_4000
DATA = 0x21_0000


def reference_digest(seed: int, nbytes: int) -> int:
    data = SeededStream(seed).read(nbytes)
    h = 0
    for i in range(0, nbytes, 8):
        h = mix(h, int.from_bytes(data[i:i + 8], "little"))
    return h


def build(args: dict[str, str], memsize: int, lowmem_size: int, highmem_size: int) -> Program:
    a = ArgReader(NAME, args, ARGUMENTS)
    chunk = a.integer("chunk", minimum=8, maximum=4096)
    if chunk % 8:
        raise a.fail("chunk", "must be a multiple of 8")
    total = a.size("bytes")
    if total == 0 or total % chunk:
        raise a.fail("bytes", f"must be a positive multiple of chunk ({chunk})")
    batch = a.integer("batch", minimum=1, maximum=32)
    check_memory(NAME, lowmem_size, DATA + batch * chunk)
    body = f"""
start:
        movabs rax, (VIRTIO_RND_DEVICE << 16) | VIRTIO_VENDOR
        call vio_bind
        test rax, rax
        jnz found
        PRINT msg_nodev
        call poweroff
found:
        mov rax, 0
        call vio_start
        mov rax, 0
        mov rbx, RING
        call vio_queue
        mov r12, rax                    ; queue size
        cmp rax, BATCH
        jae queue_ok
        PRINT msg_smallq
        call poweroff
queue_ok:
        call intx_setup
        call vio_driver_ok
        mov r15, 0                      ; avail index
        mov r14, 0                      ; bytes received
        mov r13, 0                      ; digest
        mov r10, 0                      ; requests
next_batch:
        movabs rax, TOTAL
        cmp r14, rax
        jae finished
        mov rcx, 0
fill:
        cmp rcx, BATCH
        jae submit
        mov rax, rcx                    ; stop at TOTAL bytes
        mul rax, CHUNK
        add rax, r14
        movabs rbx, TOTAL
        cmp rax, rbx
        jae submit
        mov rax, rcx                    ; descriptor rcx: DATA + rcx*CHUNK, CHUNK bytes, writable
        shl rax, 4
        add rax, RING
        mov rbx, rcx
        mul rbx, CHUNK
        add rbx, DATA
        st64 [rax], rbx
        mov rbx, CHUNK
        st32 [rax + 8], rbx
        mov rbx, VRING_F_WRITE
        st16 [rax + 12], rbx
        mov rdi, vvar_avail
        ld64 rdi, [rdi]
        mov rax, r15
        rem rax, r12
        shl rax, 1
        add rax, rdi
        st16 [rax + 4], rcx
        inc r15
        inc r10
        inc rcx
        jmp fill
submit:
        mov r9, rcx                     ; requests in this batch
        mov rdi, vvar_avail
        ld64 rdi, [rdi]
        st16 [rdi + 2], r15
        mov rax, 0
        call vio_notify
        mov rax, r15
        mov rbx, 1
        call vio_wait_used
        mov rcx, 0                      ; check used lengths, fold the bytes
check:
        cmp rcx, r9
        jae next_batch
        mov rax, r15                    ; used entry of request rcx: (r15 - r9 + rcx) % size
        sub rax, r9
        add rax, rcx
        and rax, 0xffff
        rem rax, r12
        shl rax, 3
        mov rdi, vvar_used
        ld64 rdi, [rdi]
        add rdi, rax
        ld32 rax, [rdi + 8]             ; len
        cmp rax, CHUNK
        jne short
        ld32 rsi, [rdi + 4]             ; id = descriptor = buffer number
        mul rsi, CHUNK
        add rsi, DATA
        mov rdx, rsi
        add rdx, CHUNK
fold:
        ld64 rax, [rsi]
        MIX r13, rax, rax
        add rsi, 8
        cmp rsi, rdx
        jb fold
        add r14, CHUNK
        inc rcx
        jmp check
short:
        PRINT msg_short
        PRINT_DEC rax
        PRINT msg_of
        mov rax, CHUNK
        PRINT_DEC rax
        PRINT msg_bytes
        call poweroff
finished:
        PRINT msg_received
        PRINT_DEC r14
        PRINT msg_in
        PRINT_DEC r10
        PRINT msg_digest
        PRINT_HEX16 r13
        PRINT msg_newline
        call poweroff
msg_nodev:    .asciz {asm_string("rndtest: no virtio-rnd device on PCI bus 0" + chr(10))}
msg_smallq:   .asciz {asm_string("rndtest: the queue is too small for the batch" + chr(10))}
msg_short:    .asciz {asm_string("rndtest: short request: ")}
msg_of:       .asciz {asm_string(" of ")}
msg_bytes:    .asciz {asm_string(" bytes" + chr(10))}
msg_received: .asciz {asm_string("rndtest: received ")}
msg_in:       .asciz {asm_string(" bytes in ")}
msg_digest:   .asciz {asm_string(" requests, digest 0x")}
msg_newline:  .asciz {asm_string(chr(10))}
""" + V.library()
    constants = {**V.CONSTANTS, "VIRTIO_RND_DEVICE": VIRTIO_RND_DEVICE, "MIX_INCREMENT": MIX_INCREMENT,
                 "MIX_MULTIPLIER": MIX_MULTIPLIER, "TOTAL": total, "CHUNK": chunk, "BATCH": batch,
                 "RING": RING, "DATA": DATA}
    return assemble_program(NAME, body, constants)
