"""Save/restore through vmmrun and vmmctl: a guest checkpointed or suspended and resumed (eager
and lazy, both vendors) finishes exactly as an uninterrupted run; bad checkpoints are refused."""

import json
import os
import subprocess

import pytest

from vmmpy.guest.programs.hash import reference_hash

from .procs import start_vmmrun, stop, vmmctl, vmmrun_cmd, wait_for_socket, wait_for_state

MiB = 1 << 20
ABTEST = ["--guest", "abtest", "--guest-arg", "sweeps=400", "--guest-arg", "report=50", "-m", "32M"]
PAGES = (32 * MiB - 2 * MiB) // 4096
DONE = f"abtest: done 400 sweeps over {PAGES} pages, all counters 400\n"


def run(*args, timeout=180):
    return subprocess.run(vmmrun_cmd(*args), capture_output=True, text=True, timeout=timeout)


def expected_abtest_console():
    return "".join(f"abtest: sweep {n}\n" for n in range(50, 401, 50)) + DONE


@pytest.mark.covers(operation="suspend", guest="abtest", via="cli", vendor="{vendor}", restore="{mode}")
@pytest.mark.parametrize(
    "vendor, mode, at",
    [("intel", "eager", 1), ("amd", "lazy", 3_000_001), ("intel", "lazy", 7_777_777), ("amd", "eager", 10_000_000)],
)
def test_suspend_then_resume_finishes_exactly_as_an_uninterrupted_run(tmp_path, vendor, mode, at):
    console = tmp_path / "console.log"
    proc = start_vmmrun(tmp_path, *ABTEST, "--vendor", vendor, "-l", f"com1,{console}", f"--pause-at={at}", "sr0")
    try:
        wait_for_socket(tmp_path, "sr0", proc)
        wait_for_state(tmp_path, "sr0", "paused")
        ckp = tmp_path / "sr0.ckp"
        saved = vmmctl(tmp_path, "--vm=sr0", f"--suspend={ckp}", "--json")
        assert saved.returncode == 0, saved.stderr
        assert json.loads(saved.stdout)["suspended"] is True
        assert proc.wait(timeout=60) == 0, "bhyve exits 0 after a suspend"
    finally:
        stop(proc)
    assert DONE not in console.read_text(), "the guest was suspended before it finished"
    for suffix in ("", ".kern", ".meta"):
        assert (tmp_path / f"sr0.ckp{suffix}").exists()
    resumed = run("-r", str(ckp), "--restore-mode", mode, "-l", f"com1,{console}", "--run-dir", str(tmp_path), "sr0")
    assert resumed.returncode == 1, resumed.stderr
    assert console.read_text() == expected_abtest_console()


@pytest.mark.covers(operation="checkpoint", guest="hash", via="cli")
def test_checkpoint_keeps_the_guest_running_and_the_copy_finishes_the_same(tmp_path):
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    proc = start_vmmrun(tmp_path, "--guest", "hash", "--guest-arg", "rounds=40", "--guest-arg", "end=6M",
                        "-m", "8M", "-l", f"com1,{first}", "--pause-at=2000000", "hc0")
    try:
        wait_for_socket(tmp_path, "hc0", proc)
        wait_for_state(tmp_path, "hc0", "paused")
        ckp = tmp_path / "hc0.ckp"
        saved = vmmctl(tmp_path, "--vm=hc0", f"--checkpoint={ckp}")
        assert saved.returncode == 0, saved.stderr
        assert saved.stdout.startswith(f"checkpointed to {ckp}: 8 MiB guest")
        assert vmmctl(tmp_path, "--vm=hc0", "--resume").returncode == 0
        assert proc.wait(timeout=120) == 1, "the original runs on to its power-off"
    finally:
        stop(proc)
    resumed = run("-r", str(ckp), "-l", f"com1,{second}", "--run-dir", str(tmp_path), "hc1")
    assert resumed.returncode == 1, resumed.stderr
    expected = f"hash: 0x{reference_hash(2 * MiB, 6 * MiB, rounds=40, seed=0):016x}\n"
    assert first.read_text() == expected
    assert second.read_text() == expected


def test_a_relative_checkpoint_path_is_relative_to_vmmctl(tmp_path):
    proc = start_vmmrun(tmp_path, *ABTEST, "--pause-at=0", "rel0")
    try:
        wait_for_socket(tmp_path, "rel0", proc)
        sub = tmp_path / "sub"
        sub.mkdir()
        result = subprocess.run(
            [*vmmctl_cmd(tmp_path), "--vm=rel0", "--checkpoint=here.ckp"], cwd=sub, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert (sub / "here.ckp.meta").exists()
    finally:
        stop(proc)


def vmmctl_cmd(run_dir):
    import sys

    return [sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={run_dir}"]


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckp")
    proc = start_vmmrun(directory, *ABTEST, "--pause-at=5000000", "good0")
    try:
        wait_for_socket(directory, "good0", proc)
        assert vmmctl(directory, "--vm=good0", f"--suspend={directory / 'good.ckp'}").returncode == 0
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)
    return directory / "good.ckp"


def damaged_copy(src, dst_dir, damage):
    import shutil

    dst = dst_dir / "bad.ckp"
    for suffix in ("", ".kern", ".meta"):
        shutil.copyfile(f"{src}{suffix}", f"{dst}{suffix}")
    damage(dst)
    return dst


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: os.remove(f"{p}.kern"), "bad.ckp.kern"),
        (lambda p: os.truncate(f"{p}.kern", 100), "bad.ckp.kern"),
        (lambda p: flip(f"{p}.kern", 300), "bad.ckp.kern"),
        (lambda p: flip(f"{p}.meta", 40), "bad.ckp.meta"),
        (lambda p: os.truncate(p, 4096), "bad.ckp"),
        (lambda p: flip(p, 3 * MiB + 17), "chunk"),
    ],
    ids=["missing-kern", "truncated-kern", "flipped-kern", "flipped-meta", "truncated-memory", "flipped-memory"],
)
def test_a_damaged_checkpoint_is_refused_and_nothing_runs(saved_checkpoint, tmp_path, damage, message):
    bad = damaged_copy(saved_checkpoint, tmp_path, damage)
    result = run("-r", str(bad), "--run-dir", str(tmp_path), "bad0")
    assert result.returncode == 4
    assert message in result.stderr
    assert not (tmp_path / "bad0.ctl").exists(), "nothing was left running"


def test_device_options_that_do_not_match_are_refused_naming_the_device(saved_checkpoint, tmp_path):
    result = run("-r", str(saved_checkpoint), "-s", "0,hostbridge", "--run-dir", str(tmp_path), "mm0")
    assert result.returncode == 4
    assert "device 'hostbridge@pci.0.0.0' is configured here but was not saved" in result.stderr


GUESTS = os.path.join(os.path.dirname(__file__), "guests")


def test_host_tsc_continues_across_suspend_without_jumping_or_going_back(tmp_path):
    """With the host TSC, the guest must not see the time it spent suspended (bhyve's
    VM_RESTORE_TIME), nor its TSC run backwards, for either vendor's state layout."""
    import time

    vendors = ("intel", "amd")
    for vendor in vendors:
        console = tmp_path / f"tsc-{vendor}.log"
        args = ["--guest", os.path.join(GUESTS, "tsc_watch.s"), "--guest-arg", "iterations=40000000", "--tsc", "host",
                "--vendor", vendor, "-m", "4M", "-l", f"com1,{console}"]
        proc = start_vmmrun(tmp_path, *args, f"tsc-{vendor}")
        try:
            wait_for_socket(tmp_path, f"tsc-{vendor}", proc)
            assert vmmctl(tmp_path, f"--vm=tsc-{vendor}", f"--suspend={tmp_path / vendor}.ckp").returncode == 0
            assert proc.wait(timeout=60) == 0
        finally:
            stop(proc)
        assert console.read_text() == "", "suspended mid-loop"
    suspended_for = 2.5
    time.sleep(suspended_for)
    # Both restored at once (each a vmmrun of its own): the one-core loops run side by side.
    resumed = {vendor: subprocess.Popen(vmmrun_cmd("-r", f"{tmp_path / vendor}.ckp", "-l", f"com1,{tmp_path / f'tsc-{vendor}.log'}",
                                                   "--run-dir", str(tmp_path), f"tsc-{vendor}"),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for vendor in vendors}
    try:
        outcomes = {vendor: (proc.communicate(timeout=180)[1], proc.returncode) for vendor, proc in resumed.items()}
    finally:
        for proc in resumed.values():
            stop(proc)
    for vendor in vendors:
        console = tmp_path / f"tsc-{vendor}.log"
        stderr, returncode = outcomes[vendor]
        assert returncode == 1, stderr
        words = console.read_text().split()
        assert words[0] == "S" and words[2] == "B", words
        largest_step_ns, backwards = int(words[1], 16), int(words[3], 16)
        assert backwards == 0, f"{vendor}: the guest TSC went backwards"
        assert largest_step_ns < suspended_for * 1e9 / 2, f"{vendor}: the guest TSC jumped by {largest_step_ns / 1e9:.3f} s"


@pytest.mark.covers(operation="suspend", guest="console", via="cli")
@pytest.mark.parametrize("at", [17, 601, 1_333, 2_100])  # of about 2,230 instructions in all
def test_a_timer_driven_guest_resumes_on_the_same_tick(tmp_path, at):
    """The console guest sleeps in hlt between lapic timer interrupts: suspended with the timer
    armed (and interrupts possibly pending), it resumes and ticks exactly as if never stopped."""
    args = ["--guest", "console", "--guest-arg", "ticks=40", "--guest-arg", "every=5", "--guest-arg", "period_us=200", "-m", "8M"]
    reference = tmp_path / "reference.log"
    assert run(*args, "-l", f"com1,{reference}", "--run-dir", str(tmp_path), "tick-ref").returncode == 1
    console = tmp_path / "console.log"
    proc = start_vmmrun(tmp_path, *args, "-l", f"com1,{console}", f"--pause-at={at}", "tick0")
    try:
        wait_for_socket(tmp_path, "tick0", proc)
        wait_for_state(tmp_path, "tick0", "paused")
        assert vmmctl(tmp_path, "--vm=tick0", f"--suspend={tmp_path / 'tick.ckp'}").returncode == 0
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)
    assert "done" not in console.read_text(), "suspended before the end"
    resumed = run("-r", str(tmp_path / "tick.ckp"), "-l", f"com1,{console}", "--run-dir", str(tmp_path), "tick0")
    assert resumed.returncode == 1, resumed.stderr
    assert console.read_text() == reference.read_text()
    assert reference.read_text().endswith("console: tick 40\nconsole: done\n")
