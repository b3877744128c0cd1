"""The main job: a guest boots, is checkpointed and restored, and migrates warm and live.

Everything runs as a user would run it: vmmrun processes and vmmctl commands, on loopback.
Each stage prints what it did and what it measured, and checks the guest's own verdict: the
abtest guest keeps a counter in every page and verifies them all at the end, so a page lost or
stale anywhere on the way shows up as a MISMATCH.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import vmmpy
from vmmpy.units import format_size

SWEEPS = 3000
MEMORY = "64M"
PAGES = (64 - 2) * 256
LIVE_SWEEPS = 150_000  # over 6 MiB: a few seconds of guest time, so it is busy through every round


def vmmrun(run_dir: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vmmpy.cli.vmmrun", f"--run-dir={run_dir}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def vmmctl(run_dir: Path, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={run_dir}", *args],
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"vmmctl {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout


def wait_for(run_dir: Path, name: str, state: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vmmrun {name} exited {proc.returncode}: {proc.stderr.read()}")
        if (run_dir / f"{name}.ctl").exists():
            out = subprocess.run([sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={run_dir}", f"--vm={name}", "--status", "--json"],
                                 capture_output=True, text=True, timeout=60)
            if out.returncode == 0 and json.loads(out.stdout)["state"] == state:
                return
        time.sleep(0.05)
    raise SystemExit(f"{name} did not become {state}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def verdict(*consoles: Path, sweeps: int = SWEEPS, pages: int = PAGES) -> str:
    text = "".join(c.read_text() for c in consoles)
    last = text.strip().splitlines()[-1]
    expected = f"abtest: done {sweeps} sweeps over {pages} pages, all counters {sweeps}"
    if last != expected:
        raise SystemExit(f"the guest reports: {last!r}; expected {expected!r}")
    return last


def memory_stage() -> None:
    mem = vmmpy.GuestMemory("5G")
    rng = np.random.default_rng(7)
    pages = rng.choice(mem.lowmem.pages, size=10_000, replace=False)
    for pfn in pages:
        mem.write(int(pfn) * vmmpy.PAGE_SIZE, b"dirty")
    t0 = time.perf_counter()
    harvested = mem.get_and_clear_dirty()
    took = time.perf_counter() - t0
    assert np.array_equal(harvested, np.sort(pages)), "harvest must report exactly the written pages"
    print(f"memory: 5 GiB guest ({mem.dirty_tracking} dirty tracking); harvest found the {harvested.size} "
          f"written pages in {took * 1e3:.2f} ms; {format_size(mem.resident_pages() * 4096)} resident")


def checkpoint_stage(run_dir: Path) -> None:
    console, copy = run_dir / "ckp.log", run_dir / "ckp-restored.log"
    guest = ["--guest", "abtest", "--guest-arg", f"sweeps={SWEEPS}", "--guest-arg", f"report={SWEEPS}", "-m", MEMORY]
    proc = vmmrun(run_dir, *guest, "-l", f"com1,{console}", "--pause-at=20000000", "demo-ckp")
    wait_for(run_dir, "demo-ckp", "paused", proc)
    status = json.loads(vmmctl(run_dir, "--vm=demo-ckp", "--status", "--json"))
    print(f"boot: abtest in a {format_size(status['memsize'])} guest ({status['vendor']} vCPU, {status['tsc']} TSC, "
          f"{status['dirty_tracking']} dirty tracking), paused by --pause-at after 20,000,000 instructions")
    ckp = run_dir / "demo.ckp"
    print("checkpoint:", vmmctl(run_dir, "--vm=demo-ckp", f"--checkpoint={ckp}").strip())
    vmmctl(run_dir, "--vm=demo-ckp", "--resume")
    if proc.wait(timeout=300) != 1:
        raise SystemExit(f"the original guest ended with {proc.returncode}: {proc.stderr.read()}")
    print("  original guest finished:", verdict(console))
    t0 = time.perf_counter()
    restored = subprocess.run([sys.executable, "-m", "vmmpy.cli.vmmrun", f"--run-dir={run_dir}", "-r", str(ckp),
                               "--restore-mode", "lazy", "-l", f"com1,{copy}", "demo-ckp2"], capture_output=True, text=True, timeout=300)
    if restored.returncode != 1:
        raise SystemExit(f"restored guest ended with {restored.returncode}: {restored.stderr}")
    print(f"restore: vmmrun -r (lazy) ran the saved guest to the end in {time.perf_counter() - t0:.2f} s:", verdict(copy))


def migration_stage(run_dir: Path, live: bool) -> None:
    """Warm: the guest is paused mid-run and moved. Live: a guest sweeping a 6 MiB working set
    flat out is moved while it runs, in rounds, with a 20 ms downtime target."""
    kind = "live" if live else "warm"
    src_console, dst_console = run_dir / f"{kind}-src.log", run_dir / f"{kind}-dst.log"
    port = free_port()
    dest = vmmrun(run_dir, "-m", MEMORY, "-l", f"com1,{dst_console}", "-R", f"127.0.0.1:{port}", f"demo-{kind}-dst")
    sweeps, end = (LIVE_SWEEPS, "8M") if live else (SWEEPS, "end of lowmem")
    guest = ["--guest", "abtest", "--guest-arg", f"sweeps={sweeps}", "--guest-arg", f"report={sweeps}", "-m", MEMORY]
    if live:
        guest += ["--guest-arg", f"end={end}"]
    source = vmmrun(run_dir, *guest, "-l", f"com1,{src_console}", "--pause-at=1" if live else "--pause-at=30000000", f"demo-{kind}-src")
    wait_for(run_dir, f"demo-{kind}-src", "paused", source)
    if live:
        vmmctl(run_dir, f"--vm=demo-{kind}-src", "--resume")
        action = ["--migrate-live", "127.0.0.1", str(port), "--downtime-ms", "20"]
    else:
        action = ["--migrate", "127.0.0.1", str(port)]
    print(f"{kind} migration:", vmmctl(run_dir, f"--vm=demo-{kind}-src", *action).strip())
    if source.wait(timeout=60) != 0 or dest.wait(timeout=300) != 1:
        raise SystemExit(f"after the {kind} migration: source {source.returncode}, destination {dest.returncode}: {dest.stderr.read()}")
    pages = PAGES if not live else (8 - 2) * 256
    print("  the guest finished on the destination:", verdict(src_console, dst_console, sweeps=sweeps, pages=pages))


def main() -> int:
    memory_stage()
    with tempfile.TemporaryDirectory(prefix="vmmpy-demo-") as tmp:
        run_dir = Path(tmp)
        os.chmod(run_dir, 0o700)
        checkpoint_stage(run_dir)
        migration_stage(run_dir, live=False)
        migration_stage(run_dir, live=True)
    print("demo: all stages passed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
