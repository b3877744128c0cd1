"""What the disk drivers (blktest, nvmetest, ahcitest, scsitest) share: the disk pattern and
digest, the write-then-read driver loop, and their console lines.

Pattern and digest: qword k of sector s holds ``mix(SEED, s * 64 + k)``; reading back, every
qword is compared and folded into the digest (``h = SEED; h = mix(h, q)`` in disk order).
``reference_image`` and ``reference_digest`` are the same computation in Python. Sectors are
the device's blocks (512 bytes for all four).

The loop (``storage_run``): write the pattern to sectors 0 .. var_capacity - 1, flush, print
the "wrote" line, read everything back checking and digesting it, print the "read back" line.
Each pass goes in batches of up to BATCH requests of up to REQUEST_SECTORS sectors; request i of
a batch uses the buffer at SLOT_BASE + i * SLOT_STRIDE. A program states only its device, as
routines the loop calls (each may clobber rax, rbx, rdx, rdi, r8, r11; the loop's registers are
rcx, rsi, r9, r10, r13, r14):

    dev_queue      rcx = request number in the batch, r14 = first sector, r10 = sectors,
                   rsi = buffer, r8 = 1 to write (0 to read): prepare (or send) one request
    dev_submit     r9 = requests in the batch: send them and wait until all are done, checked
    dev_check      rcx = request number, r10 = sectors (reads only, before the data is
                   compared): any per-request check, e.g. the bytes the device says it moved
    dev_flush      flush the device's write cache, waited for and checked

and prints its own first line (``storage_capacity`` caps the size it found by LIMIT first;
``storage_trim`` drops a serial number's padding).
Console lines (UNIT, REQUESTS and FLUSHED are the program's words)::

    PROGRAM: wrote N UNIT in R REQUESTS, FLUSHED
    PROGRAM: read back N UNIT, all match, digest 0x0123456789abcdef
    PROGRAM: done (irq: I interrupts)                 (storage_done_irq)
    PROGRAM: MISMATCH UNIT S qword K                  (instead, on the first bad qword)
"""

from __future__ import annotations

from ._common import asm_string
from .hash import MIX_INCREMENT, MIX_MULTIPLIER, mix


def pattern(seed: int, sector: int, qword: int) -> int:
    return mix(seed, sector * 64 + qword)


def reference_image(seed: int, sectors: int) -> bytes:
    """The bytes a disk driver leaves in the first ``sectors`` sectors."""
    out = bytearray()
    for s in range(sectors):
        for k in range(64):
            out += pattern(seed, s, k).to_bytes(8, "little")
    return bytes(out)


def reference_digest(seed: int, sectors: int) -> int:
    """The digest a disk driver prints after reading back ``sectors`` sectors."""
    h = seed
    for s in range(sectors):
        for k in range(64):
            h = mix(h, pattern(seed, s, k))
    return h


def constants(*, seed: int, batch: int, request_sectors: int, limit: int, slot_base: int, slot_stride: int) -> dict[str, int]:
    """The constants the shared routines read."""
    return {
        "SEED": seed, "MIX_INCREMENT": MIX_INCREMENT, "MIX_MULTIPLIER": MIX_MULTIPLIER, "BATCH": batch,
        "REQUEST_SECTORS": request_sectors, "LIMIT": limit, "SLOT_BASE": slot_base, "SLOT_STRIDE": slot_stride,
    }


def messages(program: str, *, device: str, unit: str, requests: str, flushed: str) -> str:
    """The console lines every disk driver prints, as the labels the routines use."""
    lines = {
        "msg_nodev": f"{program}: no {device} on PCI bus 0\n",
        "msg_wrote": f"{program}: wrote ",
        "msg_in": f" {unit} in ",
        "msg_flushed": f" {requests}, {flushed}\n",
        "msg_read": f"{program}: read back ",
        "msg_match": f" {unit}, all match, digest 0x",
        "msg_done_irq": f"{program}: done (irq: ",
        "msg_interrupts": " interrupts)\n",
        "msg_done_poll": f"{program}: done (poll",
        "msg_close": ")\n",
        "msg_mismatch": f"{program}: MISMATCH {unit.rstrip('s')} ",
        "msg_qword": " qword ",
        "msg_comma": ", ",
        "msg_newline": "\n",
    }
    return "".join(f"{label + ':':<16}.asciz {asm_string(text)}\n" for label, text in lines.items())


def routines(*, check: bool = False) -> str:
    """The shared routines; ``check`` when the program has a ``dev_check``."""
    dev_check = "        call dev_check\n" if check else ""
    return r"""
; ---- library: disk pattern and driver loop (_storage) --------------------------------------
; storage_capacity: rbx = the device's size in sectors -> rbx = that, capped by LIMIT (if not 0),
; also in var_capacity
storage_capacity:
        push rax
        push rdi
        movabs rax, LIMIT
        test rax, rax
        jz sto_no_limit
        cmp rbx, rax
        jbe sto_no_limit
        mov rbx, rax
sto_no_limit:
        mov rdi, var_capacity
        st64 [rdi], rbx
        pop rdi
        pop rax
        ret

; storage_trim: rsi = a string's first byte, rdi = one past its last: NUL-terminate it there
; and drop its trailing spaces (a serial number, space-padded by the device); clobbers rax, rdi
storage_trim:
        mov rax, 0
        st8 [rdi], rax
sto_trim_next:
        dec rdi
        ld8 rax, [rdi]
        cmp rax, 32
        jne sto_trim_done
        mov rax, 0
        st8 [rdi], rax
        cmp rdi, rsi
        ja sto_trim_next
sto_trim_done:
        ret

; storage_run: the write pass, dev_flush, the "wrote" line, the read pass, the "read back" line
storage_run:
        mov rax, 1
        call storage_pass
        call dev_flush
        PRINT msg_wrote
        mov rdi, var_capacity
        ld64 rax, [rdi]
        PRINT_DEC rax
        PRINT msg_in
        mov rdi, var_requests
        ld64 rax, [rdi]
        PRINT_DEC rax
        PRINT msg_flushed
        movabs rax, SEED
        mov rdi, var_digest
        st64 [rdi], rax
        mov rax, 0
        call storage_pass
        PRINT msg_read
        mov rdi, var_capacity
        ld64 rax, [rdi]
        PRINT_DEC rax
        PRINT msg_match
        mov rdi, var_digest
        ld64 rax, [rdi]
        PRINT_HEX16 rax
        PRINT msg_newline
        ret

; storage_done_irq: rax = interrupts taken: the "done (irq: I interrupts)" line
storage_done_irq:
        PRINT msg_done_irq
        PRINT_DEC rax
        PRINT msg_interrupts
        ret

; storage_pass: rax = 1 to write the pattern, 0 to read it back and check it: every sector, in
; batches (requests counted in var_requests while writing)
storage_pass:
        mov rdi, var_writing
        st64 [rdi], rax
        mov r14, 0                      ; r14 = next sector
sto_batch:
        mov rdi, var_capacity
        ld64 r13, [rdi]
        cmp r14, r13
        jae sto_done
        mov rcx, 0                      ; rcx = request number in the batch
sto_fill:
        cmp rcx, BATCH
        jae sto_submit
        cmp r14, r13
        jae sto_submit
        mov r10, r13                    ; r10 = sectors in this request
        sub r10, r14
        cmp r10, REQUEST_SECTORS
        jbe sto_n_ok
        mov r10, REQUEST_SECTORS
sto_n_ok:
        mov rsi, rcx                    ; rsi = its buffer
        mul rsi, SLOT_STRIDE
        add rsi, SLOT_BASE
        mov rdi, var_writing
        ld64 r8, [rdi]
        test r8, r8
        jz sto_no_fill
        call fill_buffer
        mov rdi, var_requests
        ld64 rax, [rdi]
        inc rax
        st64 [rdi], rax
sto_no_fill:
        mov rdi, rcx
        shl rdi, 3
        add rdi, var_count
        st64 [rdi], r10
        mov rdi, rcx
        shl rdi, 3
        add rdi, var_first
        st64 [rdi], r14
        call dev_queue
        add r14, r10
        inc rcx
        jmp sto_fill
sto_submit:
        mov r9, rcx
        call dev_submit
        mov rdi, var_writing
        ld64 rax, [rdi]
        test rax, rax
        jnz sto_batch
        mov rcx, 0                      ; reads: check each buffer
sto_check:
        cmp rcx, r9
        jae sto_batch
        mov rsi, rcx
        mul rsi, SLOT_STRIDE
        add rsi, SLOT_BASE
        mov rdi, rcx
        shl rdi, 3
        add rdi, var_first
        ld64 rbx, [rdi]
        mov rdi, rcx
        shl rdi, 3
        add rdi, var_count
        ld64 r10, [rdi]
""" + dev_check + r"""        call check_buffer
        inc rcx
        jmp sto_check
sto_done:
        ret

; pattern_qword: rax = index -> rax = mix(SEED, index)
pattern_qword:
        push rcx
        movabs rcx, SEED
        MIX rax, rcx, rcx
        pop rcx
        ret

; fill_buffer: rsi = buffer, r14 = first sector, r10 = sectors
fill_buffer:
        push rax
        push rbx
        push rdx
        push rdi
        mov rbx, r14
        shl rbx, 6                      ; rbx = pattern index
        mov rdx, r10
        shl rdx, 6
        add rdx, rbx                    ; rdx = end index
        mov rdi, rsi
sto_fill_next:
        mov rax, rbx
        call pattern_qword
        st64 [rdi], rax
        add rdi, 8
        inc rbx
        cmp rbx, rdx
        jb sto_fill_next
        pop rdi
        pop rdx
        pop rbx
        pop rax
        ret

; check_buffer: rsi = buffer, rbx = first sector, r10 = sectors; compares and folds the digest
; (clobbers r8)
check_buffer:
        push rax
        push rbx
        push rdx
        push rdi
        push r11
        push r13
        shl rbx, 6
        mov rdx, r10
        shl rdx, 6
        add rdx, rbx
        mov rdi, rsi
        mov r11, var_digest
        ld64 r13, [r11]
sto_check_next:
        mov rax, rbx
        call pattern_qword
        ld64 r8, [rdi]
        cmp rax, r8
        jne sto_check_bad
        MIX r13, r8, rax                ; digest = mix(digest, value)
        add rdi, 8
        inc rbx
        cmp rbx, rdx
        jb sto_check_next
        st64 [r11], r13
        pop r13
        pop r11
        pop rdi
        pop rdx
        pop rbx
        pop rax
        ret
sto_check_bad:
        PRINT msg_mismatch
        mov rax, rbx
        shr rax, 6
        PRINT_DEC rax
        PRINT msg_qword
        mov rax, rbx
        and rax, 63
        PRINT_DEC rax
        PRINT msg_newline
        call poweroff

.align 8
var_capacity:   .qword 0
var_writing:    .qword 0
var_digest:     .qword 0
var_requests:   .qword 0
var_first:      .space 8 * 16
var_count:      .space 8 * 16
"""
