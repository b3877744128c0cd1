"""Fault points to enumerate from a recorded migration, and kill -9 at a named phase.

``fault_points(log)`` turns a dry run's message log (``FaultProxy(target).log``) into every place a
``FaultProxy`` can break that migration: each message boundary in each direction (before the
first message, after each one) and one byte offset inside each message larger than 4 KiB (its
middle), for each action. A point found in one run exists in the next only if the migration is
deterministic: migrate a paused or idle guest (the rounds of a busy guest differ from run to
run); a point that is not reached leaves ``proxy.fired`` false, which a test asserts.

``phase_point(log, phase)`` places the source engine's phases (its ``on_phase`` names) on the
wire: the boundary right before the first message the source sends in that phase, so a stall
there holds the destination exactly at the end of the previous phase while the source has
entered it:

* ``handshake``: before HELLO (the connection is open); ``streams``: before STREAMS;
* ``round N``: before that round's MEMORY; ``final``: before the FINAL round's MEMORY (the source
  paused the guest just before it: ``pause`` is the same point);
* ``state``: before STATE; ``commit``: before COMMIT_REQUEST;
* ``committed``: after COMMITTED (the source has stopped for good; the destination may or may
  not have read it); ``resumed``: after the destination's RESUMED.

``kill_at(target, proc, direction, after_message, inside_bytes=None)`` returns a ``FaultProxy``
that stalls the connection at the point, kills ``proc`` (a ``subprocess.Popen``, the source's or
the destination's vmmrun) with SIGKILL, waits for it to die, then forwards again: the survivor
learns of the death exactly as from a dead peer's kernel (a FIN, or a reset when the dead end
had unread bytes), and holds exactly the bytes up to the point. ``kill_at_phase(target, proc,
log, phase)`` does so at ``phase_point(log, phase)``. Watching ``vmmctl --migrate-status``
instead could only tell setup, a finished round count, and the end (the record is published after
each live round), and races the engine; the proxy's point is exact.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable
from typing import NamedTuple

from vmmpy.migration import protocol as P

from .fault_proxy import ACTIONS, DIRECTIONS, FaultProxy, Message

LARGE = 4096


class FaultPoint(NamedTuple):
    """Where and how to break: the ``FaultProxy`` arguments of one case, and a label saying it in
    the log's words (``cut after s2d 2 AUTH``, ``reset at byte 8388660 of s2d 5 BATCH``)."""

    direction: str
    after_message: int
    inside_bytes: int | None
    action: str
    label: str

    def proxy_args(self) -> dict:
        return {"direction": self.direction, "after_message": self.after_message, "inside_bytes": self.inside_bytes,
                "action": self.action}


def _of(log: Iterable[Message], direction: str, connection: int) -> list[Message]:
    return [m for m in log if m.direction == direction and m.connection == connection]


def fault_points(log: Iterable[Message], *, actions: Iterable[str] = ACTIONS, connection: int = 0,
                 large: int = LARGE) -> list[FaultPoint]:
    """Every message boundary of ``connection`` in each direction, and the middle of each message
    longer than ``large`` bytes, for each action. Before the first message is listed once (s2d):
    in either direction it is the moment the connection opens."""
    log = list(log)
    points = []
    for action in actions:
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {', '.join(ACTIONS)}; got {action!r}")
        for direction in DIRECTIONS:
            messages = _of(log, direction, connection)
            if direction == "s2d":
                points.append(FaultPoint(direction, 0, None, action, f"{action} before {direction} 1"))
            for m in messages:
                if m.length > large:
                    inside = m.length // 2
                    points.append(FaultPoint(direction, m.index - 1, inside, action,
                                             f"{action} at byte {inside} of {direction} {m.index} {m.kind}"))
                points.append(FaultPoint(direction, m.index, None, action, f"{action} after {direction} {m.index} {m.kind}"))
    return points


def _first(messages: list[Message], kinds: tuple[str, ...], phase: str, where=lambda m: True) -> Message:
    for m in messages:
        if m.kind in kinds and where(m):
            return m
    raise ValueError(f"phase {phase!r}: the log has no {' or '.join(kinds)} message that starts it")


def phase_point(log: Iterable[Message], phase: str, *, connection: int = 0) -> dict:
    """``direction`` and ``after_message`` of the boundary where the source enters ``phase``."""
    s2d, d2s = _of(log, "s2d", connection), _of(log, "d2s", connection)
    # The state starts with its first part (protocol 9, where the source sends parts) or STATE.
    starts = {"streams": ("STREAMS",), "state": ("STATE_PART", "STATE"), "commit": ("COMMIT_REQUEST",)}
    if phase in ("connect", "handshake"):
        return {"direction": "s2d", "after_message": 0}
    if phase in starts:
        return {"direction": "s2d", "after_message": _first(s2d, starts[phase], phase).index - 1}
    if (match := re.fullmatch(r"round (\d+)", phase)) or phase in ("pause", "final"):
        if match:
            wanted = lambda m: P.decode_memory(m.payload).round == int(match.group(1))  # noqa: E731
        else:
            wanted = lambda m: bool(P.decode_memory(m.payload).flags & P.MemoryFlags.FINAL)  # noqa: E731
        return {"direction": "s2d", "after_message": _first(s2d, ("MEMORY",), phase, wanted).index - 1}
    if phase == "committed":
        return {"direction": "s2d", "after_message": _first(s2d, ("COMMITTED",), phase).index}
    if phase == "resumed":
        return {"direction": "d2s", "after_message": _first(d2s, ("RESUMED",), phase).index}
    raise ValueError(f"unknown phase {phase!r}: one of connect, handshake, streams, round N, pause, final, state, "
                     "commit, committed, resumed")


def kill_at(target: tuple[str, int], proc: subprocess.Popen, *, direction: str, after_message: int,
            inside_bytes: int | None = None) -> FaultProxy:
    """A proxy to ``target`` that kills ``proc`` with SIGKILL at the point (see the module's doc)."""

    def kill(proxy: FaultProxy) -> None:
        proc.kill()
        proc.wait(timeout=30)
        proxy.release()

    return FaultProxy(target, direction=direction, after_message=after_message, inside_bytes=inside_bytes,
                      action="stall", on_fault=kill)


def kill_at_phase(target: tuple[str, int], proc: subprocess.Popen, log: Iterable[Message], phase: str) -> FaultProxy:
    return kill_at(target, proc, **phase_point(log, phase))
