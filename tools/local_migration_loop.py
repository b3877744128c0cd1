"""Hand a running guest from vmmrun to vmmrun on this host N times (default 20) with local
migrations, then check that it ends exactly as a run that was never migrated.

    .venv/bin/python tools/local_migration_loop.py [--hops N] [--sweeps S] [--dir DIR]

The guest is abtest (32 MiB, memfd-backed), migrated while it runs; each hop starts a new
``vmmrun -R unix:PATH`` and asks the current one ``vmmctl --migrate-local unix:PATH``. Every hop's
console is its own file; at the end their concatenation must be abtest's exact output. Prints
each hop's downtime and the result; exits 1 on any difference. Bounded: every wait has a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MiB = 1 << 20


def vmmrun(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vmmpy.cli.vmmrun", f"--run-dir={run_dir}", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def vmmctl(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={run_dir}", *args],
                          capture_output=True, text=True, timeout=120)


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise SystemExit(f"vmmrun exited {proc.returncode} before {what}: {proc.stderr.read().strip()}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hops", type=int, default=20)
    ap.add_argument("--sweeps", type=int, default=200_000, help="abtest's sweeps: long enough to outlast the hops")
    ap.add_argument("--dir", type=Path, help="where sockets and consoles go (default: a temporary directory)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = args.dir or Path(tmp)
        run_dir.mkdir(parents=True, exist_ok=True)
        sweeps = args.sweeps
        guest = ["--guest", "abtest", "--guest-arg", f"sweeps={sweeps}", "--guest-arg", f"report={sweeps // 4}", "-m", "32M"]
        consoles = [run_dir / "hop0.log"]
        procs = [vmmrun(run_dir, *guest, "--memory-backing", "memfd", "-l", f"com1,{consoles[0]}", "hop0")]
        downtimes = []
        try:
            wait_for(lambda: (run_dir / "hop0.ctl").exists(), procs[0], "hop0's control socket")
            for n in range(1, args.hops + 1):
                sock = run_dir / f"hop{n}.mig"
                consoles.append(run_dir / f"hop{n}.log")
                procs.append(vmmrun(run_dir, "-m", "32M", "-l", f"com1,{consoles[-1]}", "-R", f"unix:{sock}", f"hop{n}"))
                wait_for(sock.exists, procs[-1], f"hop{n} to listen")
                result = vmmctl(run_dir, f"--vm=hop{n - 1}", "--migrate-local", f"unix:{sock}", "--json")
                if result.returncode != 0:
                    print(f"hop {n}: failed: {result.stderr.strip()}")
                    return 1
                downtimes.append(json.loads(result.stdout)["downtime_ms"])
                if procs[-2].wait(timeout=60) != 0:
                    print(f"hop {n}: the old vmmrun exited {procs[-2].returncode}")
                    return 1
                print(f"hop {n}: downtime {downtimes[-1]:.2f} ms")
            status = procs[-1].wait(timeout=600)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=30)
        step = sweeps // 4
        pages = (32 * MiB - 2 * MiB) // 4096
        expected = "".join(f"abtest: sweep {k}\n" for k in range(step, sweeps + 1, step))
        expected += f"abtest: done {sweeps} sweeps over {pages} pages, all counters {sweeps}\n"
        text = "".join(c.read_text() if c.exists() else "" for c in consoles)
        still_running_at_first = "done" not in consoles[0].read_text()
        ok = status == 1 and text == expected and still_running_at_first
        print(f"{args.hops} hops; downtime median {statistics.median(downtimes):.2f} ms, max {max(downtimes):.2f} ms; "
              f"guest exit {status}; console {'exact' if text == expected else 'DIFFERS'}; "
              f"{'the guest ran through the hops' if still_running_at_first else 'the guest had finished before the first hop'}")
        if text != expected:
            print(text, file=sys.stderr)
        return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
