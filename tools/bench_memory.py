#!/usr/bin/env python3
"""Memory-core benchmark driver: the Rust figures beside this machine's limits.

Runs `cargo bench --bench memory` (benches/memory.rs: dirty harvest, residency, page hashing,
zero detection, page batches over a socketpair and loopback TCP), then measures the limits those
figures should be read against, on this machine and in this run (the shared hosts drift 15-25%
between runs, see shared/reference/qemu-anchors.md):

* memcpy: numpy.copyto of a pre-faulted buffer (1 GiB by default) into another; bytes copied/s.
* loopback TCP: one stream over 127.0.0.1 between two processes in native code
  (examples/tcp_ceiling.rs): a ceiling no migration stream can pass.

and prints one table with a ratio column (figure / limit), or JSON with --json.

It owns no benchmark logic of its own beyond the limits; once the Python bindings of
vmm_core::wire and vmm_core::digest exist, the same hot paths measured from Python belong here too (they would show
the cost of crossing into Rust with the GIL released against these same limits).

Usage: tools/bench_memory.py [--quick] [--json] [--skip-cargo] [--memcpy-mib N] [--tcp-mib N]
numpy is needed for the memcpy limit (python3 -m venv .venv --system-site-packages;
.venv/bin/pip install numpy); without it the memcpy row falls back to a bytearray slice copy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.bench import limits

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
MIB = 1 << 20

UNITS = {"B/s": 1 / GIB, "KiB/s": 1 / (1 << 20), "MiB/s": 1 / 1024, "GiB/s": 1.0, "TiB/s": 1024.0}

# Which limit each benchmark group is read against, and what its throughput counts.
GROUP_LIMITS = {
    "batch_send_recv": ("loopback_tcp", "page bytes delivered into the destination guest"),
    "page_hash": ("memcpy", "guest bytes read"),
    "zero_detect": ("memcpy", "guest bytes read"),
    "dirty_harvest": (None, "guest bytes covered by the bitmap (bits, not memory)"),
    "resident_bitmap": (None, "guest bytes covered (mincore, memory not read)"),
}


def run_cargo_bench(quick: bool, filter_: str | None) -> list[dict]:
    cmd = ["cargo", "bench", "--bench", "memory", "--"]
    if quick:
        cmd.append("--quick")
    if filter_:
        cmd.append(filter_)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"bench_memory: `{' '.join(cmd)}` failed with exit code {proc.returncode}")
    return parse_criterion(proc.stdout)


def parse_criterion(text: str) -> list[dict]:
    """Criterion prints `group/name`, then `time: [lo mid hi]`, then `thrpt: [lo mid hi]`."""
    results = []
    name = None
    time_mid = None
    for line in text.splitlines():
        stripped = line.strip()
        if re.fullmatch(r"[\w.-]+/[\w.-]+", stripped):
            name, time_mid = stripped, None
        elif stripped.startswith("time:") and name:
            time_mid = stripped.split("[", 1)[1].split()[2:4]
        elif stripped.startswith("thrpt:") and name:
            parts = stripped.split("[", 1)[1].rstrip("]").split()
            value, unit = float(parts[2]), parts[3]
            group = name.split("/", 1)[0]
            limit, counts = next(((lim, c) for prefix, (lim, c) in GROUP_LIMITS.items() if group.startswith(prefix)), (None, ""))
            results.append({
                "name": name,
                "gib_per_s": value * UNITS.get(unit, float("nan")),
                "time": " ".join(time_mid) if time_mid else "",
                "limit": limit,
                "counts": counts,
            })
            name = None
    return results


def memcpy_gib_s(size: int, runs: int) -> tuple[tuple[float, float, float], str]:
    """The memcpy limit, measured as the benchmark suite measures it (tools/bench/limits.py)."""
    fig = limits.memcpy(size, runs)
    return (fig.median, fig.low, fig.high), f"numpy.copyto {size // MIB} MiB, both buffers pre-faulted"


def loopback_tcp_gib_s(size: int, runs: int) -> tuple[tuple[float, float, float], str]:
    """The loopback TCP limit, measured as the benchmark suite measures it (the native ceiling)."""
    fig = limits.loopback_ceiling(size, runs)
    return (fig.median, fig.low, fig.high), f"{fig.how}, {size // MIB} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to criterion")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--skip-cargo", action="store_true", help="measure only the machine limits")
    ap.add_argument("--filter", help="criterion benchmark filter (a regex)")
    ap.add_argument("--memcpy-mib", type=int, default=1024)
    ap.add_argument("--tcp-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3, help="repetitions of each limit measurement (median)")
    args = ap.parse_args()

    benches = [] if args.skip_cargo else run_cargo_bench(args.quick, args.filter)
    memcpy, memcpy_how = memcpy_gib_s(args.memcpy_mib * MIB, args.runs)
    tcp, tcp_how = loopback_tcp_gib_s(args.tcp_mib * MIB, args.runs)
    limits = {
        "memcpy": {"gib_per_s": memcpy[0], "min": memcpy[1], "max": memcpy[2], "how": memcpy_how},
        "loopback_tcp": {"gib_per_s": tcp[0], "min": tcp[1], "max": tcp[2], "how": tcp_how},
    }
    for b in benches:
        lim = limits.get(b["limit"] or "")
        b["ratio"] = b["gib_per_s"] / lim["gib_per_s"] if lim else None

    report = {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()},
        "limits": limits,
        "benchmarks": benches,
    }
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
        return 0

    print(f"machine: {os.cpu_count()} CPUs, Linux {platform.release()}, Python {platform.python_version()}")
    print()
    print(f"{'limit':<16}{'GiB/s':>10}  {'[min-max]':<16}how")
    for name, lim in limits.items():
        print(f"{name:<16}{lim['gib_per_s']:>10.2f}  [{lim['min']:.2f}-{lim['max']:.2f}]{'':<4}{lim['how']}")
    if benches:
        print()
        print(f"{'benchmark':<62}{'GiB/s':>10}{'limit':>14}{'ratio':>8}  throughput counts")
        for b in benches:
            ratio = f"{b['ratio']:.2f}" if b["ratio"] is not None else "-"
            print(f"{b['name']:<62}{b['gib_per_s']:>10.2f}{b['limit'] or '-':>14}{ratio:>8}  {b['counts']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
