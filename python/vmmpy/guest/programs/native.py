"""The guest programs as real x86-64 code, for the KVM vCPU (``vmmrun --accel kvm``).

Same names, arguments, console lines and memory contracts as the simulated builds beside this
file (docs/guests.md); encoded by ``guest/x86.py``. The VMM enters them in 64-bit long mode at
``start`` with rsp at 1 MiB (identity-mapped, flat segments: docs/kvm.md). They print through
COM1 (``out`` to 0x3f8, no LSR polling: the UART is always ready) and power off by writing S5
to the PM1a control port.

- ``abtest``: the page-counter oracle, register r8 = sweeps done (``abtest.check_counters``
  holds). ``rate`` (pacing by the 1 GHz simulated TSC) has no x86 build and is refused.
- ``console``: the local APIC timer (KVM's in-kernel LAPIC, 1 GHz at divide-by-1, periods of
  at least 200 us) ticks
  ``period_us``; an IDT in the image sends its vector to a handler that counts ticks in memory
  (label ``tick_count``) and writes EOI; the main loop ``sti; hlt``s and prints every ``every``
  ticks, and after ``ticks`` ticks says it is done and powers off.
- ``memtouch``: the same pages in the same order from the same seed (xorshift64), write number n
  stored at the page's first byte; ``rate`` is refused as for abtest.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from .. import platform as P
from ..asm import Program
from ..x86 import X86
from . import abtest, console, memtouch
from ._common import ArgReader

LAPIC_BASE = 0xFEE0_0000
#: KVM's in-kernel local APIC counts at 1 GHz at divide-by-1 (its default bus cycle of 1 ns), not
#: the simulated platform's 128 MiHz; KVM also makes a periodic timer at least 200 us long.
KVM_LAPIC_TIMER_HZ = 1_000_000_000
KVM_LONGEST_PERIOD_US = console.MAX_COUNT * 1_000_000 // KVM_LAPIC_TIMER_HZ
UNROLL = abtest.UNROLL


def _routines(x: X86) -> None:
    """print_str (rbx = a NUL-terminated string), print_dec / print_hex (rax = the value), and
    poweroff. Each keeps every register but rax, rbx."""
    x.label("print_str")
    x.push("rdx")
    x.mov_imm("rdx", P.COM1_THR)
    x.label("print_str_next")
    x.load_byte_al("rbx")
    x.test_al()
    x.j("z", "print_str_done")
    x.out_al()
    x.inc("rbx")
    x.jmp("print_str_next")
    x.label("print_str_done")
    x.pop("rdx")
    x.ret()

    x.label("print_dec")
    x.push("rcx")
    x.mov_imm("rcx", 10)
    x.jmp("print_num")
    x.label("print_hex")
    x.push("rcx")
    x.mov_imm("rcx", 16)
    x.label("print_num")  # rax in base rcx; rcx pushed by the caller's entry
    x.push("rdx")
    x.mov_imm("rbx", 0)  # digits pushed
    x.label("print_num_divide")
    x.xor("rdx", "rdx")
    x.div("rcx")
    x.push("rdx")
    x.inc("rbx")
    x.test("rax", "rax")
    x.j("nz", "print_num_divide")
    x.mov_imm("rdx", P.COM1_THR)
    x.label("print_num_digit")
    x.pop("rax")
    x.mov_imm("rcx", 10)
    x.cmp("rax", "rcx")
    x.j("b", "print_num_decimal")
    x.add_imm("rax", ord("a") - 10 - ord("0"))
    x.label("print_num_decimal")
    x.add_imm("rax", ord("0"))
    x.out_al()
    x.dec("rbx")
    x.j("nz", "print_num_digit")
    x.pop("rdx")
    x.pop("rcx")
    x.ret()

    x.label("poweroff")
    x.mov_imm("rdx", P.PM1A_CNT_PORT)
    x.mov_imm("rax", P.POWEROFF_VALUE)
    x.out_ax()
    x.label("poweroff_wait")
    x.jmp("poweroff_wait")


def _print(x: X86, label: str) -> None:
    x.mov_address("rbx", label)
    x.call("print_str")


def _report(x: X86, every: int, countdown: str, count: str, before: str, after: str) -> None:
    """Every ``every`` times here (``countdown`` counts down to it): print ``before``, the
    decimal value of register ``count``, ``after``."""
    x.dec(countdown)
    x.j("nz", f"{countdown}_reported")
    x.mov_imm(countdown, every)
    _print_value(x, before, count, after)
    x.label(f"{countdown}_reported")


def _again_until(x: X86, count: str, scratch: str, total: int, loop: str) -> bool:
    """Jump back to ``loop`` forever (``total`` 0) or while register ``count`` is below ``total``
    (held in ``scratch``); whether the code after it is reached."""
    if total == 0:
        x.jmp(loop)
        return False
    x.mov_imm(scratch, total)
    x.cmp(count, scratch)
    x.j("b", loop)
    return True


def _print_value(x: X86, before: str | None, value: str, after: str) -> None:
    """Print the string ``before`` (if any), register ``value`` in decimal, the string ``after``."""
    if before:
        _print(x, before)
    x.mov("rax", value)
    x.call("print_dec")
    _print(x, after)


def _finish(x: X86, name: str, strings: dict[str, str]) -> Program:
    for label, text in strings.items():
        x.asciz(label, text)
    program = x.program()
    if program.end > P.IMAGE_LIMIT:
        raise ValueError(f"{name}: the x86-64 image ends at {program.end:#x}, past the image window's end {P.IMAGE_LIMIT:#x}")
    return program


def build_abtest(args: dict[str, str], memsize: int, lowmem_size: int, highmem_size: int) -> Program:
    ranges, sweeps, report, rate = abtest.plan(args, lowmem_size, highmem_size)
    if rate:
        raise ValueError("abtest: rate: pacing runs by the simulated vCPU's 1 GHz TSC and has no x86-64 build; "
                         "leave rate out (or 0) with --accel kvm")
    x = X86(P.IMAGE_BASE)
    x.label("start")
    x.mov_imm(abtest.SWEEP_REGISTER, 0)
    x.mov_imm("r9", report)
    x.label("sweep")
    for index, (base, pages) in enumerate(ranges):
        groups, tail = divmod(pages, UNROLL)
        x.mov_imm("rsi", base)
        if groups:
            x.mov_imm("rdi", base + groups * UNROLL * P.PAGE_SIZE)
            x.label(f"sweep_range{index}")
            for k in range(UNROLL):
                x.inc_mem("rsi", k * P.PAGE_SIZE)
            x.add_imm("rsi", UNROLL * P.PAGE_SIZE)
            x.cmp("rsi", "rdi")
            x.j("b", f"sweep_range{index}")
        for k in range(tail):
            x.inc_mem("rsi", k * P.PAGE_SIZE)
    x.inc(abtest.SWEEP_REGISTER)
    if report:
        _report(x, report, "r9", abtest.SWEEP_REGISTER, "msg_sweep", "msg_newline")
    if _again_until(x, abtest.SWEEP_REGISTER, "r10", sweeps, "sweep"):
        for index, (base, pages) in enumerate(ranges):
            x.mov_imm("rsi", base)
            x.mov_imm("rdi", base + pages * P.PAGE_SIZE)
            x.label(f"verify_range{index}")
            x.load("rax", "rsi")
            x.cmp("rax", "r10")
            x.j("ne", "mismatch")
            x.add_imm("rsi", P.PAGE_SIZE)
            x.cmp("rsi", "rdi")
            x.j("b", f"verify_range{index}")
        _print_value(x, "msg_done", "r10", "msg_over")
        x.mov_imm("r11", sum(pages for _, pages in ranges))
        _print_value(x, None, "r11", "msg_all")
        _print_value(x, None, "r10", "msg_newline")
        x.call("poweroff")
        x.label("mismatch")  # rsi = the page, rax = its counter, r10 = expected
        x.mov("r11", "rax")
        _print(x, "msg_mismatch")
        x.mov("rax", "rsi")
        x.call("print_hex")
        _print_value(x, "msg_counter", "r11", "msg_expected")
        _print_value(x, None, "r10", "msg_newline")
        x.call("poweroff")
    _routines(x)
    return _finish(x, abtest.NAME, {
        "msg_sweep": "abtest: sweep ", "msg_newline": "\n", "msg_done": "abtest: done ",
        "msg_over": " sweeps over ", "msg_all": " pages, all counters ", "msg_mismatch": "abtest: MISMATCH page 0x",
        "msg_counter": " counter ", "msg_expected": " expected "
    })


def _next_random(x: X86) -> None:
    """r12 = xorshift64(r12) (shifts 13, 7, 17); clobbers rax."""
    for shift, left in ((13, True), (7, False), (17, True)):
        x.mov("rax", "r12")
        (x.shl if left else x.shr)("rax", shift)
        x.xor("r12", "rax")


def _remainder(x: X86, dst: str, divisor: int) -> None:
    """dst = rax mod divisor, rax = rax / divisor (unsigned); clobbers rdx, r9."""
    x.xor("rdx", "rdx")
    x.mov_imm("r9", divisor)
    x.div("r9")
    x.mov(dst, "rdx")


def build_memtouch(args: dict[str, str], memsize: int, lowmem_size: int, highmem_size: int) -> Program:
    pages, pattern, rate, seed, writes, report = memtouch.plan(args, lowmem_size)
    if rate:
        raise ValueError("memtouch: rate: pacing runs by the simulated vCPU's 1 GHz TSC and has no x86-64 build; "
                         "leave rate out (or 0) with --accel kvm")
    hot = memtouch.hot_pages(pages)
    x = X86(P.IMAGE_BASE)
    x.label("start")
    x.mov_imm("r12", memtouch.initial_state(seed))  # generator state
    x.mov_imm("r13", 0)  # writes done
    x.mov_imm("r14", report)  # writes to the next report
    x.mov_imm("r15", P.WORKLOAD_BASE)
    x.mov_imm("rcx", 0)  # sequential: the next page
    x.label("write")  # pick a page index into rbx
    if pattern == "sequential":
        x.mov("rbx", "rcx")
        x.inc("rcx")
        x.mov_imm("rax", pages)
        x.cmp("rcx", "rax")
        x.j("b", "pick_done")
        x.mov_imm("rcx", 0)
    elif pattern == "random":
        _next_random(x)
        x.mov("rax", "r12")
        _remainder(x, "rbx", pages)
    else:
        _next_random(x)
        x.mov("rax", "r12")
        _remainder(x, "r10", 10)  # r10 = x mod 10, rax = x / 10
        x.mov_imm("r9", 9)
        x.cmp("r10", "r9")
        x.j("b", "pick_hot")
        _remainder(x, "rbx", max(1, pages - hot))
        x.mov_imm("r9", hot)
        x.add("rbx", "r9")
        x.jmp("pick_done")
        x.label("pick_hot")
        _remainder(x, "rbx", hot)
    x.label("pick_done")
    x.inc("r13")
    x.mov("rax", "rbx")
    x.shl("rax", 12)
    x.add("rax", "r15")
    x.store("rax", 0, "r13")
    if report:
        _report(x, report, "r14", "r13", "msg_progress", "msg_writes")
    if _again_until(x, "r13", "rax", writes, "write"):
        _print_value(x, "msg_done", "r13", "msg_writes")
        x.call("poweroff")
    _routines(x)
    return _finish(x, memtouch.NAME, {"msg_progress": "memtouch: ", "msg_done": "memtouch: done ", "msg_writes": " writes\n"})


def _gate(handler: int) -> bytes:
    """A 64-bit interrupt gate to ``handler`` (code segment 0x8, present, DPL 0, type 0xE)."""
    low = (handler & 0xFFFF) | 0x8 << 16 | 0x8E << 40 | ((handler >> 16) & 0xFFFF) << 48
    return struct.pack("<QQ", low, handler >> 32)


def build_console(args: dict[str, str], memsize: int, lowmem_size: int, highmem_size: int) -> Program:
    a = ArgReader(console.NAME, args, console.ARGUMENTS)
    period_us = a.integer("period_us", minimum=1, maximum=KVM_LONGEST_PERIOD_US)
    every = a.integer("every")
    ticks = a.integer("ticks")
    vector = a.integer("vector", minimum=0x20, maximum=0xFE)
    x = X86(P.IMAGE_BASE)
    x.label("start")
    x.mov_address("rbx", "idt_pointer")
    x.lidt("rbx")
    x.mov_imm("rbx", LAPIC_BASE)
    for offset, value in ((P.LAPIC_SVR, 0x1FF), (P.LAPIC_TIMER_DIVIDE_CONFIG, 0xB),
                          (P.LAPIC_LVT_TIMER, vector | P.LVT_TIMER_PERIODIC), (P.LAPIC_TIMER_INITIAL_COUNT, period_us * KVM_LAPIC_TIMER_HZ // 1_000_000)):
        x.mov_imm("rax", value)
        x.store32("rbx", offset, "rax")
    x.mov_imm("r12", every)  # the next tick to print at
    x.label("wait")
    x.sti_hlt_cli()
    x.mov_address("rsi", "tick_count")
    x.load("r13", "rsi")
    if every:
        x.cmp("r13", "r12")
        x.j("b", "printed")
        _print_value(x, "msg_tick", "r12", "msg_newline")
        x.add_imm("r12", every)
        x.label("printed")
    if ticks:
        x.mov_imm("r14", ticks)
        x.cmp("r13", "r14")
        x.j("b", "wait")
        _print(x, "msg_done")
        x.call("poweroff")
    else:
        x.jmp("wait")

    x.label("tick")  # the timer's handler: count, EOI, return
    x.push("rax")
    x.push("rbx")
    x.mov_address("rbx", "tick_count")
    x.inc_mem("rbx")
    x.mov_imm("rbx", LAPIC_BASE)
    x.mov_imm("rax", 0)
    x.store32("rbx", P.LAPIC_EOI, "rax")
    x.pop("rbx")
    x.pop("rax")
    x.iretq()
    x.label("ignore")  # every other vector: return at once (no EOI: none of them is the LAPIC's)
    x.iretq()
    _routines(x)
    x.align(8)
    x.quad("tick_count")
    x.align(16)
    x.label("idt")
    x.raw(bytes(256 * 16))  # filled in below, when the handlers' addresses are known
    x.label("idt_pointer")
    x.raw(struct.pack("<HQ", 256 * 16 - 1, x.labels["idt"]))
    program = _finish(x, console.NAME, {"msg_tick": "console: tick ", "msg_newline": "\n", "msg_done": "console: done\n"})
    code = bytearray(program.code)
    idt = program.symbols["idt"] - program.origin
    for v in range(256):
        handler = program.symbols["tick" if v == vector else "ignore"]
        code[idt + 16 * v: idt + 16 * v + 16] = _gate(handler)
    return Program(bytes(code), program.symbols, program.origin)


def native_programs(program: Callable[..., Any]) -> dict[str, Any]:
    """The programs with an x86-64 build, by name, each made by ``program(name, description,
    arguments, build)`` (the registry's GuestProgram)."""
    return {module.NAME: program(module.NAME, module.DESCRIPTION, module.ARGUMENTS, build)
            for module, build in ((abtest, build_abtest), (console, build_console), (memtouch, build_memtouch))}
