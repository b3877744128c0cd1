#!/usr/bin/env python3
"""Run vmmpy's benchmark scenarios and print one table: vmmpy's figure (median [min-max] of N
runs), the machine limit measured in the same run, the ratio, QEMU's figure for the same work
measured in the same run with the ratio to it (only where Debian's qemu-system-x86 is installed;
``tools/bench/qemu.py``), and issue 8's target.

    .venv/bin/python -m tools.bench [--quick] [--json] [--only NAME[,NAME]] [--runs N] [--budget S] [--no-qemu] [--busy]
                                    [--settle S] [--hold-host-memory]

A run first waits, for at most ``--settle`` seconds, until the CPUs are quiet, so it does not
start beside the tail of the work before it; the report says how long that took, or that the
machine never settled. With ``--busy`` a CPU-bound neighbour (a process spinning, pinned to the last CPU) runs for the
whole run, as on a host that does other work; the report records the load average before the run
and after each scenario either way. On a VM that returns freed memory to its hypervisor the report
says how much went back during the run, and ``--hold-host-memory`` holds that off
(``tools/bench/hostmem.py``).
"""

from __future__ import annotations

import argparse
import atexit
import compileall
import datetime
import fnmatch
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # python tools/bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import vmmpy
from tools.bench import hostmem, qemu
from tools.bench.procs import die_with_parent
from tools.bench.scenarios import LIMITS, SCENARIOS, Context, touches
from tools.bench.stats import Figure, Row

COMPILED = "compiled before the run"
SPEEDUP_LEGEND = ("x QEMU: how many times better vmmpy did than QEMU on the same work, measured in this run "
                  "(rates: vmmpy / QEMU; times: QEMU / vmmpy); above 1 vmmpy is faster")


def qemu_status(binary: str | None, skipped: bool) -> str:
    if skipped:
        return "skipped (--no-qemu)"
    if binary is None:
        return f"not installed ({qemu.INSTALL})"
    return f"{qemu.version(binary)}, measured beside the rows it has an equivalent for"


def attach_qemu(bench: qemu.QemuBench, ctx: Context, rows: list[Row]) -> None:
    """Measure QEMU doing each row's work (once per kind of work) and put it beside the row."""
    for row in rows:
        work = qemu.WORK.get(row.scenario)
        if work is None:
            row.qemu_note = "no QEMU equivalent"
            judge_qemu(row, None, busy=ctx.busy)
            continue
        if time.monotonic() > ctx.deadline:
            row.qemu_note = "skipped: the budget ran out"
            judge_qemu(row, None, busy=ctx.busy)
            continue
        print(f"bench: QEMU for {row.scenario} ...", file=sys.stderr, flush=True)
        try:
            result = work(bench, ctx)
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            row.qemu_note = f"QEMU failed: {type(err).__name__}: {err}"
            judge_qemu(row, None, busy=ctx.busy)
            continue
        row.qemu, row.qemu_detail = result.figure, result.to_dict()
        row.qemu_ratio = qemu.speedup(row.figure, result.figure) if row.figure else None
        others = ", ".join(f"{label} {fig.text()}" for label, fig in result.others.items())
        row.notes.append(f"QEMU (same run): {result.how}" + (f"; {others}" if others else ""))
        judge_qemu(row, result, busy=ctx.busy)


def start_neighbour() -> subprocess.Popen:
    """The ``--busy`` neighbour: one process spinning on the last CPU this run may use, killed
    with the run (and by the kernel if the bench dies)."""
    cpu = max(os.sched_getaffinity(0))
    code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)


def judge_qemu(row: Row, result: qemu.QemuFigure | None, busy: bool = False) -> None:
    """Judge the row's targets against QEMU's figures of this run (``Row.qemu_min`` and
    ``qemu_also``; on a busy host each at 0.9 of itself, as issue 16 allows). ``met`` becomes
    the row's own target and these together; with no QEMU figure they stay unjudged, and the
    target says so, so a row never passes on a figure it was not compared with."""
    wanted = ({"": row.qemu_min} if row.qemu_min is not None else {}) | row.qemu_also
    if not wanted:
        return
    scale = 0.9 if busy else 1.0
    parts, verdicts = [], []
    for label, minimum in wanted.items():
        theirs = result.figure if result is not None and not label else (result.others.get(label) if result is not None else None)
        ratio = qemu.speedup(row.figure, theirs) if row.figure and theirs else None
        parts.append(f">= {minimum * scale:.2g} x QEMU{f' ({label})' if label else ''}")
        verdicts.append(None if ratio is None else ratio >= minimum * scale)
        if label and ratio is not None:
            row.notes.append(f"x QEMU ({label}): {ratio:.2f}")
    judged = None if None in verdicts else all(verdicts)
    row.target = "; ".join(([row.target] if row.target else []) + parts)
    if judged is None:
        if row.met is not None:
            row.notes.append(f"the targets other than QEMU's were {'met' if row.met else 'NOT met'}")
        row.notes.append("QEMU not measured in this run: the row is not judged")
        row.met = None
    else:
        row.met = judged and row.met is not False


def select(names: str | None, quick: bool) -> list[str]:
    if not names:
        return [n for n, (_, in_quick) in SCENARIOS.items() if in_quick or not quick]
    chosen = []
    for pattern in names.split(","):
        # A scenario's own name picks it alone (``warm-1g`` is not also every ``warm-1g-*``);
        # anything else picks every name it is a prefix or a glob of.
        hits = [pattern] if pattern in SCENARIOS else [n for n in SCENARIOS if fnmatch.fnmatch(n, pattern) or n.startswith(pattern)]
        if not hits:
            raise SystemExit(f"bench: no scenario matches {pattern!r}; scenarios: {', '.join(SCENARIOS)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat's first line (idle and
    iowait count as not busy)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])  # guest time is already inside user and nice
    return total - idle, total


#: What "quiet" means before a run: under this share of every CPU busy over a second, twice in a row.
QUIET_SHARE = 0.10


def settle(limit: float, sample=cpu_times, sleep=time.sleep, clock=time.monotonic) -> dict:
    """Wait until the machine is quiet (two 1-second samples in a row with under
    ``QUIET_SHARE`` of all CPUs busy), for at most ``limit`` seconds, so a run does not start
    beside the tail of the last one (a load average takes minutes to forget it). Returns what the
    report records: the seconds waited, the busy share of the last second, and whether it settled."""
    started = clock()
    quiet_in_a_row, share = 0, None
    before = sample()
    while limit > 0:
        sleep(1.0)
        now = sample()
        spent = now[1] - before[1]
        share = (now[0] - before[0]) / spent if spent > 0 else 0.0
        before = now
        quiet_in_a_row = quiet_in_a_row + 1 if share < QUIET_SHARE else 0
        if quiet_in_a_row >= 2:
            return {"waited_s": round(clock() - started, 1), "busy_share": round(share, 3), "settled": True}
        if clock() - started >= limit:
            break
    return {"waited_s": round(clock() - started, 1), "busy_share": None if share is None else round(share, 3), "settled": limit <= 0}


def settle_text(report: dict) -> str:
    s = report.get("settle")
    if not s:
        return ""
    if s["busy_share"] is None:
        return "; not waited for quiet (--settle 0)"
    if s["settled"]:
        return f"; quiet after {s['waited_s']:g} s"
    return f"; NOT QUIET: still {s['busy_share']:.0%} busy after waiting {s['waited_s']:g} s"


def machine_info() -> dict:
    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem / (1 << 30), 1), "kernel": platform.release(),
            "python": platform.python_version(), "load_average": os.getloadavg()}


def compile_bytecode(package: Path) -> str:
    """Compile the bytecode of the vmmpy package at ``package`` (the one imported) before anything
    is timed, as installing a wheel does (and ``tools/setup.sh``). A row that times ``vmmrun``
    from the command would otherwise count compiling every module it imports where
    PYTHONDONTWRITEBYTECODE is set, or after an edit: about 0.3 s of CPU, which an installed
    vmmpy never spends. Returns what the report says (the table shows it unless compiled)."""
    if not (package / "__init__.py").is_file():
        return f"not compiled: no package at {package.name}"
    ok = compileall.compile_dir(str(package), quiet=2)  # nothing printed: --json owns stdout
    return COMPILED if ok else "compiling failed: modules are compiled on import"


def row_from_dict(d: dict) -> Row:
    def fig(x):
        return Figure(x["runs"], x["unit"], x.get("how", "")) if x else None

    d = dict(d)
    if isinstance(d.get("qemu"), str):  # reports from before the QEMU column: the status text
        d["qemu_note"], d["qemu"] = d.pop("qemu"), None
    return Row(**{**d, "figure": fig(d["figure"]), "limit": fig(d["limit"]), "qemu": fig(d.get("qemu"))})


def qemu_measured(rows: list[Row]) -> bool:
    return any(r.qemu is not None or r.qemu_note.startswith("QEMU failed") for r in rows)


def load_during(report: dict) -> str:
    samples = report.get("load", {}).get("during", [])
    if not samples:
        return ""
    ones = Figure([x[0] for x in samples], "")
    return f" before, {ones.median:.2f} [{ones.low:.2f}-{ones.high:.2f}] during"


def print_table(report: dict, rows: list[Row]) -> None:
    m = report["machine"]
    with_qemu = qemu_measured(rows)  # else the header line says why, once, and the columns are left out
    print(f"vmmpy bench  {report['date']}  {m['cpus']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}, "
          f"load {m['load_average'][0]:.2f}{load_during(report)}{settle_text(report)}; {report['runs']} runs per figure; "
          f"QEMU: {report['qemu']}"
          + ("" if with_qemu else "; no QEMU column"))
    if report.get("busy"):
        print(f"BUSY: {report['busy']}")
    if hostmem.text(report.get("host_memory")):
        print(hostmem.text(report.get("host_memory")))
    if report.get("bytecode", COMPILED) != COMPILED:
        print(f"BYTECODE: {report['bytecode']}: the rows that start vmmrun count compiling it")
    header = ("scenario", "vmmpy: median [min-max]", "limit (same run)", "ratio",
              *(("QEMU (same run)", "x QEMU") if with_qemu else ()), "target", "met")
    table = [header]
    for r in rows:
        limit = f"{r.limit_name} {r.limit.text()}" if r.limit else "-"
        met = "error" if r.error else ("-" if r.met is None else ("yes" if r.met else "NO"))
        qemu_cells: tuple[str, ...] = ()
        if with_qemu:
            qemu_text = r.qemu.text() if r.qemu else ("failed" if r.qemu_note.startswith("QEMU failed") else "-")
            qemu_cells = (qemu_text, f"{r.qemu_ratio:.2f}" if r.qemu_ratio is not None else "-")
        table.append((r.scenario, r.figure.text() if r.figure else (r.error or "-")[:40], limit,
                      f"{r.ratio:.2f}" if r.ratio is not None else "-", *qemu_cells, r.target or "-", met))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if with_qemu:
        print(SPEEDUP_LEGEND)
    print()
    for r in rows:
        line = "; ".join(n for n in r.notes + ([r.qemu_note] if r.qemu_note.startswith("QEMU failed") else []) if n)
        print(f"{r.scenario}: {r.what}" + (f" -- {line}" if line else "") + (f" -- ERROR {r.error}" if r.error else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one run per figure, skip the 4 GiB migration and the 16 GiB restore")
    ap.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    ap.add_argument("--only", metavar="NAME[,NAME]", help=f"scenarios to run: a name picks that scenario alone, a prefix or a glob every one it matches "
                         f"(warm-1g-*): {', '.join(SCENARIOS)}")
    ap.add_argument("--runs", type=int, help="runs per figure (default 3, 1 with --quick)")
    ap.add_argument("--budget", type=float, default=900.0, metavar="SECONDS",
                    help="stop starting scenarios after this long (default 900); skipped ones are reported")
    ap.add_argument("--disk", default=None, metavar="DIR", help="a directory on disk for checkpoints and O_DIRECT (default: the repository's .bench/)")
    ap.add_argument("--tmpfs", default="/dev/shm", metavar="DIR", help="a tmpfs directory for images and tmpfs checkpoints")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument("--show", metavar="FILE", help="print the table of a report saved with --json, and exit")
    ap.add_argument("--no-qemu", action="store_true", help="do not measure QEMU even where qemu-system-x86_64 is on PATH")
    ap.add_argument("--settle", type=float, default=120.0, metavar="SECONDS",
                    help="before anything is measured, wait until the CPUs are quiet (under 10%% busy for two seconds "
                         "in a row), for at most this long (default 120; 0: do not wait); the report says how it went")
    ap.add_argument("--busy", action="store_true",
                    help="run a CPU-bound neighbour on one core for the whole run (a busy host); targets against QEMU "
                         "are then judged at 0.9 of themselves")
    ap.add_argument("--hold-host-memory", action="store_true",
                    help="on a VM whose kernel returns freed memory to its hypervisor (free page reporting), turn that "
                         "off for the run and back on at its end, so no run pays the hypervisor's faults on memory the "
                         "run before freed (QEMU's runs and vmmpy's alike); needs root. Without it the report says how "
                         "much memory went back during the run")
    args = ap.parse_args(argv)
    if args.show:
        with open(args.show) as f:
            saved = json.load(f)
        print_table(saved, [row_from_dict(r) for r in saved["rows"]])
        return 0
    if args.list:
        for name, (_, in_quick) in SCENARIOS.items():
            print(f"{name}{'' if in_quick else '   (not in --quick)'}")
        return 0
    names = select(args.only, args.quick)
    runs = args.runs or (1 if args.quick else 3)
    root = Path(__file__).resolve().parents[2]
    disk = args.disk or str(root / ".bench")
    os.makedirs(disk, exist_ok=True)
    reporting = hostmem.Reporting(back_bytes=touches(names))
    if args.hold_host_memory:
        # Before the wait for quiet: touching the memory is work the machine settles after.
        print("bench: holding the host's memory ...", file=sys.stderr, flush=True)
        # The order comes back however the bench ends: normally, on an exception, on Ctrl-C or on
        # SIGTERM (made an exit here); only SIGKILL leaves it held, until a reboot.
        atexit.register(reporting.release)
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        reporting.hold()
    if args.settle > 0:
        print(f"bench: waiting for the machine to be quiet (at most {args.settle:g} s) ...", file=sys.stderr, flush=True)
    settled = settle(args.settle)
    if args.settle > 0 and not settled["settled"]:
        print(f"bench: the machine is still {settled['busy_share']:.0%} busy after {settled['waited_s']:g} s; "
              "running anyway (the report says so)", file=sys.stderr, flush=True)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="vmmpy-bench-"))
    ctx = Context(work=work, shm=args.tmpfs, disk=disk, runs=runs, quick=args.quick, deadline=started + args.budget, busy=args.busy)
    binary = None if args.no_qemu else qemu.find_binary()
    report = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": machine_info(),
              "runs": runs, "qemu": qemu_status(binary, args.no_qemu), "scenarios": names,
              "load": {"before": os.getloadavg(), "during": []}, "settle": settled,
              "bytecode": compile_bytecode(Path(vmmpy.__file__).parent)}
    bench = qemu.QemuBench(binary, work, args.tmpfs, runs) if binary else None
    rows: list[Row] = []
    neighbour = None
    try:
        if args.busy:
            neighbour = start_neighbour()
            report["busy"] = f"a neighbour spun on CPU {max(os.sched_getaffinity(0))} for the whole run (pid {neighbour.pid})"
        for name in LIMITS:  # every limit first, so they are all measured in this run
            print(f"bench: measuring limit {name} ...", file=sys.stderr, flush=True)
            ctx.limit(name)
        for name in names:
            if time.monotonic() > ctx.deadline:
                rows.append(Row(name, "skipped", error=f"skipped: the {args.budget:g} s budget ran out"))
                continue
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            t = time.monotonic()
            try:
                new = SCENARIOS[name][0](ctx)
            except Exception as err:
                traceback.print_exc(file=sys.stderr)
                new = [Row(name, "failed", error=f"{type(err).__name__}: {err}")]
            if bench is not None:
                attach_qemu(bench, ctx, new)
            else:
                for row in new:
                    judge_qemu(row, None, busy=ctx.busy)
            rows += new
            report["load"]["during"].append(os.getloadavg())
            print(f"bench: {name} took {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    finally:
        report["host_memory"] = reporting.report()
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait(10)
        if bench is not None:
            bench.close()
        ctx.drop_images()
        shutil.rmtree(work, ignore_errors=True)
        reporting.release()
    report["limits"] = {k: v.to_dict() for k, v in ctx.limits.items()}
    report["rows"] = [r.to_dict() for r in rows]
    report["seconds"] = round(time.monotonic() - started, 1)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print_table(report, rows)
        print(f"\n{report['seconds']} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
