"""The simulated vCPU from Python: guest programs assembled, loaded into guest memory and run,
with exits handled the way a device model does. Proves the exit protocol, interrupt delivery,
cross-thread pause, and that runs split by budgets, pauses or save/restore end identically."""

import struct
import threading
import time

import pytest

from vmmpy import _core
from vmmpy.guest import assemble

CODE = 0x1000
STACK = 0x8000

# A guest that computes, touches memory across pages, calls, reads the TSC, and counts the
# interrupts it takes (vector table at 0x2000, every vector -> `handler`).
BUSY = """
.equ DATA, 0x10000
.org 0x1000
start:  mov rax, 0x2000
        lidt rax
        sti
        mov rsi, DATA
        mov rcx, 20000
        mov rbx, 1
loop:   mul rbx, 6364136
        add rbx, 1442695
        ld64 rax, [rsi]
        xor rax, rbx
        st64 [rsi], rax
        add rsi, 4104
        and rsi, 0x3ffff8
        or rsi, DATA
        call tick
        dec rcx
        jnz loop
        mov rax, r9
        out32 0x80, rax
        hlt
tick:   rdtsc
        add r9, rax
        ret
handler:
        push rax
        inc r10
        rdtsc
        add r11, rax
        pop rax
        iret
"""


def boot(source, vendor="intel", memsize=8 << 20, tsc="instructions"):
    mem = _core.GuestMemory(memsize)
    program = assemble(source)
    program.load(mem)
    if "handler" in program.symbols:
        table = struct.pack("<Q", program.symbols["handler"]) * 256
        mem.write(0x2000, table)
    cpu = _core.Vcpu(mem, vendor=vendor, tsc=tsc)
    cpu.set_register("rip", program.symbols.get("start", CODE))
    cpu.set_register("rsp", STACK)
    return mem, cpu, program


def snapshot(mem, cpu):
    """Everything that must match: registers, counters, pending work, all of lowmem."""
    return (cpu.registers(), cpu.instructions_retired, cpu.halted, cpu.pending_interrupts, mem.read(0, 8 << 20))


def run_busy_to_end(cpu, budget):
    """Run until the guest's final out + hlt, resuming after budget and pause exits."""
    outs = []
    while True:
        exit = cpu.run(budget)
        if exit.kind == "inout":
            outs.append(exit.value)
        elif exit.kind == "hlt":
            return outs
        else:
            assert exit.kind in ("budget", "pause_requested"), exit


def test_registers_are_named_as_on_amd64():
    mem = _core.GuestMemory(1 << 20)
    cpu = _core.Vcpu(mem, vcpu_id=1, vendor="amd")
    cpu.set_register("r13", 0xFFFF_FFFF_FFFF_FFFF)
    regs = cpu.registers()
    assert list(regs)[:17] == [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip",
    ]
    assert regs["r13"] == 2**64 - 1
    assert regs["rflags"] == 0x2 and regs["cr0"] == 0x6000_0010
    assert regs["apic_base"] == 0xFEE0_0800  # vcpu 1 is not the BSP
    assert list(regs) == _core.VCPU_REGISTER_NAMES


def test_register_errors_name_the_register_and_value():
    cpu = _core.Vcpu(_core.GuestMemory(1 << 20), vcpu_id=2)
    with pytest.raises(ValueError, match="vcpu 2: unknown register 'rxx'"):
        cpu.get_register("rxx")
    with pytest.raises(ValueError, match=r"register 'rflags' cannot be set to 0x400: bits 0x400"):
        cpu.set_register("rflags", 0x400)
    with pytest.raises(ValueError, match=r"'rax' must be an integer in 0..2\*\*64, got -1"):
        cpu.set_register("rax", -1)
    with pytest.raises(ValueError, match="vendor 'via' is not 'intel' or 'amd'"):
        _core.Vcpu(_core.GuestMemory(1 << 20), vendor="via")
    with pytest.raises(ValueError, match="interrupt vector 256 is not in 0..255"):
        cpu.inject_interrupt(256)


def test_out_to_a_port_is_an_inout_exit_carrying_the_value():
    mem, cpu, _ = boot(".org 0x1000\nstart: mov rax, 0x12345678\nout16 0x3f8, rax\nhlt")
    exit = cpu.run(100)
    assert (exit.kind, exit.port, exit.size, exit.is_in, exit.value, exit.rip) == ("inout", 0x3F8, 2, False, 0x5678, 0x1008)
    assert cpu.get_register("rip") == 0x1010, "out retired before the exit"
    assert cpu.run(100).kind == "hlt"


def test_in_waits_for_complete_read_then_retires():
    mem, cpu, _ = boot(".org 0x1000\nstart: mov rdx, 0x64\nin8 rbx, rdx\nhlt")
    exit = cpu.run(100)
    assert (exit.kind, exit.port, exit.size, exit.is_in, exit.value) == ("inout", 0x64, 1, True, None)
    assert cpu.pending_read.as_dict() == {"source": "port", "port": 0x64, "gpa": None, "size": 1, "register": "rbx"}
    with pytest.raises(OSError, match="waiting for the result of 'in8 rbx from port 0x64'"):
        cpu.run(100)
    with pytest.raises(ValueError, match="value 0x100 does not fit the 1 bytes"):
        cpu.complete_read(0x100)
    cpu.complete_read(0x5A)
    assert cpu.get_register("rbx") == 0x5A and cpu.instructions_retired == 2
    assert cpu.run(100).kind == "hlt"


def test_loads_and_stores_outside_ram_are_mmio_exits():
    source = ".org 0x1000\nstart: movabs rsi, 0xfee00000\nmov rax, 7\nst32 [rsi + 0xb0], rax\nld32 rbx, [rsi + 0x20]\nhlt"
    mem, cpu, _ = boot(source)
    w = cpu.run(100)
    assert (w.kind, w.gpa, w.size, w.is_write, w.value) == ("mmio", 0xFEE000B0, 4, True, 7)
    r = cpu.run(100)
    assert (r.kind, r.gpa, r.is_write, r.value) == ("mmio", 0xFEE00020, False, None)
    cpu.complete_read(0x14)
    assert cpu.run(100).kind == "hlt" and cpu.get_register("rbx") == 0x14


def test_divide_by_zero_is_a_fault_exit_not_a_crash():
    mem, cpu, _ = boot(".org 0x1000\nstart: mov rax, 1\ndiv rax, rbx\nhlt")
    exit = cpu.run(100)
    assert (exit.kind, exit.fault, exit.rip) == ("fault", "divide_error", 0x1008)
    assert cpu.get_register("rip") == 0x1008


def test_vcpu_stores_dirty_exactly_their_pages():
    mem, cpu, _ = boot(".org 0x1000\nstart: mov rsi, 0x20000\nst8 [rsi + 5], rsi\nst64 [rsi + 0x3ffc], rsi\nhlt")
    mem.get_and_clear_dirty()  # forget the program load
    assert cpu.run(100).kind == "hlt"
    dirty = mem.get_and_clear_dirty()
    # the qword at 0x23ffc straddles pages 0x23 and 0x24
    assert struct.unpack(f"<{len(dirty) // 8}Q", dirty) == (0x20, 0x23, 0x24)


def test_hlt_is_woken_by_an_interrupt_delivered_through_the_vector_table():
    source = """
    .org 0x1000
    start:  mov rax, 0x2000
            lidt rax
            sti
    idle:   hlt
            jmp idle
    handler:
            inc r15
            iret
    """
    mem, cpu, program = boot(source, vendor="amd")
    exit = cpu.run(1000)
    assert exit.kind == "hlt" and cpu.halted
    assert cpu.run(1000).kind == "hlt", "no interrupt: stays halted"
    cpu.inject_interrupt(0x30)
    assert cpu.pending_interrupts == [0x30]
    assert cpu.run(1000).kind == "hlt"
    assert cpu.get_register("r15") == 1
    assert cpu.pending_interrupts == []
    assert cpu.get_register("rsp") == STACK, "iret popped rip and rflags"


def test_an_interrupt_is_injected_from_another_thread_into_a_halted_guest():
    source = ".org 0x1000\nstart: mov rax, 0x2000\nlidt rax\nsti\nidle: hlt\njmp idle\nhandler: inc r15\niret"
    mem, cpu, _ = boot(source)
    assert cpu.run(1000).kind == "hlt"
    t = threading.Thread(target=cpu.inject_interrupt, args=(0x41,))
    t.start()
    t.join()
    assert cpu.run(1000).kind == "hlt" and cpu.get_register("r15") == 1


def test_a_running_vcpu_is_paused_from_another_thread_and_refuses_register_access():
    mem, cpu, _ = boot(".org 0x1000\nstart: jmp start")
    result = {}
    runner = threading.Thread(target=lambda: result.setdefault("exit", cpu.run(2**63)))
    runner.start()
    deadline = time.monotonic() + 5
    while True:  # wait until run() holds the vCPU
        try:
            cpu.get_register("rip")
        except OSError as e:
            assert str(e).endswith("vcpu 0 is running")
            break
        assert time.monotonic() < deadline
    cpu.request_pause()
    runner.join(5)
    assert not runner.is_alive()
    assert result["exit"].kind == "pause_requested"
    # The request may land before the first instruction or a million after; either way the
    # vCPU stops at an instruction boundary of its one-instruction loop.
    assert cpu.get_register("rip") == 0x1000


@pytest.mark.parametrize("vendor", ["intel", "amd"])
def test_budget_splits_give_the_same_final_state_as_one_run(vendor):
    mem_a, a, _ = boot(BUSY, vendor)
    a.inject_interrupt(0x30)  # taken right after sti
    outs_a = run_busy_to_end(a, 2**63)
    assert a.get_register("r10") == 1
    for budget in (1, 97, 4096):
        mem_b, b, _ = boot(BUSY, vendor)
        b.inject_interrupt(0x30)
        assert run_busy_to_end(b, budget) == outs_a
        assert snapshot(mem_b, b) == snapshot(mem_a, a), f"budget {budget}"


def test_pause_requests_at_arbitrary_points_change_nothing():
    mem_a, a, _ = boot(BUSY)
    outs_a = run_busy_to_end(a, 2**63)
    mem_b, b, _ = boot(BUSY)
    stop = threading.Event()

    def pester():
        while not stop.is_set():
            b.request_pause()
            time.sleep(0.0002)

    pester_thread = threading.Thread(target=pester)
    pester_thread.start()
    try:
        pauses = 0
        outs = []
        while True:
            exit = b.run(2**63)
            if exit.kind == "pause_requested":
                pauses += 1
            elif exit.kind == "inout":
                outs.append(exit.value)
            else:
                assert exit.kind == "hlt"
                break
    finally:
        stop.set()
        pester_thread.join()
    assert pauses > 0
    assert outs == outs_a
    assert snapshot(mem_b, b) == snapshot(mem_a, a)


@pytest.mark.parametrize("vendor", ["intel", "amd"])
def test_save_and_restore_into_a_fresh_vcpu_gives_the_same_final_state(vendor):
    mem_a, a, _ = boot(BUSY, vendor)
    a.tsc_offset = 1 << 40
    a.inject_interrupt(0x30)
    outs_a = run_busy_to_end(a, 2**63)

    mem_b, b, _ = boot(BUSY, vendor)
    b.tsc_offset = 1 << 40
    b.inject_interrupt(0x30)  # still pending in the first saved state
    restores = 0
    while True:
        state = b.save_state()
        fresh = _core.Vcpu(mem_b, vendor=vendor)
        fresh.restore_state(state)
        assert fresh.save_state() == state
        b = fresh
        restores += 1
        exit = b.run(5003)
        if exit.kind == "inout":
            assert exit.value == outs_a[0]
        elif exit.kind == "hlt":
            break
    assert restores > 20
    assert snapshot(mem_b, b) == snapshot(mem_a, a)


def test_saved_state_uses_the_vendor_layout():
    mem = _core.GuestMemory(1 << 20)
    intel = _core.Vcpu(mem, vendor="intel")
    amd = _core.Vcpu(mem, vendor="amd")
    for cpu in (intel, amd):
        cpu.set_register("rax", 1)
        cpu.set_register("rsp", 2)
        cpu.set_register("rbx", 3)
    i, a = intel.save_state(), amd.save_state()
    assert (i["vendor"], a["vendor"]) == ("intel", "amd")
    assert (i["vmcs"]["guest_rsp"], i["vmxctx"]["guest_rax"], i["vmxctx"]["guest_rbx"]) == (2, 1, 3)
    assert "guest_rsp" not in i["vmxctx"]
    assert (a["vmcb_save"]["rsp"], a["vmcb_save"]["rax"], a["swctx"]["sctx_rbx"]) == (2, 1, 3)
    assert "sctx_rax" not in a["swctx"] and a["vmcb_save"]["cpl"] == 0
    assert "vpid" in i["vmcs"] and "asid" in a["vmcb_control"]


def test_restore_refuses_the_other_vendor_and_damaged_states_and_changes_nothing():
    mem = _core.GuestMemory(1 << 20)
    intel = _core.Vcpu(mem, vendor="intel")
    intel.set_register("rax", 42)
    before = intel.save_state()
    with pytest.raises(ValueError, match="vcpu 0 is an intel vcpu and cannot restore amd state"):
        intel.restore_state(_core.Vcpu(mem, vendor="amd").save_state())
    missing = intel.save_state()
    del missing["vmcs"]["guest_rip"]
    with pytest.raises(ValueError, match="saved state has no 'vmcs.guest_rip'"):
        intel.restore_state(missing)
    extra = intel.save_state()
    extra["vmcs"]["guest_dr7"] = 0
    with pytest.raises(ValueError, match="'vmcs.guest_dr7' is not part of the intel layout"):
        intel.restore_state(extra)
    newer = intel.save_state()
    newer["format"] = 2
    with pytest.raises(ValueError, match="format 2 is not the one this vmmpy reads"):
        intel.restore_state(newer)
    other = intel.save_state()
    other["vcpu_id"] = 3
    with pytest.raises(ValueError, match="vcpu 0 cannot restore the state of vcpu 3"):
        intel.restore_state(other)
    with pytest.raises(ValueError, match="TSC mode 'host'"):
        intel.restore_state(_core.Vcpu(mem, vendor="intel", tsc="host").save_state())
    assert intel.save_state() == before


def test_a_pending_in_survives_save_and_restore():
    mem, cpu, _ = boot(".org 0x1000\nstart: in32 rdi, 0x71\nhlt")
    assert cpu.run(10).is_in
    state = cpu.save_state()
    assert state["pending_read"] == {"source": "port", "port": 0x71, "size": 4, "register": "rdi"}
    fresh = _core.Vcpu(mem)
    fresh.restore_state(state)
    fresh.complete_read(0xCAFE)
    assert fresh.run(10).kind == "hlt" and fresh.get_register("rdi") == 0xCAFE


def test_the_instruction_count_tsc_is_retired_instructions_plus_the_offset():
    mem, cpu, _ = boot(".org 0x1000\nstart: nop\nnop\nrdtsc\nhlt")
    cpu.tsc_offset = (7 << 32) + 100
    assert cpu.run(100).kind == "hlt"
    assert (cpu.get_register("rax"), cpu.get_register("rdx")) == (102, 7)
    assert cpu.instructions_retired == 4 and cpu.tsc == (7 << 32) + 104


def test_a_host_clock_tsc_does_not_jump_across_a_suspend():
    mem = _core.GuestMemory(1 << 20)
    cpu = _core.Vcpu(mem, tsc="host")
    state = cpu.save_state()
    time.sleep(0.05)
    fresh = _core.Vcpu(mem, tsc="host")
    fresh.restore_state(state)
    assert 0 <= fresh.tsc - state["guest_tsc"] < 20_000_000
