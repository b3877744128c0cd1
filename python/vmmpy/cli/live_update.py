"""Live update (issue 19): replace a running vmmrun by a new one (a new build, the same options)
that keeps the guest, its memory, its control socket name and its console.

``vmmctl --vm=NAME --live-update [--exec PATH]`` asks the running vmmrun, which:

1. starts its successor: ``PATH`` (default: this Python's ``-m vmmpy.cli.vmmrun``) with the
   options of the running guest (``-c``, ``-m``, ``-S``, ``-s``, ``-l``, ``--tsc``, ``--vendor``,
   ``--dirty-tracking``, ``--memory-backing``, ``--run-dir``, and ``--idle`` where it is not the
   default, so a default guest still updates to a build before it), ``-R unix:RUNDIR/NAME.update-PID.mig``
   and ``--take-name``, the same VMNAME; it inherits this process's stdin, stdout and stderr;
2. hands the guest over with a local migration (the guest's memory must be memfd-backed);
3. exits 0 once the successor confirms it runs the guest, as after any completed migration. The
   successor, holding the guest, then claims the name (its lock and control socket) as soon as
   this process has let it go, so vmmctl reaches it by the same name; it appends to the same
   console files.

Any failure before the confirmation leaves the guest here as it was (running, or paused) and the
successor is killed.
The successor is a new process (a new PID), not an exec of this one.
"""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..runtime.commands import MachineCommands
from ..runtime.config import VmConfig
from ..runtime.control import ControlError, guest_stays_here, run_dir
from ..runtime.process import Machine

#: How long the successor may take to start and listen, and to claim the name afterwards.
START_TIMEOUT_S = 60.0
CLAIM_TIMEOUT_S = 30.0


def successor_argv(args: argparse.Namespace, config: VmConfig, sock: Path, exe: str | None) -> list[str]:
    """The command line of a vmmrun that takes this guest over on ``sock``."""
    argv = [exe] if exe else [sys.executable, "-m", "vmmpy.cli.vmmrun"]
    argv += ["-c", str(config.ncpus), "-m", f"{config.memsize // 1024}K"]
    if config.wired:
        argv.append("-S")
    for slot in args.slots:
        argv += ["-s", slot]
    for device, backend in sorted(config.lpc.items()):
        argv += ["-l", f"{device},{backend}"]
    argv += ["--tsc", config.tsc, "--vendor", config.vendor, "--dirty-tracking", config.dirty_tracking,
             "--memory-backing", config.memory_backing, "--accel", config.accel]
    if config.idle != VmConfig.idle:
        argv += ["--idle", config.idle]
    if args.run_dir is not None:
        argv += ["--run-dir", str(args.run_dir)]
    argv += ["-R", f"unix:{sock}", "--accept-timeout", str(int(START_TIMEOUT_S)), "--take-name", config.name]
    return argv


def install(machine: Machine, commands: MachineCommands, args: argparse.Namespace) -> None:
    """Serve ``live-update`` on this vmmrun's control socket."""

    def live_update(request: dict[str, Any], progress) -> dict[str, Any]:
        exe = request.get("exec")
        if exe is not None and (not isinstance(exe, str) or not os.path.isabs(exe)):
            raise ValueError(f"--exec must be an absolute path (vmmctl makes it so), got {exe!r}")
        if exe is not None and not os.access(exe, os.X_OK):
            raise OSError(errno.ENOEXEC, f"--exec {exe}: not an executable file")
        if machine.vm.memory is not None and machine.vm.memory.backing != "memfd":
            raise OSError(errno.EINVAL, "a live update hands the guest's memory to the new vmmrun, so it must be memfd-backed; "
                                        "this guest's is anonymous: start it with --memory-backing memfd (-o memory.backing=memfd)")
        config = machine.config
        sock = (args.run_dir or run_dir()) / f"{config.name}.update-{os.getpid()}.mig"

        def stays() -> str:  # running, or paused as it was before the update
            return guest_stays_here(machine.status()["state"])

        child = subprocess.Popen(successor_argv(args, config, sock, exe))
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not sock.exists():
                if child.poll() is not None:
                    raise OSError(errno.ECHILD, f"the new vmmrun exited {child.returncode} before it listened on "
                                                f"unix:{sock} (its error is on this vmmrun's stderr); {stays()}")
                if time.monotonic() > deadline:
                    raise OSError(errno.ETIMEDOUT, f"the new vmmrun did not listen on unix:{sock} within "
                                                   f"{START_TIMEOUT_S:g} s; {stays()}")
                time.sleep(0.01)
            result = commands.migrate({"host": f"unix:{sock}", "port": 0, "live": False, "params": {}}, progress)
        except BaseException:
            if child.poll() is None:
                child.kill()
                child.wait(30)
            raise
        result["successor_pid"] = child.pid
        return result

    machine.add_control_handler("live-update", live_update)


def serve_when_free(machine: Machine, directory: Path | None, timeout: float = CLAIM_TIMEOUT_S) -> None:
    """The successor of a live update, running the guest: open the control socket under the
    guest's name as soon as the old vmmrun has let it go (it exits right after the hand-over)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            machine.serve(directory)
            return
        except ControlError as err:
            if err.errno != errno.EEXIST or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
