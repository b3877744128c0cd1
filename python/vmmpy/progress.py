"""Figures while a long call runs: a bounded ticker, and what a progress meter's reading says.

The memory core advances a ``ProgressMeter`` (``vmmpy._core``) while a round's page batches go,
a checkpoint's memory is written or an eager restore reads it, with the GIL released. A
:class:`Ticker` calls a function every ``interval`` seconds until its ``with`` block ends (it
never outlives the block, and a tick in progress is waited for), so the figures can be passed on
while the call runs. :func:`read_meter` names a reading's numbers.
"""

from __future__ import annotations

import os
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
    shows progress must never break the work it shows.

    Every ticker of the process is served by one thread, started with the first: a block costs a
    few microseconds, not a thread's start and join (0.15 ms here, and a wait for a CPU on a busy
    host), which matters in a migration's downtime, whose final round is such a block. So a tick
    must be quick and must not wait for another ticker's tick: while it runs, no other ticks."""

    def __init__(self, fn: Callable[[], None], interval: float = TICK_S) -> None:
        if interval <= 0:
            raise ValueError(f"a ticker's interval must be positive seconds, got {interval}")
        self.fn = fn
        self.interval = interval
        self.ticks = 0
        self.error: BaseException | None = None
        self._due = 0.0  # the next tick, while registered (monotonic seconds)
        self._calling = False

    def __enter__(self) -> Ticker:
        _TICKS.add(self)
        return self

    def __exit__(self, *exc) -> None:
        _TICKS.remove(self)


class _TickThread:
    """The thread that serves every :class:`Ticker`: it sleeps until the earliest is due, calls it
    with the lock released, and lets a ticker's block end only between its ticks."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._tickers: set[Ticker] = set()
        self._wake_at = float("inf")  # when the thread wakes on its own; a ticker due sooner wakes it
        self._thread: threading.Thread | None = None

    def add(self, ticker: Ticker) -> None:
        with self._cond:
            ticker._due = time.monotonic() + ticker.interval
            self._tickers.add(ticker)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="progress-ticker", daemon=True)
                self._thread.start()
            elif ticker._due < self._wake_at:
                self._cond.notify()

    def remove(self, ticker: Ticker) -> None:
        with self._cond:
            self._tickers.discard(ticker)
            while ticker._calling:
                self._cond.wait()

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for ticker in sorted((t for t in self._tickers if t._due <= now), key=lambda t: t._due):
                    self._tick(ticker)
                self._wake_at = min((t._due for t in self._tickers), default=float("inf"))
                self._cond.wait(None if self._wake_at == float("inf") else max(0.0, self._wake_at - time.monotonic()))

    def _tick(self, ticker: Ticker) -> None:
        """Call one ticker due now (the lock held on entry and on return, not during the call),
        unless its block ended while an earlier one of the same pass was called."""
        if ticker not in self._tickers:
            return
        ticker._calling = True
        self._cond.release()
        try:
            ticker.fn()
            error = None
        except BaseException as err:  # a Rust panic too: it stops this ticker, not the thread
            error = err
        finally:
            self._cond.acquire()
            ticker._calling = False
            self._cond.notify_all()  # a block ending waits for this tick
        if error is not None:
            ticker.error = error
            self._tickers.discard(ticker)
            return
        ticker.ticks += 1
        ticker._due = time.monotonic() + ticker.interval


_TICKS = _TickThread()


def _after_fork_in_child() -> None:
    """A child of fork has none of the parent's threads: it starts its own ticker thread when it
    needs one, and a tick the parent's thread was in the middle of is over (else the child would
    wait for ever to end that ticker's block)."""
    global _TICKS
    for ticker in _TICKS._tickers:
        ticker._calling = False
    _TICKS = _TickThread()


os.register_at_fork(after_in_child=_after_fork_in_child)


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
