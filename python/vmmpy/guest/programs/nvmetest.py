"""nvmetest: an NVMe driver that writes a pattern to every block of namespace 1, flushes, reads
everything back, compares, and prints a digest of what it read.

The driver: finds the controller (fb5d:0a0a) on PCI bus 0, takes the register base from the
64-bit memory BAR 0 (BAR 0 low dword, BAR 1 high dword, which must be 0) and the I/O APIC pin
from the interrupt line register; disables the controller, sets up an admin queue pair of 8
entries (AQA, ASQ, ACQ), enables it and waits for CSTS.RDY. It then identifies the controller
(serial) and namespace 1 (size, 512-byte LBA format), asks for one I/O queue pair (SET FEATURES
Number of Queues), creates I/O completion queue 1 and I/O submission queue 1 of 16 entries, and
writes and reads the namespace in batches of ``batch`` commands of ``request_blocks`` blocks
each: the commands go into the SQ, one tail doorbell write announces the batch, and the driver
takes the completions by their phase tags and releases them with one CQ head doorbell write.
Each data buffer starts ``offset`` bytes into a page, so a transfer may use PRP2 for its second
page. Interrupts (``mode=irq``): pin-based, the handler masks them (INTMS) and the driver
unmasks (INTMC) after releasing the completions; ``mode=poll`` masks them for good and creates
the I/O CQ with interrupts off. At the end it deletes the I/O queues and shuts the controller
down (CC.SHN, CSTS.SHST).

Pattern, digest, the two passes and their console lines are ``_storage``'s (shared with
blktest, ahcitest and scsitest), with LBAs for sectors (``blktest.reference_digest`` and
``reference_image`` give the expected values); bus-0 lookup and INTx are ``_pci``'s. This module
states the controller: its queues, commands and doorbells.

Console::

    nvmetest: controller SERIAL, namespace 1: N blocks
    nvmetest: wrote N blocks in R commands, flushed
    nvmetest: read back N blocks, all match, digest 0x0123456789abcdef
    nvmetest: done (irq: I interrupts | poll)
    nvmetest: command failed, queue Q, status 0xS      (instead, on an error completion)
    nvmetest: MISMATCH block B qword K                 (instead, on the first bad qword)
"""

from __future__ import annotations

from . import _pci
from . import _storage as S
from ._common import ArgReader, Argument, asm_string, assemble_program, check_memory

NAME = "nvmetest"
DESCRIPTION = "drives an NVMe controller: writes a pattern to every block of namespace 1, reads it back, checks it and prints a digest"
ARGUMENTS = (
    Argument("seed", "1", "pattern seed"),
    Argument("batch", "4", "commands per submission queue doorbell write (1 .. 15)"),
    Argument("request_blocks", "8", "512-byte blocks per command (1 .. 16; with offset, at most two pages)"),
    Argument("offset", "0", "byte offset of each data buffer in its page (a multiple of 4)"),
    Argument("mode", "irq", "irq: wait for the INTx interrupt; poll: interrupts masked, poll the phase tags"),
    Argument("blocks", "0", "cover only the first N blocks; 0 = the whole namespace"),
)

NVME_VENDOR = 0xFB5D
NVME_DEVICE = 0x0A0A
ADMIN_ENTRIES = 8
IO_ENTRIES = 16
ASQ = 0x20_0000
ACQ = 0x20_1000
IOSQ = 0x20_2000
IOCQ = 0x20_3000
IDBUF = 0x20_4000
NSBUF = 0x20_5000
DATA = 0x21_0000
SLOT_STRIDE = 0x3000


def build(args: dict[str, str], memsize: int, lowmem_size: int, highmem_size: int):
    a = ArgReader(NAME, args, ARGUMENTS)
    seed = a.integer("seed")
    batch = a.integer("batch", minimum=1, maximum=IO_ENTRIES - 1)
    request_blocks = a.integer("request_blocks", minimum=1, maximum=16)
    offset = a.integer("offset", maximum=4092)
    if offset % 4:
        raise a.fail("offset", "must be a multiple of 4 (PRP1 is dword aligned)")
    if offset + request_blocks * 512 > 8192:
        raise a.fail("offset", f"with request_blocks={request_blocks} a buffer would span more than two pages")
    mode = a.choice("mode", ("irq", "poll"))
    limit = a.integer("blocks", maximum=(1 << 48))
    check_memory(NAME, lowmem_size, DATA + batch * SLOT_STRIDE)
    irq = 1 if mode == "irq" else 0
    body = f"""
start:
        mov rax, (NVME_DEVICE << 16) | NVME_VENDOR
        call pci_find
        test rax, rax
        jnz found
        PRINT msg_nodev
        call poweroff
found:
        add rax, 0x14                   ; BAR 1: the high dword of the 64-bit BAR 0
        call pci_read32
        test rax, rax
        jz bar_low
        PRINT msg_highbar
        call poweroff
bar_low:
        mov rdi, pci_cfgaddr
        ld64 rax, [rdi]
        add rax, 0x10
        call pci_read32
        and rax, ~15
        mov rbp, rax                    ; rbp = register base, for good
        ld64 rax, [rbp]                 ; CAP: DSTRD must be 0
        shr rax, 32
        and rax, 15
        jz cap_ok
        PRINT msg_stride
        call poweroff
cap_ok:
        mov rax, 0                      ; disable, wait for RDY = 0
        st32 [rbp + 0x14], rax
wait_not_ready:
        ld32 rax, [rbp + 0x1c]
        and rax, 1
        jnz wait_not_ready
        mov rax, ((ADMIN_ENTRIES - 1) << 16) | (ADMIN_ENTRIES - 1)
        st32 [rbp + 0x24], rax
        mov rax, ASQ
        st64 [rbp + 0x28], rax
        mov rax, ACQ
        st64 [rbp + 0x30], rax
        mov rax, IRQ
        test rax, rax
        jz mask_all
        call intx_setup
        jmp enable
mask_all:
        mov rax, 1
        st32 [rbp + 0x0c], rax          ; INTMS: no interrupts at all
enable:
        mov rax, 1 | (6 << 16) | (4 << 20)   ; EN, IOSQES 64 bytes, IOCQES 16 bytes
        st32 [rbp + 0x14], rax
wait_ready:
        ld32 rax, [rbp + 0x1c]
        mov rbx, rax
        and rbx, 2                      ; CFS
        jnz fatal
        and rax, 1
        jz wait_ready

        ; IDENTIFY controller (CNS 1): the serial
        mov rax, 6
        mov rbx, 0
        mov rcx, IDBUF
        mov rdx, 1
        mov rsi, 0
        call admin
        mov rsi, IDBUF + 4              ; the serial: bytes 4 .. 23
        mov rdi, IDBUF + 24
        call storage_trim
        ; IDENTIFY namespace 1 (CNS 0): size and LBA format
        mov rax, 6
        mov rbx, 1
        mov rcx, NSBUF
        mov rdx, 0
        mov rsi, 0
        call admin
        mov rdi, NSBUF
        ld32 rax, [rdi + 128]
        shr rax, 16
        and rax, 0xff
        cmp rax, 9
        je lba_ok
        PRINT msg_lbaf
        call poweroff
lba_ok:
        ld64 rbx, [rdi]
        call storage_capacity
        PRINT msg_ctrl
        PRINT IDBUF + 4
        PRINT msg_ns
        PRINT_DEC rbx
        PRINT msg_blocks

        ; one I/O queue pair: SET FEATURES (Number of Queues), CREATE CQ 1, CREATE SQ 1
        mov rax, 9
        mov rbx, 0
        mov rcx, 0
        mov rdx, 7
        mov rsi, 0
        call admin
        mov rax, 5
        mov rbx, 0
        mov rcx, IOCQ
        mov rdx, ((IO_ENTRIES - 1) << 16) | 1
        mov rsi, 1 | (IRQ << 1)         ; physically contiguous, interrupts as the mode says
        call admin
        mov rax, 1
        mov rbx, 0
        mov rcx, IOSQ
        mov rdx, ((IO_ENTRIES - 1) << 16) | 1
        mov rsi, 1 | (1 << 16)          ; physically contiguous, completions to CQ 1
        call admin

        call storage_run

        ; tear down: DELETE SQ 1, DELETE CQ 1, shutdown notification
        mov rax, 0
        mov rbx, 0
        mov rcx, 0
        mov rdx, 1
        mov rsi, 0
        call admin
        mov rax, 4
        call admin
        ld32 rax, [rbp + 0x14]
        or rax, 1 << 14
        st32 [rbp + 0x14], rax
wait_shutdown:
        ld32 rax, [rbp + 0x1c]
        shr rax, 2
        and rax, 3
        cmp rax, 2
        jne wait_shutdown
        mov rax, IRQ
        test rax, rax
        jz report_poll
        mov rdi, pci_irqs
        ld64 rax, [rdi]
        call storage_done_irq
        call poweroff
report_poll:
        PRINT msg_done_poll
        PRINT msg_close
        call poweroff
fatal:
        PRINT msg_fatal
        call poweroff

; dev_queue: a WRITE or READ of r10 blocks from r14 on I/O queue 1, into the SQ (see _storage)
dev_queue:
        call cmd_clear
        mov rdi, var_cmd
        mov rax, 2                      ; READ
        sub rax, r8                     ; or WRITE
        st32 [rdi], rax                 ; opcode
        mov rax, 1
        st32 [rdi + 4], rax             ; namespace 1
        st64 [rdi + 24], rsi            ; PRP1
        mov rax, rsi
        and rax, ~4095
        add rax, 4096
        st64 [rdi + 32], rax            ; PRP2: the next page, used if the buffer reaches it
        st32 [rdi + 40], r14            ; SLBA
        mov rax, r14
        shr rax, 32
        st32 [rdi + 44], rax
        mov rax, r10
        dec rax
        st32 [rdi + 48], rax            ; NLB, 0-based
        mov rax, 1
        call sq_add
        ret

; dev_submit: one SQ 1 tail doorbell for the batch's r9 commands, then their completions
dev_submit:
        mov rax, 1
        call sq_ring
        mov rbx, r9
        call cq_collect
        ret

; dev_flush: FLUSH namespace 1
dev_flush:
        call cmd_clear
        mov rdi, var_cmd
        mov rax, 0                      ; FLUSH
        st32 [rdi], rax
        mov rax, 1
        st32 [rdi + 4], rax
        mov rax, 1
        call sq_add
        call sq_ring
        mov rbx, 1
        call cq_collect
        ret

; admin: rax = opcode, rbx = nsid, rcx = PRP1, rdx = CDW10, rsi = CDW11: one admin command,
; waited for; its DW0 in var_result
admin:
        push rax
        push rdi
        call cmd_clear
        mov rdi, var_cmd
        st32 [rdi], rax
        st32 [rdi + 4], rbx
        st64 [rdi + 24], rcx
        st32 [rdi + 40], rdx
        st32 [rdi + 44], rsi
        push rbx
        mov rax, 0
        call sq_add
        call sq_ring
        mov rbx, 1
        call cq_collect
        pop rbx
        pop rdi
        pop rax
        ret

cmd_clear:
        push rax
        push rdi
        mov rdi, var_cmd
        mov rax, 0
        st64 [rdi], rax
        st64 [rdi + 8], rax
        st64 [rdi + 16], rax
        st64 [rdi + 24], rax
        st64 [rdi + 32], rax
        st64 [rdi + 40], rax
        st64 [rdi + 48], rax
        st64 [rdi + 56], rax
        pop rdi
        pop rax
        ret

; sq_add: rax = queue id: var_cmd (with a fresh command id) into the SQ at its tail
sq_add:
        push rax
        push rbx
        push rcx
        push rdx
        push rdi
        push rsi
        mov rbx, rax
        mov rdi, var_cid
        ld64 rcx, [rdi]
        inc rcx
        and rcx, 0xffff
        st64 [rdi], rcx
        mov rdi, var_cmd
        ld32 rdx, [rdi]
        and rdx, 0xffff
        shl rcx, 16
        or rdx, rcx
        st32 [rdi], rdx
        mov rdi, rbx
        shl rdi, 3
        add rdi, var_sq_tail
        ld64 rcx, [rdi]                 ; rcx = tail
        mov rsi, rbx
        shl rsi, 3
        add rsi, var_sq_base
        ld64 rsi, [rsi]
        mov rdx, rcx
        shl rdx, 6
        add rsi, rdx                    ; rsi = the entry
        mov rdx, var_cmd
        ld64 rax, [rdx]
        st64 [rsi], rax
        ld64 rax, [rdx + 8]
        st64 [rsi + 8], rax
        ld64 rax, [rdx + 16]
        st64 [rsi + 16], rax
        ld64 rax, [rdx + 24]
        st64 [rsi + 24], rax
        ld64 rax, [rdx + 32]
        st64 [rsi + 32], rax
        ld64 rax, [rdx + 40]
        st64 [rsi + 40], rax
        ld64 rax, [rdx + 48]
        st64 [rsi + 48], rax
        ld64 rax, [rdx + 56]
        st64 [rsi + 56], rax
        inc rcx
        mov rax, rbx
        shl rax, 3
        add rax, var_q_size
        ld64 rax, [rax]
        rem rcx, rax
        st64 [rdi], rcx
        pop rsi
        pop rdi
        pop rdx
        pop rcx
        pop rbx
        pop rax
        ret

; sq_ring: rax = queue id: the SQ tail doorbell
sq_ring:
        push rbx
        push rcx
        push rdi
        mov rdi, rax
        shl rdi, 3
        mov rbx, rdi
        add rdi, var_sq_tail
        ld64 rcx, [rdi]
        add rbx, rbp
        st32 [rbx + 0x1000], rcx
        pop rdi
        pop rcx
        pop rbx
        ret

; cq_collect: rax = queue id, rbx = completions expected. Waits (irq) or polls, takes each by
; its phase tag, checks its status, releases them with the CQ head doorbell.
cq_collect:
        push rax
        push rbx
        push rcx
        push rdx
        push rdi
        push rsi
        push r8
        push r9
        push r10
        mov r8, rax
        mov r9, rbx
        mov rax, IRQ
        test rax, rax
        jz cq_take
        call intx_wait
cq_take:
        mov r10, 0
cq_next:
        cmp r10, r9
        jae cq_release
        mov rdi, r8
        shl rdi, 3
        add rdi, var_cq_head
        ld64 rcx, [rdi]                 ; rcx = head
        mov rsi, r8
        shl rsi, 3
        add rsi, var_cq_base
        ld64 rsi, [rsi]
        mov rdx, rcx
        shl rdx, 4
        add rsi, rdx                    ; rsi = the entry
        ld32 rdx, [rsi + 12]
        mov rax, rdx
        shr rax, 16
        and rax, 1
        mov rbx, r8
        shl rbx, 3
        add rbx, var_cq_phase
        ld64 rbx, [rbx]
        cmp rax, rbx
        je cq_new
        mov rax, IRQ
        test rax, rax
        jnz cq_missing
        pause
        jmp cq_next
cq_new:
        shr rdx, 17
        and rdx, 0x7fff
        test rdx, rdx
        jnz cq_failed
        ld32 rax, [rsi]
        mov rbx, var_result
        st64 [rbx], rax
        inc rcx
        mov rax, r8
        shl rax, 3
        add rax, var_q_size
        ld64 rax, [rax]
        cmp rcx, rax
        jb cq_no_wrap
        mov rcx, 0
        mov rax, r8
        shl rax, 3
        add rax, var_cq_phase
        ld64 rbx, [rax]
        xor rbx, 1
        st64 [rax], rbx
cq_no_wrap:
        st64 [rdi], rcx
        inc r10
        jmp cq_next
cq_release:
        mov rdi, r8
        shl rdi, 3
        mov rbx, rdi
        add rdi, var_cq_head
        ld64 rcx, [rdi]
        add rbx, rbp
        st32 [rbx + 0x1004], rcx
        mov rax, IRQ
        test rax, rax
        jz cq_out
        mov rax, 1
        st32 [rbp + 0x10], rax          ; INTMC: interrupts back on
cq_out:
        pop r10
        pop r9
        pop r8
        pop rsi
        pop rdi
        pop rdx
        pop rcx
        pop rbx
        pop rax
        ret
cq_failed:
        PRINT msg_failed
        PRINT_DEC r8
        PRINT msg_status
        PRINT_HEX rdx
        PRINT msg_newline
        call poweroff
cq_missing:
        PRINT msg_missing
        call poweroff

; the handler masks the pin interrupt (INTMS) so the line drops; the driver unmasks it after
; releasing the completions
nv_irq_handler:
        push rax
        mov rax, 1
        st32 [rbp + 0x0c], rax
        call intx_taken
        pop rax
        iret

.align 8
var_cid:        .qword 0
var_result:     .qword 0
var_sq_base:
        .qword ASQ
        .qword IOSQ
var_cq_base:
        .qword ACQ
        .qword IOCQ
var_q_size:
        .qword ADMIN_ENTRIES
        .qword IO_ENTRIES
var_sq_tail:
        .qword 0
        .qword 0
var_cq_head:
        .qword 0
        .qword 0
var_cq_phase:
        .qword 1
        .qword 1
var_cmd:        .space 64
{S.messages(NAME, device="NVMe controller", unit="blocks", requests="commands", flushed="flushed")}
msg_highbar:    .asciz {asm_string("nvmetest: BAR 0 is above 4 GiB" + chr(10))}
msg_stride:     .asciz {asm_string("nvmetest: doorbell stride is not 0" + chr(10))}
msg_fatal:      .asciz {asm_string("nvmetest: controller fatal status" + chr(10))}
msg_lbaf:       .asciz {asm_string("nvmetest: namespace 1 does not have 512-byte blocks" + chr(10))}
msg_ctrl:       .asciz {asm_string("nvmetest: controller ")}
msg_ns:         .asciz {asm_string(", namespace 1: ")}
msg_blocks:     .asciz {asm_string(" blocks" + chr(10))}
msg_failed:     .asciz {asm_string("nvmetest: command failed, queue ")}
msg_status:     .asciz {asm_string(", status 0x")}
msg_missing:    .asciz {asm_string("nvmetest: a completion is missing" + chr(10))}
""" + S.routines() + _pci.library("nv_irq_handler")
    constants = {
        **_pci.CONSTANTS,
        **S.constants(seed=seed, batch=batch, request_sectors=request_blocks, limit=limit, slot_base=DATA + offset,
                      slot_stride=SLOT_STRIDE),
        "NVME_VENDOR": NVME_VENDOR, "NVME_DEVICE": NVME_DEVICE,
        "ADMIN_ENTRIES": ADMIN_ENTRIES, "IO_ENTRIES": IO_ENTRIES, "ASQ": ASQ, "ACQ": ACQ, "IOSQ": IOSQ, "IOCQ": IOCQ,
        "IDBUF": IDBUF, "NSBUF": NSBUF, "IRQ": irq,
    }
    return assemble_program(NAME, body, constants)
