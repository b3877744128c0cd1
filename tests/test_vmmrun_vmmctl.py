"""vmmrun and vmmctl as real processes, the way a person runs them."""

import json
import re
import subprocess
import time

import pytest

from vmmpy.guest.programs.hash import reference_hash

from .procs import start_vmmrun, stop, vmmctl, vmmrun_cmd, wait_for_socket, wait_for_state

MiB = 1 << 20


def run(*args, timeout=120):
    return subprocess.run(vmmrun_cmd(*args), capture_output=True, text=True, timeout=timeout)


def test_abtest_runs_to_completion_and_says_what_it_did(tmp_path):
    console = tmp_path / "console.log"
    result = run("--guest", "abtest", "--guest-arg", "sweeps=20", "-m", "64M", "-l", f"com1,{console}", "--run-dir", str(tmp_path), "ab0")
    assert result.returncode == 1, result.stderr  # bhyve: 1 = powered off
    text = console.read_text()
    assert "abtest: sweep 20\n" in text
    pages = (64 * MiB - 2 * MiB) // 4096
    assert text.endswith(f"abtest: done 20 sweeps over {pages} pages, all counters 20\n")


@pytest.mark.parametrize("vendor", ["intel", "amd"])
def test_hash_guest_prints_the_reference_hash(tmp_path, vendor):
    console = tmp_path / "console.log"
    result = run("--guest", "hash", "--guest-arg", "end=4M", "--guest-arg", "rounds=3", "--guest-arg", "seed=7",
                 "--vendor", vendor, "-m", "8M", "-l", f"com1,{console}", "--run-dir", str(tmp_path), f"h-{vendor}")
    assert result.returncode == 1, result.stderr
    expected = reference_hash(2 * MiB, 4 * MiB, rounds=3, seed=7)
    assert console.read_text() == f"hash: 0x{expected:016x}\n"


def test_console_guest_ticks_on_the_vlapic_timer(tmp_path):
    console = tmp_path / "console.log"
    result = run("--guest", "console", "--guest-arg", "ticks=30", "--guest-arg", "every=10", "-m", "8M",
                 "-l", f"com1,{console}", "--run-dir", str(tmp_path), "tick0")
    assert result.returncode == 1, result.stderr
    assert console.read_text() == "console: tick 10\nconsole: tick 20\nconsole: tick 30\nconsole: done\n"


def test_vmmctl_drives_a_running_guest(tmp_path):
    console = tmp_path / "console.log"
    proc = start_vmmrun(tmp_path, "--guest", "console", "--guest-arg", "ticks=0", "--guest-arg", "period_us=100",
                        "--tsc", "host", "-m", "8M", "-l", f"com1,{console}", "ctl0")
    try:
        wait_for_socket(tmp_path, "ctl0", proc)
        status = json.loads(vmmctl(tmp_path, "--vm=ctl0", "--status", "--json").stdout)
        assert status["state"] == "running" and status["memsize"] == 8 * MiB
        listed = vmmctl(tmp_path, "--list")
        assert "ctl0\trunning" in listed.stdout

        stats = vmmctl(tmp_path, "--vm", "ctl0", "--get-stats")
        assert stats.returncode == 0 and "instructions" in stats.stdout

        refused = vmmctl(tmp_path, "--vm=ctl0", "--get-all")
        assert refused.returncode == 1 and "pause it first" in refused.stderr

        assert vmmctl(tmp_path, "--vm=ctl0", "--pause").returncode == 0
        assert json.loads(vmmctl(tmp_path, "--vm=ctl0", "--status", "--json").stdout)["state"] == "paused"
        regs = vmmctl(tmp_path, "--vm=ctl0", "--get-all").stdout
        assert re.search(r"^rip\[0\]\t0x[0-9a-f]{16}$", regs, re.M)
        ticks_paused = console.read_text().count("tick")
        assert vmmctl(tmp_path, "--vm=ctl0", "--resume").returncode == 0

        assert vmmctl(tmp_path, "--vm=ctl0", "--destroy").returncode == 0
        assert proc.wait(timeout=30) == 1
        assert console.read_text().count("tick") >= ticks_paused
        assert not (tmp_path / "ctl0.ctl").exists(), "vmmrun removes its socket when it ends"
        gone = vmmctl(tmp_path, "--vm=ctl0", "--status")
        assert gone.returncode == 1 and "no VM named 'ctl0' is running" in gone.stderr
    finally:
        stop(proc)


@pytest.mark.parametrize(
    "args, message",
    [
        (["-s", "3,virtio-gpu", "--guest", "abtest", "v0"], "unknown emulation 'virtio-gpu'"),
        (["-s", "0,hostbridge", "-s", "0,lpc", "--guest", "abtest", "v0"], "slot already holds hostbridge"),
        (["--guest", "abtest", "-m", "12Q", "v0"], "is not a size"),
        (["--guest", "nosuch", "v0"], "nosuch"),
        (["--guest", "abtest", "--guest-arg", "sweeps=many", "v0"], "sweeps"),
        (["--guest", "abtest", "-l", "com3,stdio", "v0"], "com3"),
        (["-m", "64M", "v0"], "no guest program"),
        (["--guest", "abtest"], "no VMNAME"),
    ],
)
def test_bad_configuration_is_refused_at_start_with_status_4(tmp_path, args, message):
    result = run("--run-dir", str(tmp_path), *args)
    assert result.returncode == 4
    assert message in result.stderr


FOREVER = ["--guest", "console", "--guest-arg", "ticks=0", "--guest-arg", "period_us=1000", "--tsc", "host", "-m", "8M"]


def test_a_second_vmmrun_with_the_same_name_is_refused_and_the_first_stays_reachable(tmp_path):
    """The refused duplicate touches nothing of the running guest: its control socket stays, so
    vmmctl still reaches it (status, checkpoint, destroy), and no third vmmrun can take the name."""
    proc = start_vmmrun(tmp_path, *FOREVER, "-l", f"com1,{tmp_path / 'first.log'}", "dup0")
    try:
        wait_for_socket(tmp_path, "dup0", proc)
        for _ in range(2):  # a third start is refused as the second was: the name is still held
            second = run("--run-dir", str(tmp_path), *FOREVER, "dup0", timeout=60)
            assert second.returncode == 4 and "already running" in second.stderr, second.stderr
            status = vmmctl(tmp_path, "--vm=dup0", "--status", "--json")
            assert status.returncode == 0 and json.loads(status.stdout)["state"] == "running", status.stderr
            assert f"a VM named 'dup0' is already running (process {proc.pid}, control socket" in second.stderr
        ckp = tmp_path / "dup0.ckp"
        saved = vmmctl(tmp_path, "--vm=dup0", f"--checkpoint={ckp}")
        assert saved.returncode == 0 and ckp.with_name("dup0.ckp.meta").exists(), saved.stderr
        assert vmmctl(tmp_path, "--vm=dup0", "--destroy").returncode == 0
        assert proc.wait(timeout=30) == 1
        assert sorted(p.name for p in tmp_path.glob("dup0.*") if not p.name.startswith("dup0.ckp")) == [], \
            "the socket and the lock file are gone with the guest"
    finally:
        stop(proc)


def test_two_vmmruns_started_at_once_with_one_name_yield_exactly_one(tmp_path):
    for attempt in range(3):
        run_dir = tmp_path / f"try{attempt}"
        procs = [start_vmmrun(run_dir, *FOREVER, "twin0") for _ in range(2)]
        try:
            deadline = time.monotonic() + 60
            while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.05)  # the loser ends as soon as it finds the name taken
            refused = [p for p in procs if p.poll() is not None]
            assert len(refused) == 1, [(p.returncode, p.stderr.read()) for p in refused]
            assert refused[0].returncode == 4 and "already running" in refused[0].stderr.read()
            winner = next(p for p in procs if p is not refused[0])
            wait_for_socket(run_dir, "twin0", winner)
            assert vmmctl(run_dir, "--vm=twin0", "--destroy").returncode == 0
            assert winner.wait(timeout=30) == 1
        finally:
            for p in procs:
                stop(p)


@pytest.mark.covers(operation="suspend", guest="abtest", via="cli", vcpus=2)
def test_a_two_vcpu_guest_runs_checkpoints_and_resumes(tmp_path):
    """-c 2: the application processor waits for a STARTUP IPI (abtest never sends one) while
    the BSP runs; both vCPUs' state travels through a suspend and resume."""
    console = tmp_path / "console.log"
    args = ["--guest", "abtest", "--guest-arg", "sweeps=400", "--guest-arg", "report=400", "-c", "2", "-m", "16M", "-l", f"com1,{console}"]
    proc = start_vmmrun(tmp_path, *args, "--pause-at=1000000", "smp0")
    try:
        wait_for_socket(tmp_path, "smp0", proc)
        ckp = tmp_path / "smp0.ckp"
        from .procs import wait_for_state

        wait_for_state(tmp_path, "smp0", "paused")
        regs = vmmctl(tmp_path, "--vm=smp0", "--get-all").stdout
        assert "rip[1]\t0x0000000000000000" in regs, "the AP has not started"
        assert vmmctl(tmp_path, "--vm=smp0", f"--suspend={ckp}").returncode == 0
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)
    resumed = run("-r", str(ckp), "-l", f"com1,{console}", "--run-dir", str(tmp_path), "smp1")
    assert resumed.returncode == 1, resumed.stderr
    pages = (16 * MiB - 2 * MiB) // 4096
    assert console.read_text().endswith(f"abtest: done 400 sweeps over {pages} pages, all counters 400\n")


def test_vmmctl_output_cut_short_by_its_reader_is_not_an_error(tmp_path):
    """`vmmctl --get-all | head -1`: the reader leaves early; vmmctl stops printing quietly."""
    import os
    import sys

    proc = start_vmmrun(tmp_path, *FOREVER, "-c", "4", "--pause-at=0", "pipe0")
    try:
        wait_for_socket(tmp_path, "pipe0", proc)
        wait_for_state(tmp_path, "pipe0", "paused")
        read_end, write_end = os.pipe()
        os.close(read_end)  # as `head -1` is once it has its line: every write now fails (EPIPE)
        try:
            cut = subprocess.run([sys.executable, "-m", "vmmpy.cli.vmmctl", f"--run-dir={tmp_path}", "--vm=pipe0", "--get-all"],
                                 stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write_end)
        assert cut.returncode == 0 and cut.stderr == "", cut.stderr
        headed = subprocess.run(f"{sys.executable} -m vmmpy.cli.vmmctl --run-dir={tmp_path} "
                                "--vm=pipe0 --get-all | head -1", shell=True, capture_output=True, text=True, timeout=60)
        assert headed.stdout.startswith("rax[0]\t0x") and headed.stdout.count("\n") == 1
        assert "Traceback" not in headed.stderr and "Error" not in headed.stderr, headed.stderr
        assert vmmctl(tmp_path, "--vm=pipe0", "--destroy").returncode == 0
    finally:
        stop(proc)


def test_vmmrun_restores_without_leaving_the_memory_file_cached_unless_told_to_keep_it(tmp_path):
    """vmmrun -r of a checkpoint on the disk drops the memory file from the page cache as it
    reads it (no second copy of the guest stays cached); --restore-page-cache keep leaves it.
    Either way the guest finishes as it would have."""
    import os

    from vmmpy import _core

    console = tmp_path / "console.log"
    args = ["--guest", "abtest", "--guest-arg", "sweeps=40", "--guest-arg", "report=40", "-m", "16M", "-l", f"com1,{console}"]
    proc = start_vmmrun(tmp_path, *args, "--pause-at=300000", "pc0")
    try:
        wait_for_state(tmp_path, "pc0", "paused")
        ckp = tmp_path / "pc0.ckp"
        assert vmmctl(tmp_path, "--vm=pc0", f"--suspend={ckp}").returncode == 0
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)

    def cached(evict: bool = False) -> tuple[int, int]:
        fd = os.open(ckp, os.O_RDONLY)
        try:
            if evict:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            pages, held = _core.cached_pages(fd), os.fstat(fd).st_blocks * 512 // 4096
        finally:
            os.close(fd)
        if pages is None:
            pytest.skip("this kernel cannot count cached pages (cachestat(2), Linux 6.5): restores keep the cache")
        if evict and pages * 2 >= held:
            pytest.skip("this filesystem keeps its pages cached whatever it is told (tmpfs?)")
        return pages, held

    pages = (16 * MiB - 2 * MiB) // 4096
    for keep, name in ((False, "pc1"), (True, "pc2")):
        console.write_text("")
        cached(evict=True)
        resumed = run("-r", str(ckp), *(["--restore-page-cache", "keep"] if keep else []), "-l", f"com1,{console}",
                      "--run-dir", str(tmp_path), name)
        assert resumed.returncode == 1, resumed.stderr
        assert console.read_text().endswith(f"abtest: done 40 sweeps over {pages} pages, all counters 40\n")
        now, held = cached()
        if keep:
            # The kernel's own page-out may take a few whole 2 MiB folios (512 pages each) of a
            # kept file meanwhile: three of them, or an eighth, whichever is more. The file is big
            # enough that this still leaves more than twice what a dropped one may keep.
            slack = max(held // 8, 3 * 512)
            assert held - slack > 2 * (held // 8), (held, slack)
            assert now >= held - slack, f"--restore-page-cache keep: only {now} of the file's {held} pages cached"
        else:
            assert now <= held // 8, f"{now} of the file's {held} pages still cached after vmmrun -r"
