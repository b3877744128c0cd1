"""The vmmrun machine in-process: vCPU threads, userspace exits, kernel devices, bhyve exit codes."""

import re
import threading
import time

import pytest

from vmmpy.devices.uart import CaptureConsole
from vmmpy.guest import assemble
from vmmpy.runtime.config import ConfigError, VmConfig, parse_slot
from vmmpy.runtime.process import EXIT_ERROR, EXIT_HALT, EXIT_POWEROFF, EXIT_TRIPLEFAULT, Machine
from vmmpy.vmm.ioctl import Ioctl, VmInjectInterrupt
from vmmpy.vmm.vm import PACE_LAG_NS

from .inproc import move_to_fresh_machine, run_to_end, wait_paused

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


def boot(source, name, pause_at=None, **config):
    """Start a guest in-process; with ``pause_at``, it pauses itself at that instruction count
    and this returns once it has."""
    console = CaptureConsole()
    machine = Machine(VmConfig(name=name, memsize=4 << 20, **config), consoles={"com1": console})
    machine.setup_memory()
    machine.load_program(assemble(source))
    machine.pause_at = pause_at
    machine.start(serve_control=False)
    if pause_at is not None:
        wait_paused(machine)
    return machine, console


def test_a_pause_before_the_vcpus_start_holds_them_until_resume():
    # A control request may arrive between serving the socket and starting the vCPUs (a
    # migration asked for as soon as vmmrun answers): pausing then must work, not fail.
    console = CaptureConsole()
    machine = Machine(VmConfig(name="m-early", memsize=4 << 20), consoles={"com1": console})
    machine.setup_memory()
    machine.load_program(assemble(HELLO))
    machine.pause()
    machine.start_vcpus()
    assert machine.wait(0.3) is None and console.output == b"", "paused before it ran: nothing printed"
    assert machine.vm.vcpus[0].instructions_retired == 0
    machine.resume()
    assert run_to_end(machine) == EXIT_POWEROFF
    assert console.output == b"hello from the guest\n"


@pytest.mark.parametrize("outcome", ["commit", "commit-unprepared", "discard"])
def test_a_migration_destination_holds_its_vcpus_until_the_commit(outcome):
    from vmmpy.runtime.guest_handle import MachineHandle
    from vmmpy.state.kernel import save_sections

    source, _ = boot(HELLO, f"m-held-src-{outcome}", pause_at=5)
    sections = save_sections(source)
    source.finish(0, "moved")
    run_to_end(source)
    source.close()
    console = CaptureConsole()
    dest = Machine(VmConfig(name=f"m-held-dst-{outcome}", memsize=4 << 20), consoles={"com1": console})
    dest.setup_memory()
    dest.vm.memory.write(0, source.vm.memory.read(0, 4 << 20))
    handle = MachineHandle(dest)
    handle.restore_sections(sections, what="test")

    def vcpu_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name == f"m-held-dst-{outcome}/vcpu0"]

    assert vcpu_threads() == [] and dest.paused, "no vCPU thread yet: the restore is downtime"
    if outcome != "commit-unprepared":
        handle.prepare_to_run()
        assert len(vcpu_threads()) == 1
        # The threads exist (started while COMMITTED travels) but run nothing until start_running.
        assert dest.wait(0.2) is None and dest.paused and console.output == b""
    assert dest.vm.vcpus[0].instructions_retired == 5
    if outcome.startswith("commit"):
        handle.start_running()
        assert run_to_end(dest) == EXIT_POWEROFF
        assert console.output == b"hello from the guest\n"[1:], "the first byte was printed on the source"
    else:
        handle.discard()
        assert run_to_end(dest) == EXIT_ERROR and console.output == b""
    dest.close()


def test_a_receiving_handle_rehearses_the_restore_without_changing_the_machine(monkeypatch):
    """A migration's destination runs its state restore's code ahead (``MachineHandle.receiving``),
    on its own state: the machine is left as built, and a guest restored into it afterwards runs
    exactly as one never rehearsed."""
    from vmmpy.runtime import guest_handle
    from vmmpy.state import encode_sections
    from vmmpy.state.kernel import save_sections

    source, _ = boot(HELLO, "m-rehearse-src", pause_at=5)
    sections = save_sections(source)
    source.finish(0, "moved")
    run_to_end(source)
    source.close()
    console = CaptureConsole()
    dest = Machine(VmConfig(name="m-rehearse-dst", memsize=4 << 20), consoles={"com1": console})
    dest.setup_memory()
    before = encode_sections(save_sections(dest))
    checked = []
    check = guest_handle.check_sections
    monkeypatch.setattr(guest_handle, "check_sections", lambda *a, **k: checked.append(k["what"]) or check(*a, **k))
    handle = guest_handle.MachineHandle.receiving(dest)
    assert checked == ["rehearsal"] * guest_handle.REHEARSALS
    assert encode_sections(save_sections(dest)) == before, "the rehearsal changed the machine's state"
    assert dest.vm.memory.read(0, 4 << 20) == bytes(4 << 20), "the rehearsal wrote guest memory"
    dest.vm.memory.write(0, source.vm.memory.read(0, 4 << 20))
    handle.restore_sections(sections, what="test")
    handle.prepare_to_run()
    handle.start_running()
    assert run_to_end(dest) == EXIT_POWEROFF
    assert console.output == b"hello from the guest\n"[1:], "the first byte was printed on the source"
    dest.close()


def test_a_rehearsal_that_fails_leaves_the_receiving_handle_usable(monkeypatch):
    from vmmpy.runtime import guest_handle

    def broken(self):
        raise RuntimeError("no state to be had")

    dest = Machine(VmConfig(name="m-rehearse-fail", memsize=4 << 20), consoles={"com1": CaptureConsole()})
    dest.setup_memory()
    monkeypatch.setattr(guest_handle.MachineHandle, "save_sections", broken)
    handle = guest_handle.MachineHandle.receiving(dest)
    assert handle.machine is dest and handle.spec()["vcpus"] == 1
    dest.close()


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


# TICKS with 20 ms of guest time per tick (the lapic timer counts 128 Mi ticks a second): 100 ms
# of guest time, nearly all of it halted.
SLOW_TICKS = TICKS.replace("mov rax, 100000\n", f"mov rax, {20 * (1 << 27) // 1000}\n")


def test_an_idle_guest_sleeps_the_time_it_skips_and_ends_as_one_fast_forwarded():
    ends = {}
    for idle in ("sleep", "skip"):
        started = time.monotonic_ns()
        machine, console = boot(SLOW_TICKS, f"m-idle-{idle}", idle=idle)
        try:
            assert machine.wait(60) == EXIT_POWEROFF
            took = time.monotonic_ns() - started
            vm, stats = machine.vm, machine.vm.stats[0]
            ends[idle] = (console.output, vm.last_tsc[0], vm.vcpus[0].instructions_retired, vm.vcpus[0].get_register("rip"),
                          stats["halt_skipped_ns"], stats["interrupts_delivered"])
        finally:
            machine.close()
        assert stats["halt_skipped_ns"] > 90_000_000, "the five ticks' waits were halted time"
        if idle == "sleep":
            # Guest time never ran ahead of the host's by more than the pacing's slack: the
            # halted time was slept, not run through.
            assert took >= vm.last_tsc[0] - PACE_LAG_NS
            assert stats["halt_slept_ns"] > 0
        else:
            assert stats["halt_slept_ns"] == 0, "skip never sleeps"
    assert ends["sleep"] == ends["skip"], "the guest sees the same whether its idle time is slept or skipped"
    assert ends["sleep"][0] == b"T5"


# One lapic timer tick every 32 s of guest time (the largest initial count at divide-by-1): a
# vCPU sleeps in its first hlt far longer than anything below may wait.
FAR_TICKS = TICKS.replace("mov rax, 100000\n", "movabs rax, 0xffffffff\n")
FAR_TICK_NS = (0xFFFFFFFF * 10**9) >> 27


def wait_until_sleeping(machine, vcpu=0):
    """Wait (bounded) until ``vcpu`` waits in hlt."""
    deadline = time.monotonic() + 30
    while vcpu not in machine.vm._halted_waiting or machine.vm.last_tsc[vcpu] == 0:
        assert machine.exit_status is None, machine.exit_reason
        assert time.monotonic() < deadline, "the guest never went to sleep in hlt"
        time.sleep(0.001)


def test_a_pause_ends_an_idle_sleep_at_once_where_skip_would_have_put_the_guest():
    machine, _ = boot(FAR_TICKS, "m-idle-pause")
    try:
        wait_until_sleeping(machine)
        machine.pause()  # its timeout (10 s) is far shorter than the sleep
        assert machine.paused
        # Guest time is at the timer event, as without the sleep: where the pause landed
        # changes nothing the guest sees.
        assert machine.vm.stats[0]["halt_skipped_ns"] >= FAR_TICK_NS - 1_000_000
    finally:
        machine.close()


# FAR_TICKS, and an interrupt at vector 0x50 (sent by another thread) prints 'I' and powers off.
FAR_TICKS_THEN_I = FAR_TICKS.replace("tick:   inc r15", """ipi:    mov rax, 'I'
        out8 COM1, rax
        mov rax, 0x3400
        out16 PM1A_CNT, rax
        hlt
tick:   inc r15""").replace("        .qword tick\n", "        .qword tick\n.org vectors + 8 * 0x50\n        .qword ipi\n")


def test_an_interrupt_from_another_thread_ends_an_idle_sleep_and_the_guest_takes_it_then():
    machine, console = boot(FAR_TICKS_THEN_I, "m-idle-inject")
    try:
        wait_until_sleeping(machine)
        machine.vm.ioctl(Ioctl.VM_INJECT_INTERRUPT, VmInjectInterrupt(0, 0x50))
        assert machine.wait(20) == EXIT_POWEROFF, "the interrupt did not end the 32 s sleep"
        assert console.output == b"I"
        # It came long before the timer: the guest took it at the guest time the host had
        # reached, not at the timer event (32 s).
        assert machine.vm.last_tsc[0] < FAR_TICK_NS // 2
    finally:
        machine.close()


# vCPU 1 (the AP) arms a 32 s lapic timer and halts; vCPU 0 starts it, waits until it is ready,
# and sends it a fixed IPI (vector 0x50), whose handler prints 'I' and powers off.
IPI_TO_A_SLEEPER = PRELUDE.replace(".org 0x100000", ".org 0x8000") + """
ap:     movabs rsp, 0x300000
        movabs rax, vectors
        lidt rax
        movabs rbx, LAPIC
        mov rax, 0x1ff
        st32 [rbx + 0xf0], rax
        mov rax, 0x0b
        st32 [rbx + 0x3e0], rax
        mov rax, 0x20040
        st32 [rbx + 0x320], rax
        movabs rax, 0xffffffff
        st32 [rbx + 0x380], rax
        movabs rsi, ready
        mov rax, 1
        st64 [rsi + 0], rax
        sti
idle:   hlt
        jmp idle
tick:   movabs rbx, LAPIC
        mov rax, 0
        st32 [rbx + 0xb0], rax
        iret
ipi:    mov rax, 'I'
        out8 COM1, rax
        mov rax, 0x3400
        out16 PM1A_CNT, rax
        hlt
.org 0x100000
start:  movabs rbx, LAPIC
        mov rax, 0x1ff
        st32 [rbx + 0xf0], rax
        mov rax, 0x01000000
        st32 [rbx + 0x310], rax
        mov rax, 0x4500
        st32 [rbx + 0x300], rax     ; INIT to APIC 1
        mov rax, 0x4608
        st32 [rbx + 0x300], rax     ; STARTUP at 0x8000
        movabs rsi, ready
wait:   ld64 rax, [rsi + 0]
        cmp rax, 1
        jb wait
        mov rcx, 300000
spin:   dec rcx
        jnz spin
        mov rax, 0x01000000
        st32 [rbx + 0x310], rax
        mov rax, 0x4050
        st32 [rbx + 0x300], rax     ; fixed IPI, vector 0x50, to APIC 1
        cli
        hlt
.align 8
ready:  .qword 0
vectors:
.org vectors + 8 * 0x40
        .qword tick
.org vectors + 8 * 0x50
        .qword ipi
"""


def test_an_ipi_wakes_a_vcpu_sleeping_in_hlt():
    machine, console = boot(IPI_TO_A_SLEEPER, "m-idle-ipi", ncpus=2)
    try:
        assert machine.wait(20) == EXIT_POWEROFF, "the IPI did not end the AP's 32 s sleep"
        assert console.output == b"I"
        assert machine.vm.last_tsc[1] < FAR_TICK_NS // 2
    finally:
        machine.close()


def test_wakeups_meant_for_nobody_do_not_cut_an_idle_sleep_short():
    # A device line pulsed every 2 ms that this guest never unmasked: each pulse wakes the
    # sleeping vCPU to look, and it must go back to sleep, not on through guest time.
    machine, console = boot(SLOW_TICKS, "m-idle-kicks")
    stop = threading.Event()

    def pulse() -> None:
        while not stop.wait(0.002):
            machine.vm.raise_irq(5, None)

    pulser = threading.Thread(target=pulse)
    started = time.monotonic_ns()
    pulser.start()
    try:
        assert machine.wait(60) == EXIT_POWEROFF
        took = time.monotonic_ns() - started
        assert console.output == b"T5"
        assert took >= machine.vm.last_tsc[0] - PACE_LAG_NS, "guest time ran ahead of the host's"
    finally:
        stop.set()
        pulser.join()
        machine.close()


# The HPET's timer 0 with interrupts on and its comparator left at reset (all ones): the next
# timer event is 2^64 HPET ticks away, beyond the TSC's range and any host wait.
HPET_NEVER = PRELUDE + """
.equ HPET, 0xfed00000
start:  movabs rbx, HPET
        mov rax, 4
        st32 [rbx + 0x100], rax     ; timer 0: interrupt enable
        mov rax, 1
        st32 [rbx + 0x10], rax      ; the counter runs
        sti
idle:   hlt
        jmp idle
"""


@pytest.mark.parametrize("idle", ["sleep", "skip"])
def test_a_timer_event_beyond_the_tsc_s_range_is_no_event(idle):
    machine, _ = boot(HPET_NEVER, f"m-idle-hpet-{idle}", idle=idle)
    try:
        wait_until_sleeping(machine)
        assert machine.wait(0.3) is None and machine.exit_status is None, machine.exit_reason
        machine.pause()
        # Guest time did not jump (it would wrap the TSC) and the vCPU waits for an interrupt.
        assert machine.vm.last_tsc[0] < 10**9 and machine.vm.stats[0]["halt_skipped_ns"] == 0
    finally:
        machine.close()


def test_an_unknown_idle_mode_is_refused_naming_the_option():
    with pytest.raises(ConfigError, match="--idle 'nap': choose one of sleep, skip"):
        VmConfig(name="m-nap", idle="nap").validate()


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


# A long compute loop with timer interrupts: a running sum over a table the handler rewrites.
BUSY = TICKS.replace("        cmp r15, 5\n", "        cmp r15, 40\n").replace(
    "idle:   hlt\n",
    "idle:   mov rcx, 200000\nspin:   add r14, rcx\n        xor r14, r15\n        st64 [rsp - 64], r14\n        dec rcx\n        jnz spin\n        hlt\n",
)


def final_state(machine):
    vcpu = machine.vm.vcpus[0]
    return machine.vm.memory.digest(), vcpu.registers(), vcpu.instructions_retired


@pytest.mark.covers(operation="state-move", guest="busy", via="machine")
def test_state_sections_move_a_running_guest_into_a_fresh_machine_exactly():
    """Pause mid-run, save every section and all memory into a fresh machine, finish there:
    the end is the same as an uninterrupted run's, in memory, registers and console."""
    reference, ref_console = boot(BUSY, "m-ref")
    assert run_to_end(reference) == EXIT_POWEROFF
    expected = final_state(reference)
    assert ref_console.output == b"T" + bytes([ord("0") + 40])

    total = expected[2]
    for at in (1, 999_999, total // 2 + 7, total - 1_000):
        source, src_console = boot(BUSY, "m-src", pause_at=at)
        assert source.vm.vcpus[0].instructions_retired == at
        target_console = CaptureConsole()
        target = move_to_fresh_machine(source, VmConfig(name="m-dst", memsize=4 << 20), {"com1": target_console})
        assert run_to_end(target) == EXIT_POWEROFF
        assert final_state(target) == expected, f"paused at instruction {at}"
        assert bytes(src_console.output) + bytes(target_console.output) == ref_console.output


@pytest.mark.covers(operation="state-move", guest="busy", via="machine", compress="lz4")
def test_a_guest_moved_with_compressed_pages_ends_exactly_as_an_unmigrated_run():
    """The same move with every page batch LZ4-compressed: memory, registers, instruction count
    and console end as in the run that never moved."""
    reference, ref_console = boot(BUSY, "m-refz")
    assert run_to_end(reference) == EXIT_POWEROFF
    expected = final_state(reference)
    for at in (999_999, expected[2] // 2 + 7):
        source, src_console = boot(BUSY, "m-srcz", pause_at=at)
        target_console = CaptureConsole()
        target = move_to_fresh_machine(source, VmConfig(name="m-dstz", memsize=4 << 20), {"com1": target_console}, compress="lz4")
        assert run_to_end(target) == EXIT_POWEROFF
        assert final_state(target) == expected, f"paused at instruction {at}"
        assert bytes(src_console.output) + bytes(target_console.output) == ref_console.output


@pytest.mark.covers(operation="state-move", guest="busy", via="machine")
def test_a_guest_whose_state_moves_in_parts_ends_exactly_as_an_unmigrated_run():
    """The state read in parts, each checked as it comes and all loaded at the end (migration
    protocol 9's STATE_PARTs): memory, registers, instruction count and console end as in the
    run that never moved, whatever the size of the parts."""
    reference, ref_console = boot(BUSY, "m-refp")
    assert run_to_end(reference) == EXIT_POWEROFF
    expected = final_state(reference)
    for at, parts in ((999_999, 1), (expected[2] // 2 + 7, 4), (expected[2] - 1_000, 5)):
        source, src_console = boot(BUSY, "m-srcp", pause_at=at)
        target_console = CaptureConsole()
        target = move_to_fresh_machine(source, VmConfig(name="m-dstp", memsize=4 << 20), {"com1": target_console}, parts=parts)
        assert run_to_end(target) == EXIT_POWEROFF
        assert final_state(target) == expected, f"paused at instruction {at}, parts of {parts}"
        assert bytes(src_console.output) + bytes(target_console.output) == ref_console.output


def test_state_in_parts_is_refused_section_by_section_and_loads_nothing_until_whole():
    """A MachineSectionLoader refuses a part as it comes (a section seen before, an unknown one, a
    payload its declaration does not read), names it, and changes nothing; a set with a section
    missing is refused at the end, before anything is loaded."""
    from dataclasses import replace

    from vmmpy.state import SectionError
    from vmmpy.state.kernel import MachineSectionLoader, save_sections

    source, _ = boot(BUSY, "m-srcl", pause_at=999_999)
    target, _ = boot(BUSY, "m-dstl", pause_at=2_000_003)
    try:
        saved = save_sections(source)
        before = save_sections(target)
        vlapic = next(i for i, s in enumerate(saved) if s.name == "vlapic")
        bad_payload = replace(saved[vlapic], payload={**saved[vlapic].payload, "vcpus": "not a list"})
        cases = [
            ([saved[:4], saved[3:]], "add", "test: section 'vioapic' came twice"),
            ([saved[:4], [replace(saved[4], name="nosuch")]], "add", "test: section 'nosuch' is unknown to this vmmpy"),
            ([saved[:vlapic], [bad_payload]], "add", "test: section 'vlapic': vcpus"),
            ([saved[:4], saved[5:]], "restore", f"test: kernel section '{saved[4].name}' is missing"),
        ]
        for parts, where, sentence in cases:
            loader = MachineSectionLoader(target, what="test")
            with pytest.raises(SectionError, match=re.escape(sentence)):
                for part in parts:
                    loader.add(part)
                assert where == "restore", f"every part of {sentence!r} was taken"
                loader.restore()
            assert save_sections(target) == before, f"{sentence!r} changed the machine"
    finally:
        for machine in (source, target):
            machine.destroy()


def test_pausing_and_resuming_at_arbitrary_points_changes_nothing():
    reference, ref_console = boot(BUSY, "m-ref2")
    assert run_to_end(reference) == EXIT_POWEROFF
    expected = final_state(reference)
    machine, console = boot(BUSY, "m-pauses")
    pauses = 0
    for _ in range(200):
        if machine.exit_status is not None:
            break
        try:
            machine.pause()
        except OSError:
            break  # it finished between our check and the pause
        pauses += 1
        machine.resume()
        time.sleep(0.0005)
    assert run_to_end(machine) == EXIT_POWEROFF
    assert pauses > 2
    assert final_state(machine) == expected
    assert console.output == ref_console.output


def test_pausing_a_stopped_machine_is_refused():
    machine, _ = boot(HELLO, "m-stopped")
    assert machine.wait(30) == EXIT_POWEROFF
    try:
        with pytest.raises(OSError, match="has stopped"):
            machine.pause()
    finally:
        machine.close()


def test_throttling_changes_the_pace_not_the_result():
    """Auto-converge runs the vCPU in short budgets with sleeps between: the guest must end in
    exactly the state of a full-speed run (budget ends are host policy, not guest events)."""
    reference, ref_console = boot(BUSY, "m-ref3")
    assert run_to_end(reference) == EXIT_POWEROFF
    machine, console = boot(BUSY, "m-throttled")
    machine.set_throttle(0.3)
    assert run_to_end(machine, timeout=60) == EXIT_POWEROFF
    assert machine.vm.stats[0]["budget_returns"] > 10, "it really ran in short budgets"
    assert reference.vm.stats[0]["budget_returns"] == 0
    assert final_state(machine) == final_state(reference)
    assert console.output == ref_console.output


# The BSP starts vCPU 1 with a STARTUP IPI (vector 8: rip = 8 * 4 KiB, below 1 MiB as on a PC).
# The AP adds to a shared counter in a loop and halts for good; the BSP waits for the count,
# prints, and powers off.
SMP = """
.equ COM1, 0x3f8
.equ PM1A_CNT, 0x404
.equ LAPIC, 0xfee00000
.org 0x8000
ap:     movabs rsi, counter
        mov rcx, 1000
again:  ld64 rax, [rsi + 0]
        inc rax
        st64 [rsi + 0], rax
        dec rcx
        jnz again
        cli
        hlt                         ; this AP is done: halted for good, the BSP goes on
.org 0x100000
start:  movabs rbx, LAPIC
        mov rax, 0x1ff
        st32 [rbx + 0xf0], rax      ; software-enable the lapic
        mov rax, 0x01000000
        st32 [rbx + 0x310], rax     ; ICR high: destination APIC ID 1
        mov rax, 0x4500
        st32 [rbx + 0x300], rax     ; INIT
        mov rax, 0x4608
        st32 [rbx + 0x300], rax     ; STARTUP, vector 8
        movabs rsi, counter
wait:   ld64 rax, [rsi + 0]
        cmp rax, 1000
        jb wait
        mov rax, 'A'
        out8 COM1, rax
        mov rax, 0x3400
        out16 PM1A_CNT, rax
        hlt
.align 8
counter: .qword 0
"""


def test_application_processors_wait_for_a_startup_ipi():
    machine, console = boot(SMP, "m-smp", ncpus=2)
    assert run_to_end(machine) == EXIT_POWEROFF
    assert console.output == b"A"
    assert machine.vm.stats[1]["startup_ipis"] == 1
    assert machine.vm.vcpus[1].instructions_retired > 4000


def test_a_vm_halts_only_when_every_started_vcpu_has_halted():
    idle_aps = PRELUDE + "start: cli\nhlt\n"  # the APs are never started: the BSP's halt is the last
    machine, _ = boot(idle_aps, "m-smp-halt", ncpus=3)
    assert run_to_end(machine) == EXIT_HALT
