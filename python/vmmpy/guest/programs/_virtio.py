"""The guest side of legacy virtio, in assembly, shared by the virtio guest drivers (on the PCI
and INTx library ``_pci``, which it includes).

A driver finds its device by vendor/device ID, takes the I/O base from BAR 0, negotiates
features, gives each queue a page-aligned ring (legacy layout: descriptors, avail ring, used
ring at the next 4 KiB boundary) and sets DRIVER_OK. Interrupts: ``intx_setup`` (``_pci``)
routes the pin to ``vio_irq_handler``, which reads the ISR (which drops the line) and calls
``intx_taken``.

Routines (all preserve every register they do not return in; labels start with ``vio_``,
variables with ``vvar_``):

    vio_bind         rax = device id << 16 | vendor id -> rax = I/O base, or 0 (no device);
                     remembers the config address (pci_cfgaddr) and I/O base
    vio_in8/16/32    rdx = register offset -> rax          (in the bound device's BAR 0)
    vio_out8/16/32   rdx = register offset, rax = value
    vio_start        rax = features the driver takes -> rax = negotiated features
                     (reset, ACKNOWLEDGE, DRIVER, guest features)
    vio_queue        rax = queue index, rbx = ring GPA (page aligned) -> rax = queue size
                     (0: no such queue); the ring's avail and used addresses go to
                     vvar_avail and vvar_used
    vio_driver_ok    status |= DRIVER_OK
    vio_notify       rax = queue index
    vio_wait_used    rax = used index to reach, rbx = 1 to wait for the interrupt (intx_wait
                     until the used index is there), 0 to poll
"""

from __future__ import annotations

from . import _pci

VIRTIO_VENDOR = 0x1AF4

CONSTANTS = {
    **_pci.CONSTANTS,
    "VIRTIO_VENDOR": VIRTIO_VENDOR,
    "VIO_HOST_FEATURES": 0x00,
    "VIO_GUEST_FEATURES": 0x04,
    "VIO_QUEUE_PFN": 0x08,
    "VIO_QUEUE_NUM": 0x0C,
    "VIO_QUEUE_SEL": 0x0E,
    "VIO_QUEUE_NOTIFY": 0x10,
    "VIO_STATUS": 0x12,
    "VIO_ISR": 0x13,
    "VIO_CONFIG": 0x14,
    "VIO_S_ACK": 0x01,
    "VIO_S_DRIVER": 0x02,
    "VIO_S_DRIVER_OK": 0x04,
    "VRING_F_NEXT": 1,
    "VRING_F_WRITE": 2,
    "VRING_AVAIL_F_NO_INTERRUPT": 1,
}


def equs() -> str:
    return "".join(f".equ {k}, {v:#x}\n" for k, v in CONSTANTS.items())


def library() -> str:
    return r"""
; ---- library: legacy virtio (_virtio) -------------------------------------------------------
vio_bind:
        push rdi
        call pci_find
        test rax, rax
        jz vio_bind_out
        add rax, 0x10                   ; BAR 0
        call pci_read32
        and rax, 0xfffc
        mov rdi, vvar_iobase
        st64 [rdi], rax
vio_bind_out:
        pop rdi
        ret

; port = I/O base + rdx, in rdi
.macro VIO_PORT
        push rdi
        mov rdi, vvar_iobase
        ld64 rdi, [rdi]
        add rdi, rdx
.endm
vio_in8:
        VIO_PORT
        in8 rax, rdi
        pop rdi
        ret
vio_in16:
        VIO_PORT
        in16 rax, rdi
        pop rdi
        ret
vio_in32:
        VIO_PORT
        in32 rax, rdi
        pop rdi
        ret
vio_out8:
        VIO_PORT
        out8 rdi, rax
        pop rdi
        ret
vio_out16:
        VIO_PORT
        out16 rdi, rax
        pop rdi
        ret
vio_out32:
        VIO_PORT
        out32 rdi, rax
        pop rdi
        ret

vio_start:
        push rdx
        push rcx
        mov rcx, rax
        mov rax, 0
        mov rdx, VIO_STATUS
        call vio_out8                   ; reset
        mov rax, VIO_S_ACK
        call vio_out8
        mov rax, VIO_S_ACK | VIO_S_DRIVER
        call vio_out8
        mov rdx, VIO_HOST_FEATURES
        call vio_in32
        and rax, rcx
        mov rdx, VIO_GUEST_FEATURES
        call vio_out32
        pop rcx
        pop rdx
        ret

vio_queue:
        push rdx
        push rcx
        push rdi
        mov rdx, VIO_QUEUE_SEL
        call vio_out16
        mov rdx, VIO_QUEUE_NUM
        call vio_in16
        test rax, rax
        jz vio_queue_out
        mov rcx, rax                    ; size
        mov rax, rbx
        shr rax, 12
        mov rdx, VIO_QUEUE_PFN
        call vio_out32
        mov rax, rcx                    ; avail = ring + 16 * size
        shl rax, 4
        add rax, rbx
        mov rdi, vvar_avail
        st64 [rdi], rax
        mov rax, rcx                    ; used = ring + align4k(16*size + 6 + 2*size)
        mul rax, 18
        add rax, 6 + 4095
        and rax, ~4095
        add rax, rbx
        mov rdi, vvar_used
        st64 [rdi], rax
        mov rax, rcx
vio_queue_out:
        pop rdi
        pop rcx
        pop rdx
        ret

vio_driver_ok:
        push rax
        push rdx
        mov rdx, VIO_STATUS
        call vio_in8
        or rax, VIO_S_DRIVER_OK
        call vio_out8
        pop rdx
        pop rax
        ret

vio_notify:
        push rdx
        mov rdx, VIO_QUEUE_NOTIFY
        call vio_out16
        pop rdx
        ret

vio_wait_used:
        push rcx
        push rdx
        push rdi
        mov rcx, rax
        and rcx, 0xffff
vio_wait_again:
        test rbx, rbx
        jz vio_wait_check
        call intx_wait
vio_wait_check:
        mov rdi, vvar_used
        ld64 rdi, [rdi]
        ld16 rdx, [rdi + 2]
        cmp rdx, rcx
        je vio_wait_done
        test rbx, rbx
        jnz vio_wait_again
        pause
        jmp vio_wait_check
vio_wait_done:
        pop rdi
        pop rdx
        pop rcx
        ret

vio_irq_handler:
        push rax
        push rdx
        push rdi
        mov rdx, VIO_ISR
        call vio_in8                    ; read-to-clear: the line drops
        mov rdi, vvar_isr_seen
        ld64 rdx, [rdi]
        or rdx, rax
        st64 [rdi], rdx
        call intx_taken
        pop rdi
        pop rdx
        pop rax
        iret

.align 8
vvar_iobase:    .qword 0
vvar_avail:     .qword 0
vvar_used:      .qword 0
vvar_isr_seen:  .qword 0
""" + _pci.library("vio_irq_handler")
