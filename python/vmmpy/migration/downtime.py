"""What a migration's downtime holds off: Python's cycle collector, and the host scheduler's long
slices.

The collector runs when enough objects have been allocated since it last ran, wherever that
falls. Decoding and restoring the guest's state allocates thousands of small objects, and in an
idle guest's live migration a generation-1 collection landed inside the destination's restore in
every run traced: 0.9-1.2 ms of a 3 ms downtime (docs/performance.md, session 25). Reference
counting still frees everything that is not in a cycle; what is waits for the collector, which is
back on the moment the guest runs on one side or the other (or the migration ends). The
collection that was due then runs soon after, while the guest runs: it is moved out of the
downtime, not saved.

The downtime is also a chain of threads waking each other (the vCPU pauses, the last pages and
the state go out, the destination restores and starts its vCPU). On a busy host each wake-up may
wait for a neighbour on its core to finish its slice (1.4 ms by default on the hosts measured),
and an idle guest's downtime doubled when one did (docs/performance.md, session 29). For the
hold every thread of the process asks for the shortest slice (``vmmpy._core.set_thread_slice``,
EEVDF's per-thread slice, Linux 6.12 and later; earlier kernels ignore it), so that it preempts
the neighbour when it wakes; its share of the CPU is unchanged. Threads started during the hold
inherit it. At the end every thread gets back the slice it had (one started during the hold, the
one the process had; one that had the scheduler's default follows the default again). Where the
kernel refuses (a seccomp filter, say) the collector is still held and nothing else changes.

Short slices are for waiting and answering, not for copying: during a bulk copy (a warm
migration's one round, a live round before the last) they only make this process's threads
preempt one another, and warm migrations measured slower with them. So a warm migration holds
the collector alone, and a live destination shortens its slices when a round ends (the source
may pause before the next one) and gives them back when a round that is not the last begins.

Both switches are process-wide, so holds are counted: a source and a destination in one process
(the tests, the library) each hold and release their own, and the collector comes back, and the
slices, when the last is released (the collector only if it was on before the first).
"""

from __future__ import annotations

import errno
import gc
import os
import threading
from collections import Counter

from .._core import MIN_THREAD_SLICE_NS, set_thread_slice, thread_slice

_lock = threading.Lock()
_holds = 0  # holds keeping the collector off
_short_holds = 0  # holds keeping the slices short
_was_enabled = False
_slices: dict[int, int] = {}  # each thread's slice before the hold, by thread id
_slices_refused: str | None = None  # why the kernel would not change a slice, once it said so


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [threading.get_native_id()]


def _shorten_slices() -> None:
    global _slices_refused
    if _slices_refused is not None:
        return
    for tid in _threads():
        try:
            before = set_thread_slice(tid, MIN_THREAD_SLICE_NS)
            if before is not None:
                _slices[tid] = before
        except ProcessLookupError:
            continue  # ended meanwhile
        except OSError as err:
            if tid == threading.get_native_id() or err.errno in (errno.ENOSYS, errno.EPERM):
                # Refused for this process (a seccomp filter, an LSM): the hold keeps the collector.
                _slices_refused = err.strerror or str(err)
                break
            continue  # this thread only (another policy or credentials since the listing)


def _give_back(tid: int, slice_ns: int) -> None:
    """Thread ``tid``'s slice back to ``slice_ns``: to the scheduler's default where that is what
    it was (so the thread follows the default again, rather than keeping a fixed copy of it)."""
    set_thread_slice(tid, 0)
    if thread_slice(tid) != slice_ns:
        set_thread_slice(tid, slice_ns)


def _restore_slices() -> None:
    if not _slices:
        return
    # A thread started during the hold gets the slice the process's main thread had.
    default = _slices.get(os.getpid(), Counter(_slices.values()).most_common(1)[0][0])
    seen: set[int] = set()
    for _ in range(8):  # again for threads a thread still short started meanwhile (they inherit it)
        new = [tid for tid in _threads() if tid not in seen]
        if not new:
            break
        for tid in new:
            seen.add(tid)
            try:
                if thread_slice(tid) == MIN_THREAD_SLICE_NS:  # ours, or inherited from a thread of ours
                    _give_back(tid, _slices.get(tid, default))
            except OSError:
                continue
    _slices.clear()


class DowntimeHold:
    """One hold: the collector off and short slices from :meth:`start` until :meth:`release`;
    the slices may be shortened earlier and given back on their own (:meth:`shorten_slices`,
    :meth:`lengthen_slices`). Each may be called more than once; only the first of each counts."""

    def __init__(self) -> None:
        self._held = False
        self._short = False
        self._asked = False  # whether this hold ever asked for short slices

    def shorten_slices(self) -> None:
        """Short slices from now until :meth:`lengthen_slices` or :meth:`release`, the collector
        left as it is: for a live migration's destination between rounds, whose wake-up when
        the final round arrives is already part of the downtime."""
        global _short_holds
        with _lock:
            self._asked = True
            if self._short:
                return
            _short_holds += 1
            self._short = True
            if _short_holds == 1:
                _shorten_slices()

    def lengthen_slices(self) -> None:
        """Give the slices back (a round that is not the last has begun: bulk work, where short
        slices only make this process's threads preempt each other)."""
        global _short_holds
        with _lock:
            if not self._short:
                return
            self._short = False
            _short_holds -= 1
            if _short_holds == 0:
                _restore_slices()

    def start(self, *, slices: bool = True) -> None:
        """The collector off; with ``slices`` short slices too (without, the slices are left as
        they are: a warm migration's downtime is one bulk copy)."""
        global _holds, _was_enabled
        if slices:
            self.shorten_slices()
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
        self.lengthen_slices()
        with _lock:
            if not self._held:
                return
            self._held = False
            _holds -= 1
            if _holds == 0 and _was_enabled:
                gc.enable()

    @property
    def held(self) -> bool:
        """Whether this hold keeps the collector off."""
        return self._held

    @property
    def short(self) -> bool:
        """Whether this hold keeps the slices short."""
        return self._short

    def note_refusal(self, notes: list[str]) -> None:
        """Where this hold asked for short slices and the kernel refused them (the downtime then
        ran on the scheduler's default), say so in ``notes``, once: a migration's statistics,
        when it ends, whichever way it went (pre-copy, post-copy, local)."""
        if self._asked and _slices_refused is not None:
            note = f"the downtime ran on the scheduler's default slices: the kernel refused a shorter one ({_slices_refused})"
            if note not in notes:
                notes.append(note)


def active_holds() -> int:
    """How many holds keep the collector off or the slices short now (0 once every migration's
    downtime is over)."""
    with _lock:
        return max(_holds, _short_holds)


def slices_refused() -> str | None:
    """Why this process could not shorten its threads' slices (the kernel's refusal), or None."""
    return _slices_refused
