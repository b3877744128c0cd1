"""nettest: a virtio-net driver that exchanges frames with an echoing peer.

It reads the MAC address and link status from the device configuration, posts ``RXBUFS``
receive buffers of 2 KiB (device-writable, one descriptor each), then, ``frames`` times,
sends one frame and waits for it to come back: the frame is the 10-byte virtio-net header
(zero) and an Ethernet frame to the broadcast address from the device's MAC, EtherType 0x88B5,
with ``payload`` bytes of pattern (qword ``k`` of frame ``i`` is ``i << 32 | k``). Both rings
have VRING_AVAIL_F_NO_INTERRUPT set: the driver polls. While it waits it notifies the receive
queue (the device's deterministic delivery point, docs/devices.md) until the used index
moves; the returned buffer must hold exactly the header and the frame it sent (an echo peer
returns frames unchanged), and goes back on the receive ring. The digest folds every payload
qword received, in order: ``h = mix(h, q)`` (``mix`` as in the hash program).

Console::

    nettest: mac 0x2766d000400, link up
    nettest: N frames of B bytes echoed, digest 0x0123456789abcdef
    nettest: frame I MISMATCH                      (instead, if an echo differs)
"""

from __future__ import annotations

from ..asm import Program
from . import _virtio as V
from ._common import ArgReader, Argument, asm_string, assemble_program, check_memory
from .hash import mix

NAME = "nettest"
DESCRIPTION = "drives a virtio-net device: sends frames with a known pattern to an echo peer, checks each comes back, prints a digest"
ARGUMENTS = (
    Argument("frames", "32", "frames to send and expect back (1 .. 1000000)"),
    Argument("payload", "256", "payload bytes per frame (a multiple of 8, 8 .. 1496)"),
)
VIRTIO_NET_DEVICE = 0x1000
ETHERTYPE = 0x88B5
RX_RING = 0x20_0000
TX_RING = 0x20_4000
TX_BUF = 0x20_8000
RX_BUFS = 0x21_0000
RX_BUF_SIZE = 2048
RXBUFS = 8
F_MAC = 1 << 5
F_STATUS = 1 << 16


def reference_frame(mac: bytes, index: int, payload: int) -> bytes:
    """The Ethernet frame ``nettest`` sends as frame ``index`` (without the virtio-net header)."""
    body = b"".join(((index << 32) | k).to_bytes(8, "little") for k in range(payload // 8))
    return b"\xff" * 6 + mac + ETHERTYPE.to_bytes(2, "big") + body


def reference_digest(frames: int, payload: int) -> int:
    h = 0
    for i in range(frames):
        for k in range(payload // 8):
            h = mix(h, (i << 32) | k)
    return h


def reference_output(mac: bytes, frames: int, payload: int) -> str:
    return (f"nettest: mac {hex(int.from_bytes(mac, 'big'))}, link up\n"
            f"nettest: {frames} frames of {14 + payload} bytes echoed, digest 0x{reference_digest(frames, payload):016x}\n")


def build(args: dict[str, str], memsize: int, lowmem_size: int, highmem_size: int) -> Program:
    a = ArgReader(NAME, args, ARGUMENTS)
    frames = a.integer("frames", minimum=1, maximum=1_000_000)
    payload = a.integer("payload", minimum=8, maximum=1496)
    if payload % 8:
        raise a.fail("payload", "must be a multiple of 8")
    check_memory(NAME, lowmem_size, RX_BUFS + RXBUFS * RX_BUF_SIZE)
    body = f"""
start:
        movabs rax, (VIRTIO_NET_DEVICE << 16) | VIRTIO_VENDOR
        call vio_bind
        test rax, rax
        jnz found
        PRINT msg_nodev
        call poweroff
found:
        mov rax, F_MAC | F_STATUS
        call vio_start
        mov rax, 0                      ; receiveq
        mov rbx, RX_RING
        call vio_queue
        mov r12, rax                    ; queue size (both queues have the same)
        cmp rax, RXBUFS
        jae rxq_ok
        PRINT msg_smallq
        call poweroff
rxq_ok:
        mov rdi, vvar_avail
        ld64 rax, [rdi]
        mov rdi, var_rx_avail
        st64 [rdi], rax
        mov rdi, vvar_used
        ld64 rax, [rdi]
        mov rdi, var_rx_used
        st64 [rdi], rax
        mov rax, 1                      ; transmitq
        mov rbx, TX_RING
        call vio_queue
        mov rdi, vvar_avail
        ld64 rax, [rdi]
        mov rdi, var_tx_avail
        st64 [rdi], rax
        mov rdi, vvar_used
        ld64 rax, [rdi]
        mov rdi, var_tx_used
        st64 [rdi], rax
        mov rbx, VRING_AVAIL_F_NO_INTERRUPT ; both rings: no interrupts, the driver polls
        mov rdi, var_rx_avail
        ld64 rdi, [rdi]
        st16 [rdi], rbx
        mov rdi, var_tx_avail
        ld64 rdi, [rdi]
        st16 [rdi], rbx
        ; the MAC (config bytes 0..5) into r9 and into the frame's source address
        mov r9, 0
        mov rcx, 0
mac_byte:
        mov rdx, VIO_CONFIG
        add rdx, rcx
        call vio_in8
        shl r9, 8
        or r9, rax
        mov rdi, TX_BUF + 16
        add rdi, rcx
        st8 [rdi], rax
        inc rcx
        cmp rcx, 6
        jb mac_byte
        mov rdx, VIO_CONFIG + 6
        call vio_in16
        mov r8, rax                     ; link status
        call vio_driver_ok
        PRINT msg_mac
        PRINT_HEX r9
        test r8, 1
        jz link_down
        PRINT msg_up
        jmp link_done
link_down:
        PRINT msg_down
link_done:
        ; the constant part of the frame: zero header, broadcast destination, EtherType
        mov rdi, TX_BUF
        mov rax, 0
        st64 [rdi], rax
        st16 [rdi + 8], rax
        mov rax, 0xff
        mov rcx, 10
dst_byte:
        mov rsi, rdi
        add rsi, rcx
        st8 [rsi], rax
        inc rcx
        cmp rcx, 16
        jb dst_byte
        mov rax, ETHERTYPE_HI
        st8 [rdi + 22], rax
        mov rax, ETHERTYPE_LO
        st8 [rdi + 23], rax
        mov rax, TX_RING                ; transmit descriptor 0: header + frame, device-readable
        mov rbx, TX_BUF
        st64 [rax], rbx
        mov rbx, BUF_LEN
        st32 [rax + 8], rbx
        mov rbx, 0
        st16 [rax + 12], rbx
        ; post the receive buffers: descriptor k = RX_BUFS + k * RX_BUF_SIZE, device-writable
        mov rcx, 0
        mov rsi, var_rx_avail
        ld64 rsi, [rsi]
post:
        mov rax, rcx
        shl rax, 4
        add rax, RX_RING
        mov rbx, rcx
        mul rbx, RX_BUF_SIZE
        add rbx, RX_BUFS
        st64 [rax], rbx
        mov rbx, RX_BUF_SIZE
        st32 [rax + 8], rbx
        mov rbx, VRING_F_WRITE
        st16 [rax + 12], rbx
        mov rax, rcx
        shl rax, 1
        add rax, rsi
        st16 [rax + 4], rcx
        inc rcx
        cmp rcx, RXBUFS
        jb post
        st16 [rsi + 2], rcx
        mov r15, rcx                    ; receive avail index
        mov r14, 0                      ; receive used index seen
        mov r13, 0                      ; transmit avail index
        mov r11, 0                      ; digest
        mov r10, 0                      ; frame number
frame:
        movabs rax, FRAMES
        cmp r10, rax
        jae finished
        mov rcx, 0                      ; payload qword k = frame << 32 | k
        mov rdi, TX_BUF + 24
fill:
        mov rax, r10
        shl rax, 32
        or rax, rcx
        st64 [rdi], rax
        add rdi, 8
        inc rcx
        cmp rcx, QWORDS
        jb fill
        mov rdi, var_tx_avail           ; publish transmit descriptor 0
        ld64 rdi, [rdi]
        mov rax, r13
        rem rax, r12
        shl rax, 1
        add rax, rdi
        mov rbx, 0
        st16 [rax + 4], rbx
        inc r13
        and r13, 0xffff
        st16 [rdi + 2], r13
        mov rax, 1
        call vio_notify
        mov rdi, var_tx_used            ; transmit completes during the notify
        ld64 rdi, [rdi]
        ld16 rax, [rdi + 2]
        cmp rax, r13
        je wait_rx
        PRINT msg_txfail
        call poweroff
wait_rx:
        mov rdi, var_rx_used
        ld64 rdi, [rdi]
        ld16 rax, [rdi + 2]
        cmp rax, r14
        jne got_rx
        mov rax, 0                      ; poll: let the device deliver what has arrived
        call vio_notify
        pause
        jmp wait_rx
got_rx:
        mov rax, r14                    ; used entry r14 % size
        rem rax, r12
        shl rax, 3
        add rdi, rax
        ld32 rbx, [rdi + 4]             ; id: the buffer's descriptor
        ld32 rax, [rdi + 8]             ; len
        cmp rax, BUF_LEN
        jne mismatch
        cmp rbx, RXBUFS
        jae mismatch
        mov rsi, rbx
        mul rsi, RX_BUF_SIZE
        add rsi, RX_BUFS
        mov rdi, TX_BUF
        mov rcx, 0
compare:
        ld64 rax, [rsi]
        ld64 rdx, [rdi]
        cmp rax, rdx
        jne mismatch
        cmp rcx, 3                      ; qwords 3.. are payload: fold them
        jb next_qword
        MIX r11, rax, rax
next_qword:
        add rsi, 8
        add rdi, 8
        inc rcx
        cmp rcx, QWORDS_ALL
        jb compare
        inc r14
        and r14, 0xffff
        mov rdi, var_rx_avail           ; the buffer goes back on the receive ring
        ld64 rdi, [rdi]
        mov rax, r15
        rem rax, r12
        shl rax, 1
        add rax, rdi
        st16 [rax + 4], rbx
        inc r15
        and r15, 0xffff
        st16 [rdi + 2], r15
        inc r10
        jmp frame
mismatch:
        PRINT msg_frame
        PRINT_DEC r10
        PRINT msg_mismatch
        call poweroff
finished:
        PRINT msg_done
        PRINT_DEC r10
        PRINT msg_of
        mov rax, FRAME_LEN
        PRINT_DEC rax
        PRINT msg_digest
        PRINT_HEX16 r11
        PRINT msg_newline
        call poweroff
msg_nodev:    .asciz {asm_string("nettest: no virtio-net device on PCI bus 0" + chr(10))}
msg_smallq:   .asciz {asm_string("nettest: the receive queue is too small" + chr(10))}
msg_mac:      .asciz {asm_string("nettest: mac 0x")}
msg_up:       .asciz {asm_string(", link up" + chr(10))}
msg_down:     .asciz {asm_string(", link down" + chr(10))}
msg_txfail:   .asciz {asm_string("nettest: transmit not completed by its notify" + chr(10))}
msg_frame:    .asciz {asm_string("nettest: frame ")}
msg_mismatch: .asciz {asm_string(" MISMATCH" + chr(10))}
msg_done:     .asciz {asm_string("nettest: ")}
msg_of:       .asciz {asm_string(" frames of ")}
msg_digest:   .asciz {asm_string(" bytes echoed, digest 0x")}
msg_newline:  .asciz {asm_string(chr(10))}
.align 8
var_rx_avail: .qword 0
var_rx_used:  .qword 0
var_tx_avail: .qword 0
var_tx_used:  .qword 0
""" + V.library()
    from .hash import MIX_INCREMENT, MIX_MULTIPLIER

    constants = {**V.CONSTANTS, "VIRTIO_NET_DEVICE": VIRTIO_NET_DEVICE, "F_MAC": F_MAC, "F_STATUS": F_STATUS,
                 "ETHERTYPE": ETHERTYPE, "FRAMES": frames, "PAYLOAD": payload, "RX_RING": RX_RING, "TX_RING": TX_RING,
                 "TX_BUF": TX_BUF, "RX_BUFS": RX_BUFS, "RX_BUF_SIZE": RX_BUF_SIZE, "RXBUFS": RXBUFS,
                 "MIX_INCREMENT": MIX_INCREMENT, "MIX_MULTIPLIER": MIX_MULTIPLIER,
                 "QWORDS": payload // 8, "QWORDS_ALL": 3 + payload // 8, "ETHERTYPE_HI": ETHERTYPE >> 8,
                 "ETHERTYPE_LO": ETHERTYPE & 0xFF, "BUF_LEN": 24 + payload, "FRAME_LEN": 14 + payload}
    return assemble_program(NAME, body, constants)
