"""The vmmrun machine in-process: vCPU threads, userspace exits, kernel devices, bhyve exit codes."""

import pytest

from vmmpy.devices.uart import CaptureConsole
from vmmpy.guest import assemble
from vmmpy.runtime.config import ConfigError, VmConfig, parse_slot
from vmmpy.runtime.machine import EXIT_ERROR, EXIT_HALT, EXIT_POWEROFF, EXIT_TRIPLEFAULT, Machine

PRELUDE = """
.equ COM1, 0x3f8
.equ PM1A_CNT, 0x404
.equ LAPIC, 0xfee00000
.org 0x100000
"""

HELLO = PRELUDE + """
start:  movabs rsi, msg
next:   ld8 rax, [rsi + 0]
        cmp rax, 0
        je off
        out8 COM1, rax
        inc rsi
        jmp next
off:    mov rax, 0x3400
        out16 PM1A_CNT, rax
        hlt
msg:    .asciz "hello from the guest\\n"
"""

# Sleeps in hlt on the local APIC's periodic timer, prints a tick count, then powers off.
TICKS = PRELUDE + """
start:  movabs rax, vectors
        lidt rax
        movabs rbx, LAPIC
        mov rax, 0x1ff
        st32 [rbx + 0xf0], rax      ; software-enable the lapic
        mov rax, 0x0b
        st32 [rbx + 0x3e0], rax     ; divide by 1
        mov rax, 0x20040
        st32 [rbx + 0x320], rax     ; periodic, vector 0x40
        mov rax, 100000
        st32 [rbx + 0x380], rax     ; initial count
        mov r15, 0
        sti
idle:   hlt
        cmp r15, 5
        jne idle
        cli
        mov rax, 'T'
        out8 COM1, rax
        mov rax, r15
        add rax, '0'
        out8 COM1, rax
        mov rax, 0x3400
        out16 PM1A_CNT, rax
tick:   inc r15
        movabs rbx, LAPIC
        mov rax, 0
        st32 [rbx + 0xb0], rax      ; EOI
        iret
.align 8
vectors:
.org vectors + 8 * 0x40
        .qword tick
"""


def boot(source, name, **config):
    console = CaptureConsole()
    machine = Machine(VmConfig(name=name, memsize=4 << 20, **config), consoles={"com1": console})
    machine.setup_memory()
    machine.load_program(assemble(source))
    machine.start(serve_control=False)
    return machine, console


def run_to_end(machine, timeout=30):
    try:
        status = machine.wait(timeout)
        assert status is not None, "the guest did not stop in time"
        return status
    finally:
        machine.close()


def test_a_guest_prints_on_com1_and_powers_off():
    machine, console = boot(HELLO, "m-hello")
    assert run_to_end(machine) == EXIT_POWEROFF
    assert console.output == b"hello from the guest\n"


@pytest.mark.parametrize("vendor", ["intel", "amd"])
def test_hlt_sleeps_until_the_lapic_timer_wakes_it(vendor):
    machine, console = boot(TICKS, f"m-ticks-{vendor}", vendor=vendor)
    assert run_to_end(machine) == EXIT_POWEROFF
    assert console.output == b"T5"
    stats = machine.vm.stats[0]
    assert stats["interrupts_delivered"] == 5
    assert stats["halt_skipped_ns"] > 0, "with the instruction TSC, halted time is skipped, not waited"


def test_hlt_with_interrupts_off_halts_the_vm():
    machine, _ = boot(PRELUDE + "start: cli\nhlt\n", "m-halt")
    assert run_to_end(machine) == EXIT_HALT


def test_a_guest_fault_stops_the_vm_like_a_triple_fault():
    machine, _ = boot(PRELUDE + "start: .qword 0\n", "m-fault")
    assert run_to_end(machine) == EXIT_TRIPLEFAULT
    assert "invalid_opcode" in machine.exit_reason


def test_an_unhandled_port_is_an_error_naming_the_port():
    machine, _ = boot(PRELUDE + "start: mov rax, 1\nout8 0x1234, rax\nhlt\n", "m-port")
    assert run_to_end(machine) == EXIT_ERROR
    assert "port 0x1234" in machine.exit_reason


def test_unknown_emulation_and_slot_clash_are_refused_at_start():
    with pytest.raises(ConfigError, match="unknown emulation 'virtio-gpu'"):
        Machine(VmConfig(name="m-bad", slots=[parse_slot("3,virtio-gpu")]))
    with pytest.raises(ConfigError, match="slot already holds hostbridge"):
        Machine(VmConfig(name="m-bad2", slots=[parse_slot("0,hostbridge"), parse_slot("0,lpc")]))
