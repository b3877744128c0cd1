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
from collections.abc import Callable
from dataclasses import dataclass

from . import _core

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

    @property
    def fraction(self) -> float | None:
        """The share of the pages done, None while the total is unknown."""
        return min(1.0, self.pages_done / self.pages_total) if self.pages_total else None


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
