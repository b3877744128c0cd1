"""Figures while a long call runs: a bounded ticker, and what a progress meter's reading says.

The memory core advances a ``ProgressMeter`` (``vmmpy._core``) while a round's page batches go,
a checkpoint's memory is written or an eager restore reads it, with the GIL released. A
:class:`Ticker` calls a function every ``interval`` seconds in a thread of its own until its
``with`` block ends (it never outlives the block, and a tick in progress is waited for), so the
figures can be passed on while the call runs. :func:`read_meter` names a reading's numbers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from . import _core

PAGE_SIZE: int = _core.PAGE_SIZE

ProgressMeter = _core.ProgressMeter

#: How often live figures are refreshed while a long call runs (seconds).
TICK_S = 0.5


@dataclass(frozen=True)
class MeterReading:
    """A :class:`ProgressMeter` at one moment: pages the call covers (``pages_total``, 0 until it
    knows) and has done, data pages (those whose bytes move) likewise, bytes moved, and the
    seconds since the call started."""

    pages_total: int
    data_pages_total: int
    pages_done: int
    data_pages_done: int
    bytes_done: int
    seconds: float

    def work(self) -> tuple[int, int]:
        """(done, total) in bytes of the work that takes the time: the data pages when the call
        knows how many it moves (holes and zero pages cost next to nothing), else all its pages;
        total 0 while unknown."""
        if self.data_pages_total:
            return self.data_pages_done * PAGE_SIZE, self.data_pages_total * PAGE_SIZE
        return self.pages_done * PAGE_SIZE, self.pages_total * PAGE_SIZE

    def as_progress(self, phase: str) -> dict[str, Any]:
        """A progress message (JSON) for ``phase``: the work done of how much (:meth:`work`), its
        rate, the seconds so far and the seconds still needed at that rate, and the bytes moved."""
        done, total = self.work()
        rate = done / self.seconds if self.seconds > 0 else 0.0
        return {"phase": phase, "done_bytes": done, "total_bytes": total, "rate": round(rate), "seconds": round(self.seconds, 3),
                "eta_s": round(max(0, total - done) / rate, 3) if rate > 0 and total else None, "bytes_moved": self.bytes_done}


def read_meter(meter: ProgressMeter, started: float) -> MeterReading:
    """``meter`` now, ``started`` being the ``time.monotonic()`` its call began at."""
    return MeterReading(*meter.read(), seconds=time.monotonic() - started)


class Ticker:
    """``with Ticker(fn):`` calls ``fn()`` every ``interval`` seconds while the block runs (first
    after one interval). The block's end stops it and waits for a tick in progress, so ``fn``
    never runs after the block. A tick that raises stops the ticking (``error`` keeps it): what
    shows progress must never break the work it shows."""

    def __init__(self, fn: Callable[[], None], interval: float = TICK_S) -> None:
        if interval <= 0:
            raise ValueError(f"a ticker's interval must be positive seconds, got {interval}")
        self.fn = fn
        self.interval = interval
        self.ticks = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-ticker", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.fn()
            except Exception as err:
                self.error = err
                return
            self.ticks += 1

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


ProgressCallback = Callable[[dict[str, Any]], None]


@contextmanager
def metered(progress: ProgressCallback | None, phase: str, interval: float = TICK_S) -> Iterator[ProgressMeter | None]:
    """``with metered(progress, "checkpoint") as meter:`` a meter for the long call in the block,
    and ``progress`` called with its reading (:meth:`MeterReading.as_progress`) every ``interval``
    seconds while the block runs, and once more with the last when it ends well (so even a call
    quicker than a tick reports its whole). Without a ``progress`` callback the meter is None:
    the call goes unmetered."""
    if progress is None:
        yield None
        return
    meter = ProgressMeter()
    started = time.monotonic()

    def tick() -> None:
        progress(read_meter(meter, started).as_progress(phase))

    with Ticker(tick, interval):
        yield meter
    _last_tick(tick)


@contextmanager
def timed(progress: ProgressCallback | None, phase: str, window_s: float, interval: float = TICK_S) -> Iterator[None]:
    """``progress`` called every ``interval`` seconds with the seconds spent of a ``window_s``
    long wait (an estimate measuring the dirty rate) while the block runs."""
    if progress is None:
        yield
        return
    started = time.monotonic()

    def tick() -> None:
        progress({"phase": phase, "seconds": round(min(window_s, time.monotonic() - started), 3), "window_s": window_s})

    with Ticker(tick, interval):
        yield
    _last_tick(tick)


def _last_tick(tick: Callable[[], None]) -> None:
    try:
        tick()
    except Exception:  # as a Ticker's: showing progress never fails the work shown
        pass
