"""Run a source and a destination against each other on loopback, in threads of the test process,
and check every byte that arrived."""

from __future__ import annotations

import threading

from vmmpy.migration import Destination, MigrationParams, migrate

from .memory_image import memory_differences

KEY = b"k" * 32


class DestinationThread:
    """A Destination on an ephemeral loopback port, receiving in a thread."""

    def __init__(self, adapter, *, host: str = "127.0.0.1", key: bytes | None = None, params: MigrationParams | None = None,
                 cancel: threading.Event | None = None, accept_timeout: float = 30.0, populate: bool = False) -> None:
        # Not populated while waiting unless a test asks: a source connecting at once races the
        # population, and the tests that check how pages arrived need one path each.
        self.dest = Destination(adapter, host, 0, key=key, params=params, cancel=cancel, populate=populate)
        self.host, self.port = self.dest.address[:2]
        self.stats = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.stats = self.dest.run(accept_timeout=accept_timeout)
            except BaseException as err:
                self.error = err

        self.thread = threading.Thread(target=run, name="migration-destination", daemon=True)
        self.thread.start()

    def stop_waiting(self, timeout: float = 60.0):
        """A destination still waiting after its source failed before its SPEC was accepted (a
        stranger, to the destination) waits on: end the wait, then join."""
        self.dest.stop_waiting()
        return self.join(timeout)

    def join(self, timeout: float = 60.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "destination did not finish"
        if self.error is not None:
            raise self.error
        return self.stats




def migrated_memory_differences(src, dst) -> list[str]:
    """The pages where the destination's memory when it started differs from the source's at
    the pause, compared byte for byte without vmmpy's digests (``tests/memory_image.py``). After
    a completed migration the source (a FakeGuest) stays paused, so its memory is still what it
    was at the pause."""
    assert dst.memory_at_start is not None, "the destination guest never started"
    return memory_differences(src.memory, dst.memory_at_start, labels=("on the source", "on the destination"))


def assert_migrated_memory_exact(src, dst) -> None:
    wrong = migrated_memory_differences(src, dst)
    assert not wrong, ("the migration completed, but the destination started with memory that differs from the "
                       "source's at the pause: " + "; ".join(wrong))


def migrate_pair(src, dst, *, live: bool, key: bytes | None = None, dst_key: bytes | None = None,
                 params: MigrationParams | None = None, dst_params: MigrationParams | None = None,
                 check_memory: bool = True, dst_populate: bool = False, **kwargs):
    """Migrate FakeGuest ``src`` to ``dst``; returns both sides' statistics. When both say
    completed, every byte is checked too (``check_memory=False`` leaves that to the test), so a
    wrong page fails the test whatever the commit check let through."""
    d = DestinationThread(dst, key=dst_key, params=dst_params or params, populate=dst_populate)
    stats = migrate(src, d.host, d.port, live=live, key=key, params=params, **kwargs)
    if stats.status != "completed" and d.dest.state == "waiting":
        # The source failed before its SPEC was accepted: to the destination it was a stranger,
        # and it waits on for its real source. Stop it: its record names the stranger.
        dstats = d.stop_waiting()
    else:
        dstats = d.join()
    if check_memory and stats.status == "completed" and dstats.status == "completed":
        assert_migrated_memory_exact(src, dst)
    return stats, dstats
