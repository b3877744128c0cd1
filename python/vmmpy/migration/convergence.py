"""When to stop pre-copying: the switch-over decision, auto-converge, and the up-front estimate.

After every live round the source knows how many pages the guest dirtied while the round ran
(``dirty_count()`` right after it: the round's harvest cleared the bits when it started) and how
fast the link carried the round. The guest can switch over when the dirty bytes left would go in
``downtime_target_ms`` at that speed (QEMU's and Cloud Hypervisor's rule). When it cannot, the
policy decides: ``auto-converge`` throttles the vCPUs as QEMU does (20 %, then +10 % per step, up
to 99 %, a step whenever the guest dirtied more than half of what a round sent, twice in a row),
``switch-over`` pauses and finishes anyway, ``give-up`` aborts and leaves the guest running on the
source. Any policy meets ``max_rounds`` the same way as a stall: ``give-up`` aborts, the others
switch over.

Post-copy (``postcopy``): ``after=N`` switches to post-copy once N rounds went (0: before any),
whatever convergence says; ``auto`` switches to post-copy where the guest does not converge (where
auto-converge would throttle, a stall or ``max_rounds``), and finishes as pre-copy where it does;
``manual`` runs pre-copy until the operator asks for the switch (``MigrationHandle.start_postcopy``),
finishing as pre-copy if it converges first.

Known blind spot (as Cloud Hypervisor's maintainers note): the estimate covers pages only; device
state, the digest and the commit round trip are measured (``downtime_breakdown``) but predicted
only by the handshake round trip time.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

# MAX_STREAMS from the core, where the wire defines it (protocol.py offers the same): the
# parameters are what vmmctl checks its options with, and the protocol module is 25-45 ms to load.
from .._core import MAX_STREAMS, PAGE_SIZE
from .digest import VERIFY_MODES
from .stats import MigrationStats, RoundStats

POLICIES = ("auto-converge", "switch-over", "give-up")
POSTCOPY_MODES = ("auto", "manual", "after=N")
COMPRESS_MODES = ("off", "lz4", "auto")


#: The longest a migration's connect, handshake, send, receive or commit may wait (about 11.6
#: days): longer waits (infinity among them) overflow the socket's and the locks' timeouts.
MAX_WAIT_S = 1e6


@dataclass
class MigrationParams:
    """How a migration runs: what vmmctl's ``--migrate`` options set, and what
    ``vmmpy.Vm.migrate(params=...)`` takes (this class or a dict of its fields).

    Convergence (live): ``downtime_target_ms`` the downtime to switch over at, ``max_rounds`` and
    ``policy`` (``auto-converge``, ``switch-over``, ``give-up``) for a guest that dirties faster
    than the link carries, with the ``throttle_*`` steps auto-converge takes. The link:
    ``bandwidth_cap`` (bytes/s, None for as fast as it goes), ``streams`` (parallel TCP
    connections), ``compress`` (``off``, ``lz4``, ``auto``), ``detect_zero``. Checks and limits:
    ``verify`` (``incremental`` or ``full``), the ``*_timeout`` seconds for each wait,
    ``max_state_bytes``. Bad values raise ValueError naming the field. docs/migration.md,
    "Parameters", says what each does and its default.
    """

    downtime_target_ms: float = 300.0  # QEMU's downtime-limit and Cloud Hypervisor's downtime_ms default
    bandwidth_cap: float | None = None  # bytes/s; None = as fast as the link goes
    max_rounds: int = 30  # live rounds after round 0 before the policy must act
    policy: str = "auto-converge"
    detect_zero: bool = True
    verify: str = "incremental"  # the commit check: "incremental" (what changed) or "full" (all memory, in the downtime)
    # Page batch compression (docs/migration.md), source side: "off" (the default); "lz4" = every
    # batch that shrinks to 3/4; "auto" = only while it pays on this link, backing off after
    # batches that do not. Used only when the destination agrees (protocol version 4, one stream).
    compress: str = "off"
    accept_compression: bool = True  # destination: take a codec the source offers
    throttle_initial: float = 0.20
    throttle_increment: float = 0.10
    throttle_max: float = 0.99
    throttle_trigger: float = 0.50  # dirtied bytes / sent bytes in a round that counts as "not converging"
    stall_rounds: int = 4  # rounds without a 10 % better expected downtime = stalled
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    io_timeout: float = 30.0  # any single blocking send or receive while memory streams
    commit_timeout: float = 30.0
    # Ownership through the commit (protocol version 5, docs/migration-protocol.md): how long a
    # source whose COMMITTED went unconfirmed keeps reconnecting to settle it before it reports
    # "in doubt" and waits for the operator; and how long a destination holds a guest in doubt
    # (None: until the source or the operator settles it, however long that takes).
    resolve_timeout: float = 30.0
    in_doubt_timeout: float | None = None
    max_state_bytes: int = 256 << 20
    streams: int = 1  # TCP connections carrying page batches, the main one included (protocol v2 for more than one)
    # Post-copy (protocol version 7, docs/postcopy.md): None (pre-copy only), "auto", "manual" or
    # "after=N"; the chunk the destination fetches at a time; how long a source whose page link
    # failed reconnects by itself before it waits for the operator's recover.
    postcopy: str | None = None
    postcopy_chunk: int = 64 * 1024
    recover_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}; got {self.verify!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        if self.compress not in COMPRESS_MODES:
            raise ValueError(f"compress must be one of {', '.join(COMPRESS_MODES)}; got {self.compress!r}")
        if self.downtime_target_ms <= 0:
            raise ValueError(f"downtime_target_ms must be positive, got {self.downtime_target_ms}")
        if self.max_rounds < 0:
            raise ValueError(f"max_rounds must not be negative, got {self.max_rounds}")
        if self.bandwidth_cap is not None and self.bandwidth_cap <= 0:
            raise ValueError(f"bandwidth_cap must be positive bytes/s or None, got {self.bandwidth_cap}")
        if isinstance(self.streams, bool) or not isinstance(self.streams, int) or not 1 <= self.streams <= MAX_STREAMS:
            raise ValueError(f"streams must be a whole number from 1 to {MAX_STREAMS}, got {self.streams!r}")
        for name in ("connect_timeout", "handshake_timeout", "io_timeout", "commit_timeout"):
            wait = getattr(self, name)
            if not 0 < wait <= MAX_WAIT_S:  # NaN too; past the cap the socket and lock waits overflow
                raise ValueError(f"{name} must be positive seconds, at most {MAX_WAIT_S:.0f}; got {wait}")
        if self.resolve_timeout < 0:
            raise ValueError(f"resolve_timeout must not be negative, got {self.resolve_timeout}")
        if self.in_doubt_timeout is not None and self.in_doubt_timeout <= 0:
            raise ValueError(f"in_doubt_timeout must be positive seconds or None, got {self.in_doubt_timeout}")
        self.postcopy_after()  # refuses a bad mode by name
        if not (4096 <= self.postcopy_chunk <= 256 * 1024 and self.postcopy_chunk % 4096 == 0):
            raise ValueError(f"postcopy_chunk must be 4 KiB to 256 KiB in whole 4 KiB pages, got {self.postcopy_chunk}")
        if self.recover_timeout < 0:
            raise ValueError(f"recover_timeout must not be negative, got {self.recover_timeout}")
        for name in ("throttle_initial", "throttle_increment", "throttle_max"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


    @staticmethod
    def io_timeouts(seconds: float) -> dict[str, float]:
        """The fields one ``--io-timeout SECONDS`` sets, on a source (vmmctl) or a destination
        (vmmrun -R): every send and receive and the commit wait that long for the peer, the
        handshake that long but at most its default (ValueError for seconds that are not
        positive, or past MAX_WAIT_S)."""
        if not 0 < seconds <= MAX_WAIT_S:
            raise ValueError(f"--io-timeout must be positive seconds, at most {MAX_WAIT_S:.0f}; got {seconds}")
        return {"io_timeout": seconds, "commit_timeout": seconds, "handshake_timeout": min(seconds, MigrationParams.handshake_timeout)}

    def postcopy_after(self) -> int | None:
        """For ``postcopy="after=N"``: N; None for the other modes (ValueError for a bad one)."""
        mode = self.postcopy
        if mode is None or mode in ("auto", "manual"):
            return None
        if isinstance(mode, str) and mode.startswith("after="):
            count = mode[len("after="):]
            if count.isdigit() and int(count) <= 1_000_000:
                return int(count)
        raise ValueError(f"postcopy must be one of {', '.join(POSTCOPY_MODES)} (N a whole number of rounds, 0 or more); got {mode!r}")


SWITCH = "switch"
CONTINUE = "continue"
GIVE_UP = "give-up"
POSTCOPY = "postcopy"


class Convergence:
    """Decides, after each live round, whether to go on, switch over, or give up; applies the
    auto-converge throttle through the ``throttle`` callable."""

    def __init__(self, params: MigrationParams, stats: MigrationStats, throttle, fixed_ms: float = 0.0) -> None:
        """``fixed_ms``: downtime that does not shrink with the dirty pages (the commit round trip,
        and with ``verify="full"`` the digest of all memory), added to every prediction."""
        self.params = params
        self.stats = stats
        self.set_throttle = throttle
        self.fixed_ms = fixed_ms
        self.throttle = 0.0
        self._high_rounds = 0
        self._best_ms = float("inf")
        self._since_best = 0
        self.reason = ""

    def bandwidth(self) -> float:
        """Bytes/s over the last three rounds, weighted by bytes (a tiny round's latency does not
        dominate)."""
        recent = [r for r in self.stats.rounds if not r.final][-3:]
        total_bytes = sum(r.bytes for r in recent)
        total_s = sum(r.duration_ms for r in recent) / 1000.0
        if total_bytes == 0 or total_s <= 0:
            return float(self.params.bandwidth_cap or 1e9)
        bw = total_bytes / total_s
        if self.params.bandwidth_cap:
            bw = min(bw, self.params.bandwidth_cap)
        return bw

    def after_round(self, rnd: RoundStats, dirty_pages_now: int) -> str:
        p, s = self.params, self.stats
        bw = self.bandwidth()
        remaining = dirty_pages_now * PAGE_SIZE
        pages_ms = remaining / bw * 1000.0
        expected_ms = pages_ms + self.fixed_ms
        s.throughput = bw
        s.remaining_bytes = remaining
        s.expected_downtime_ms = expected_ms
        rnd.expected_downtime_ms = expected_ms
        rnd.pages_dirtied_during = dirty_pages_now
        if rnd.duration_ms > 0:
            rnd.dirty_rate = dirty_pages_now / (rnd.duration_ms / 1000.0)
            s.dirty_rate = rnd.dirty_rate
        if expected_ms <= p.downtime_target_ms:
            self.reason = f"converged: {remaining} dirty bytes at {bw / 2**20:.1f} MiB/s = {expected_ms:.1f} ms <= {p.downtime_target_ms:g} ms"
            return SWITCH
        if self.fixed_ms >= p.downtime_target_ms and pages_ms <= max(1.0, 0.1 * p.downtime_target_ms):
            # More rounds cannot help: the part that does not shrink is over the target already.
            self.reason = (f"switching over: the commit (digest and round trip, {self.fixed_ms:.0f} ms) alone exceeds "
                           f"the {p.downtime_target_ms:g} ms target; the dirty pages left take {pages_ms:.1f} ms")
            s.notes.append(self.reason)
            return SWITCH
        if expected_ms < 0.9 * self._best_ms:
            self._best_ms = expected_ms
            self._since_best = 0
        else:
            self._since_best += 1
        if rnd.round >= 1 and (p.policy == "auto-converge" or p.postcopy == "auto"):
            if remaining > p.throttle_trigger * max(rnd.bytes, 1):
                self._high_rounds += 1
            else:
                self._high_rounds = 0
            if self._high_rounds >= 2 and p.postcopy == "auto":
                self.reason = (f"switching to post-copy: the guest dirtied more than {p.throttle_trigger:.0%} of what a round "
                               f"sent, twice in a row (expected downtime {expected_ms:.0f} ms)")
                s.notes.append(self.reason)
                return POSTCOPY
            if self._high_rounds >= 2:
                self._high_rounds = 0
                self._step_throttle()
        live_rounds = rnd.round  # rounds after round 0
        why = None
        if live_rounds >= p.max_rounds:
            why = f"{live_rounds} rounds reached max_rounds={p.max_rounds}"
        elif self._since_best >= p.stall_rounds and p.policy != "auto-converge":
            why = f"expected downtime stalled at {expected_ms:.0f} ms for {self._since_best} rounds (target {p.downtime_target_ms:g} ms)"
        elif p.policy == "auto-converge" and self.throttle >= p.throttle_max and self._since_best >= p.stall_rounds:
            why = f"throttle at {self.throttle:.0%} and expected downtime still {expected_ms:.0f} ms"
        if why is None:
            return CONTINUE
        if p.postcopy == "auto":
            self.reason = f"switching to post-copy without converging: {why}"
            s.notes.append(self.reason)
            return POSTCOPY
        if p.policy == "give-up":
            self.reason = (f"not converging: {why}; dirty rate {s.dirty_rate * PAGE_SIZE / 2**20:.1f} MiB/s "
                           f"vs bandwidth {bw / 2**20:.1f} MiB/s; guest stays on the source")
            return GIVE_UP
        self.reason = f"switching over without converging: {why}; expected downtime {expected_ms:.0f} ms"
        s.notes.append(self.reason)
        return SWITCH

    def _step_throttle(self) -> None:
        p = self.params
        new = p.throttle_initial if self.throttle == 0 else min(p.throttle_max, self.throttle + p.throttle_increment)
        if new != self.throttle:
            self.throttle = new
            self.stats.throttle = new
            self.set_throttle(new)

    def release(self) -> None:
        if self.throttle:
            self.throttle = 0.0
            self.set_throttle(0.0)


@dataclass
class Estimate:
    """What ``estimate`` measured and predicts (issue 7's ``--estimate``)."""

    window_s: float
    resident_pages: int
    dirty_rate: float  # pages/s early in the window (before pages are dirtied twice)
    working_set_pages: int  # distinct pages dirtied over the window, or resident pages if not saturated
    saturated: bool  # the window saw the working set: dirtying slowed as pages repeated
    bandwidth: float
    downtime_target_ms: float
    first_round_s: float
    converges: bool
    rounds: int
    expected_downtime_ms: float
    total_time_s: float
    throttle_needed: float  # fraction of vCPU time to take away so that it converges (0 if none)
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def estimate(adapter, bandwidth: float, seconds: float = 1.0, params: MigrationParams | None = None, *, samples: int = 4) -> Estimate:
    """Measure the guest's dirty rate over ``seconds`` and predict live migration at ``bandwidth``
    bytes/s with ``params``. Clears the dirty bits: not while a migration runs."""
    params = params or MigrationParams()
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive bytes/s, got {bandwidth}")
    if not 0 < seconds <= 60:
        raise ValueError(f"the estimate window must be in (0, 60] seconds, got {seconds}")
    mem = adapter.memory
    resident = mem.resident_pages()
    mem.get_and_clear_dirty()
    start = time.monotonic()
    points: list[tuple[float, int]] = []
    for i in range(1, samples + 1):
        time.sleep(max(0.0, start + seconds * i / samples - time.monotonic()))
        points.append((time.monotonic() - start, mem.dirty_count()))
    t1, c1 = points[0]
    t_end, c_end = points[-1]
    _, c_half = points[len(points) // 2 - 1] if len(points) >= 2 else points[0]
    rate = c1 / t1 if t1 > 0 else 0.0
    saturated = c_end > 0 and c_end <= 1.25 * c_half
    wss = c_end if saturated else max(resident, c_end)

    def dirtied(t: float) -> float:
        return min(rate * t, wss)

    first = resident * PAGE_SIZE / bandwidth
    pending = dirtied(first)
    total = first
    rounds = 0
    converges = False
    downtime_ms = pending * PAGE_SIZE / bandwidth * 1000
    while rounds <= params.max_rounds:
        t = pending * PAGE_SIZE / bandwidth
        downtime_ms = t * 1000
        if downtime_ms <= params.downtime_target_ms:
            converges = True
            break
        rounds += 1
        total += t
        new = dirtied(t)
        if new >= pending * 0.999:  # not shrinking: the dirty rate keeps up with the link
            break
        pending = new
    total += downtime_ms / 1000
    rate_bytes = rate * PAGE_SIZE
    throttle = 0.0
    if not converges and rate_bytes > 0:
        # Converges when the guest dirties at most half what the link carries in the same time.
        throttle = min(0.99, max(0.0, 1.0 - 0.5 * bandwidth / rate_bytes))
    if converges:
        verdict = (f"converges after {rounds} live rounds in about {total:.1f} s with {downtime_ms:.0f} ms downtime "
                   f"(dirty {rate_bytes / 2**20:.1f} MiB/s, link {bandwidth / 2**20:.1f} MiB/s)")
    else:
        verdict = (f"does not converge to {params.downtime_target_ms:g} ms: the guest dirties {rate_bytes / 2**20:.1f} MiB/s "
                   f"(working set {wss * PAGE_SIZE / 2**20:.0f} MiB) against {bandwidth / 2**20:.1f} MiB/s; "
                   f"the final copy would take {downtime_ms:.0f} ms; auto-converge needs about {throttle:.0%} throttle")
    return Estimate(seconds, resident, rate, int(wss), saturated, bandwidth, params.downtime_target_ms, first,
                    converges, rounds, downtime_ms, total, throttle, verdict)


def estimate_warm(adapter, bandwidth: float, params: MigrationParams | None = None) -> Estimate:
    """Predict a warm migration at ``bandwidth`` bytes/s: the guest stays paused while every
    resident page crosses (never-touched pages go as zero ranges, at almost no cost), so the
    downtime is the whole copy. No dirty-rate window is needed."""
    params = params or MigrationParams()
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive bytes/s, got {bandwidth}")
    resident = adapter.memory.resident_pages()
    copy_s = resident * PAGE_SIZE / bandwidth
    verdict = (f"warm: the guest would be paused about {copy_s * 1000:.0f} ms while {resident * PAGE_SIZE / 2**20:.0f} MiB "
               f"of resident memory crosses at {bandwidth / 2**20:.1f} MiB/s (state and commit add a round trip)")
    return Estimate(0.0, resident, 0.0, resident, False, bandwidth, params.downtime_target_ms, copy_s,
                    True, 0, copy_s * 1000, copy_s, 0.0, verdict)
