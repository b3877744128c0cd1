"""Make a compatibility fixture set: a suspended checkpoint of a deterministic guest, in the
format this vmmpy writes now, checked in under ``tests/fixtures/compat/<NAME>/``.

    .venv/bin/python tools/make_compat_fixtures.py v1

The guest is ``abtest`` (16 MiB, 200 sweeps, a line every 20), paused by ``--pause-at`` partway
and suspended with vmmctl; the three checkpoint files are stored xz-compressed (the memory file
is sparse and its counter pages repeat, so the set stays small). ``expected-console.txt`` holds
what the resumed guest must print.

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
        (out / "console-before.txt").write_text(console.read_text())
        (out / "args.json").write_text(json.dumps({"guest": GUEST, "pause_at": PAUSE_AT, "name": NAME}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
