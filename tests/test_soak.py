"""The soak tool (tools/soak.py): a short soak runs and records every migration checked, and its
check fails on a checkpoint whose memory is not abtest's: a stale counter, a misplaced page, a
damaged memory file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools.soak import check_checkpoint, percentile
from vmmpy.guest.programs import abtest
from vmmpy.snapshot.files import read_checkpoint, restore_memory, write_checkpoint

from .procs import start_vmmrun, stop, vmmctl, wait_for_socket

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
RANGES = abtest.sweep_ranges(2 * MiB, 8 * MiB, False, 0)  # the guest below: 16 MiB, sweeping 2M..8M


def soak(*args: str, timeout: float = 280) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.soak", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.covers(operation="migrate-live", guest="abtest", via="cli", key=True)
@pytest.mark.timeout(300)
def test_a_soak_of_three_migrations_checks_each_and_records_it(tmp_path):
    record_file = tmp_path / "soak.json"
    result = soak("--runs", "3", "--mem", "16M", "--dirty-size", "6M", "--dwell", "0.05", "--seed", "7", "--timeout", "90",
                  "--dir", str(tmp_path / "soak"), "--json", str(record_file))
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads(record_file.read_text())
    runs = record["runs"]
    assert [r["direction"] for r in runs] == ["A->B", "B->A", "A->B"]
    assert all(r["ok"] and r["error"] is None for r in runs)
    assert all(r["checked"]["ok"] and r["checked"]["problems"] == [] for r in runs), "every migration was checked"
    sweeps = [r["checked"]["sweeps"] for r in runs]
    assert 0 < sweeps[0] <= sweeps[1] <= sweeps[2], "the guest kept sweeping on each host"
    assert all(r["downtime_ms"] > 0 and r["rounds"] >= 1 and r["pages_sent"] > 0 for r in runs)
    summary = record["summary"]
    assert (summary["runs"], summary["failures"], summary["checked"]) == (3, 0, 3)
    assert summary["downtime_ms"]["max"] == max(r["downtime_ms"] for r in runs)
    assert record["options"]["dirty_size"] == 6 * MiB and record["machine"]["nproc"] >= 1
    assert "run 3/3 A->B" in result.stdout and "3 runs, 0 failures" in result.stdout
    # Passed checkpoints are removed; the logs of every vmmrun stay in --dir.
    assert not list((tmp_path / "soak" / "runs").glob("*.ckp"))
    assert len(list((tmp_path / "soak").glob("host*/vmmrun-*.log"))) == 4


def test_a_guest_that_cannot_start_is_a_clear_error_and_its_log_is_kept(tmp_path):
    result = soak("--runs", "1", "--mem", "16M", "--dirty-size", "100M", "--dir", str(tmp_path), "--timeout", "60", timeout=120)
    assert result.returncode == 1
    assert "abtest: argument end=0x6600000: is past the end of lowmem (0x1000000)" in result.stderr
    assert "Traceback" not in result.stderr and f"kept {tmp_path}" in result.stderr
    assert "past the end of lowmem" in (tmp_path / "hostA" / "vmmrun-0001.log").read_text()


@pytest.mark.timeout(300)
def test_failed_migrations_are_reported_the_guest_checked_where_it_stayed_and_the_logs_kept(tmp_path):
    # The source expects the destination's certificate to name another host: every migration is
    # refused in the TLS handshake, and the guest stays on A.
    record_file = tmp_path / "soak.json"
    result = soak("--runs", "2", "--mem", "16M", "--tls", "--migrate-opt=--tls-hostname=elsewhere.example", "--keep-going",
                  "--dwell", "0", "--timeout", "90", "--dir", str(tmp_path / "soak"), "--json", str(record_file))
    assert result.returncode == 1, result.stdout + result.stderr
    record = json.loads(record_file.read_text())
    assert [r["direction"] for r in record["runs"]] == ["A->B", "A->B"], "the guest stayed on A, so the next run starts there"
    for r in record["runs"]:
        assert not r["ok"] and "elsewhere.example" in r["error"] and "keeps running here" in r["error"]
        assert r["checked"]["ok"], "the source's guest is checked after the failure: nothing lost"
        assert (tmp_path / "soak" / r["logs"]["source"]).exists() and (tmp_path / "soak" / r["logs"]["migrate"]).exists()
    assert (record["summary"]["failures"], record["summary"]["restarts"]) == (2, 0)
    assert result.stdout.count("FAILED: vmmctl --migrate-live A->B exited 1") == 2
    assert "the guest runs on host A, its memory exact" in result.stdout
    assert f"kept {tmp_path / 'soak'}" in result.stderr and record["directory"] == str(tmp_path / "soak")


@pytest.mark.parametrize("args, message", [
    (["--runs", "0"], "argument --runs: 0 must be at least 1"),
    (["--mem", "12Q"], "argument --mem: size '12Q' is not a size"),
    (["--dwell", "-1"], "argument --dwell: -1 must be 0 or more seconds"),
    (["--key-file", "no-such.key"], "--key-file no-such.key: no such file"),
])
def test_bad_options_are_refused_by_name_before_anything_starts(args, message, tmp_path):
    result = soak(*args, "--dir", str(tmp_path / "soak"), timeout=60)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "soak").exists()


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([], 50) is None


# ---- the check can fail ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real checkpoint of a running abtest guest (16 MiB, sweeping 2M..8M), from vmmctl."""
    run_dir = tmp_path_factory.mktemp("soakcheck")
    proc = start_vmmrun(run_dir, "-m", "16M", "--guest", "abtest", "--guest-arg", "end=8M", "--guest-arg", "report=0", "ck0")
    try:
        wait_for_socket(run_dir, "ck0", proc)
        result = vmmctl(run_dir, "--vm=ck0", f"--checkpoint={run_dir / 'ck'}")
        assert result.returncode == 0, result.stderr
    finally:
        stop(proc)
    return run_dir / "ck"


def rewritten(checkpoint, path, change):
    """A consistent copy of ``checkpoint`` (hashes and all) whose memory ``change(memory)`` altered."""
    ckp = read_checkpoint(checkpoint, _registry())
    memory = restore_memory(ckp, "eager")
    try:
        change(memory)
        write_checkpoint(path, memory, ckp.sections, ckp.basic, direct_io=False)
    finally:
        memory.close()
    return path


def _registry():
    from vmmpy.runtime.commands import static_registry
    from vmmpy.runtime.config import VmConfig

    return static_registry(VmConfig("ck0"))


def test_the_check_passes_a_real_checkpoint(checkpoint):
    verdict = check_checkpoint(checkpoint, RANGES)
    assert verdict.ok, verdict.problems
    assert verdict.sweeps > 0 and verdict.instructions > 0


def test_the_check_names_a_counter_one_sweep_stale(checkpoint, tmp_path):
    page = 0x500000
    sweeps = check_checkpoint(checkpoint, RANGES).sweeps

    def stale(memory):
        memory.write(page, (sweeps - 1).to_bytes(8, "little"))  # a page that missed a whole sweep

    verdict = check_checkpoint(rewritten(checkpoint, tmp_path / "stale", stale), RANGES)
    assert not verdict.ok
    assert verdict.problems == [
        f"abtest counter of page 0x500000 is {sweeps - 1}: with {sweeps} sweeps done the pages before the one being swept "
        f"must hold {sweeps + 1} and the rest {sweeps} (a page lost, stale or sent twice)"
    ], "the file is consistent: only the counters tell"


def test_the_check_names_data_where_abtest_never_writes(checkpoint, tmp_path):
    def misplaced(memory):
        memory.write(0xC03000, b"\x01")  # 12 MiB: above the swept 2M..8M

    verdict = check_checkpoint(rewritten(checkpoint, tmp_path / "misplaced", misplaced), RANGES)
    assert verdict.problems == ["page 0xc03000 holds data, but abtest never writes there (outside 0x800000..0x1000000): a misplaced page"]


def test_the_check_reports_a_damaged_memory_file_and_still_judges_its_counters(checkpoint, tmp_path):
    damaged = tmp_path / "damaged"
    for suffix in ("", ".kern", ".meta"):
        Path(f"{damaged}{suffix}").write_bytes(Path(f"{checkpoint}{suffix}").read_bytes())
    with open(damaged, "r+b") as f:
        f.seek(0x300000)
        f.write((10**9).to_bytes(8, "little"))
    verdict = check_checkpoint(damaged, RANGES)
    assert len(verdict.problems) == 2
    assert "does not match its recorded hash" in verdict.problems[0]
    assert verdict.problems[1].startswith("abtest counter of page 0x300000 is 1000000000:")
