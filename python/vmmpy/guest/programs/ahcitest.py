"""ahcitest: an AHCI driver that writes a pattern to every sector of the SATA disk on port 0,
flushes, reads everything back, compares, and prints a digest of what it read.

The driver: finds the HBA (8086:2821) on PCI bus 0, takes the ABAR from BAR 5 and the I/O APIC
pin from the interrupt line register, resets the HBA (GHC.HR), checks port 0 is implemented
with a disk (PxSSTS.DET = 3, PxSIG = 0x101), points PxCLB at a command list at 2 MiB and PxFB
at a received-FIS area, clears PxSERR/PxIS/IS, enables interrupts (``mode=irq``: PxIE for
DHRS/TFES/HBFS and GHC.IE; the handler clears PxIS and IS, which drops the line, then EOIs) and
starts the port (PxCMD FRE|ST). It IDENTIFYs the disk (serial, 48-bit capacity), then writes
and reads every sector with blktest's pattern and digest, ``batch`` commands at a time in
slots 0..batch-1 (one PxCI write issues them all) of ``request_sectors`` sectors each, every
command a Register H2D FIS (WRITE/READ DMA EXT) and a PRDT of 4 KiB entries; a FLUSH CACHE EXT
after the writes. ``mode=poll`` leaves interrupts off and polls PxCI. It checks PxTFD after
every batch and PRDBC after every read (its ``dev_check``). Pattern, digest, the two passes and
their console lines are ``_storage``'s (shared with blktest, nvmetest and scsitest); bus-0 lookup
and INTx are ``_pci``'s. This module states the HBA: its command slots, FISes and PRDTs.

Console::

    ahcitest: disk SERIAL, N sectors
    ahcitest: wrote N sectors in R commands, flushed
    ahcitest: read back N sectors, all match, digest 0x0123456789abcdef
    ahcitest: done (irq: I interrupts | poll)
    ahcitest: command failed, tfd 0xT, ci 0xC        (instead, on a task file error)
    ahcitest: MISMATCH sector S qword K              (instead, on the first bad qword)
"""

from __future__ import annotations

from . import _pci
from . import _storage as S
from ._common import ArgReader, Argument, asm_string, assemble_program, check_memory

NAME = "ahcitest"
DESCRIPTION = "drives an AHCI SATA disk: writes a pattern to every sector, reads it back, checks it and prints a digest"
ARGUMENTS = (
    Argument("seed", "1", "pattern seed"),
    Argument("batch", "4", "commands issued per PxCI write (1 .. 16)"),
    Argument("request_sectors", "8", "sectors per command (1 .. 64)"),
    Argument("mode", "irq", "irq: wait for the INTx interrupt; poll: interrupts off, poll PxCI"),
    Argument("sectors", "0", "cover only the first N sectors; 0 = the whole disk"),
)

AHCI_VENDOR = 0x8086
AHCI_DEVICE = 0x2821
CLB = 0x20_0000
FB = 0x20_1000
CTBASE = 0x20_2000
IDBUF = 0x20_4000
SERBUF = 0x20_4400
DATA = 0x21_0000
SLOT_STRIDE = 0x8000


def build(args: dict[str, str], memsize: int, lowmem_size: int, highmem_size: int):
    a = ArgReader(NAME, args, ARGUMENTS)
    seed = a.integer("seed")
    batch = a.integer("batch", minimum=1, maximum=16)
    request_sectors = a.integer("request_sectors", minimum=1, maximum=64)
    mode = a.choice("mode", ("irq", "poll"))
    limit = a.integer("sectors", maximum=(1 << 48))
    check_memory(NAME, lowmem_size, DATA + batch * SLOT_STRIDE)
    irq = 1 if mode == "irq" else 0
    body = f"""
start:
        mov rax, (AHCI_DEVICE << 16) | AHCI_VENDOR
        call pci_find
        test rax, rax
        jnz found
        PRINT msg_nodev
        call poweroff
found:
        add rax, 0x24                   ; BAR 5: ABAR
        call pci_read32
        and rax, ~15
        mov rbp, rax                    ; rbp = ABAR, for good
        mov rax, 1
        st32 [rbp + 0x04], rax          ; GHC.HR
wait_reset:
        ld32 rax, [rbp + 0x04]
        and rax, 1
        jnz wait_reset
        ld32 rax, [rbp + 0x0c]          ; PI: port 0
        and rax, 1
        jz no_disk
        ld32 rax, [rbp + 0x128]         ; PxSSTS.DET = 3: device present, link up
        and rax, 15
        cmp rax, 3
        jne no_disk
        ld32 rax, [rbp + 0x124]         ; PxSIG: an ATA disk
        cmp rax, 0x101
        je disk_ok
no_disk:
        PRINT msg_nodisk
        call poweroff
disk_ok:
        mov rax, CLB
        st32 [rbp + 0x100], rax
        mov rax, 0
        st32 [rbp + 0x104], rax
        mov rax, FB
        st32 [rbp + 0x108], rax
        mov rax, 0
        st32 [rbp + 0x10c], rax
        movabs rax, 0xffffffff
        st32 [rbp + 0x130], rax         ; PxSERR
        st32 [rbp + 0x110], rax         ; PxIS
        st32 [rbp + 0x08], rax          ; IS
        mov rax, IRQ
        test rax, rax
        jz no_irq
        call intx_setup
        mov rax, 0x60000001             ; PxIE: TFES, HBFS, DHRS
        st32 [rbp + 0x114], rax
        movabs rax, 0x80000002          ; GHC: AE, IE
        st32 [rbp + 0x04], rax
no_irq:
        mov rax, 0x17                   ; PxCMD: FRE, POD, SUD, ST
        st32 [rbp + 0x118], rax

        ; IDENTIFY DEVICE in slot 0
        mov rcx, 0
        mov rax, 0xec
        mov rbx, 0
        mov rdx, 1
        mov rsi, IDBUF
        mov r8, 0
        call build_cmd
        mov r9, 1
        call issue
        mov rdi, CLB + 4                ; PRDBC: 512 bytes
        ld32 rax, [rdi]
        cmp rax, 512
        jne short_transfer
        mov rcx, 0                      ; serial: words 10-19, bytes swapped in each word
ser_copy:
        mov rdi, rcx
        xor rdi, 1
        add rdi, IDBUF + 20
        ld8 rax, [rdi]
        mov rdi, rcx
        add rdi, SERBUF
        st8 [rdi], rax
        inc rcx
        cmp rcx, 20
        jb ser_copy
        mov rsi, SERBUF
        mov rdi, SERBUF + 20
        call storage_trim
        mov rdi, IDBUF
        ld64 rbx, [rdi + 200]           ; words 100-103: 48-bit capacity
        call storage_capacity
        PRINT msg_disk
        PRINT SERBUF
        PRINT msg_comma
        PRINT_DEC rbx
        PRINT msg_sectors

        call storage_run
        mov rax, 0                      ; stop the port
        st32 [rbp + 0x118], rax
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
short_transfer:
        PRINT msg_short
        call poweroff

; dev_queue: a WRITE or READ DMA EXT of r10 sectors from r14 in slot rcx (see _storage)
dev_queue:
        mov rax, 0x25                   ; READ DMA EXT
        test r8, r8
        jz dev_queue_build
        mov rax, 0x35                   ; WRITE DMA EXT
dev_queue_build:
        mov rbx, r14
        mov rdx, r10
        call build_cmd
        ret

; dev_check: PRDBC of slot rcx must be the whole transfer of r10 sectors
dev_check:
        mov rdi, rcx
        shl rdi, 5
        add rdi, CLB + 4
        ld32 rax, [rdi]
        mov rdx, r10
        shl rdx, 9
        cmp rax, rdx
        jne short_transfer
        ret

; dev_flush: FLUSH CACHE EXT in slot 0
dev_flush:
        mov rcx, 0
        mov rax, 0xea
        mov rbx, 0
        mov rdx, 0
        mov rsi, 0
        mov r8, 0
        call build_cmd
        mov r9, 1
        call issue
        ret

; build_cmd: rcx = slot, rax = ATA command, rbx = LBA, rdx = sectors (0: no data), rsi = buffer,
; r8 = 1 for a write. Command header, Register H2D FIS and PRDT (4 KiB entries).
build_cmd:
        push rax
        push rbx
        push rdx
        push rdi
        push rsi
        push r10
        push r11
        mov r11, rcx                    ; r11 = command table
        shl r11, 8
        add r11, CTBASE
        mov r10, rax                    ; FIS dword 0: type, C, command
        shl r10, 16
        or r10, 0x8027
        st32 [r11], r10
        mov rax, rbx
        and rax, 0xffffff
        or rax, 0x40000000              ; device: LBA mode
        st32 [r11 + 4], rax
        mov rax, rbx
        shr rax, 24
        and rax, 0xffffff
        st32 [r11 + 8], rax
        st32 [r11 + 12], rdx            ; count
        mov rax, 0
        st32 [r11 + 16], rax
        mov r10, 0                      ; r10 = PRD count
        shl rdx, 9                      ; rdx = bytes left
        mov rdi, r11
        add rdi, 0x80
build_prd:
        test rdx, rdx
        jz build_header
        mov rax, rdx
        cmp rax, 4096
        jbe build_chunk
        mov rax, 4096
build_chunk:
        st32 [rdi], rsi
        mov rbx, 0
        st32 [rdi + 4], rbx
        st32 [rdi + 8], rbx
        sub rdx, rax
        add rsi, rax
        dec rax
        st32 [rdi + 12], rax
        add rdi, 16
        inc r10
        jmp build_prd
build_header:
        mov rdi, rcx
        shl rdi, 5
        add rdi, CLB
        mov rax, r10
        shl rax, 16
        or rax, 5                       ; CFL: 5 dwords
        test r8, r8
        jz build_not_write
        or rax, 0x40                    ; W
build_not_write:
        st32 [rdi], rax
        mov rax, 0
        st32 [rdi + 4], rax             ; PRDBC
        st32 [rdi + 8], r11
        st32 [rdi + 12], rax
        pop r11
        pop r10
        pop rsi
        pop rdi
        pop rdx
        pop rbx
        pop rax
        ret

; issue (dev_submit, see _storage): r9 = commands in slots 0..r9-1: one PxCI write, then wait
; (irq or poll) and check PxTFD
dev_submit:
issue:
        push rax
        push rbx
        push rdi
        mov rax, 1
        shl rax, r9
        dec rax
        st32 [rbp + 0x138], rax
        mov rbx, IRQ
        test rbx, rbx
        jz issue_poll
        call intx_wait
        ld32 rbx, [rbp + 0x138]
        test rbx, rbx
        jnz issue_failed
        jmp issue_check
issue_poll:
        ld32 rbx, [rbp + 0x120]
        and rbx, 1
        jnz issue_failed
        ld32 rbx, [rbp + 0x138]
        test rbx, rax
        jz issue_polled
        pause
        jmp issue_poll
issue_polled:
        ld32 rbx, [rbp + 0x110]
        st32 [rbp + 0x110], rbx         ; clear PxIS
issue_check:
        ld32 rbx, [rbp + 0x120]
        and rbx, 1
        jnz issue_failed
        pop rdi
        pop rbx
        pop rax
        ret
issue_failed:
        PRINT msg_failed
        ld32 rax, [rbp + 0x120]
        PRINT_HEX rax
        PRINT msg_ci
        ld32 rax, [rbp + 0x138]
        PRINT_HEX rax
        PRINT msg_newline
        call poweroff

; the handler clears PxIS, then IS (the line drops); intx_taken counts, flags, EOIs
ah_irq_handler:
        push rax
        ld32 rax, [rbp + 0x110]
        st32 [rbp + 0x110], rax
        mov rax, 1
        st32 [rbp + 0x08], rax
        call intx_taken
        pop rax
        iret

{S.messages(NAME, device="AHCI controller", unit="sectors", requests="commands", flushed="flushed")}
msg_nodisk:     .asciz {asm_string("ahcitest: no disk on port 0" + chr(10))}
msg_short:      .asciz {asm_string("ahcitest: a transfer moved too few bytes" + chr(10))}
msg_disk:       .asciz {asm_string("ahcitest: disk ")}
msg_sectors:    .asciz {asm_string(" sectors" + chr(10))}
msg_failed:     .asciz {asm_string("ahcitest: command failed, tfd 0x")}
msg_ci:         .asciz {asm_string(", ci 0x")}
""" + S.routines(check=True) + _pci.library("ah_irq_handler")
    constants = {
        **_pci.CONSTANTS,
        **S.constants(seed=seed, batch=batch, request_sectors=request_sectors, limit=limit, slot_base=DATA,
                      slot_stride=SLOT_STRIDE),
        "AHCI_VENDOR": AHCI_VENDOR, "AHCI_DEVICE": AHCI_DEVICE,
        "CLB": CLB, "FB": FB, "CTBASE": CTBASE, "IDBUF": IDBUF, "SERBUF": SERBUF, "IRQ": irq,
    }
    return assemble_program(NAME, body, constants)
