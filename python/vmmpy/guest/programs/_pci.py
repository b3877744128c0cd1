"""PCI configuration and INTx interrupts in assembly, shared by every guest device driver
(the virtio library ``_virtio``, nvmetest, ahcitest).

A driver finds its function by scanning bus 0 through configuration mechanism #1 and routes
its interrupt line through the I/O APIC, level-triggered, to ``INTX_VECTOR``. Its handler
silences the device (device-specific), then calls ``intx_taken``; the driver waits with
``intx_wait``.

Routines (all preserve every register they do not return in):

    pci_find      rax = device id << 16 | vendor id -> rax = config address of bus 0's first
                  such function, or 0; also kept in pci_cfgaddr
    pci_read32    rax = config address | register -> rax
    intx_setup    the vector table (INTX_VECTOR -> the program's handler), the local APIC
                  enabled, and the I/O APIC pin named by the interrupt line register of the
                  function in pci_cfgaddr to INTX_VECTOR (fixed, level-triggered, unmasked)
    intx_taken    for the handler, after it silenced the device: count the interrupt in
                  pci_irqs, set pci_irq_flag, EOI the local APIC
    intx_wait     sleep (sti; hlt) until pci_irq_flag is set, clear it; returns with
                  interrupts off
"""

from __future__ import annotations

INTX_VECTOR = 0x50
IOAPIC_BASE = 0xFEC0_0000

CONSTANTS = {"INTX_VECTOR": INTX_VECTOR, "IOAPIC_BASE": IOAPIC_BASE}


def library(handler: str) -> str:
    """The routines, and a vector table sending INTX_VECTOR to the label ``handler``."""
    vectors = "\n".join(f"        .qword {handler if v == INTX_VECTOR else 'pci_spurious'}" for v in range(256))
    return r"""
; ---- library: PCI and INTx (_pci) -----------------------------------------------------------
pci_find:
        push rcx
        push rbx
        push rdx
        push rdi
        mov rbx, rax
        movabs rcx, 0x80000000
        movabs rdx, 0x80010000          ; bus 0 ends here: 32 slots x 8 functions x 0x100
pci_find_next:
        mov rax, rcx
        out32 0xcf8, rax
        in32 rax, 0xcfc
        cmp rax, rbx
        je pci_find_hit
        add rcx, 0x100
        cmp rcx, rdx
        jb pci_find_next
        mov rcx, 0
pci_find_hit:
        mov rax, rcx
        mov rdi, pci_cfgaddr
        st64 [rdi], rax
        pop rdi
        pop rdx
        pop rbx
        pop rcx
        ret

pci_read32:
        out32 0xcf8, rax
        in32 rax, 0xcfc
        ret

intx_setup:
        push rax
        push rbx
        push rcx
        mov rax, pci_vectors
        lidt rax
        movabs rbx, LAPIC_BASE
        mov rax, SVR_APIC_ENABLE | 0xff
        st32 [rbx + LAPIC_SVR], rax
        mov rax, pci_cfgaddr            ; the interrupt line register names the I/O APIC pin
        ld64 rax, [rax]
        add rax, 0x3c
        call pci_read32
        and rax, 0xff
        mov rcx, rax
        shl rcx, 1
        add rcx, 0x10                   ; redirection entry, low dword
        movabs rbx, IOAPIC_BASE
        st32 [rbx], rcx
        mov rax, INTX_VECTOR | 0x8000   ; fixed, physical, level-triggered, unmasked
        st32 [rbx + 0x10], rax
        inc rcx
        st32 [rbx], rcx
        mov rax, 0                      ; destination: APIC 0
        st32 [rbx + 0x10], rax
        pop rcx
        pop rbx
        pop rax
        ret

intx_taken:
        push rax
        push rdi
        mov rdi, pci_irqs
        ld64 rax, [rdi]
        inc rax
        st64 [rdi], rax
        mov rdi, pci_irq_flag
        mov rax, 1
        st64 [rdi], rax
        movabs rdi, LAPIC_BASE
        mov rax, 0
        st32 [rdi + LAPIC_EOI], rax
        pop rdi
        pop rax
        ret

intx_wait:
        push rax
        push rdi
        mov rdi, pci_irq_flag
intx_wait_again:
        cli
        ld64 rax, [rdi]
        test rax, rax
        jnz intx_wait_got
        sti
        hlt
        jmp intx_wait_again
intx_wait_got:
        mov rax, 0
        st64 [rdi], rax
        pop rdi
        pop rax
        ret

pci_spurious:
        iret

.align 8
pci_cfgaddr:    .qword 0
pci_irqs:       .qword 0
pci_irq_flag:   .qword 0
pci_vectors:
""" + vectors + "\n"
