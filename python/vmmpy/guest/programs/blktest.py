"""blktest: a virtio-blk driver that writes a pattern to every sector of the disk, flushes,
reads everything back, compares, and prints a digest of what it read.

The driver: finds the virtio-blk function (1af4:1001) on PCI bus 0, negotiates FLUSH, sets up
queue 0 at 2 MiB, asks the disk for its serial (GET_ID) and reads the capacity from the device
configuration. Then, in batches of ``batch`` requests of up to ``request_sectors`` sectors,
each a three-descriptor chain (16-byte header, data, status byte), it makes the batch
available, notifies once and waits for the used ring, by interrupt (``mode=irq``: the I/O
APIC pin from the interrupt line register, the handler reads the ISR) or by polling with
VRING_AVAIL_F_NO_INTERRUPT set (``mode=poll``: the device must then never interrupt, which the
driver checks by reading the ISR at the end).

Pattern: qword ``k`` of sector ``s`` is ``mix(seed, s * 64 + k)``. Digest: ``h = seed``, then
``h = mix(h, q)`` for every qword read back in disk order (``mix`` as in the hash program).
``reference_digest`` computes it; ``reference_image`` the disk's expected contents.

Console::

    blktest: disk SERIAL, N sectors
    blktest: wrote N sectors in R requests, flushed
    blktest: read back N sectors, all match, digest 0x0123456789abcdef
    blktest: done (irq: I interrupts | poll: isr 0)
    blktest: MISMATCH sector S qword K             (instead, on the first bad qword)
    blktest: request failed, status X at sector S  (instead, on an I/O error)
"""

from __future__ import annotations

from ..asm import Program
from . import _virtio as V
from ._common import ArgReader, Argument, asm_string, assemble_program, check_memory
from ._pattern import ROUTINES as PATTERN_ROUTINES
from .hash import MIX_INCREMENT, MIX_MULTIPLIER, mix

NAME = "blktest"
DESCRIPTION = "drives a virtio-blk disk: writes a pattern to every sector, reads it back, checks it and prints a digest"
ARGUMENTS = (
    Argument("seed", "1", "pattern seed"),
    Argument("batch", "4", "requests made available per notify (1 .. 16)"),
    Argument("request_sectors", "8", "sectors per request (1 .. 128)"),
    Argument("mode", "irq", "irq: wait for the INTx interrupt; poll: suppress interrupts and poll the used ring"),
    Argument("sectors", "0", "cover only the first N sectors; 0 = the whole disk"),
)

VIRTIO_BLK_DEVICE = 0x1001
VIRTIO_BLK_F_FLUSH = 1 << 9
RING = 0x20_0000  # queue 0's ring: up to 3 pages for 256 entries
HEADERS = 0x20_4000
STATUS = 0x20_5000
IDBUF = 0x20_6000
DATA = 0x21_0000


def pattern(seed: int, sector: int, qword: int) -> int:
    return mix(seed, sector * 64 + qword)


def reference_image(seed: int, sectors: int) -> bytes:
    """The bytes blktest leaves in the first ``sectors`` sectors."""
    out = bytearray()
    for s in range(sectors):
        for k in range(64):
            out += pattern(seed, s, k).to_bytes(8, "little")
    return bytes(out)


def reference_digest(seed: int, sectors: int) -> int:
    h = seed
    for s in range(sectors):
        for k in range(64):
            h = mix(h, pattern(seed, s, k))
    return h


def build(args: dict[str, str], memsize: int, lowmem_size: int, highmem_size: int) -> Program:
    a = ArgReader(NAME, args, ARGUMENTS)
    seed = a.integer("seed")
    batch = a.integer("batch", minimum=1, maximum=16)
    request_sectors = a.integer("request_sectors", minimum=1, maximum=128)
    mode = a.choice("mode", ("irq", "poll"))
    limit = a.integer("sectors", maximum=(1 << 48))
    request_bytes = request_sectors * 512
    check_memory(NAME, lowmem_size, DATA + batch * request_bytes)
    irq = 1 if mode == "irq" else 0
    body = f"""
start:
        movabs rax, (VIRTIO_BLK_DEVICE << 16) | VIRTIO_VENDOR
        call vio_bind
        test rax, rax
        jnz found
        PRINT msg_nodev
        call poweroff
found:
        mov rax, VIRTIO_BLK_F_FLUSH
        call vio_start
        mov rax, 0
        mov rbx, RING
        call vio_queue
        cmp rax, 3 * BATCH
        jae queue_ok
        PRINT msg_smallq
        call poweroff
queue_ok:
        mov r12, rax                    ; r12 = queue size
        mov rdi, vvar_avail
        ld64 rdi, [rdi]
        mov rax, AVAIL_FLAGS
        st16 [rdi], rax
        mov rax, IRQ
        test rax, rax
        jz no_irq_setup
        call vio_irq_setup
no_irq_setup:
        call vio_driver_ok
        mov r15, 0                      ; r15 = the driver's avail index

        ; capacity (u64 at config offset 0), capped by the sectors argument
        mov rdx, VIO_CONFIG + 4
        call vio_in32
        mov rbx, rax
        shl rbx, 32
        mov rdx, VIO_CONFIG
        call vio_in32
        or rbx, rax
        movabs rax, LIMIT
        test rax, rax
        jz no_limit
        cmp rbx, rax
        jbe no_limit
        mov rbx, rax
no_limit:
        mov rdi, var_capacity
        st64 [rdi], rbx

        ; GET_ID: the disk's serial
        mov rcx, 0
        mov rax, 8                      ; VIRTIO_BLK_T_GET_ID
        mov rbx, 0
        mov rsi, IDBUF
        mov rdx, 20
        mov r8, VRING_F_WRITE
        call add_request
        mov r9, 1
        call submit
        mov rdi, IDBUF + 20
        mov rax, 0
        st8 [rdi], rax
        PRINT msg_disk
        PRINT IDBUF
        PRINT msg_comma
        mov rdi, var_capacity
        ld64 rax, [rdi]
        PRINT_DEC rax
        PRINT msg_sectors

        ; write pass
        mov rdi, var_requests
        mov rax, 0
        st64 [rdi], rax
        mov rax, 1                      ; VIRTIO_BLK_T_OUT
        call pass
        mov rdi, var_requests
        ld64 r11, [rdi]                 ; r11 = write requests
        mov rcx, 0                      ; FLUSH: header and status only
        mov rax, 4
        mov rbx, 0
        mov rdx, 0
        call add_request
        mov r9, 1
        call submit
        PRINT msg_wrote
        mov rdi, var_capacity
        ld64 rax, [rdi]
        PRINT_DEC rax
        PRINT msg_in
        PRINT_DEC r11
        PRINT msg_flushed

        ; read pass: check and digest
        movabs rax, SEED
        mov rdi, var_digest
        st64 [rdi], rax
        mov rax, 0                      ; VIRTIO_BLK_T_IN
        call pass
        PRINT msg_read
        mov rdi, var_capacity
        ld64 rax, [rdi]
        PRINT_DEC rax
        PRINT msg_match
        mov rdi, var_digest
        ld64 rax, [rdi]
        PRINT_HEX16 rax
        PRINT msg_newline
        mov rax, IRQ
        test rax, rax
        jz report_poll
        PRINT msg_done_irq
        mov rdi, vvar_irqs
        ld64 rax, [rdi]
        PRINT_DEC rax
        PRINT msg_interrupts
        call poweroff
report_poll:
        PRINT msg_done_poll
        mov rdx, VIO_ISR
        call vio_in8
        PRINT_DEC rax
        PRINT msg_close
        call poweroff

; pass: rax = request type (1 write, 0 read): every sector in batches
pass:
        mov rdi, var_type
        st64 [rdi], rax
        mov r14, 0                      ; r14 = next sector
pass_batch:
        mov rdi, var_capacity
        ld64 r13, [rdi]
        cmp r14, r13
        jae pass_done
        mov rcx, 0                      ; rcx = request number in the batch
pass_fill:
        cmp rcx, BATCH
        jae pass_submit
        cmp r14, r13
        jae pass_submit
        mov r10, r13                    ; r10 = sectors in this request
        sub r10, r14
        cmp r10, REQUEST_SECTORS
        jbe pass_n_ok
        mov r10, REQUEST_SECTORS
pass_n_ok:
        mov rsi, rcx                    ; rsi = data buffer
        mul rsi, REQUEST_BYTES
        add rsi, DATA
        mov rdi, var_type
        ld64 rax, [rdi]
        test rax, rax
        jz pass_no_fill
        call fill_buffer
pass_no_fill:
        mov rdi, rcx
        shl rdi, 3
        add rdi, var_sectors
        st64 [rdi], r10
        mov rdi, rcx
        shl rdi, 3
        add rdi, var_first
        st64 [rdi], r14
        mov rdi, var_type
        ld64 rax, [rdi]
        mov rbx, r14
        mov rdx, r10
        shl rdx, 9
        mov r8, VRING_F_WRITE           ; reads: the device writes the data
        test rax, rax
        jz pass_add
        mov r8, 0
pass_add:
        call add_request
        add r14, r10
        inc rcx
        jmp pass_fill
pass_submit:
        mov r9, rcx                     ; requests in this batch
        call submit
        mov rdi, var_type
        ld64 rax, [rdi]
        test rax, rax
        jnz pass_batch
        mov rcx, 0                      ; reads: check each buffer
pass_check:
        cmp rcx, r9
        jae pass_batch
        mov rsi, rcx
        mul rsi, REQUEST_BYTES
        add rsi, DATA
        mov rdi, rcx
        shl rdi, 3
        add rdi, var_first
        ld64 rbx, [rdi]
        mov rdi, rcx
        shl rdi, 3
        add rdi, var_sectors
        ld64 r10, [rdi]
        call check_buffer
        inc rcx
        jmp pass_check
pass_done:
        ret

; add_request: rcx = request number in the batch, rax = type, rbx = sector, rsi = data buffer,
; rdx = data bytes (0: none), r8 = data descriptor flags. Builds the chain header -> [data ->]
; status in descriptors 3*rcx .. 3*rcx+2 and makes it available (not yet published).
add_request:
        push rax
        push rbx
        push rdi
        push r11
        mov rdi, rcx                    ; header at HEADERS + 16 * rcx
        shl rdi, 4
        add rdi, HEADERS
        st32 [rdi], rax
        mov rax, 0
        st32 [rdi + 4], rax
        st64 [rdi + 8], rbx
        mov r11, rcx                    ; r11 = first descriptor
        mul r11, 3
        mov rbx, r11                    ; rbx = its address
        shl rbx, 4
        add rbx, RING
        st64 [rbx], rdi
        mov rax, 16
        st32 [rbx + 8], rax
        mov rax, VRING_F_NEXT
        st16 [rbx + 12], rax
        mov rax, r11
        inc rax
        test rdx, rdx
        jnz add_header_next
        inc rax                         ; no data: the header chains straight to the status
add_header_next:
        st16 [rbx + 14], rax
        test rdx, rdx
        jz add_status
        st64 [rbx + 16], rsi            ; data
        st32 [rbx + 24], rdx
        mov rax, r8
        or rax, VRING_F_NEXT
        st16 [rbx + 28], rax
        mov rax, r11
        add rax, 2
        st16 [rbx + 30], rax
add_status:
        mov rdi, rcx                    ; status byte at STATUS + 16 * rcx
        shl rdi, 4
        add rdi, STATUS
        mov rax, 0xff                   ; a value the device must overwrite
        st8 [rdi], rax
        st64 [rbx + 32], rdi
        mov rax, 1
        st32 [rbx + 40], rax
        mov rax, VRING_F_WRITE
        st16 [rbx + 44], rax
        mov rax, 0
        st16 [rbx + 46], rax
        mov rdi, vvar_avail             ; avail ring[idx % size] = first descriptor
        ld64 rdi, [rdi]
        mov rax, r15
        rem rax, r12
        shl rax, 1
        add rax, rdi
        st16 [rax + 4], r11
        inc r15
        mov rax, var_requests
        ld64 rdi, [rax]
        inc rdi
        st64 [rax], rdi
        pop r11
        pop rdi
        pop rbx
        pop rax
        ret

; submit: publish the avail index, notify, wait for the used ring, then check the status of
; each of the batch's r9 requests
submit:
        push rax
        push rbx
        push rdi
        push rdx
        mov rdi, vvar_avail
        ld64 rdi, [rdi]
        st16 [rdi + 2], r15
        mov rax, 0
        call vio_notify
        mov rax, r15
        mov rbx, IRQ
        call vio_wait_used
        mov rdx, 0
submit_check:
        cmp rdx, r9
        jae submit_out
        mov rdi, rdx
        shl rdi, 4
        add rdi, STATUS
        ld8 rax, [rdi]
        test rax, rax
        jnz submit_failed
        inc rdx
        jmp submit_check
submit_out:
        pop rdx
        pop rdi
        pop rbx
        pop rax
        ret
submit_failed:
        PRINT msg_failed
        PRINT_DEC rax
        PRINT msg_at
        shl rdx, 3
        add rdx, var_first
        ld64 rax, [rdx]
        PRINT_DEC rax
        PRINT msg_newline
        call poweroff

{PATTERN_ROUTINES}

.align 8
var_capacity:   .qword 0
var_type:       .qword 0
var_digest:     .qword 0
var_requests:   .qword 0
var_first:      .space 8 * 16
var_sectors:    .space 8 * 16
msg_nodev:      .asciz {asm_string("blktest: no virtio-blk device on PCI bus 0" + chr(10))}
msg_smallq:     .asciz {asm_string("blktest: the queue is too small for the batch" + chr(10))}
msg_disk:       .asciz {asm_string("blktest: disk ")}
msg_comma:      .asciz {asm_string(", ")}
msg_sectors:    .asciz {asm_string(" sectors" + chr(10))}
msg_wrote:      .asciz {asm_string("blktest: wrote ")}
msg_in:         .asciz {asm_string(" sectors in ")}
msg_flushed:    .asciz {asm_string(" requests, flushed" + chr(10))}
msg_read:       .asciz {asm_string("blktest: read back ")}
msg_match:      .asciz {asm_string(" sectors, all match, digest 0x")}
msg_done_irq:   .asciz {asm_string("blktest: done (irq: ")}
msg_interrupts: .asciz {asm_string(" interrupts)" + chr(10))}
msg_done_poll:  .asciz {asm_string("blktest: done (poll: isr ")}
msg_close:      .asciz {asm_string(")" + chr(10))}
msg_failed:     .asciz {asm_string("blktest: request failed, status ")}
msg_at:         .asciz {asm_string(" at sector ")}
msg_mismatch:   .asciz {asm_string("blktest: MISMATCH sector ")}
msg_qword:      .asciz {asm_string(" qword ")}
msg_newline:    .asciz {asm_string(chr(10))}
""" + V.library()
    constants = {
        **V.CONSTANTS,
        "VIRTIO_BLK_DEVICE": VIRTIO_BLK_DEVICE, "VIRTIO_BLK_F_FLUSH": VIRTIO_BLK_F_FLUSH,
        "SEED": seed, "MIX_INCREMENT": MIX_INCREMENT, "MIX_MULTIPLIER": MIX_MULTIPLIER,
        "BATCH": batch, "REQUEST_SECTORS": request_sectors, "REQUEST_BYTES": request_bytes, "LIMIT": limit,
        "IRQ": irq, "AVAIL_FLAGS": 0 if irq else 1,
        "RING": RING, "HEADERS": HEADERS, "STATUS": STATUS, "IDBUF": IDBUF, "DATA": DATA,
    }
    return assemble_program(NAME, body, constants)
