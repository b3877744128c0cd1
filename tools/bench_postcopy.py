#!/usr/bin/env python3
"""Post-copy migration (issue 17): its cost beside a warm migration of the same guest, one run.

A memtouch guest (256 MiB by default, a working set of half of it, random writes flat out) is
migrated over loopback between two ``vmmpy.Vm``s in this process: warm (paused, every page, then
the commit), then in post-copy switched at round 0 and after 2 rounds, alternately, the best of
three of each. Printed per mode: the total time, the time from the source's pause to the guest
running on the destination (``running_after_ms``, the target: within 10 ms whatever the size),
the remote fault latency the destination measured (p50, p99, max; targets 100 us and 1 ms), the
vCPU time blocked on pages, pages fetched on request and in the background; and the total time
as a ratio of the warm migration's (the target: at most 1.1x). The machine's state is printed
with it (load average), as the other bench scripts do; nothing here is asserted.

Usage: tools/bench_postcopy.py [--mib N] [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from vmmpy import Vm

MODES = ("warm", "after=0", "after=2")


def one(mode: str, mib: int) -> dict:
    args = {"wss": f"{mib // 2}M", "pattern": "random", "writes": "400000000", "report": "0"}
    with Vm("memtouch", args=args, memory=f"{mib}M") as src, Vm.receive(memory=f"{mib}M") as dst:
        src.start()
        deadline = time.monotonic() + 60
        while src.machine.vm.memory.resident_pages() * 4096 < (mib // 2) << 20 and time.monotonic() < deadline:
            time.sleep(0.05)  # the working set touched once
        params = {} if mode == "warm" else {"postcopy": mode, "max_rounds": 30}
        t = time.monotonic()
        stats = src.migrate(*dst.address, live=mode != "warm", params=params)
        dstats = dst.received(120)
        total = (time.monotonic() - t) * 1000
        row = {"mode": mode, "total_ms": total, "downtime_ms": stats.downtime_ms}
        if stats.postcopy:
            pc, dpc = stats.postcopy, dstats.postcopy
            row.update(running_after_ms=pc["running_after_ms"], fault_p50_us=dpc["fault_p50_us"], fault_p99_us=dpc["fault_p99_us"],
                       fault_max_us=dpc["fault_max_us"], blocked_ms=dpc["blocked_ms"], requested_pages=dpc["requested_pages"],
                       pushed_pages=dpc["pushed_pages"], postcopy_ms=dpc["postcopy_ms"])
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="guest memory in MiB (default %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each mode, alternately (default %(default)s)")
    parser.add_argument("--json", action="store_true")
    a = parser.parse_args()
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    for _ in range(a.runs):
        for mode in MODES:
            results[mode].append(one(mode, a.mib))
    best = {m: min(rows, key=lambda r: r["total_ms"]) for m, rows in results.items()}
    warm = best["warm"]["total_ms"]
    for row in best.values():
        row["vs_warm"] = row["total_ms"] / warm
    out = {"mib": a.mib, "runs": a.runs, "load_average": os.getloadavg(), "best": best, "all": results}
    if a.json:
        print(json.dumps(out, indent=2))
        return
    print(f"post-copy vs warm, memtouch {a.mib} MiB (wss {a.mib // 2} MiB random), best of {a.runs}, "
          f"load average {out['load_average'][0]:.1f}")
    for mode, row in best.items():
        text = f"  {mode:8} total {row['total_ms']:8.1f} ms ({row['vs_warm']:.2f}x warm)"
        if "running_after_ms" in row:
            text += (f", running after {row['running_after_ms']:.1f} ms, faults p50 {row['fault_p50_us']} us p99 "
                     f"{row['fault_p99_us']} us max {row['fault_max_us']} us, blocked {row['blocked_ms']:.0f} ms, "
                     f"{row['requested_pages']} pages on request, {row['pushed_pages']} in the background")
        else:
            text += f", downtime {row['downtime_ms']:.1f} ms"
        print(text)


if __name__ == "__main__":
    main()
