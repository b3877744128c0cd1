"""The commit's memory digest: kept current as pages move, and finished beside the transfer.

Both sides keep a ``DigestTracker`` (rust/pages/tracker.rs): per-page hashes with a stale bit
per page. The destination marks every page it receives; the source marks every page its dirty
harvest sends, since those are the pages the guest wrote. Between rounds each side rehashes its
stale pages on a thread, while the next round streams; at the commit only the final round's pages
are left to hash, so the commit check costs what changed, not what the guest has.

``verify="full"`` has the source recompute the digest from all of its memory instead, after
pausing the guest. That also proves the dirty tracking missed no write (a page the guest wrote
but the harvest never reported would differ on the two sides), at the price of hashing all
memory inside the downtime, about 50-70 ms per GiB here. The destination's tracker is exact in
both modes: it marks everything it writes.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Generic, TypeVar

T = TypeVar("T")

VERIFY_MODES = ("incremental", "full")


class InBackground(Generic[T]):
    """``fn()`` on a thread started now; :meth:`result` waits for it and returns or raises."""

    def __init__(self, fn: Callable[[], T], name: str = "memory-digest") -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn,), name=name, daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._value = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread by result()
            self._error = err

    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        """Wait, ignoring the outcome (after a failure, when only the thread's end matters)."""
        self._thread.join()

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class Refresher:
    """Rehashes a tracker's stale pages on a thread between rounds, one refresh at a time, and
    measures what a page costs to hash (the commit will hash the final round's pages)."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker
        self._job: InBackground | None = None
        self._started = 0.0
        self.ms_per_page = 0.0

    def kick(self) -> None:
        """Start a refresh unless one is still running (the next kick catches up)."""
        if self._job is None or self._job.done():
            self.wait()
            self._started = time.monotonic()
            self._job = InBackground(self._refresh, name="digest-refresh")

    def _refresh(self) -> tuple[int, int]:
        pages, chunks = self.tracker.refresh()
        if pages >= 1024:  # enough to time; a handful of pages measures the thread's start-up
            self.ms_per_page = (time.monotonic() - self._started) * 1000 / pages
        return pages, chunks

    def wait(self) -> None:
        """Wait for the running refresh, if any; its error, if it had one, is raised here."""
        job, self._job = self._job, None
        if job is not None:
            job.result()

    def join(self) -> None:
        """Wait for the running refresh, ignoring its outcome."""
        job, self._job = self._job, None
        if job is not None:
            job.join()
