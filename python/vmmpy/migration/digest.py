"""The commit's memory digest: kept current as pages move, so the commit costs what changed.

Both sides keep a ``DigestTracker`` (rust/digest/tracker.rs): per-page hashes with a stale bit
per page. Pages are hashed as they move, while they are in the CPU's cache: the source hashes
each 512 KiB window of a batch right after the socket has copied it (over TLS, right before it
is sealed; a compressed batch's pages before they are compressed), the destination right after
it arrives (a compressed batch's pages right after they are decompressed into place). The first
round carries every page, so at the commit each side only combines the hashes it has.

``verify="full"`` has the source recompute the digest from all of its memory instead, after
pausing the guest. That also proves the dirty tracking missed no write (a page the guest wrote
but the harvest never reported would differ on the two sides), at the price of hashing all
memory inside the downtime, about 50-70 ms per GiB here. The destination's tracker is exact in
both modes: it hashes or marks everything it writes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    from ..memory import DigestTracker

T = TypeVar("T")

VERIFY_MODES = ("incremental", "full")

#: Stale pages up to which a tracker's digest is combined at once, not on a thread: with none
#: stale, 1 GiB combines in 0.03 ms, where starting and joining a thread cost 0.13 ms here (more on
#: a busy host, where the thread waits for a CPU), inside the downtime.
INLINE_STALE_PAGES = 256


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
        except BaseException as err:
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


class Ready(Generic[T]):
    """What :class:`InBackground` offers, for work done at once: ``fn()`` is called now, and
    :meth:`result` returns its value or raises what it raised, as the thread's would."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        try:
            self._value = fn()
        except BaseException as err:  # as InBackground's thread keeps it, for result() to raise
            self._error = err

    def done(self) -> bool:
        return True

    def join(self) -> None:
        pass

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


def digest_is_quick(tracker: DigestTracker) -> bool:
    """Whether the tracker's digest only combines hashes (next to no page is left to hash)."""
    return tracker.stale_pages() <= INLINE_STALE_PAGES


def tracker_digest(tracker: DigestTracker) -> InBackground[int] | Ready[int]:
    """The tracker's commit digest, combined while the caller goes on where pages are left to hash
    (a thread), at once where there are next to none (every page was hashed as it moved)."""
    if digest_is_quick(tracker):
        return Ready(tracker.digest)
    return InBackground(tracker.digest)
