"""Guest time for the kernel-emulated devices.

Owns ``ManualClock`` (a guest clock set explicitly, for tests and for run loops that derive
guest time from retired instructions) and the exact integer arithmetic every device uses to
turn guest nanoseconds into ticks of its own oscillator and back. Devices never read the host
clock; all device time comes from a ``GuestClock`` (see ``interfaces``).

Tick arithmetic is exact: tick ``k`` of an oscillator started at ``anchor_ns`` happens at
``anchor_ns + ns_for_ticks(k, ...)``, computed from ``k`` itself, so periodic timers never
accumulate rounding drift however many periods they run.
"""

from __future__ import annotations

NS_PER_S = 1_000_000_000


def ticks_in(elapsed_ns: int, freq_num: int, freq_den: int = 1) -> int:
    """Whole ticks of a ``freq_num / freq_den`` Hz oscillator in ``elapsed_ns`` (floor)."""
    return (elapsed_ns * freq_num) // (freq_den * NS_PER_S)


def ns_for_ticks(ticks: int, freq_num: int, freq_den: int = 1) -> int:
    """The first whole nanosecond at which ``ticks`` ticks have elapsed (ceil)."""
    return -((-ticks * freq_den * NS_PER_S) // freq_num)


class ManualClock:
    """A guest clock that only moves when told to; monotonic and deterministic."""

    def __init__(self, now_ns: int = 0) -> None:
        if not isinstance(now_ns, int) or now_ns < 0:
            raise ValueError(f"clock: start time must be a non-negative int of ns, got {now_ns!r}")
        self._now_ns = now_ns

    def now_ns(self) -> int:
        return self._now_ns

    def set_ns(self, now_ns: int) -> None:
        """Move guest time to ``now_ns``; guest time never runs backwards."""
        if not isinstance(now_ns, int):
            raise TypeError(f"clock: time must be an int of ns, got {now_ns!r}")
        if now_ns < self._now_ns:
            raise ValueError(f"clock: cannot move guest time back from {self._now_ns} ns to {now_ns} ns")
        self._now_ns = now_ns

    def advance_ns(self, delta_ns: int) -> None:
        """Move guest time forward by ``delta_ns``."""
        if not isinstance(delta_ns, int) or delta_ns < 0:
            raise ValueError(f"clock: advance must be a non-negative int of ns, got {delta_ns!r}")
        self._now_ns += delta_ns
