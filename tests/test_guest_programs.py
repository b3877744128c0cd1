"""The shipped guest programs, run on a bare vCPU (vmmpy.guest.runner): each prints exactly what
docs/guests.md says and leaves memory exactly as specified; the migration oracle catches a lost
page; memtouch is deterministic and paced; hash equals its Python reference; console programs
the local APIC as expected; bad arguments are refused by name."""

import struct

import pytest

from vmmpy import _core
from vmmpy.guest import platform as P
from vmmpy.guest.programs import PROGRAMS, load_program, memory_layout, parse_guest_args
from vmmpy.guest.programs import hash as hash_program
from vmmpy.guest.programs import memtouch as memtouch_program
from vmmpy.guest.runner import FakeLapic, boot, run_bare, run_vcpu

MiB = 1 << 20
PAGE = P.PAGE_SIZE
MEMSIZE = 4 * MiB  # lowmem only: image at 1 MiB, workload 2..4 MiB


def build(name, memsize=MEMSIZE, lowmem_limit=None, **args):
    low, high = memory_layout(memsize, *(() if lowmem_limit is None else (lowmem_limit,)))
    return PROGRAMS[name].build({k: str(v) for k, v in args.items()}, memsize, low, high)


def qword(memory, gpa):
    return struct.unpack("<Q", memory.read(gpa, 8))[0]


def counters(memory, start, end):
    return [qword(memory, gpa) for gpa in range(start, end, PAGE)]


# ---- platform -------------------------------------------------------------------------------


def test_platform_poweroff_value_is_s5_with_slp_en():
    assert P.POWEROFF_VALUE == 0x3400
    assert P.is_poweroff(0x404, 2, 0x3400)
    assert not P.is_poweroff(0x404, 2, 0x1400)  # SLP_EN clear
    assert not P.is_poweroff(0x404, 2, 0x2000 | (1 << 10))  # S1, not S5


def test_platform_lapic_timer_counts_once_per_guest_ns_at_divide_by_1():
    from vmmpy.vmm.vlapic import BUS_FREQ_HZ

    assert P.LAPIC_TIMER_HZ_AT_DIVIDE_1 == BUS_FREQ_HZ, "guests must count the timer the VM's vlapic counts"
    assert P.TSC_HZ == 1_000_000_000
    one = P.lapic_timer_ns_per_count(P.DIVIDE_BY_1)
    assert one == P.TSC_HZ / BUS_FREQ_HZ
    assert P.lapic_timer_ns_per_count(0b0000) == 2 * one and P.lapic_timer_ns_per_count(0b1010) == 128 * one


def test_every_program_starts_at_start_inside_the_image_window():
    for name in PROGRAMS:
        image = build(name, memsize=128 * MiB)
        assert image.origin == P.IMAGE_BASE
        assert P.IMAGE_BASE <= image.symbols["start"] < image.end <= P.IMAGE_LIMIT


def test_runner_boots_as_the_loader_does():
    image = build("abtest", sweeps=1)
    memory = _core.GuestMemory(MEMSIZE)
    cpu = boot(image, memory)
    regs = cpu.registers()
    assert regs["rip"] == image.symbols["start"] and regs["rsp"] == P.STACK_TOP
    assert regs["rflags"] & (1 << 9) == 0
    assert memory.read(P.IMAGE_BASE, len(image.code)) == image.code


# ---- abtest ---------------------------------------------------------------------------------


def test_abtest_counts_every_page_k_times_and_says_so():
    result = run_bare(build("abtest", sweeps=5, report=2), MEMSIZE, 10**7)
    assert result.exit_reason == "poweroff"
    assert result.console == (
        b"abtest: sweep 2\nabtest: sweep 4\nabtest: done 5 sweeps over 512 pages, all counters 5\n"
    )
    assert counters(result.memory, 2 * MiB, 4 * MiB) == [5] * 512
    # Only the counter of each page is written.
    assert result.memory.read(2 * MiB + 8, PAGE - 8) == bytes(PAGE - 8)


def test_abtest_sweeps_only_its_range_including_a_partial_unroll():
    start, end = 2 * MiB + 3 * PAGE, 2 * MiB + 14 * PAGE  # 11 pages: one group of 8, 3 left
    result = run_bare(build("abtest", start=hex(start), end=hex(end), sweeps=3, report=0), MEMSIZE, 10**6)
    assert result.console == b"abtest: done 3 sweeps over 11 pages, all counters 3\n"
    assert counters(result.memory, 2 * MiB, 4 * MiB) == [0] * 3 + [3] * 11 + [0] * (512 - 14)


def test_abtest_highmem_sweeps_lowmem_range_then_all_of_highmem():
    image = build("abtest", memsize=6 * MiB, lowmem_limit=4 * MiB, end="0x208000", highmem="yes", sweeps=2)
    result = run_bare(image, 6 * MiB, 10**7, lowmem_limit=4 * MiB)
    assert result.console.endswith(b"abtest: done 2 sweeps over 520 pages, all counters 2\n")
    assert counters(result.memory, 2 * MiB, 0x208000) == [2] * 8
    assert counters(result.memory, P.HIGHMEM_BASE, P.HIGHMEM_BASE + 2 * MiB) == [2] * 512


def test_abtest_forever_keeps_sweeping_and_reporting():
    result = run_bare(build("abtest", end="0x210000", report=3), MEMSIZE, 200_000)
    assert result.exit_reason == "budget"
    lines = result.console.decode().splitlines()
    assert len(lines) >= 5
    assert lines[:5] == [f"abtest: sweep {n}" for n in (3, 6, 9, 12, 15)]
    values = counters(result.memory, 2 * MiB, 0x210000)
    assert min(values) >= 15 and max(values) - min(values) <= 1  # ascending: a prefix is one ahead


def test_abtest_names_a_page_whose_counter_is_wrong():
    memory = _core.GuestMemory(MEMSIZE)
    memory.write(0x234000, struct.pack("<Q", 7))  # as if a stale page arrived from elsewhere
    result = run_bare(build("abtest", sweeps=4, report=0), MEMSIZE, 10**7, memory=memory)
    assert result.exit_reason == "poweroff"
    assert result.console == b"abtest: MISMATCH page 0x234000 counter 11 expected 4\n"


@pytest.mark.parametrize("rate", [100, 7, 5000])
def test_abtest_rate_paces_its_sweep_by_the_tsc_and_still_checks_every_counter(rate):
    pages, sweeps = 11, 3  # 33 page increments; the group-of-8 sweep is replaced by a paced one
    image = build("abtest", end=hex(2 * MiB + pages * PAGE), sweeps=sweeps, report=0, rate=rate)
    result = run_bare(image, MEMSIZE, 10**8)
    assert result.console == b"abtest: done 3 sweeps over 11 pages, all counters 3\n"
    # Increment n waits for t0 + n * 1e6/rate; the last one is n = 32, then comes the final check
    # (a few instructions per page) and its line, one TSC tick per instruction.
    ns_per_page = 1_000_000 / rate
    assert 32 * ns_per_page <= result.vcpu.tsc <= 32 * ns_per_page + 2000
    unpaced = run_bare(build("abtest", end=hex(2 * MiB + pages * PAGE), sweeps=sweeps, report=0), MEMSIZE, 10**8)
    assert unpaced.vcpu.tsc < 2000


def test_abtest_paced_restarts_its_schedule_after_falling_behind():
    image = build("abtest", end=hex(2 * MiB + 64 * PAGE), report=0, rate=1000)  # a page per 1000 ns
    first = run_bare(image, MEMSIZE, 20_000)
    pages_before = sum(counters(first.memory, 2 * MiB, 2 * MiB + 64 * PAGE))
    first.vcpu.tsc_offset = 50_000_000  # 50 ms pass while the guest is stopped (a migration)
    run_vcpu(first.vcpu, first.memory, 20_000)
    pages_after = sum(counters(first.memory, 2 * MiB, 2 * MiB + 64 * PAGE))
    # No burst of 50 000 catch-up increments: the pace stays about one page per 1000 TSC ticks.
    assert 10 <= pages_after - pages_before < 40


def _migrate(cpu, memory, lose_page=None, stale_copy=None):
    """Copy memory and vCPU state into fresh objects, as a migration does; optionally put back
    an older copy of one page (a page the migration lost)."""
    dest = _core.GuestMemory(memory.memsize)
    dest.write(0, memory.read(0, memory.memsize))
    if lose_page is not None:
        dest.write(lose_page, stale_copy)
    dest_cpu = _core.Vcpu(dest)
    dest_cpu.restore_state(cpu.save_state())
    return dest_cpu, dest


def test_abtest_survives_a_faithful_migration_and_catches_a_lost_page():
    image = build("abtest", end="0x300000", sweeps=100, report=0)  # ~900 instructions a sweep
    first = run_bare(image, MEMSIZE, 20_000)  # some sweeps in
    assert first.exit_reason == "budget"
    page = 0x2C0000
    stale = first.memory.read(page, PAGE)
    more = run_vcpu(first.vcpu, first.memory, 2_000)  # the page changes after its copy was taken
    assert more.exit_reason == "budget" and first.memory.read(page, PAGE) != stale

    cpu, memory = _migrate(more.vcpu, more.memory)
    good = run_vcpu(cpu, memory, 10**6)
    assert good.console == b"abtest: done 100 sweeps over 256 pages, all counters 100\n"

    cpu, memory = _migrate(more.vcpu, more.memory, lose_page=page, stale_copy=stale)
    bad = run_vcpu(cpu, memory, 10**6)
    assert bad.console.startswith(b"abtest: MISMATCH page 0x2c0000 counter ")
    assert bad.console.endswith(b" expected 100\n")


# ---- memtouch -------------------------------------------------------------------------------


def expected_memtouch_memory(pattern, pages, seed, writes):
    """Each page holds the number of the last write that touched it (0 if none)."""
    values = [0] * pages
    for number, page in enumerate(memtouch_program.reference_pages(pattern, pages, seed, writes), start=1):
        values[page] = number
    return values


@pytest.mark.parametrize("pattern", memtouch_program.PATTERNS)
def test_memtouch_writes_the_pages_its_pattern_names(pattern):
    result = run_bare(build("memtouch", wss="128K", pattern=pattern, seed=11, writes=3000, report=1000), MEMSIZE, 10**7)
    assert result.exit_reason == "poweroff"
    assert result.console == (
        b"memtouch: 1000 writes\nmemtouch: 2000 writes\nmemtouch: 3000 writes\nmemtouch: done 3000 writes\n"
    )
    assert counters(result.memory, 2 * MiB, 2 * MiB + 128 * 1024) == expected_memtouch_memory(pattern, 32, 11, 3000)
    assert counters(result.memory, 2 * MiB + 128 * 1024, 4 * MiB) == [0] * (512 - 32)  # outside the set


def test_memtouch_hotcold_puts_nine_tenths_of_writes_in_the_hot_tenth():
    pages = memtouch_program.reference_pages("hotcold", 200, 5, 20_000)
    hot = sum(1 for p in pages if p < 20)
    assert 0.88 < hot / len(pages) < 0.92
    assert len(set(p for p in pages if p >= 20)) == 180  # the cold part is still all touched


def test_memtouch_is_deterministic_for_a_seed_and_differs_across_seeds():
    def digest(seed):
        image = build("memtouch", wss="1M", pattern="random", seed=seed, writes=2000, report=0)
        return _core.memory_digest(run_bare(image, MEMSIZE, 10**7).memory)

    assert digest(1) == digest(1)
    assert digest(1) != digest(2)


@pytest.mark.parametrize("rate", [100, 3, 7000])
def test_memtouch_rate_paces_writes_by_the_tsc(rate):
    writes = 40
    image = build("memtouch", wss="64K", pattern="sequential", rate=rate, writes=writes, report=0)
    ns_per_write = 1_000_000 / rate
    result = run_bare(image, MEMSIZE, 10**8)
    assert result.exit_reason == "poweroff"
    # The last write waits for t0 + (writes-1) * 1e6/rate; after it come a few dozen instructions
    # (the final line) and, with the instruction-count TSC, one tick per instruction.
    elapsed = result.vcpu.tsc
    assert (writes - 1) * ns_per_write <= elapsed <= (writes - 1) * ns_per_write + 1000
    unpaced = run_bare(build("memtouch", wss="64K", writes=writes, report=0), MEMSIZE, 10**8)
    assert unpaced.vcpu.tsc < 40 * writes + 1000


def test_memtouch_restarts_its_schedule_after_falling_behind():
    image = build("memtouch", wss="64K", rate=1000, writes=0, report=0)  # one write per 1000 ns
    first = run_bare(image, MEMSIZE, 20_000)
    done_before = first.vcpu.get_register("r13")
    first.vcpu.tsc_offset = 50_000_000  # 50 ms pass while the guest is stopped
    run_vcpu(first.vcpu, first.memory, 20_000)
    done_after = first.vcpu.get_register("r13")
    # No burst of 50 000 catch-up writes: the pace stays about one write per 1000 TSC ticks.
    assert done_after - done_before < 40


# ---- hash -----------------------------------------------------------------------------------


@pytest.mark.parametrize("qwords,rounds,seed", [(8, 4, 0), (1, 3, 12345), (512, 1, 2**64 - 1), (4, 0, 9)])
def test_hash_prints_the_reference_hash(qwords, rounds, seed):
    end = 0x240000
    image = build("hash", end=hex(end), rounds=rounds, seed=seed, qwords=qwords)
    result = run_bare(image, MEMSIZE, 10**8)
    expected = hash_program.reference_hash(2 * MiB, end, rounds, seed, qwords)
    assert result.exit_reason == "poweroff"
    assert result.console == f"hash: 0x{expected:016x}\n".encode()


def test_hash_depends_on_the_initial_memory():
    memory = _core.GuestMemory(MEMSIZE)
    memory.write(0x201000 + 3 * 512, struct.pack("<Q", 99))
    result = run_bare(build("hash", end="0x204000", rounds=2), MEMSIZE, 10**7, memory=memory)
    with_value = hash_program.reference_hash(2 * MiB, 0x204000, 2, 0, read_qword=lambda gpa: 99 if gpa == 0x201600 else 0)
    assert result.console == f"hash: 0x{with_value:016x}\n".encode()
    assert with_value != hash_program.reference_hash(2 * MiB, 0x204000, 2, 0)


def test_hash_changes_when_a_byte_it_wrote_goes_stale():
    image = build("hash", end="0x220000", rounds=4)
    clean = run_bare(image, MEMSIZE, 10**8).console
    partial = run_bare(image, MEMSIZE, 2_500)  # past round one (32 pages x ~60 instructions)
    assert partial.exit_reason == "budget" and qword(partial.memory, 0x210000) != 0
    partial.memory.write(0x210000, bytes(1))  # one byte reverts to its old value
    rest = run_vcpu(partial.vcpu, partial.memory, 10**8)
    assert rest.exit_reason == "poweroff"
    assert rest.console.startswith(b"hash: 0x") and rest.console != clean


# ---- console --------------------------------------------------------------------------------


def test_console_programs_the_lapic_timer_and_ticks():
    lapic = FakeLapic()
    image = build("console", period_us=250, every=4, ticks=10)
    count = 250 * P.LAPIC_TIMER_HZ_AT_DIVIDE_1 // 1_000_000
    period_ns = count * P.lapic_timer_ns_per_count(P.DIVIDE_BY_1)
    result = run_bare(image, MEMSIZE, 10**6, lapic=lapic)
    assert result.exit_reason == "poweroff"
    assert result.console == b"console: tick 4\nconsole: tick 8\nconsole: done\n"
    setup = [(offset, value) for offset, is_write, value in lapic.accesses[:4]]
    assert setup == [
        (P.LAPIC_SVR, P.SVR_APIC_ENABLE | 0xFF),
        (P.LAPIC_TIMER_DIVIDE_CONFIG, P.DIVIDE_BY_1),
        (P.LAPIC_LVT_TIMER, P.LVT_TIMER_PERIODIC | 0x40),
        (P.LAPIC_TIMER_INITIAL_COUNT, count),
    ]
    assert lapic.writes_to(P.LAPIC_EOI) == [0] * 10 and lapic.fired == 10
    # Ten periods of guest time passed (the guest sleeps between ticks), not a tick more.
    assert 10 * period_ns <= result.vcpu.tsc < 11 * period_ns
    table = image.symbols["vector_table"]
    handler = qword(result.memory, table + 8 * 0x40)
    assert handler == image.symbols["timer_handler"] and qword(result.memory, table) == image.symbols["other_interrupt"]
    assert qword(result.memory, image.symbols["tick_count"]) == 10


def test_console_forever_sleeps_between_ticks():
    lapic = FakeLapic()
    result = run_bare(build("console", vector="0x31", every=1, ticks=0, period_us=1), MEMSIZE, 3_000, lapic=lapic)
    assert result.exit_reason == "budget"
    assert result.console.startswith(b"console: tick 1\nconsole: tick 2\nconsole: tick 3\n")
    assert lapic.writes_to(P.LAPIC_LVT_TIMER) == [P.LVT_TIMER_PERIODIC | 0x31]


def test_console_without_a_lapic_is_an_unhandled_mmio_store():
    result = run_bare(build("console"), MEMSIZE, 10**5)
    assert result.exit_reason == f"unhandled:mmio write 4 bytes at {P.LAPIC_BASE + P.LAPIC_SVR:#x}"


# ---- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,args,message",
    [
        ("abtest", {"sweep": "3"}, "abtest: unknown argument 'sweep' (it takes start, end, highmem, sweeps, report, rate)"),
        ("abtest", {"sweeps": "many"}, "abtest: argument sweeps=many: is not a whole number"),
        ("abtest", {"sweeps": "-1"}, "abtest: argument sweeps=-1: must be in 0..18446744073709551615"),
        ("abtest", {"start": "0x1000"}, "abtest: argument start=0x1000: must be at least 0x200000"),
        ("abtest", {"start": "0x200800"}, "abtest: argument start=0x200800: must be a multiple of the page size"),
        ("abtest", {"end": "8M"}, "abtest: argument end=8M: is past the end of lowmem (0x400000)"),
        ("abtest", {"end": "2M"}, "abtest: argument end=2M: must be above start (0x200000)"),
        ("abtest", {"highmem": "maybe"}, "abtest: argument highmem=maybe: must be yes or no"),
        ("abtest", {"highmem": "yes"}, "abtest: argument highmem=yes: this VM has no highmem"),
        ("memtouch", {"pattern": "zigzag"}, "memtouch: argument pattern=zigzag: must be one of sequential, random, hotcold"),
        ("memtouch", {}, "memtouch: argument wss=64M: does not fit lowmem"),
        ("memtouch", {"wss": "5000"}, "memtouch: argument wss=5000: must be a multiple of the page size"),
        ("memtouch", {"wss": "4K", "pattern": "hotcold"}, "memtouch: argument wss=4K: must be at least 2 pages"),
        ("memtouch", {"wss": "1M", "rate": "lots"}, "memtouch: argument rate=lots: is not a whole number"),
        ("abtest", {"rate": "2000000000"}, "abtest: argument rate=2000000000: must be in 0..1000000000"),
        ("hash", {"qwords": "3"}, "hash: argument qwords=3: must be a power of two"),
        ("hash", {"qwords": "1024"}, "hash: argument qwords=1024: must be in 1..512"),
        ("console", {"period_us": "0"}, "console: argument period_us=0: must be in 1..31999999"),
        ("console", {"vector": "0x10"}, "console: argument vector=0x10: must be in 32..254"),
    ],
)
def test_bad_arguments_are_refused_by_name(name, args, message):
    with pytest.raises(ValueError) as info:
        PROGRAMS[name].build(args, MEMSIZE, MEMSIZE, 0)
    assert message in str(info.value)


def test_a_vm_too_small_for_the_platform_is_refused():
    with pytest.raises(ValueError, match="abtest: needs at least 2 MiB of lowmem"):
        PROGRAMS["abtest"].build({}, MiB, MiB, 0)


def test_parse_guest_args():
    assert parse_guest_args(["sweeps=100", "highmem=yes", "x="]) == {"sweeps": "100", "highmem": "yes", "x": ""}
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_guest_args(["sweeps"])
    with pytest.raises(ValueError, match="sweeps is given twice"):
        parse_guest_args(["sweeps=1", "sweeps=2"])


# ---- load_program -----------------------------------------------------------------------------


def test_load_program_builds_a_registered_program_for_the_memory_layout():
    image = load_program("abtest", {"sweeps": "1"}, memsize=6 * MiB)
    assert image.symbols["TOTAL_PAGES"] == (6 * MiB - 2 * MiB) // PAGE  # all lowmem: memsize < 3 GiB
    split = load_program("abtest", {"highmem": "yes"}, memsize=6 * MiB, lowmem_size=4 * MiB, highmem_size=2 * MiB)
    assert split.symbols["TOTAL_PAGES"] == (2 * MiB + 2 * MiB) // PAGE
    with pytest.raises(ValueError, match="unknown guest program 'abtset': choose one of abtest, memtouch, hash, console"):
        load_program("abtset", memsize=6 * MiB)


def test_load_program_assembles_a_source_file_with_its_arguments(tmp_path):
    source = tmp_path / "hello.s"
    source.write_text(
        "start:  mov rbx, GREETING\n"
        "        out8 0x3f8, rbx\n"
        "        mov rbx, GUEST_MEMSIZE >> 20\n"
        "        out8 0x3f8, rbx\n"
        "        mov rax, 0x3400\n"
        "        out16 0x404, rax\n"
    )
    image = load_program(str(source), {"GREETING": "0x41"}, memsize=4 * MiB)
    result = run_bare(image, MEMSIZE, 100)
    assert result.console == b"A\x04" and result.exit_reason == "poweroff"
    with pytest.raises(ValueError, match="GREETING=hi: a .s program takes whole numbers only"):
        load_program(str(source), {"GREETING": "hi"}, memsize=4 * MiB)
    broken = tmp_path / "broken.s"
    broken.write_text("begin: nop\n")
    with pytest.raises(ValueError, match="broken.s: no 'start' label"):
        load_program(str(broken), memsize=4 * MiB)


def test_halt_with_interrupts_off_is_reported_as_halted(tmp_path):
    source = tmp_path / "halt.s"
    source.write_text("start: cli\n hlt\n")
    result = run_bare(load_program(str(source), memsize=MEMSIZE), MEMSIZE, 100)
    assert result.exit_reason == "halted" and result.instructions == 2


def test_uart_status_reads_as_idle(tmp_path):
    source = tmp_path / "lsr.s"
    source.write_text("start: in8 rax, 0x3fd\n out8 0x3f8, rax\n cli\n hlt\n")
    result = run_bare(load_program(str(source), memsize=MEMSIZE), MEMSIZE, 100)
    assert result.console == bytes([P.LSR_IDLE])


def test_abtest_counters_can_be_checked_from_the_host_mid_sweep():
    from vmmpy.guest.programs import abtest

    ranges = abtest.sweep_ranges(2 * MiB, 4 * MiB, False, 0)
    result = run_bare(build("abtest", report=0), MEMSIZE, 5_000)  # stopped inside sweep 3
    done = result.vcpu.get_register(abtest.SWEEP_REGISTER)
    assert done == 2 and counters(result.memory, 2 * MiB, 2 * MiB + PAGE) == [3]
    assert abtest.check_counters(result.memory, ranges, done) is None
    result.memory.write(0x3F0000, struct.pack("<Q", done - 1))  # a page one sweep stale
    assert abtest.check_counters(result.memory, ranges, done) == 0x3F0000


def test_library_prints_numbers_at_their_limits():
    from vmmpy.guest.programs._common import assemble_program

    body = "start:\n"
    for value in (0, 7, 10, 2**64 - 1, 0xABC, 2**32):
        body += f"        movabs rbx, {value}\n        PRINT_DEC rbx\n        PRINT space\n"
        body += "        PRINT_HEX rbx\n        PRINT space\n        PRINT_HEX16 rbx\n        PRINT newline\n"
    body += "        mov rbx, 0x1234\n        call poweroff\nspace: .asciz \" \"\nnewline: .asciz \"\\n\"\n"
    result = run_bare(assemble_program("t", body, {}), MEMSIZE, 10**5)
    expected = "".join(f"{v} {v:x} {v:016x}\n" for v in (0, 7, 10, 2**64 - 1, 0xABC, 2**32))
    assert result.console.decode() == expected and result.exit_reason == "poweroff"
    assert result.vcpu.get_register("rbx") == 0x1234  # routines preserve the caller's registers
