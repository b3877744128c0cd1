"""The commit's memory digest, computed beside the transfer instead of after it.

Once the source has paused the guest its memory no longer changes, and once the destination has
the final round its memory no longer changes either; from those moments each side can digest
its memory (in Rust, without the GIL) while the final pages, the state and the commit messages
are still on the way. Only the part that is not done by the time the commit needs it counts
against the guest's downtime.
"""

from __future__ import annotations

import threading

from ..memory import GuestMemory


class DigestInBackground:
    """``memory.digest()`` on a thread started now; :meth:`result` waits for it."""

    def __init__(self, memory: GuestMemory) -> None:
        self._value: int | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(memory,), name="memory-digest", daemon=True)
        self._thread.start()

    def _run(self, memory: GuestMemory) -> None:
        try:
            self._value = memory.digest()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread by result()
            self._error = err

    def result(self) -> int:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value
