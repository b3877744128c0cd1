"""Conventions both tools keep: --version, rates as people write them, a key file others can read
is warned about, the run directory's default is shown where it is used."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vmmpy import __version__
from vmmpy.cli.keyfile import read_key
from vmmpy.migration.protocol import PROTOCOL_VERSIONS
from vmmpy.units import GiB, MiB, parse_rate


@pytest.mark.parametrize("tool", ["vmmrun", "vmmctl"])
def test_version_names_the_release_and_the_formats_it_speaks(tool):
    done = subprocess.run([sys.executable, "-m", f"vmmpy.cli.{tool}", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{tool} (vmmpy) {__version__}: migration protocol ")
    assert f"-{max(PROTOCOL_VERSIONS)}," in done.stdout and "checkpoint format" in done.stdout


def test_vmmctl_help_shows_the_run_directory_it_would_use():
    env = dict(os.environ, VMMPY_RUN_DIR="/srv/vmmpy/run")  # need not exist: the help only names it
    done = subprocess.run([sys.executable, "-m", "vmmpy.cli.vmmctl", "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert "(default here: /srv/vmmpy/run)" in " ".join(done.stdout.split())


@pytest.mark.parametrize(("text", "rate"), [
    ("100M", 100 * MiB), ("1.5G", int(1.5 * GiB)), ("50MB/s", 50 * MiB), ("12.5MiB/s", int(12.5 * MiB)),
    ("100Mbit", 12_500_000), ("10Gbit/s", 1_250_000_000), ("800Mbps", 100_000_000), ("4096", 4096), (65536, 65536),
])
def test_rates_in_bytes_or_bits(text, rate):
    assert parse_rate(text, what="--bandwidth") == rate


@pytest.mark.parametrize("text", ["fast", "100Mbits/h", "-5M", "0.1", "1e9", ""])
def test_a_rate_that_is_not_one_is_refused_by_name(text):
    with pytest.raises(ValueError, match=r"^--bandwidth "):
        parse_rate(text, what="--bandwidth")


def test_vmmctl_takes_a_bit_rate_for_bandwidth(tmp_path):
    # --estimate needs no destination: it reports the link speed it assumed, from --bandwidth.
    from .procs import start_vmmrun, stop, vmmctl, wait_for_socket

    proc = start_vmmrun(tmp_path, "--guest", "abtest", "-m", "32M", "est0")
    try:
        wait_for_socket(tmp_path, "est0", proc)
        done = vmmctl(tmp_path, "--vm=est0", "--json", "--migrate-live", "10.0.0.2", "24983", "--bandwidth", "800Mbit",
                      "--estimate", "--estimate-window", "0.5")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["bandwidth"] == 100_000_000  # bytes/s
    finally:
        stop(proc)


def test_a_key_file_others_can_read_is_warned_about_and_still_works(tmp_path, capsys):
    key = tmp_path / "mig.key"
    key.write_bytes(b"k" * 32)
    key.chmod(0o644)
    assert read_key(key) == b"k" * 32
    warning = capsys.readouterr().err
    assert f"--key-file {key} can be read by others (mode 0644)" in warning and f"chmod 600 {key}" in warning
    key.chmod(0o600)
    assert read_key(key) == b"k" * 32
    assert capsys.readouterr().err == ""


def test_list_shows_each_guests_state_a_waiting_destination_as_incoming(tmp_path):
    from .procs import free_port, start_vmmrun, stop, vmmctl, wait_for_socket

    running = start_vmmrun(tmp_path, "--guest", "abtest", "-m", "32M", "--pause-at", "0", "a0")
    waiting = start_vmmrun(tmp_path, "-m", "32M", "-R", f"127.0.0.1:{free_port()}", "b0")
    try:
        wait_for_socket(tmp_path, "a0", running)
        wait_for_socket(tmp_path, "b0", waiting)
        listed = vmmctl(tmp_path, "--list")
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines() == ["a0\tpaused", "b0\tincoming"]
        assert vmmctl(tmp_path, "--vm=a0", "--resume").returncode == 0
        # A destination's (empty) guest is the source's until the commit: nothing may run it here.
        refused = vmmctl(tmp_path, "--vm=b0", "--resume")
        assert refused.returncode != 0 and "is receiving a migration (waiting)" in refused.stderr, refused.stderr
        as_json = json.loads(vmmctl(tmp_path, "--list", "--json").stdout)
        assert as_json == [{"name": "a0", "running": True, "state": "running"},
                           {"name": "b0", "running": True, "state": "incoming"}]
    finally:
        stop(running)
        stop(waiting)


def suspended_abtest(tmp_path: Path, name: str) -> Path:
    """A 32 MiB abtest guest suspended at its first instruction to ``tmp_path / NAME.ckp``."""
    from .procs import start_vmmrun, stop, vmmctl, wait_for_socket

    proc = start_vmmrun(tmp_path, "--guest", "abtest", "-m", "32M", "--pause-at", "0", name)
    try:
        wait_for_socket(tmp_path, name, proc)
        assert vmmctl(tmp_path, f"--vm={name}", f"--suspend={tmp_path / f'{name}.ckp'}").returncode == 0
    finally:
        stop(proc)
    return tmp_path / f"{name}.ckp"


def test_restore_refuses_options_that_contradict_the_checkpoint_in_the_users_terms(tmp_path):
    from .procs import start_vmmrun, stop, vmmrun_cmd, wait_for_socket

    suspended_abtest(tmp_path, "r0")
    refused = subprocess.run([*vmmrun_cmd(f"--run-dir={tmp_path}", "-r", str(tmp_path / "r0.ckp"), "-m", "64M", "-c", "2",
                                          "--vendor", "amd", "r0")], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 4
    assert refused.stderr.strip() == (
        f"vmmrun: -r {tmp_path / 'r0.ckp'}: the saved guest has -m 32M, -m 64M was given; the saved guest has -c 1, -c 2 "
        "was given; the saved guest has --vendor intel, --vendor amd was given; leave it out with -r (memory, vCPUs, "
        "vendor and TSC come from the checkpoint)")
    assert not (tmp_path / "r0.ctl").exists(), "nothing was left behind"
    # The same values, spelt another way, are no contradiction: the guest resumes (paused at 0).
    same = start_vmmrun(tmp_path, "-r", str(tmp_path / "r0.ckp"), "-m", "32", "-c", "1", "r0")
    try:
        wait_for_socket(tmp_path, "r0", same)
    finally:
        stop(same)


@pytest.mark.parametrize("argv", [["--bogus", "vm0"], ["-c", "two", "vm0"], ["--tsc", "sundial", "vm0"]])
def test_vmmrun_bad_options_exit_4_as_bhyve_not_2_which_means_halted(argv):
    done = subprocess.run([sys.executable, "-m", "vmmpy.cli.vmmrun", *argv], capture_output=True, text=True, timeout=60)
    assert done.returncode == 4
    assert done.stderr.startswith("usage: vmmrun") and "vmmrun: error: " in done.stderr


def test_a_checkpoint_into_a_missing_directory_is_refused_by_name_and_the_guest_runs_on(tmp_path):
    from .procs import start_vmmrun, stop, vmmctl, wait_for_socket

    proc = start_vmmrun(tmp_path, "--guest", "abtest", "-m", "32M", "c0")
    try:
        wait_for_socket(tmp_path, "c0", proc)
        target = tmp_path / "no" / "such" / "c0.ckp"
        done = vmmctl(tmp_path, "--vm=c0", f"--checkpoint={target}")
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == f"vmmctl: --checkpoint {target}: directory {target.parent} does not exist"
        assert json.loads(vmmctl(tmp_path, "--vm=c0", "--status", "--json").stdout)["state"] == "running"
    finally:
        stop(proc)


def test_status_says_what_wiring_a_guests_memory_did(tmp_path):
    from .procs import start_vmmrun, stop, vmmctl, wait_for_socket

    proc = start_vmmrun(tmp_path, "--guest", "abtest", "-m", "32M", "-S", "w0")
    try:
        wait_for_socket(tmp_path, "w0", proc)
        status = json.loads(vmmctl(tmp_path, "--vm=w0", "--status", "--json").stdout)
        assert status["wired"] is True
        wiring = status["wiring"]
        assert wiring["bytes"] == wiring["target_bytes"] == 32 * MiB and wiring["refused"] is None
        text = vmmctl(tmp_path, "--vm=w0", "--status").stdout
        line = next(line for line in text.splitlines() if line.startswith("wiring: "))
        assert line.startswith("wiring: 32 MiB populated in ") and line.endswith(", and locked"), line
        assert ("of it on huge pages" in line) == (wiring["huge_bytes"] > 0), line
    finally:
        stop(proc)
    unwired = start_vmmrun(tmp_path, "--guest", "abtest", "-m", "32M", "u0")
    try:
        wait_for_socket(tmp_path, "u0", unwired)
        assert "wiring" not in json.loads(vmmctl(tmp_path, "--vm=u0", "--status", "--json").stdout)
    finally:
        stop(unwired)


def _resident_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0  # gone, or a zombie that has no resident memory


def _ctrl_c_once_resident(cmd: list[str], expected: str) -> tuple[int, str]:
    """Start ``cmd`` with SIGINT as at a terminal, send SIGINT once it holds 256 MiB (its long
    step under way) and return its exit status and stderr. Where the signal landed elsewhere
    (stderr not ``expected``), a fresh process tries again, at most three in all."""
    import signal
    import time

    from .procs import stop

    def sigint_as_at_a_terminal() -> None:
        # A job a non-interactive shell starts in the background (CI's, say) inherits SIGINT
        # ignored, and Python then installs no handler for it; from a terminal it is not.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    for _attempt in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_at_a_terminal)
        try:
            deadline = time.monotonic() + 60
            while proc.poll() is None and _resident_bytes(proc.pid) < 256 * MiB and time.monotonic() < deadline:
                time.sleep(0.002)
            assert proc.poll() is None, proc.stderr.read()
            proc.send_signal(signal.SIGINT)
            status = proc.wait(timeout=120)
            err = proc.stderr.read()
        finally:
            stop(proc)
        if re.fullmatch(expected, err):
            break
    return status, err


def test_ctrl_c_while_vmmrun_wires_its_memory_ends_it_with_one_line(tmp_path):
    """Wiring a large guest takes seconds (populating and locking every page); Ctrl-C stops it
    at the core's next check, about 64 MiB on: vmmrun says what it was doing and how far it got,
    and exits 4 with no traceback. The signal goes once wiring has begun, seen by the process's
    resident memory. Where it landed elsewhere (wiring highmem, or past it: the process then
    listens and says so) a fresh process tries again, a bounded number of times."""
    from .procs import free_port, vmmrun_cmd

    expected = (r"vmmrun: w0: stopped by SIGINT while setting up its wired memory to receive a migration \(wiring 3 GiB "
                r"for segment 'lowmem' was interrupted after [0-9.]+ [MG]iB\); no guest ran\n")
    port = free_port()
    status, err = _ctrl_c_once_resident(vmmrun_cmd(f"--run-dir={tmp_path}", "-S", "-m", "4G", "-R", f"127.0.0.1:{port}", "w0"),
                                        expected)
    assert status == 4, err
    assert re.fullmatch(expected, err), err


def test_ctrl_c_while_vmmrun_restores_its_memory_ends_it_with_one_line(tmp_path):
    """An eager restore of a large guest reads for seconds; Ctrl-C stops the read at the core's
    next check, 64 MiB on: vmmrun says what it was doing and how far the read got, exits 4 with
    no traceback and runs no guest. The signal goes once the read has begun, seen by the
    process's resident memory; where it landed after the read (the guest then runs, and the
    signal powers it off) a fresh process tries again, a bounded number of times."""
    from tools.bench.images import build_image

    from .procs import vmmrun_cmd

    image = tmp_path / "big.ckp"
    build_image(str(image), memsize=2 * GiB, guest="console", guest_args={"ticks": "0", "every": "0"}, random_bytes=2 * GiB,
                fill="text")
    expected = (rf"vmmrun: r0: stopped by SIGINT while restoring '{re.escape(str(image))}' \(reading 2(\.0)? GiB of memory from "
                r"the checkpoint was interrupted after [0-9.]+ [MG]iB\); no guest ran\n")
    status, err = _ctrl_c_once_resident(vmmrun_cmd(f"--run-dir={tmp_path}", "-l", "com1,/dev/null", "-r", str(image), "r0"),
                                        expected)
    assert status == 4, err
    assert re.fullmatch(expected, err), err


@pytest.mark.parametrize("tool", ["vmmrun", "vmmctl"])
@pytest.mark.parametrize("parent", ["terminal", "background"])
def test_the_installed_commands_run_main_with_sigint_as_python_had_it(tool, parent):
    """The installed command's launcher gives SIGINT back to Python's handler before main runs
    (vmmctl --migrate turns Ctrl-C into a cancel with it), and leaves it ignored where the
    shell started the command with SIGINT ignored (a background job): main sees what it would
    have seen without the launcher."""
    import signal

    def sigint_as(parent_handler) -> None:
        signal.signal(signal.SIGINT, parent_handler)

    handler = signal.SIG_DFL if parent == "terminal" else signal.SIG_IGN
    probe = (f"import signal, sys, vmmpy.cli.{tool} as tool; "
             "tool.main = lambda: print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
             "signal.getsignal(signal.SIGINT) == signal.SIG_IGN) or 0; "
             f"from vmmpy.cli.launch import {tool}; {tool}()")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: sigint_as(handler))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == (["True", "False"] if parent == "terminal" else ["False", "True"]), done.stdout


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e300", "1000001"])
def test_an_io_timeout_that_is_not_a_sane_wait_is_refused_by_both_tools_before_anything_starts(tmp_path, value):
    """--io-timeout on vmmctl (the source) and vmmrun -R (the destination) maps to the same
    waits, and a value that is not positive or too long for the socket and lock timeouts
    (infinity overflowed them mid-handshake) is refused by name before either tool does a thing."""
    from vmmpy.migration import MigrationParams

    expected = f"--io-timeout must be positive seconds, at most 1000000; got {float(value)}"
    run = subprocess.run([sys.executable, "-m", "vmmpy.cli.vmmrun", f"--run-dir={tmp_path}", "-m", "64M", "--io-timeout", value,
                          "-R", "127.0.0.1:1", "d0"], capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stderr) == (4, f"vmmrun: {expected}\n")
    ctl = subprocess.run([sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={tmp_path}", "--vm=nope", "--migrate", "127.0.0.1", "1",
                          "--io-timeout", value], capture_output=True, text=True, timeout=60)
    assert expected in ctl.stderr and ctl.returncode != 0, ctl.stderr
    assert not list(tmp_path.iterdir()), "nothing was started"
    with pytest.raises(ValueError, match="io_timeout must be positive seconds"):
        MigrationParams(io_timeout=float(value))
    assert MigrationParams.io_timeouts(1e6) == {"io_timeout": 1e6, "commit_timeout": 1e6, "handshake_timeout": 10.0}


def _handles_sigint(pid: int) -> bool | None:
    """Whether the process has a handler for SIGINT (its SigCgt bit), None once it is gone."""
    import signal

    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    caught = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:")), None)
    return None if caught is None else bool(caught >> (signal.SIGINT - 1) & 1)


@pytest.mark.parametrize("tool", ["vmmrun", "vmmctl"])
@pytest.mark.parametrize("how", ["module", "command"])
def test_ctrl_c_while_a_tool_loads_ends_it_at_once_without_a_traceback(tool, how):
    """A tool's imports take about 0.15 s, and Ctrl-C there used to print a traceback from inside
    an import. Run as a module (``python -m``) or as the installed command (the entry point
    pyproject.toml names), the tool lets the signal end it quietly while it loads, as the
    signal's default does, and raises KeyboardInterrupt again before its main runs. The signal
    goes inside that window, seen in /proc: Python's own handler in place, then none. (Python
    also drops its handler as it ends, after ``--help`` has printed: nothing printed shows the
    signal came while the tool loaded.)"""
    import signal
    import time

    def sigint_as_at_a_terminal() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in the test above

    if how == "module":
        cmd = [sys.executable, "-m", f"vmmpy.cli.{tool}", "--help"]
    else:
        cmd = [sys.executable, "-c", f"from vmmpy.cli.launch import {tool}; {tool}()", "--help"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_as_at_a_terminal)
    try:
        deadline = time.monotonic() + 30
        seen = []
        while time.monotonic() < deadline:
            handles = _handles_sigint(proc.pid)
            if handles is None or proc.poll() is not None:
                break
            if not seen or seen[-1] != handles:
                seen.append(handles)
            if seen[-2:] == [True, False]:
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.0005)
        status = proc.wait(timeout=30)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert seen[-2:] == [True, False], f"never saw the quiet window while loading (handler states {seen}); exit {status}, {err}"
    assert status == -signal.SIGINT, (status, out[:200], err)
    assert out == "", "the signal came once the tool had run (its handler was gone as Python ended)"
    assert "Traceback" not in err and err == "", err
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert f'{tool} = "vmmpy.cli.launch:{tool}"' in pyproject


@pytest.mark.parametrize("tool", ["vmmrun", "vmmctl"])
@pytest.mark.parametrize(("given", "seen"), [(None, "1"), ("3", "3")])
def test_the_tools_start_numpy_without_blas_threads_and_keep_a_setting_the_user_gave(tool, given, seen):
    """``import vmmpy`` loads neither numpy nor the core, so the tools' modules can tell numpy's
    BLAS to start no thread pool (0.1 s of CPU at every start) before numpy loads. The library's
    own modules, the report writer among them, leave the environment alone. Importing either tool
    does not load numpy (0.1-0.2 s of CPU at every start): vmmctl's checkpoint checks and
    --version load it when run, vmmrun whatever first needs an array."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if given is not None:
        env["OPENBLAS_NUM_THREADS"] = given
    probe = ("import os, sys, vmmpy; light = not {'numpy', 'vmmpy._core', 'vmmpy.memory'} & set(sys.modules); "
             "import vmmpy.cli.report; library = os.environ.get('OPENBLAS_NUM_THREADS', '-'); "
             f"import vmmpy.cli.{tool}; print(light, library, 'numpy' in sys.modules, os.environ['OPENBLAS_NUM_THREADS'])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", given or "-", "False", seen]


def test_a_restore_does_not_wait_for_numpy_and_vmmrun_loads_it_meanwhile(tmp_path):
    """Loading numpy is 0.1 s (a fifth of `vmmrun -r` of 1 GiB, from the command to the guest
    ready); nothing a restore does needs it (the .meta's nesting scan, the checkpoint log), so the
    restore path does not import it, and vmmrun imports it on a thread once the guest starts, so
    that a later pause (a diff checkpoint) does not wait for it either."""
    from .procs import start_vmmrun, stop, wait_for_state

    suspended_abtest(tmp_path, "np0")
    probe = ("import os, sys; from vmmpy.cli import vmmrun; from vmmpy.runtime.commands import restore_machine; "
             "from vmmpy.runtime.config import VmConfig; "
             f"m = restore_machine({str(tmp_path / 'np0.ckp')!r}, VmConfig(name='np1')); "
             "print(m.vm.memory.memsize, 'numpy' in sys.modules); m.close()")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(32 << 20), "False"], "the restore imported numpy"
    restored = start_vmmrun(tmp_path, "-r", str(tmp_path / "np0.ckp"), "--pause-at=0", "np0")
    try:
        wait_for_state(tmp_path, "np0", "paused")
        maps = Path("/proc") / str(restored.pid) / "maps"
        for _ in range(200):  # bounded: 10 s
            if "numpy" in maps.read_text():
                break
            threading.Event().wait(0.05)
        assert "numpy" in maps.read_text(), "vmmrun loads numpy once the guest has started"
    finally:
        stop(restored)
