"""Ownership through the commit with real processes: vmmrun on both ends, vmmctl, kill -9.

The guest is abtest: it sweeps its memory, prints a line every quarter and a last line with its
counters. Whatever happens to the migration, the console lines of both ends together must read
exactly as an uninterrupted run's, from the one guest that ran to the end: the guest's own proof
that nothing was lost and nothing ran twice.

The destination's answers (d2s) of a one-stream session are the same whatever the rounds:
1 CHALLENGE, 2 ACCEPT (auth), 3 ACCEPT (spec), 4 COMMIT_ACK, 5 RESUMED; so fault points are named
by them.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from .fault_cases import kill_at
from .fault_proxy import FaultProxy
from .procs import free_port, start_vmmrun, stop, vmmctl, wait_for_listener, wait_for_socket, write_key
from .test_migration_processes import abtest_args, expected_console

SWEEPS = 8000  # about 7 s of guest time: it runs through the migration
MEMORY = "32M"
PAGES = (32 * 2**20 - 2 * 2**20) // 4096
# The destination's answers: the ROUND_DONEs of the live rounds (version 8) come between the
# SPEC's ACCEPT and COMMIT_ACK, as many as there were rounds, so the later points go by name.
AFTER_SPEC_ACCEPT, AFTER_COMMIT_ACK, AFTER_RESUMED = 3, "COMMIT_ACK", "RESUMED"


class Pair:
    """A busy source guest and an empty destination waiting for it, behind a FaultProxy."""

    def __init__(self, tmp_path, key_file) -> None:
        self.tmp = tmp_path
        self.port = free_port()
        self.key = key_file
        self.src_log, self.dst_log = tmp_path / "src.log", tmp_path / "dst.log"
        self.dest = start_vmmrun(tmp_path, "-m", MEMORY, "-l", f"com1,{self.dst_log}", "-R", f"127.0.0.1:{self.port}",
                                 "--key-file", str(key_file), "dst0")
        self.source = start_vmmrun(tmp_path, *abtest_args(SWEEPS, MEMORY), "-l", f"com1,{self.src_log}", "--pause-at=1", "src0")
        wait_for_listener("127.0.0.1", self.port, self.dest)
        wait_for_socket(self.tmp, "src0", self.source)
        self.wait_state("src0", "paused")

    def migrate(self, proxy_port: int, *extra: str):
        assert vmmctl(self.tmp, "--vm=src0", "--resume").returncode == 0  # busy from here, through the migration
        return vmmctl(self.tmp, "--vm=src0", "--migrate-live", "127.0.0.1", str(proxy_port), "--key-file", str(self.key),
                      "--io-timeout", "3", *extra, timeout=120)

    def state(self, name: str) -> str | None:
        result = vmmctl(self.tmp, f"--vm={name}", "--status", "--json")
        return json.loads(result.stdout)["state"] if result.returncode == 0 else None

    def wait_state(self, name: str, state: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state(name) == state:
                return
            time.sleep(0.1)
        raise AssertionError(f"{name} is {self.state(name)!r}, not {state!r}, after {timeout} s")

    def assert_one_guest_finished_exactly(self) -> None:
        """Both processes end; the consoles, joined, are exactly one uninterrupted run's."""
        codes = []
        for proc in (self.source, self.dest):
            try:
                codes.append(proc.wait(timeout=120))
            except Exception:
                stop(proc)
                raise
        text = (self.src_log.read_text() if self.src_log.exists() else "") + (self.dst_log.read_text() if self.dst_log.exists() else "")
        assert text == expected_console(SWEEPS, PAGES), (codes, text)
        assert sorted(codes)[-1] == 1, codes  # the one that ran to the end powered off (1); the other stopped

    def close(self) -> None:
        stop(self.source)
        stop(self.dest)


@pytest.fixture
def pair(tmp_path):
    key = tmp_path / "mig.key"
    write_key(key, os.urandom(32).hex().encode())
    key.chmod(0o600)
    made = []

    def make():
        p = Pair(tmp_path, key)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_committed_lost_to_a_reset_completes_by_reconnecting(pair):
    # The case: every message relayed, then both connections reset in place of
    # COMMITTED. The source must not report success on a guess nor stop its guest; it reconnects,
    # the destination runs the guest, and vmmctl says so.
    p = pair()
    with FaultProxy(("127.0.0.1", p.port), direction="d2s", after_message=AFTER_COMMIT_ACK, action="reset") as proxy:
        result = p.migrate(proxy.port)
        assert proxy.fired
    assert result.returncode == 0, result.stderr
    assert "migration completed (live)" in result.stdout
    assert "in doubt:" in result.stdout and "confirmed it runs the guest (reconnecting)" in result.stdout, result.stdout
    p.assert_one_guest_finished_exactly()


def test_both_in_doubt_until_the_operator_settles_it(pair):
    p = pair()
    # The proxy takes one connection only: the source's reconnects find nobody.
    proxy = FaultProxy(("127.0.0.1", p.port), direction="d2s", after_message=AFTER_COMMIT_ACK, action="reset",
                       accept_many=False)
    result = p.migrate(proxy.port, "--resolve-timeout", "1")
    proxy.close()
    assert result.returncode == 3, (result.returncode, result.stderr)
    assert "migration in doubt" in result.stderr and "--migrate-resolve" in result.stderr, result.stderr
    p.wait_state("src0", "in-doubt")
    p.wait_state("dst0", "in-doubt")
    # Neither side may run it on a guess.
    resumed = vmmctl(p.tmp, "--vm=src0", "--resume")
    assert resumed.returncode == 1 and "in doubt" in resumed.stderr, resumed.stderr
    guess = vmmctl(p.tmp, "--vm=dst0", "--migrate-resolve=run-here")
    assert guess.returncode == 1 and "needs --force" in guess.stderr, guess.stderr
    asked = vmmctl(p.tmp, "--vm=dst0", "--migrate-resolve", "--json")
    assert asked.returncode == 3 and json.loads(asked.stdout)["state"] == "in-doubt", asked.stdout
    # The source asks again (still through the dead proxy's address: nobody there): in doubt.
    again = vmmctl(p.tmp, "--vm=src0", "--migrate-resolve")
    assert again.returncode == 3, again.stdout + again.stderr
    assert p.source.poll() is None and p.dest.poll() is None
    # The operator knows the source committed (it says so): run it on the destination, give it up here.
    ran = vmmctl(p.tmp, "--vm=dst0", "--migrate-resolve=run-here", "--force")
    assert ran.returncode == 0, ran.stderr
    gave = vmmctl(p.tmp, "--vm=src0", "--migrate-resolve=discard-here", "--force")
    assert gave.returncode == 0, gave.stderr
    p.assert_one_guest_finished_exactly()


@pytest.mark.parametrize("victim,after", [("source", AFTER_SPEC_ACCEPT), ("source", AFTER_COMMIT_ACK),
                                          ("dest", AFTER_SPEC_ACCEPT), ("dest", AFTER_COMMIT_ACK), ("dest", AFTER_RESUMED)])
def test_kill_9_of_either_side_at_each_phase_leaves_one_guest(pair, victim, after):
    p = pair()
    killed = p.source if victim == "source" else p.dest
    survivor = "dst0" if victim == "source" else "src0"
    with kill_at(("127.0.0.1", p.port), killed, direction="d2s", after_message=after) as proxy:
        result = p.migrate(proxy.port, "--resolve-timeout", "1")
        assert proxy.fired
    assert killed.poll() is not None
    if victim == "source":
        if after == AFTER_SPEC_ACCEPT:
            # The rounds: the destination discards and exits 4. The guest is gone with its
            # process (kill -9 of the only copy); nothing ran twice.
            assert p.dest.wait(timeout=60) == 4
            return
        # After COMMIT_ACK the source may have committed: if its COMMITTED left before it died
        # the destination runs the guest; if not it holds it in doubt, and as the source is gone
        # its operator runs it there.
        deadline = time.monotonic() + 30
        while p.dest.poll() is None and p.state(survivor) not in ("in-doubt", "running") and time.monotonic() < deadline:
            time.sleep(0.1)
        if p.dest.poll() is None and p.state(survivor) == "in-doubt":
            ran = vmmctl(p.tmp, f"--vm={survivor}", "--migrate-resolve=run-here", "--force")
            assert ran.returncode == 0, ran.stderr
    elif after == AFTER_SPEC_ACCEPT:
        assert result.returncode == 1 and "the guest keeps running here" in result.stderr, result.stderr
    elif after == AFTER_COMMIT_ACK:
        # COMMITTED went to a dead destination: in doubt; it is gone, so run the guest here.
        assert result.returncode == 3, result.stderr
        ran = vmmctl(p.tmp, f"--vm={survivor}", "--migrate-resolve=run-here", "--force")
        assert ran.returncode == 0, ran.stderr
    else:
        # RESUMED arrived: the source knew the guest ran there and stopped; that guest died with
        # its process. The source must not come back to life.
        assert result.returncode == 0, result.stderr
        assert p.source.wait(timeout=60) == 0
        return
    # The survivor runs the one guest to the end; the dead end's console holds the start.
    proc = p.dest if victim == "source" else p.source
    assert proc.wait(timeout=120) == 1
    text = p.src_log.read_text() + (p.dst_log.read_text() if p.dst_log.exists() else "")
    assert text == expected_console(SWEEPS, PAGES), text
