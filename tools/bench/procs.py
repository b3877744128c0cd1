"""Real vmmrun processes for the scenarios, driven through their control sockets from this
process (so no vmmctl start-up lands inside a timed region)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from vmmpy.runtime.control import ControlClient, ControlError

from .images import LPC

PR_SET_PDEATHSIG = 1  # linux/prctl.h

#: A source is timed once it has finished starting, as QEMU's is once it answers QMP: vmmrun
#: imports the migration engine and numpy on a thread once its guest runs (``load_meanwhile``),
#: and a migration asked for meanwhile waited for them, 40-50 ms of a 0.3 s warm 1 GiB
#: (docs/performance.md, session 32). Finished means it used under SETTLE_BUSY_S of CPU in a
#: window of SETTLE_WINDOW_S; a source that stays busy (a guest running flat out) is waited for
#: SETTLE_LIMIT_S at most.
SETTLE_WINDOW_S = 0.1
#: Under two clock ticks of /proc's figure (10 ms each where USER_HZ is 100): a difference of
#: two ticks computed in floating point may come out a hair under 0.02.
SETTLE_BUSY_S = 0.015
SETTLE_LIMIT_S = 3.0


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def wait_settled(pid: int, limit: float = SETTLE_LIMIT_S) -> float:
    """Wait until process ``pid`` has finished starting (see SETTLE_WINDOW_S), at most ``limit``
    seconds; returns the seconds waited. A process that is gone ends the wait at once: the
    caller's next request to it says what happened."""
    started = time.monotonic()
    try:
        last = process_cpu_seconds(pid)
        while time.monotonic() - started < limit:
            time.sleep(SETTLE_WINDOW_S)
            now = process_cpu_seconds(pid)
            if now - last < SETTLE_BUSY_S:
                break
            last = now
    except (FileNotFoundError, ProcessLookupError):
        pass
    return time.monotonic() - started


def die_with_parent() -> None:
    """In a child before exec: SIGKILL when the bench dies, even by SIGKILL (the OOM killer
    takes the bench first: it holds the most memory), so no vmmrun or QEMU outlives it holding
    gigabytes."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Vmmrun:
    """One vmmrun process; ``client`` talks to its control socket."""

    def __init__(self, run_dir: Path, name: str, *args: str) -> None:
        self.run_dir, self.name = run_dir, name
        # Consoles go to files in the run directory, where a failed scenario's output can be read.
        lpc = [a for dev in LPC for a in ("-l", f"{dev},{run_dir / f'{name}.{dev}.log'}")]
        self.proc = subprocess.Popen([sys.executable, "-m", "vmmpy.cli.vmmrun", f"--run-dir={run_dir}", *lpc, *args, name],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent)

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the process so far (all its threads)."""
        return process_cpu_seconds(self.proc.pid)

    def client(self, timeout: float | None = 30.0) -> ControlClient:
        return ControlClient(self.name, self.run_dir, timeout=timeout)

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"vmmrun {self.name} exited {self.proc.returncode}: {self.proc.stderr.read().strip()}")

    def wait_state(self, states: tuple[str, ...] = ("running", "paused"), timeout: float = 120, poll: float = 0.02) -> str:
        """Wait until the control socket answers with one of ``states``, asking every ``poll`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._alive()
            if (self.run_dir / f"{self.name}.ctl").exists():
                try:
                    state = self.client(5).request("status")["state"]
                    if state in states:
                        return state
                except (ControlError, OSError):
                    pass
            time.sleep(poll)
        raise RuntimeError(f"vmmrun {self.name} did not reach {states} within {timeout} s")

    def wait_listening(self, port: int, timeout: float = 120) -> None:
        """Wait until something listens on 127.0.0.1:port (without connecting to it: the
        destination accepts exactly one connection)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._alive()
            out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
            if out.strip():
                return
            time.sleep(0.02)
        raise RuntimeError(f"vmmrun {self.name} did not listen on port {port} within {timeout} s")

    def wait_path(self, path: Path, timeout: float = 120) -> None:
        """Wait until the Unix socket ``path`` exists (it appears only once it listens)."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            self._alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"vmmrun {self.name} did not listen on {path} within {timeout} s")
            time.sleep(0.02)

    def wait_exit(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        if self.proc.stderr:
            self.proc.stderr.close()


def _destination_record(dest: Vmmrun) -> dict | None:
    """The destination's own record of the migration it received (its ``migrate-status``), or None
    when it cannot say (it stopped)."""
    try:
        return dest.client(timeout=10).request("migrate-status")
    except (OSError, RuntimeError, ValueError):
        return None


def migrate(run_dir: Path, source: str, *, source_args: list[str], dest_args: list[str], live: bool,
            params: dict | None = None, before=None, request: dict | None = None, local: bool = False) -> tuple[float, dict]:
    """Start a destination (``vmmrun -R``) and a source, migrate, and return (wall seconds of the
    ``migrate`` request, the source's statistics, with the destination's under ``destination``
    when it could give them). Both processes are gone on return. ``request``
    adds fields to the migrate request (``tls``, ``key``) as vmmctl would. ``local``: a local
    migration, the destination waiting on a Unix socket (``-R unix:PATH``)."""
    tag = f"{source}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    if local:
        path = run_dir / f"{tag}.mig"
        host, port, listen_at = f"unix:{path}", 0, f"unix:{path}"
    else:
        host, port = "127.0.0.1", free_port()
        listen_at = f"{host}:{port}"
    dest = Vmmrun(run_dir, f"d{tag}", *dest_args, "-R", listen_at)
    src = Vmmrun(run_dir, f"s{tag}", *source_args)
    try:
        if local:
            dest.wait_path(path)
        else:
            dest.wait_listening(port)
        # The destination's CPU counts from here: populating its memory while it waits (vmmrun
        # -R's default) is work QEMU's destination that is not preallocated does inside its
        # window, so it counts, whether it ends before the migration starts or is cut short then.
        dest_cpu = dest.cpu_seconds()
        src.wait_state()
        settled = wait_settled(src.proc.pid)
        if before is not None:
            before(src)
        client = src.client(timeout=None)
        src_cpu = src.cpu_seconds()
        started = time.perf_counter()
        stats = client.request("migrate", host=host, port=port, live=live, params=params or {}, **(request or {}))
        seconds = time.perf_counter() - started
        # The source is not reaped yet (even if it has exited), so its /proc entry still counts.
        stats["cpu_seconds"] = src.cpu_seconds() - src_cpu + dest.cpu_seconds() - dest_cpu
        stats["source_settled_s"] = settled
        src.wait_exit(60)
        stats["destination"] = _destination_record(dest)
        return seconds, stats
    finally:
        src.stop()
        dest.stop()
