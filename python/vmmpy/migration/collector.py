"""Python's cycle collector held off for a migration's downtime.

The collector runs when enough objects have been allocated since it last ran, wherever that
falls. Decoding and restoring the guest's state allocates thousands of small objects, and in an
idle guest's live migration a generation-1 collection landed inside the destination's restore in
every run traced: 0.9-1.2 ms of a 3 ms downtime (docs/performance.md, session 25). Reference
counting still frees everything that is not in a cycle; what is waits for the collector, which is
back on the moment the guest runs on one side or the other (or the migration ends). The
collection that was due then runs soon after, while the guest runs: it is moved out of the
downtime, not saved.

The switch is process-wide (``gc.disable``), so holds are counted: a source and a destination in
one process (the tests, the library) each hold and release their own, and the collector comes
back when the last is released, and only if it was on before the first.
"""

from __future__ import annotations

import gc
import threading

_lock = threading.Lock()
_holds = 0
_was_enabled = False


class CollectorHold:
    """One hold on the collector: off from :meth:`start` until :meth:`release` (both may be called
    more than once; only the first of each counts)."""

    def __init__(self) -> None:
        self._held = False

    def start(self) -> None:
        global _holds, _was_enabled
        with _lock:
            if self._held:
                return
            if _holds == 0:
                _was_enabled = gc.isenabled()
                gc.disable()
            _holds += 1
            self._held = True

    def release(self) -> None:
        global _holds
        with _lock:
            if not self._held:
                return
            self._held = False
            _holds -= 1
            if _holds == 0 and _was_enabled:
                gc.enable()

    @property
    def held(self) -> bool:
        return self._held


def active_holds() -> int:
    """How many holds keep the collector off now (0 once every migration's downtime is over)."""
    with _lock:
        return _holds
