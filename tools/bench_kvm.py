#!/usr/bin/env python3
"""KVM backend benchmark (docs/kvm.md, "Measured"): figures printed, never asserted.

Rows:

* abtest page sweeps: pages incremented per second by abtest (unpaced, 16 MiB, report=0) on the
  simulated vCPU and under KVM (``--accel kvm``), and their ratio (issue #20's target: 50x);
  plus KVM's raw instruction rate (a ``dec; jnz`` loop), which says whether this host's KVM runs
  guest code natively or emulates it.
* dirty harvest (get and clear, as runs: ``GuestMemory.get_and_clear_dirty_ranges``, what a
  migration round starts with) of a clean 64 GiB KVM
  guest (target <= 1 ms), and of a 1 GiB KVM guest whose every swept page the guest wrote once
  (target <= 2 ms); the median of ``--repeat`` runs.
* live migration of an idle 1 GiB KVM guest (the console guest asleep in ``hlt`` on its APIC
  timer) over loopback: downtime (target <= 10 ms), total time, pages sent.
* live migration of a 1 GiB KVM guest running memtouch (random writes over 64 MiB, unpaced) with
  the link capped (``bandwidth_cap``) at 4x the rate memtouch dirties distinct pages, measured
  first over 50 ms windows (the target: at a quarter of the link it converges within the 10 ms
  downtime target): whether it converged, its downtime and rounds.

Usage: tools/bench_kvm.py [--json] [--repeat N] [--skip-migration]
Skips everything (saying why) where /dev/kvm cannot be opened.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from vmmpy import GuestMemory, Vm, _core
from vmmpy.guest import platform as P
from vmmpy.guest.x86 import X86

GIB = 1 << 30


def abtest_pages_per_s(accel: str, sweeps: int) -> float:
    memory = 16 << 20
    pages = (memory - P.WORKLOAD_BASE) // P.PAGE_SIZE
    with Vm("abtest", args={"sweeps": sweeps, "report": 0}, memory=memory, accel=accel) as vm:
        t0 = time.perf_counter()
        vm.start()
        assert vm.wait(600) == 1, vm.exit_reason
        return sweeps * pages / (time.perf_counter() - t0)


def kvm_instructions_per_s(iterations: int = 2_000_000) -> float:
    """Two instructions (dec rcx; jnz) per iteration, timed around one KVM_RUN."""
    memory = GuestMemory(8 << 20, dirty_tracking="kvm")
    x = X86(P.IMAGE_BASE)
    x.label("start")
    x.mov_imm("rcx", iterations)
    x.label("loop")
    x.dec("rcx")
    x.j("nz", "loop")
    x.mov_imm("rdx", P.COM1_THR)
    x.out_al()
    program = x.program()
    memory.write(program.origin, program.code)
    vcpu = _core.KvmVcpu(memory.core, 0)
    vcpu.enter_long_mode(memory.core, program.symbols["start"], P.STACK_TOP)
    t0 = time.perf_counter()
    exit_ = vcpu.run()
    elapsed = time.perf_counter() - t0
    assert exit_.kind == "inout", exit_
    del vcpu
    memory.close()
    return 2 * iterations / elapsed


def harvest_ms(memory: GuestMemory, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        memory.get_and_clear_dirty_ranges()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def clean_harvest_ms(size: int, repeat: int) -> float:
    memory = GuestMemory(size, dirty_tracking="kvm")
    try:
        memory.get_and_clear_dirty()
        return harvest_ms(memory, repeat)
    finally:
        memory.close()


def dirty_harvest_ms(repeat: int) -> tuple[float, int]:
    """A 1 GiB KVM guest runs abtest until it has swept once more than the last harvest, each time."""
    times, pages = [], 0
    with Vm("abtest", args={"sweeps": 0, "report": 0}, memory=GIB, accel="kvm") as vm:
        memory, vcpu = vm.machine.vm.memory, vm.machine.vm.vcpus
        memory.get_and_clear_dirty()
        vm.start()
        for _ in range(repeat):
            vm.pause()
            start = vcpu[0].get_register("r8")
            memory.get_and_clear_dirty()
            vm.resume()
            deadline = time.monotonic() + 600
            while True:  # until a whole sweep has run since the harvest
                time.sleep(0.05)
                vm.pause()
                if vcpu[0].get_register("r8") >= start + 2 or time.monotonic() > deadline:
                    break
                vm.resume()
            t0 = time.perf_counter()
            ranges = memory.get_and_clear_dirty_ranges()
            times.append((time.perf_counter() - t0) * 1e3)
            pages = sum(r.length for r in ranges) // P.PAGE_SIZE
            vm.resume()
    return statistics.median(times), pages


def idle_live_migration() -> dict[str, float]:
    args = {"period_us": 10_000, "every": 0, "ticks": 0}
    with Vm("console", args=args, memory=GIB, accel="kvm") as src, Vm.receive(memory=GIB, accel="kvm") as dst:
        src.start()
        time.sleep(0.5)
        stats = src.migrate(*dst.address, live=True)
        assert dst.received(120).status == "completed"
        return {"downtime_ms": stats.downtime_ms, "total_time_ms": stats.total_time_ms, "rounds": len(stats.rounds),
                "pages_sent": sum(r.pages_sent for r in stats.rounds)}


MEMTOUCH = {"wss": "64M", "pattern": "random", "writes": 0, "report": 0, "seed": 5}


def memtouch_dirty_rate(window: float = 0.05, windows: int = 10) -> float:
    """Bytes/s of distinct pages memtouch dirties under KVM: the median over ``windows`` windows."""
    rates = []
    with Vm("memtouch", args=MEMTOUCH, memory=GIB, accel="kvm") as vm:
        memory = vm.machine.vm.memory
        vm.start()
        time.sleep(0.2)
        for _ in range(windows):
            memory.get_and_clear_dirty()
            t0 = time.perf_counter()
            time.sleep(window)
            pages = memory.get_and_clear_dirty().size
            rates.append(pages * P.PAGE_SIZE / (time.perf_counter() - t0))
    return statistics.median(rates)


def memtouch_quarter_link_migration(dirty_rate: float) -> dict[str, float]:
    cap = 4 * dirty_rate
    params = {"downtime_target_ms": 10.0, "bandwidth_cap": cap, "max_rounds": 30}
    with Vm("memtouch", args=MEMTOUCH, memory=GIB, accel="kvm") as src, Vm.receive(memory=GIB, accel="kvm") as dst:
        src.start()
        time.sleep(0.3)
        stats = src.migrate(*dst.address, live=True, params=params)
        assert dst.received(300).status == "completed"
        last = stats.rounds[-1] if stats.rounds else None
        return {"link_cap_bytes_per_s": cap, "dirty_bytes_per_s": dirty_rate, "downtime_ms": stats.downtime_ms,
                "total_time_ms": stats.total_time_ms, "rounds": len(stats.rounds),
                "converged": bool(stats.downtime_ms <= 10.0), "final_round_pages": last.pages_sent if last else 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--skip-migration", action="store_true")
    args = parser.parse_args()
    why = _core.kvm_unavailable()
    if why is not None:
        print(f"bench_kvm: skipped: KVM is not available here: {why}")
        return 0
    rows: dict[str, object] = {}
    sim = abtest_pages_per_s("sim", 200)
    kvm = abtest_pages_per_s("kvm", 50)
    rows["abtest_pages_per_s"] = {"sim": sim, "kvm": kvm, "kvm_over_sim": kvm / sim, "target_ratio": 50}
    rows["kvm_guest_instructions_per_s"] = kvm_instructions_per_s()
    rows["harvest_clean_64g_ms"] = {"median": clean_harvest_ms(64 * GIB, args.repeat), "target": 1.0}
    dirty_ms, dirty_pages = dirty_harvest_ms(args.repeat)
    rows["harvest_dirty_1g_ms"] = {"median": dirty_ms, "pages": dirty_pages, "target": 2.0}
    if not args.skip_migration:
        rows["idle_1g_live_migration"] = {**idle_live_migration(), "target_downtime_ms": 10.0}
        rows["memtouch_quarter_link_live_migration"] = {**memtouch_quarter_link_migration(memtouch_dirty_rate()),
                                                        "target_downtime_ms": 10.0}
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    ab = rows["abtest_pages_per_s"]
    print(f"abtest pages/s        sim {ab['sim']:,.0f}   kvm {ab['kvm']:,.0f}   kvm/sim {ab['kvm_over_sim']:.2f}x (target 50x)")
    print(f"KVM guest instr/s     {rows['kvm_guest_instructions_per_s']:,.0f}   (native hardware runs ~1e9; far less means KVM emulates)")
    print(f"harvest clean 64 GiB  {rows['harvest_clean_64g_ms']['median']:.3f} ms (target <= 1 ms)")
    print(f"harvest dirty 1 GiB   {dirty_ms:.3f} ms for {dirty_pages} pages (target <= 2 ms)")
    if "idle_1g_live_migration" in rows:
        m = rows["idle_1g_live_migration"]
        print(f"idle 1 GiB live mig.  downtime {m['downtime_ms']:.1f} ms (target <= 10 ms), total {m['total_time_ms']:.0f} ms, "
              f"{m['rounds']} rounds, {m['pages_sent']} pages sent")
        q = rows["memtouch_quarter_link_live_migration"]
        print(f"memtouch, link 4x its dirty rate  dirty {q['dirty_bytes_per_s'] / 2**20:.1f} MiB/s, link capped at "
              f"{q['link_cap_bytes_per_s'] / 2**20:.1f} MiB/s: downtime {q['downtime_ms']:.1f} ms (target <= 10 ms), "
              f"{q['rounds']} rounds, total {q['total_time_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
