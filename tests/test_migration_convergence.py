"""Convergence policies against a guest that out-dirties the link, and the up-front estimate."""

import time

import pytest

from vmmpy.migration import MigrationParams, estimate
from vmmpy.units import MiB

from .migration_helpers import migrate_pair


@pytest.mark.covers(operation="migrate-live", guest="writer", via="engine", bandwidth="capped", throttled=True)
def test_auto_converge_throttles_like_qemu_and_still_moves_the_guest_exactly(guests):
    # 1024 pages (4 MiB) rewritten at 32 MiB/s against an 8 MiB/s link: never converges unthrottled.
    src = guests("32M", work_pages=1024, rate=8000, chunk_pages=32)
    dst = guests("32M", work_pages=1024, running=False, chunk_pages=32)
    src.wait_for_progress(1024)
    params = MigrationParams(downtime_target_ms=20, bandwidth_cap=8 * MiB, max_rounds=8, policy="auto-converge")
    stats, dstats = migrate_pair(src, dst, live=True, params=params)
    assert stats.status == "completed" and dstats.status == "completed", (stats.error, dstats.error)
    steps = src.throttle_history
    assert steps[:2] == [0.2, pytest.approx(0.3)], steps
    assert all(b - a == pytest.approx(0.1) for a, b in zip(steps, steps[1:])) and max(steps) <= 0.99
    first_throttled = next(r.round for r in stats.rounds if r.throttle > 0)
    assert first_throttled >= 3, "no throttle before two high rounds after round 0 (QEMU: only after pass 2)"
    assert stats.throttle == steps[-1]
    dst.stop_writer()
    assert dst.state_at_start == src.state_at_pause and dst.digest_at_start == src.digest_at_pause
    assert dst.bad_pages() == []


def test_give_up_aborts_cleanly_and_the_guest_keeps_running_on_the_source(guests):
    src = guests("32M", work_pages=1024, rate=8000, chunk_pages=32)
    dst = guests("32M", work_pages=1024, running=False)
    src.wait_for_progress(1024)
    params = MigrationParams(downtime_target_ms=20, bandwidth_cap=8 * MiB, max_rounds=10, stall_rounds=2, policy="give-up")
    reports = []
    stats, dstats = migrate_pair(src, dst, live=True, params=params, progress=lambda s: reports.append(s.status))
    assert stats.status == "failed" and stats.error.startswith("not converging: expected downtime stalled"), stats.error
    assert "guest stays on the source" in stats.error
    assert reports[-1] == "failed", "progress hears the ending too"
    assert "pause" not in src.calls and src.throttle_history == []
    assert dstats.status == "failed" and "source aborted: not converging" in dstats.error and dst.discarded
    before = src.progress()
    src.wait_for_progress(500)
    assert src.progress() > before
    src.stop_writer()
    assert src.bad_pages() == []


@pytest.mark.covers(operation="migrate-live", guest="writer", via="engine", bandwidth="capped")
def test_switch_over_policy_finishes_a_non_converging_guest_with_a_note(guests):
    src = guests("32M", work_pages=1024, rate=8000, chunk_pages=32)
    dst = guests("32M", work_pages=1024, running=False)
    src.wait_for_progress(1024)
    params = MigrationParams(downtime_target_ms=5, bandwidth_cap=8 * MiB, max_rounds=10, stall_rounds=2, policy="switch-over")
    stats, dstats = migrate_pair(src, dst, live=True, params=params)
    assert stats.status == "completed" and dstats.status == "completed"
    assert any("switching over without converging" in n for n in stats.notes)
    assert src.throttle_history == []
    dst.stop_writer()
    assert dst.bad_pages() == [] and dst.digest_at_start == src.digest_at_pause


def test_estimate_measures_the_dirty_rate_and_predicts_convergence(guests):
    g = guests("32M", work_pages=4096, rate=4000)
    g.wait_for_progress(4096)
    # The writer aims at 4000 pages/s; what it really did around the estimate is the reference
    # (a loaded machine can slow it, and the estimate must then see it slower too).
    written, start = g.progress(), time.monotonic()
    fast = estimate(g, bandwidth=1024 * MiB, seconds=0.4)
    did = (g.progress() - written) / (time.monotonic() - start)
    assert fast.converges and fast.throttle_needed == 0.0
    assert 500 < did < 6000, did
    assert did * 0.5 < fast.dirty_rate < did * 1.5, (fast.dirty_rate, did)  # pages/s
    slow = estimate(g, bandwidth=4 * MiB, seconds=0.4, params=MigrationParams(downtime_target_ms=50))
    assert not slow.converges
    assert slow.throttle_needed > 0.5 and "does not converge" in slow.verdict
    assert slow.to_dict()["resident_pages"] >= 4096
