"""Live figures within a round and progress bars (issue 15, "Status and progress like
query-migrate"): the memory core's progress meter read while a round's pages go, the progress
callback fired within a round, a stopped migration's record saying how far it got, and the bar
both tools draw on a terminal and never into a pipe."""

import threading

from vmmpy.migration import MigrationParams
from vmmpy.migration.source import migrate
from vmmpy.progress import ProgressMeter, Ticker
from vmmpy.units import MiB

from .migration_helpers import DestinationThread


def test_a_ticker_ticks_while_its_block_runs_and_never_after():
    calls = []
    with Ticker(lambda: calls.append(1), interval=0.01) as ticker:
        for _ in range(500):  # bounded: until a few ticks came, at most 5 s
            if len(calls) >= 3:
                break
            threading.Event().wait(0.01)
    after = len(calls)
    threading.Event().wait(0.05)
    assert after >= 3 and len(calls) == after == ticker.ticks, "no tick after the block"

    def boom():
        raise OSError("the terminal went away")

    with Ticker(boom, interval=0.01) as failing:
        threading.Event().wait(0.1)
    assert isinstance(failing.error, OSError) and failing.ticks == 0, "a failing tick stops ticking, never the work"


def test_the_progress_callback_fires_within_a_single_warm_round_with_live_figures(guests):
    """A warm migration is one round: without live figures its progress callback said nothing
    until it was over. Capped at 4 MiB/s, its 8 MiB of data take about 2 s."""
    src = guests("64M", work_pages=2048)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)
    d = DestinationThread(dst, params=MigrationParams())
    seen, received = [], []

    def progress(stats):
        seen.append(stats.current_round)
        record = d.dest.record
        if record is not None and record.current_round is not None:
            received.append(record.current_round)

    stats = migrate(src, d.host, d.port, live=False, params=MigrationParams(bandwidth_cap=4 * MiB), progress=progress)
    dstats = d.join()
    assert stats.status == "completed" and dstats.status == "completed", (stats.error, dstats.error)
    assert len(stats.rounds) == 1 and stats.current_round is None and dstats.current_round is None
    moving = [c for c in seen if c is not None and c.bytes > 0]
    assert len(moving) >= 2, f"the callback fired {len(moving)} times with figures inside the round"
    assert all(c.round == 0 and c.final for c in moving)
    assert [c.bytes for c in moving] == sorted(c.bytes for c in moving), "bytes sent only grow"
    assert [c.remaining_bytes for c in moving] == sorted((c.remaining_bytes for c in moving), reverse=True)
    assert moving[-1].bytes > moving[0].bytes and moving[-1].remaining_bytes < moving[0].remaining_bytes
    pages = dst.memory.memsize // 4096
    assert all(c.pages_total == pages and 0 <= c.pages_done <= pages for c in moving)
    assert all(c.rate > 0 and c.eta_s is not None and c.expected_downtime_ms is not None for c in moving)
    assert all(c.dirty_rate is None for c in moving), "a warm round runs with the guest paused"
    # The destination's record has the same round arriving.
    assert received and all(c.round == 0 and c.pages_total == pages for c in received)
    assert max(c.bytes for c in received) > 0


def test_a_cancelled_migration_says_how_far_it_got(guests):
    """Cancelled inside round 0: the record names the phase, the rounds done (none), and how far
    round 0 got (pages of how many, bytes), and those bytes count in bytes_total."""
    src = guests("64M", work_pages=2048, rate=2000)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)
    d = DestinationThread(dst, params=MigrationParams())
    cancel = threading.Event()

    def progress(stats):
        if stats.current_round is not None and stats.current_round.pages_done > 0:
            cancel.set()

    stats = migrate(src, d.host, d.port, live=True, params=MigrationParams(bandwidth_cap=4 * MiB), progress=progress, cancel=cancel)
    dstats = d.join()
    assert stats.status == "cancelled" and stats.owner == "source", stats.error
    assert stats.stopped_in == "round 0" and stats.rounds == [] and stats.current_round is None
    got = stats.interrupted_round
    assert got is not None and got.round == 0 and not got.final
    assert 0 < got.pages_done < got.pages_total == src.memory.memsize // 4096
    assert 0 < got.bytes <= stats.bytes_total
    assert "stopped in round 0 after 0 complete rounds; round 0 had moved" in stats.summary()
    record = stats.to_dict()
    assert record["interrupted_round"]["pages_done"] == got.pages_done and record["stopped_in"] == "round 0"
    # The destination's record says it too.
    assert dstats.status in ("failed", "cancelled") and dstats.stopped_in and dstats.stopped_in.startswith("state ")
    assert dstats.interrupted_round is not None and dstats.interrupted_round.round == 0
    assert "pause" not in src.calls and "stop_for_good" not in src.calls, "the guest ran on at the source throughout"


def test_a_progress_meter_starts_empty():
    assert ProgressMeter().read() == (0, 0, 0, 0, 0)
