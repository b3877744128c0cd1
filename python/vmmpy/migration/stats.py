"""What a migration did, as it goes and when it is over: the record both ends return.

Modelled on QEMU's ``query-migrate`` (status, setup/total time, expected and measured downtime,
bytes, zero pages, dirty rate, throughput, throttle) plus what QEMU does not give: a per-round
history, a breakdown of the downtime, and live figures within a round (``current_round``, read
from the memory core's progress meter while the round's pages go). Times are milliseconds,
rates per second, sizes bytes. ``to_dict()`` is plain JSON.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .._core import PAGE_SIZE
from ..progress import MeterReading, ProgressMeter, read_meter
from ..units import format_size

# "in-doubt": the commit was decided but not confirmed (protocol version 5); the guest is held
# paused on this side until the question is settled (docs/migration-protocol.md, "Ownership").
STATUSES = ("setup", "active", "paused", "postcopy", "postcopy-paused", "completed", "failed", "cancelled", "in-doubt")


@dataclass
class RoundStats:
    """One pass over memory. Round 0 carries every page; a final round runs with the guest paused."""

    round: int
    final: bool
    pages_dirtied: int  # pages this round had to send (all pages for round 0)
    pages_sent: int  # pages that went with their data
    zero_pages: int  # pages that went as zero ranges, without data
    bytes: int  # page batches on the wire: headers, range tables, data
    duration_ms: float
    throughput: float  # bytes/s over this round
    dirty_rate: float  # pages/s the guest dirtied while this round ran (0 for a final round)
    throttle: float  # the throttle in force during the round
    # Live rounds only, set by the convergence decision right after the round:
    pages_dirtied_during: int = 0  # pages the guest dirtied while this round ran (the next round's work)
    expected_downtime_ms: float | None = None  # what switching over right after this round would have cost
    stream_bytes: list[int] = field(default_factory=list)  # with parallel streams: page batch bytes per stream
    # Compression (0 when off or not agreed):
    compressed_batches: int = 0  # batches whose pages went as an LZ4 block
    saved_bytes: int = 0  # page bytes those batches did not put on the wire
    compress_attempts: int = 0  # source: batches compressed to see whether they shrink

    @property
    def pages(self) -> int:
        return self.pages_sent + self.zero_pages


@dataclass
class CurrentRound:
    """The round running now, as far as it has got: ``MigrationStats.current_round`` while it
    runs (refreshed every ``vmmpy.progress.TICK_S`` seconds; None between rounds), and
    ``MigrationStats.interrupted_round`` when the migration stopped inside it.

    ``pages_done`` of ``pages_total`` (every page the round covers, zero pages included; None
    while unknown: a destination knows it only for round 0) and ``bytes`` sent (source) or
    received (destination) in this round so far; ``remaining_bytes`` the page data still to send
    (source); ``rate`` bytes/s over the last refresh; ``dirty_rate`` pages/s the guest dirtied
    since the round began (a live source's rounds before the final); ``expected_downtime_ms`` what
    pausing now would cost (this round's rest and the pages dirtied since it began, at ``rate``,
    plus the commit), or in a final round the downtime it will have come to; ``eta_s`` the
    seconds this round still needs at ``rate``."""

    round: int
    final: bool
    elapsed_ms: float
    pages_done: int
    pages_total: int | None
    bytes: int
    remaining_bytes: int | None = None
    rate: float = 0.0
    dirty_rate: float | None = None
    expected_downtime_ms: float | None = None
    eta_s: float | None = None


class RoundProgress:
    """One round's :class:`CurrentRound` figures from the progress meter its page call advances."""

    def __init__(self, number: int, final: bool, *, knows_total: bool = True) -> None:
        self.number = number
        self.final = final
        self.knows_total = knows_total
        self.meter = ProgressMeter()
        self.started = time.monotonic()
        self._last: MeterReading | None = None

    def figures(self, *, dirty_pages: int | None = None, fixed_ms: float = 0.0, paused_s: float | None = None,
                pages_total: int | None = None) -> CurrentRound:
        """The round now. ``dirty_pages``: what the guest dirtied since the round began (a live
        round); ``fixed_ms``: the downtime that does not shrink (the commit); ``paused_s``: how long
        the guest has been paused (a final round); ``pages_total`` when the caller knows it better."""
        now = read_meter(self.meter, self.started)
        last, self._last = self._last, now
        if last is not None and now.seconds - last.seconds >= 0.1 and now.bytes_done > last.bytes_done:
            rate = (now.bytes_done - last.bytes_done) / (now.seconds - last.seconds)
        else:
            rate = now.bytes_done / now.seconds if now.seconds > 0 else 0.0
        total = pages_total if pages_total is not None else (now.pages_total or None) if self.knows_total else None
        remaining = max(0, now.data_pages_total - now.data_pages_done) * PAGE_SIZE if self.knows_total and now.pages_total else None
        eta = remaining / rate if remaining is not None and rate > 0 else None
        expected = None
        if paused_s is not None and eta is not None:
            expected = (paused_s + eta) * 1000 + fixed_ms
        elif dirty_pages is not None and remaining is not None and rate > 0:
            expected = (remaining + dirty_pages * PAGE_SIZE) / rate * 1000 + fixed_ms
        return CurrentRound(
            round=self.number, final=self.final, elapsed_ms=now.seconds * 1000, pages_done=now.pages_done, pages_total=total,
            bytes=now.bytes_done, remaining_bytes=remaining, rate=rate,
            dirty_rate=dirty_pages / now.seconds if dirty_pages is not None and now.seconds > 0 else None,
            expected_downtime_ms=expected, eta_s=eta)


@dataclass
class MigrationStats:
    """The record of one migration, as either end sees it (``role``), live while it runs and
    final when it ends: what ``vmmpy.Vm.migrate``, ``vmmctl --migrate-status`` and the engine's
    progress callback give.

    ``status`` is one of ``setup``, ``active``, ``paused``, ``postcopy`` (the guest runs on the
    destination, pages still moving), ``postcopy-paused`` (their link failed), ``completed``,
    ``failed``, ``cancelled`` or ``in-doubt`` and ``error`` says why it did not complete; ``owner`` where the
    guest is when the record ends. Then times (milliseconds: ``total_time_ms``, ``downtime_ms``
    and its ``downtime_breakdown``), volume (bytes and pages on the wire), rates (per second:
    ``dirty_rate`` in pages, ``throughput`` in bytes), ``rounds`` (one :class:`RoundStats` per pass
    over memory) and ``notes`` for the operator. While a round runs, ``current_round`` (a
    :class:`CurrentRound`) has its live figures; it is None between rounds and once the record
    ends. A migration that failed or was cancelled says where: ``stopped_in`` (the phase) and,
    when it stopped inside a round, ``interrupted_round`` (how far that round got).
    ``summary()`` is one line for people, ``to_dict()`` plain JSON. docs/migration.md,
    "Statistics", describes every field.
    """

    role: str  # "source" or "destination"
    live: bool = False
    status: str = "setup"
    error: str | None = None
    peer: str | None = None
    protocol_version: int | None = None
    streams: int = 1  # connections that carried page batches
    streams_at_once: int | None = None  # source, with parallel streams: how many sent a batch at a time
    policy: str | None = None
    downtime_target_ms: float | None = None  # live: the target the convergence rule aimed for
    bandwidth_cap: float | None = None  # bytes/s, None when the link was not capped
    verify: str | None = None  # source: the commit check, "incremental" or "full"
    compress: str | None = None  # source: the compression mode asked for (off, lz4, auto)
    compression: str | None = None  # the codec both ends agreed on for page batches, None for none
    # times
    setup_time_ms: float = 0.0  # connect + handshake + spec
    total_time_ms: float = 0.0
    expected_downtime_ms: float | None = None  # the last estimate before switch-over
    expected_commit_ms: float = 0.0  # live: the part of downtime that does not shrink (round trip; with verify="full" the digest)
    downtime_ms: float | None = None  # source: paused here -> running on the destination (RESUMED); see docs
    destination_start_ms: float | None = None  # source: what starting the guest took the destination
    # the host's clock (seconds since the epoch), so that on one host the two records give the
    # downtime without an estimate of the wire: source: the guest paused for the last step;
    # destination: the guest ran there
    paused_at: float | None = None
    running_at: float | None = None
    downtime_breakdown: dict[str, float] = field(default_factory=dict)  # final_pages, state, digest, commit
    # volume
    bytes_total: int = 0  # every byte this end sent (source) or received (destination) on the wire
    page_bytes: int = 0  # page batches only
    pages_sent: int = 0  # with data
    zero_pages: int = 0
    state_bytes: int = 0
    state_parts: int = 0  # the frames the state went in (source) or came in (destination): STATE_PARTs and STATE (version 9)
    compressed_batches: int = 0  # page batches that went compressed
    compression_saved_bytes: int = 0  # page bytes compression kept off the wire
    compress_attempts: int = 0  # source: batches compressed to see whether they shrink
    installed_pages: int = 0  # destination: pages put into fresh memory without zeroing it first (docs/memory.md)
    huge_pages: int = 0  # destination: pages read straight into regions advised for transparent huge pages
    # destination: what populating guest memory while it waited for the source did (bytes,
    # target_bytes, seconds, cpu_seconds, stopped, refused, short_of_memory, huge_bytes,
    # huge_cheaper; or error), None if
    # it did not
    populate: dict[str, Any] | None = None
    # rates
    dirty_rate: float = 0.0  # pages/s, last measured
    throughput: float = 0.0  # bytes/s, bandwidth estimate the convergence decision used last
    throttle: float = 0.0
    remaining_bytes: int = 0  # dirty bytes still to send, last measured
    # ownership (protocol version 5): the session's name (hex), and where the guest is when the
    # record ends: "source" (runs or is paused here), "destination", "nowhere" (it stopped
    # running, e.g. powered off), or "in doubt" (held paused until settled)
    session: str | None = None
    owner: str | None = None
    rounds: list[RoundStats] = field(default_factory=list)
    # the current round: live figures while one runs (None between rounds and at the end)
    current_round: CurrentRound | None = None
    # how far a failed or cancelled migration got: the phase it stopped in ("round 2", "state",
    # "commit", ...; a destination's state), and the round it stopped inside, if any
    stopped_in: str | None = None
    interrupted_round: CurrentRound | None = None
    notes: list[str] = field(default_factory=list)
    # post-copy (protocol version 7): None unless the migration switched to it; then a
    # PostcopyStats' figures (docs/postcopy.md)
    postcopy: dict[str, Any] | None = None
    _started: float = field(default_factory=time.monotonic, repr=False)

    @property
    def dirty_rate_bytes(self) -> float:
        return self.dirty_rate * 4096

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self._started) * 1000.0

    def finish(self, status: str, error: str | None = None) -> None:
        assert status in STATUSES, status
        self.status = status
        self.error = error
        self.total_time_ms = self.elapsed_ms()
        self.current_round = None

    def interrupt_round(self, figures: CurrentRound) -> None:
        """The round running stopped (failed, cancelled) as ``figures`` say: keep them in the
        record, and count the bytes that went on the wire."""
        self.current_round = None
        self.interrupted_round = figures
        self.bytes_total += figures.bytes

    def add_round(self, rnd: RoundStats) -> None:
        self.rounds.append(rnd)
        self.page_bytes += rnd.bytes
        self.pages_sent += rnd.pages_sent
        self.zero_pages += rnd.zero_pages
        self.compressed_batches += rnd.compressed_batches
        self.compression_saved_bytes += rnd.saved_bytes
        self.compress_attempts += rnd.compress_attempts

    def to_dict(self) -> dict[str, Any]:
        for _ in range(3):
            try:
                out = asdict(self)
                break
            except RuntimeError:  # a dict of the record changed while it was copied (read while the migration runs)
                continue
        else:
            out = asdict(self)
        out.pop("_started", None)
        if self.status in ("setup", "active", "paused", "postcopy", "postcopy-paused"):
            out["total_time_ms"] = self.elapsed_ms()  # so far, while it runs (as query-migrate's total-time)
        out["dirty_rate_bytes"] = self.dirty_rate_bytes
        out["round_count"] = len(self.rounds)
        return out

    def summary(self) -> str:
        """One line for people: status, time, downtime, volume."""
        down = f"{self.downtime_ms:.1f} ms" if self.downtime_ms is not None else "n/a"
        text = (f"{self.role} {self.status}: {len(self.rounds)} rounds, total {self.total_time_ms:.0f} ms, "
                f"downtime {down}, {self.bytes_total / 2**20:.1f} MiB on the wire "
                f"({self.pages_sent} data pages, {self.zero_pages} zero pages)")
        if self.compressed_batches:
            text += (f"; {self.compressed_batches} batches compressed ({self.compression}), "
                     f"{self.compression_saved_bytes / 2**20:.1f} MiB saved")
        populated = populate_text(self.populate)
        if populated is not None:
            text += f"; {populated}"
        if self.interrupted_round is not None:
            text += f"; {stopped_text(self.to_dict())}"
        return text + (f"; {self.error}" if self.error else "")


def populate_text(populate: dict[str, Any] | None) -> str | None:
    """What populating a destination's memory while it waited did, in words (None if it did not)."""
    if not populate:
        return None
    if "error" in populate:
        return f"memory not populated while waiting: {populate['error']}"
    text = (f"populated {format_size(populate['bytes'])} of {format_size(populate['target_bytes'])} of guest memory "
            f"while waiting, in {populate['seconds']:.2f} s ({populate['cpu_seconds']:.2f} CPU-s")
    # How much went on huge pages, where any did: the thread takes whichever kind it times cheaper
    # (docs/memory.md); older records do not say.
    text += f"; {format_size(populate['huge_bytes'])} on huge pages)" if populate.get("huge_bytes") else ")"
    if populate.get("refused") is not None:
        return text + f", then the kernel refused: {os.strerror(populate['refused'])}"
    if populate.get("short_of_memory") is not None:
        return text + f", stopped with {format_size(populate['short_of_memory'])} of host memory left available"
    return text + (", stopped when the source came" if populate.get("stopped") else "")


def stopped_text(stats: dict[str, Any]) -> str | None:
    """How far a stopped migration got, in words, from its ``to_dict()``; None when it did not stop
    early."""
    phase = stats.get("stopped_in")
    if phase is None:
        return None
    done = stats.get("round_count", len(stats.get("rounds") or ()))
    text = f"stopped in {phase} after {done} complete round{'s' if done != 1 else ''}"
    rnd = stats.get("interrupted_round")
    if rnd:
        of = f" of {rnd['pages_total']}" if rnd.get("pages_total") else ""
        text += f"; round {rnd['round']} had moved {rnd['pages_done']}{of} pages ({format_size(rnd['bytes'])})"
    return text


ProgressCallback = Callable[[MigrationStats], None]
