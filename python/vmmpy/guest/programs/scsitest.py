"""scsitest: a virtio-scsi driver for target 0, LUN 0. Through the request queue (queue 2,
polled: VRING_AVAIL_F_NO_INTERRUPT) it sends TEST UNIT READY, INQUIRY (prints vendor and
product) and READ CAPACITY(10); writes the blktest pattern (qword k of block s =
``mix(seed, s * 64 + k)``) to every block with WRITE(10) in commands of ``request_sectors``
blocks, SYNCHRONIZE CACHE, reads everything back with READ(10), compares, and prints a digest
(``h = seed; h = mix(h, q)`` over every qword read: ``blktest.reference_digest``); finally it
sends MODE SENSE(6), which the device does not implement, and reports the sense data. Pattern,
digest, the two passes and their console lines are ``_storage``'s (shared with blktest,
nvmetest and ahcitest); each READ(10)/WRITE(10) is sent and completed on its own, a batch of one.

Console::

    scsitest: vmmpy   virtio-scsi disk, N blocks of 512 bytes
    scsitest: wrote N blocks in R commands, synchronized
    scsitest: read back N blocks, all match, digest 0x0123456789abcdef
    scsitest: unsupported command: sense key 5, asc 0x20
    scsitest: MISMATCH block B qword K             (instead, on the first bad qword)
    scsitest: command failed: 0xS                  (instead, on a failed command)
"""

from __future__ import annotations

from ..asm import Program
from . import _storage as S
from . import _virtio as V
from ._common import ArgReader, Argument, asm_string, assemble_program, check_memory
from ._storage import reference_digest, reference_image  # noqa: F401  (the same pattern and digest)

NAME = "scsitest"
DESCRIPTION = "drives a virtio-scsi disk: INQUIRY, READ CAPACITY, writes a pattern, reads it back, prints a digest"
ARGUMENTS = (
    Argument("seed", "1", "pattern seed"),
    Argument("request_sectors", "8", "blocks per READ(10)/WRITE(10) (1 .. 128)"),
    Argument("sectors", "0", "blocks to write and read (0: the whole disk)"),
)
VIRTIO_SCSI_DEVICE = 0x1004
RING = 0x20_0000
REQ = 0x20_8000
RESP = 0x20_8100
DATA = 0x21_0000


def reference_output(seed: int, blocks: int, request_sectors: int) -> str:
    return (f"scsitest: vmmpy   virtio-scsi disk, {blocks} blocks of 512 bytes\n"
            f"scsitest: wrote {blocks} blocks in {-(-blocks // request_sectors)} commands, synchronized\n"
            f"scsitest: read back {blocks} blocks, all match, digest 0x{reference_digest(seed, blocks):016x}\n"
            f"scsitest: unsupported command: sense key 5, asc 0x20\n")


def build(args: dict[str, str], memsize: int, lowmem_size: int, highmem_size: int) -> Program:
    a = ArgReader(NAME, args, ARGUMENTS)
    seed = a.integer("seed", minimum=0, maximum=(1 << 63) - 1)
    rs = a.integer("request_sectors", minimum=1, maximum=128)
    sectors = a.integer("sectors", minimum=0, maximum=(1 << 32) - 1)
    check_memory(NAME, lowmem_size, DATA + rs * 512)
    body = f"""
start:
        movabs rax, (VIRTIO_SCSI_DEVICE << 16) | VIRTIO_VENDOR
        call vio_bind
        test rax, rax
        jnz found
        PRINT msg_nodev
        call poweroff
found:
        mov rax, 0
        call vio_start
        mov rax, 2                      ; request queue
        mov rbx, RING
        call vio_queue
        mov r12, rax
        test rax, rax
        jnz have_queue
        PRINT msg_noqueue
        call poweroff
have_queue:
        mov rdi, vvar_avail
        ld64 rdi, [rdi]
        mov rax, VRING_AVAIL_F_NO_INTERRUPT
        st16 [rdi], rax
        call vio_driver_ok
        mov r15, 0                      ; avail index
        ; TEST UNIT READY
        call cdb_clear
        mov rcx, 0
        mov rdx, 0
        call scsi_cmd
        test rax, rax
        jnz cmd_failed
        ; INQUIRY, 36 bytes
        call cdb_clear
        mov rdi, REQ + 19
        mov rax, 0x12
        st8 [rdi], rax
        mov rax, 36
        st8 [rdi + 4], rax
        mov rcx, 36
        mov rdx, 2
        call scsi_cmd
        test rax, rax
        jnz cmd_failed
        mov rdi, DATA
        ld8 rax, [rdi]
        and rax, 0x1f
        jnz cmd_failed                  ; not a direct-access device
        mov rax, 0                      ; vendor (8) + product (16), then a NUL
        st8 [rdi + 32], rax
        ; READ CAPACITY(10)
        call cdb_clear
        mov rdi, REQ + 19
        mov rax, 0x25
        st8 [rdi], rax
        mov rcx, 8
        mov rdx, 2
        call scsi_cmd
        test rax, rax
        jnz cmd_failed
        mov rsi, DATA + 4
        call load_be32
        cmp rax, 512
        jne cmd_failed
        mov rsi, DATA
        call load_be32
        inc rax
        mov rbx, rax                    ; blocks, capped by the sectors argument
        call storage_capacity
        PRINT msg_prefix
        PRINT INQ_STRING
        PRINT msg_comma
        PRINT_DEC rbx
        PRINT msg_blocks
        call storage_run
        ; MODE SENSE(6): not implemented by the device
        call cdb_clear
        mov rdi, REQ + 19
        mov rax, 0x1a
        st8 [rdi], rax
        mov rcx, 0
        mov rdx, 0
        call scsi_cmd
        cmp rax, 2                      ; CHECK CONDITION, response OK
        jne cmd_failed
        PRINT msg_unsupported
        mov rdi, RESP + 12
        ld8 rax, [rdi + 2]
        and rax, 0xf
        PRINT_DEC rax
        PRINT msg_asc
        ld8 rax, [rdi + 12]
        PRINT_HEX rax
        PRINT msg_newline
        call poweroff
cmd_failed:
        PRINT msg_failed
        PRINT_HEX rax
        PRINT msg_newline
        call poweroff

; dev_queue: a WRITE(10) or READ(10) of r10 blocks from r14, sent and completed at once (the
; device completes a request during its notify), so a batch is one command and dev_submit has
; nothing left to do (see _storage)
dev_queue:
        push rcx
        mov rax, 0x28                   ; READ(10), data in
        mov rdx, 2
        test r8, r8
        jz dev_queue_cdb
        mov rax, 0x2a                   ; WRITE(10), data out
        mov rdx, 1
dev_queue_cdb:
        call rw_cdb
        mov rcx, r10
        shl rcx, 9
        call scsi_cmd
        pop rcx
        test rax, rax
        jnz cmd_failed
dev_submit:
        ret

; dev_flush: SYNCHRONIZE CACHE(10)
dev_flush:
        call cdb_clear
        mov rdi, REQ + 19
        mov rax, 0x35
        st8 [rdi], rax
        mov rcx, 0
        mov rdx, 0
        call scsi_cmd
        test rax, rax
        jnz cmd_failed
        ret

; the CDB of READ(10)/WRITE(10): opcode rax, LBA r14, r10 blocks (clobbers rax)
rw_cdb:
        push rdi
        push rax
        call cdb_clear
        pop rax
        mov rdi, REQ + 19
        st8 [rdi], rax
        mov rax, r14
        st8 [rdi + 5], rax
        shr rax, 8
        st8 [rdi + 4], rax
        shr rax, 8
        st8 [rdi + 3], rax
        shr rax, 8
        st8 [rdi + 2], rax
        mov rax, r10
        st8 [rdi + 8], rax
        shr rax, 8
        st8 [rdi + 7], rax
        pop rdi
        ret

; the request header: LUN 0 of target 0, tag 0, and a zero CDB
cdb_clear:
        push rax
        push rdi
        push rcx
        mov rdi, REQ
        movabs rax, 0x400001
        st64 [rdi], rax
        mov rax, 0
        mov rcx, 8
cdb_clear_byte:
        mov rdi, REQ
        add rdi, rcx
        st8 [rdi], rax
        inc rcx
        cmp rcx, 51
        jb cdb_clear_byte
        pop rcx
        pop rdi
        pop rax
        ret

; rax = the big-endian u32 at rsi
load_be32:
        push rbx
        push rcx
        mov rax, 0
        mov rcx, 0
load_be32_byte:
        shl rax, 8
        mov rbx, rsi
        add rbx, rcx
        ld8 rbx, [rbx]
        or rax, rbx
        inc rcx
        cmp rcx, 4
        jb load_be32_byte
        pop rcx
        pop rbx
        ret

; send the command in REQ: rcx = data bytes at DATA, rdx = 0 none, 1 out, 2 in.
; -> rax = status | response << 8 (0: GOOD)
scsi_cmd:
        push rbx
        push rdi
        push rsi
        mov rdi, RING                   ; descriptor 0: the request
        mov rax, REQ
        st64 [rdi], rax
        mov rax, 51
        st32 [rdi + 8], rax
        mov rax, VRING_F_NEXT
        st16 [rdi + 12], rax
        mov rax, 1
        st16 [rdi + 14], rax
        cmp rdx, 1
        jne cmd_not_out
        call desc_data_1                ; out: 0 req -> 1 data (readable) -> 2 resp
        mov rax, VRING_F_NEXT
        st16 [rdi + 28], rax
        mov rax, 2
        st16 [rdi + 30], rax
        mov rbx, 2
        call desc_resp
        mov rax, VRING_F_WRITE
        st16 [rdi + 44], rax
        jmp cmd_publish
cmd_not_out:
        mov rbx, 1                      ; 0 req -> 1 resp [-> 2 data (writable)]
        call desc_resp
        mov rax, VRING_F_WRITE
        st16 [rdi + 28], rax
        cmp rdx, 2
        jne cmd_publish
        mov rax, VRING_F_WRITE | VRING_F_NEXT
        st16 [rdi + 28], rax
        mov rax, 2
        st16 [rdi + 30], rax
        mov rax, DATA
        st64 [rdi + 32], rax
        st32 [rdi + 40], rcx
        mov rax, VRING_F_WRITE
        st16 [rdi + 44], rax
cmd_publish:
        mov rdi, vvar_avail
        ld64 rdi, [rdi]
        mov rax, r15
        rem rax, r12
        shl rax, 1
        add rax, rdi
        mov rbx, 0
        st16 [rax + 4], rbx
        inc r15
        and r15, 0xffff
        st16 [rdi + 2], r15
        mov rax, 2
        call vio_notify
        mov rdi, vvar_used              ; completes during the notify
        ld64 rdi, [rdi]
        ld16 rax, [rdi + 2]
        cmp rax, r15
        je cmd_done
        movabs rax, 0xdead
        jmp cmd_out
cmd_done:
        mov rdi, RESP
        ld8 rax, [rdi + 10]             ; status
        ld8 rbx, [rdi + 11]             ; response
        shl rbx, 8
        or rax, rbx
cmd_out:
        pop rsi
        pop rdi
        pop rbx
        ret
desc_data_1:
        mov rax, DATA
        st64 [rdi + 16], rax
        st32 [rdi + 24], rcx
        ret
; descriptor rbx: the response, 108 bytes (flags set by the caller)
desc_resp:
        push rsi
        mov rsi, rbx
        shl rsi, 4
        add rsi, rdi
        mov rax, RESP
        st64 [rsi], rax
        mov rax, 108
        st32 [rsi + 8], rax
        pop rsi
        ret

{S.messages(NAME, device="virtio-scsi device", unit="blocks", requests="commands", flushed="synchronized")}
msg_noqueue:     .asciz {asm_string("scsitest: the device has no request queue" + chr(10))}
msg_prefix:      .asciz {asm_string("scsitest: ")}
msg_blocks:      .asciz {asm_string(" blocks of 512 bytes" + chr(10))}
msg_unsupported: .asciz {asm_string("scsitest: unsupported command: sense key ")}
msg_asc:         .asciz {asm_string(", asc 0x")}
msg_failed:      .asciz {asm_string("scsitest: command failed: 0x")}
""" + S.routines() + V.library()
    constants = {**V.CONSTANTS, **S.constants(seed=seed, batch=1, request_sectors=rs, limit=sectors, slot_base=DATA, slot_stride=0),
                 "VIRTIO_SCSI_DEVICE": VIRTIO_SCSI_DEVICE, "RING": RING, "REQ": REQ, "RESP": RESP, "DATA": DATA,
                 "INQ_STRING": DATA + 8}
    return assemble_program(NAME, body, constants)
