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
``reference_digest`` computes it; ``reference_image`` the disk's expected contents. Pattern,
digest, the two passes and the console lines they print are ``_storage``'s, shared with
nvmetest, ahcitest and scsitest; this module states the virtio-blk requests (``dev_queue``,
``dev_submit``, ``dev_flush``). PCI and INTx come from ``_pci`` through ``_virtio``.

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
from . import _storage as S
from . import _virtio as V
from ._common import ArgReader, Argument, asm_string, assemble_program, check_memory
from ._storage import pattern, reference_digest, reference_image  # noqa: F401  (the pattern and digest are blktest's)

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
        call intx_setup
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
        call storage_capacity

        ; GET_ID: the disk's serial
        mov rcx, 0
        mov rax, 8                      ; VIRTIO_BLK_T_GET_ID
        mov rbx, 0
        mov rsi, IDBUF
        mov rdx, 20
        mov r8, VRING_F_WRITE
        call add_request
        mov r9, 1
        call dev_submit
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

        call storage_run
        mov rax, IRQ
        test rax, rax
        jz report_poll
        mov rdi, pci_irqs
        ld64 rax, [rdi]
        call storage_done_irq
        call poweroff
report_poll:
        PRINT msg_done_poll
        PRINT msg_isr
        mov rdx, VIO_ISR
        call vio_in8
        PRINT_DEC rax
        PRINT msg_close
        call poweroff

; dev_queue: a read or write request (see _storage)
dev_queue:
        mov rax, r8                     ; VIRTIO_BLK_T_OUT (1) or VIRTIO_BLK_T_IN (0)
        mov rbx, r14
        mov rdx, r10
        shl rdx, 9
        mov r8, VRING_F_WRITE           ; reads: the device writes the data
        test rax, rax
        jz dev_queue_read
        mov r8, 0
dev_queue_read:
        call add_request
        ret

; dev_flush: FLUSH, header and status only
dev_flush:
        mov rcx, 0
        mov rax, 4
        mov rbx, 0
        mov rdx, 0
        call add_request
        mov r9, 1
        call dev_submit
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
        pop r11
        pop rdi
        pop rbx
        pop rax
        ret

; dev_submit: publish the avail index, notify, wait for the used ring, then check the status of
; each of the batch's r9 requests
dev_submit:
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

{S.messages(NAME, device="virtio-blk device", unit="sectors", requests="requests", flushed="flushed")}
msg_smallq:     .asciz {asm_string("blktest: the queue is too small for the batch" + chr(10))}
msg_disk:       .asciz {asm_string("blktest: disk ")}
msg_sectors:    .asciz {asm_string(" sectors" + chr(10))}
msg_isr:        .asciz {asm_string(": isr ")}
msg_failed:     .asciz {asm_string("blktest: request failed, status ")}
msg_at:         .asciz {asm_string(" at sector ")}
""" + S.routines() + V.library()
    constants = {
        **V.CONSTANTS,
        **S.constants(seed=seed, batch=batch, request_sectors=request_sectors, limit=limit, slot_base=DATA,
                      slot_stride=request_bytes),
        "VIRTIO_BLK_DEVICE": VIRTIO_BLK_DEVICE, "VIRTIO_BLK_F_FLUSH": VIRTIO_BLK_F_FLUSH,
        "IRQ": irq, "AVAIL_FLAGS": 0 if irq else 1,
        "RING": RING, "HEADERS": HEADERS, "STATUS": STATUS, "IDBUF": IDBUF, "DATA": DATA,
    }
    return assemble_program(NAME, body, constants)
