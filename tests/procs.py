"""Helpers for tests that run vmmrun and vmmctl as real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def vmmrun_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmmpy.cli.vmmrun", *args]


def vmmctl(run_dir: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={run_dir}", *args],
        capture_output=True, text=True, timeout=timeout,
    )


def start_vmmrun(run_dir: Path, *args: str, prefix: list[str] | tuple[str, ...] = ()) -> subprocess.Popen:
    """Start vmmrun (inside a network namespace when ``prefix`` is ``ip netns exec NS``)."""
    return subprocess.Popen([*prefix, *vmmrun_cmd(f"--run-dir={run_dir}", *args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_socket(run_dir: Path, name: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Wait until the VM's control socket answers (bounded), or fail with vmmrun's stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vmmrun exited {proc.returncode} before serving: {proc.stderr.read()}")
        if (run_dir / f"{name}.ctl").exists() and vmmctl(run_dir, f"--vm={name}", "--status").returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"vmmrun for {name} did not serve its control socket within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def wait_for_state(run_dir: Path, name: str, state: str, timeout: float = 30) -> None:
    """Wait until vmmctl --status reports ``state`` (bounded)."""
    import json

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        result = vmmctl(run_dir, f"--vm={name}", "--status", "--json")
        if result.returncode == 0:
            last = json.loads(result.stdout)["state"]
            if last == state:
                return
        time.sleep(0.05)
    raise AssertionError(f"{name} did not reach state {state!r} within {timeout} s (last: {last!r})")


def free_port(host: str = "127.0.0.1") -> int:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for_listener(host: str, port: int, proc: subprocess.Popen, timeout: float = 30, netns: str | None = None) -> None:
    """Wait until something listens on host:port (bounded): ss from inside the namespace."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"destination exited {proc.returncode}: {proc.stderr.read()}")
        cmd = ["ss", "-Hltn", f"sport = :{port}"]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listened on {host}:{port} within {timeout} s")


def write_key(path: Path, key: bytes) -> Path:
    """A key file as an operator should keep it: readable by its owner only (vmmrun and vmmctl
    warn on stderr about one that others can read)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    return path
