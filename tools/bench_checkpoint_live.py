#!/usr/bin/env python3
"""Live checkpoint figures beside this machine's disk limit, measured in the same run.

For each guest size a real vmmrun runs memtouch writing as fast as it can (random pages over a
working set of ``--wss``, the rest of memory never touched), and ``vmmctl --checkpoint --live``
is taken three times while it writes: how long the guest was paused (vmmrun's own figure: from
the pause request to the resume), how long the whole checkpoint took, how many pages the guest
wrote first (copied out before its write), and, beside them, an O_DIRECT write of the same
number of bytes to the same directory (``bench_checkpoint_diff.odirect_write``). The target of
issue #18: paused at most 5 ms whatever the size (reported, not asserted).

Usage: tools/bench_checkpoint_live.py [--dir DIR] [--gib N ...] [--wss SIZE] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_checkpoint_diff import in_scratch_dir, odirect_write

RUNS = 3


def _vmmctl(run_dir: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={run_dir}", *args, "--json"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"vmmctl {' '.join(args)}: {done.stderr.strip()}")
    return json.loads(done.stdout) if done.stdout.strip() else {}


def measure(directory: str, gib: int, wss: str) -> dict:
    name = f"live{gib}"
    console = os.path.join(directory, f"{name}.log")
    proc = subprocess.Popen([sys.executable, "-m", "vmmpy.cli.vmmrun", f"--run-dir={directory}", "--guest", "memtouch",
                             "--guest-arg", f"wss={wss}", "--guest-arg", "pattern=random", "--guest-arg", "report=1000000",
                             "-m", f"{gib}G", "-l", f"com1,{console}", name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while "writes" not in (open(console).read() if os.path.exists(console) else ""):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vmmrun {name} did not start memtouch: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
            time.sleep(0.05)
        runs = []
        for attempt in range(RUNS):
            path = os.path.join(directory, f"{name}-{attempt}.ckp")
            started = time.perf_counter()
            result = _vmmctl(directory, f"--vm={name}", f"--checkpoint={path}", "--live")
            result["vmmctl_seconds"] = time.perf_counter() - started
            runs.append(result)
            for suffix in ("", ".kern", ".meta"):
                os.unlink(path + suffix)
        _vmmctl(directory, f"--vm={name}", "--destroy")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    written = runs[-1]["bytes_written"]
    return {
        "guest_gib": gib, "wss": wss, "bytes_written": written,
        "paused_ms": [round(r["guest_paused_seconds"] * 1e3, 2) for r in runs],
        "write_s": [round(r["write_seconds"], 3) for r in runs],
        "copied_before_write_pages": [r["copied_before_write_pages"] for r in runs],
        "throttled_writes": [r["throttled_writes"] for r in runs],
        "odirect_write_s": round(min(odirect_write(directory, written) for _ in range(RUNS)), 3),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=None, help="a directory on the disk to measure (default: a temporary one here)")
    parser.add_argument("--gib", type=int, nargs="+", default=[1, 16], help="guest sizes in GiB (default 1 16)")
    parser.add_argument("--wss", default="256M", help="memtouch's working set: what the guest touches and rewrites (default 256M)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = in_scratch_dir(args.dir, "bench-live-", lambda directory: [measure(directory, gib, args.wss) for gib in args.gib])
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        print(f"live checkpoint, {r['guest_gib']} GiB guest, {r['wss']} rewritten flat out: guest paused "
              f"{' / '.join(f'{ms:.2f}' for ms in r['paused_ms'])} ms (target <= 5 ms); written in "
              f"{' / '.join(f'{s:.3f}' for s in r['write_s'])} s ({r['bytes_written'] >> 20} MiB; O_DIRECT write of the same "
              f"{r['odirect_write_s']:.3f} s); pages copied before the guest wrote them "
              f"{' / '.join(str(n) for n in r['copied_before_write_pages'])}, writes throttled "
              f"{' / '.join(str(n) for n in r['throttled_writes'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
