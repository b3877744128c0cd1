"""Make a compatibility fixture set: a checkpoint and a recorded migration stream of a
deterministic guest, in the formats this vmmpy writes now, under ``tests/fixtures/compat/<NAME>/``.

    .venv/bin/python tools/make_compat_fixtures.py v1

The guest is ``abtest`` (16 MiB, 200 sweeps, a line every 20), paused by ``--pause-at`` partway.

- Checkpoint: vmmrun runs it, vmmctl suspends it; the three files are stored xz-compressed (the
  memory file is sparse and its counter pages repeat, so the set stays a few KiB).
- Migration stream: the same guest run in-process to the same point, and what a migration source
  sends of it recorded: round 0's page batches (the batch wire format, exactly the bytes
  ``send_all_pages`` writes to the socket) and the STATE message's payload (the section
  container). The handshake, framing and commit around them are left out on purpose: they carry
  per-session nonces and an HMAC, so a recording of them could never be replayed, and their
  compatibility is the handshake's own business (version and spec checks).
- ``console-before.txt`` is what the guest printed before the pause; the tests derive the rest.

NEVER regenerate an existing set: it stands for checkpoints users already have. When a format
or a section version changes, make a new set under a new name (v2, ...) and keep the old ones;
tests/test_compat_fixtures.py restores every set it finds.
"""

from __future__ import annotations

import json
import lzma
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUEST = ["--guest", "abtest", "--guest-arg", "sweeps=200", "--guest-arg", "report=20", "-m", "16M"]
PAUSE_AT = 700_001
NAME = "compat0"


def vmmctl(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={run_dir}", *args],
                          capture_output=True, text=True, timeout=120)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = ROOT / "tests" / "fixtures" / "compat" / argv[0]
    if out.exists():
        print(f"{out} exists: fixture sets are never regenerated; choose a new name", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        console = run_dir / "console.log"
        cmd = [sys.executable, "-m", "vmmpy.cli.vmmrun", f"--run-dir={run_dir}", *GUEST, "-l", f"com1,{console}",
               f"--pause-at={PAUSE_AT}", NAME]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                status = vmmctl(run_dir, f"--vm={NAME}", "--status", "--json")
                if status.returncode == 0 and json.loads(status.stdout).get("state") == "paused":
                    break
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit(f"the guest did not pause: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
                time.sleep(0.05)
            ckp = run_dir / f"{NAME}.ckp"
            saved = vmmctl(run_dir, f"--vm={NAME}", f"--suspend={ckp}")
            if saved.returncode != 0:
                raise SystemExit(saved.stderr)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.mkdir(parents=True)
        for suffix in ("", ".kern", ".meta"):
            data = (run_dir / f"{NAME}.ckp{suffix}").read_bytes()
            (out / f"{NAME}.ckp{suffix}.xz").write_bytes(lzma.compress(data, preset=9))
        before = console.read_text()
        (out / "console-before.txt").write_text(before)
        pages, state, batches, digest, console_output = record_migration(run_dir / "pages.bin")
        if console_output != before:
            raise SystemExit(f"the in-process run printed {console_output!r} before the pause, vmmrun {before!r}")
        (out / "migration-pages.bin.xz").write_bytes(lzma.compress(pages, preset=9))
        (out / "migration-state.bin.xz").write_bytes(lzma.compress(state, preset=9))
        args = {"guest": GUEST, "pause_at": PAUSE_AT, "name": NAME, "migration_batches": batches,
                "memory_digest": f"{digest:032x}"}
        (out / "args.json").write_text(json.dumps(args, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def machine_config():
    from vmmpy.runtime.config import VmConfig

    memsize = int(GUEST[GUEST.index("-m") + 1].rstrip("M")) << 20
    guest_args = dict(a.split("=", 1) for a in GUEST[GUEST.index("--guest-arg") + 1::2] if "=" in a)
    return VmConfig(name=NAME, memsize=memsize, guest=GUEST[1], guest_args=guest_args)


def record_migration(scratch: Path) -> tuple[bytes, bytes, int, int, str]:
    """Run the guest in-process to PAUSE_AT and record what a migration source sends of it (and
    the memory digest its COMMIT_REQUEST would carry)."""
    from vmmpy.devices.uart import CaptureConsole
    from vmmpy.guest.programs import load_program
    from vmmpy.runtime.process import Machine
    from vmmpy.state import encode_sections
    from vmmpy.state.kernel import save_sections

    config = machine_config()
    console = CaptureConsole()
    machine = Machine(config, consoles={"com1": console})
    try:
        machine.setup_memory()
        memory = machine.vm.memory
        highmem = memory.highmem.size if memory.highmem is not None else 0
        machine.load_program(load_program(config.guest, config.guest_args, memsize=config.memsize,
                                          lowmem_size=memory.lowmem.size, highmem_size=highmem))
        machine.pause_at = PAUSE_AT
        machine.start(serve_control=False)
        deadline = time.monotonic() + 60
        while not machine.paused:
            if machine.exit_status is not None or time.monotonic() > deadline:
                raise SystemExit(f"the in-process guest did not pause: {machine.exit_reason}")
            time.sleep(0.001)
        machine.pause()
        with open(scratch, "wb") as f:
            sent = memory.send_all_pages(f.fileno())
        state = encode_sections(save_sections(machine))
        return scratch.read_bytes(), state, sent["batches"], memory.commit_digest(), bytes(console.output).decode()
    finally:
        machine.destroy()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
