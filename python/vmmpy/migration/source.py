"""The source side: handshake, warm or live (pre-copy) memory rounds, state, commit.

Owns the rule that matters most: until COMMITTED is on the wire the source owns the guest. Any
failure before that (refusal, connection loss, timeout, bad frame, cancel, an exception anywhere)
ends with the guest running here, memory untouched, and an ABORT sent to the destination when
the connection still works. Sending COMMITTED is the decision to commit; with protocol version 5
the source then holds its paused guest until the destination confirms it runs the guest
(RESUMED, answered with RELEASED), and only then stops it for good. A link that fails in between
leaves the question open ("in doubt"): the source reconnects for ``resolve_timeout`` seconds to
deliver its decision (RESOLVE), then waits for the operator (``MigrationHandle.resolve``). A
failure after COMMIT_REQUEST but before COMMITTED is an abort, delivered the same way, so a
destination holding the guest in doubt can let it go.

Warm: pause, send every page (never-touched pages as zero ranges without data), state, commit.
Local (a ``unix:PATH`` destination, protocol version 6): pause, hand over the memfds of the
guest's memory and its dirty runs (LOCAL_MEMORY), state, commit: no page is copied or hashed, and
the same commit and ownership steps decide who runs the guest. The memory must be memfd-backed.
Live: round 0 sends every page while the guest runs; each later round harvests-and-clears the
dirty bits and sends those pages; ``Convergence`` decides when to pause for the final round.
Post-copy (protocol version 7, ``params.postcopy``, docs/postcopy.md): at the switch the source
pauses and sends POSTCOPY (the pages the destination lacks), the state and the commit; once the
destination runs the guest, this side answers its page requests from the paused guest until it
has every page, and only then stops the guest for good. From COMMITTED until then neither side
holds the whole guest: a failed link is never an abort; the source reconnects (RECOVER) for
``recover_timeout`` seconds, then waits for the operator's ``recover`` to another address.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable

from ..memory import KVM_TRACKING, PageBatchError
from ..progress import Ticker
from ..state import Section, encode_sections
from ..state.handle import GuestHandle
from . import protocol as P
from .convergence import GIVE_UP, POSTCOPY, SWITCH, Convergence, MigrationParams
from .digest import InBackground, digest_is_quick, tracker_digest
from .downtime import DowntimeHold
from .errors import Aborted, AuthenticationError, Cancelled, ConnectionLost, MigrationError, NotConverging, ProtocolError, Refused
from .net import (
    CancelWatcher,
    Channel,
    await_delivery,
    connect,
    for_page_requests,
    format_address,
    is_unix,
    peer_on_this_host,
    set_io_timeout,
)
from .stats import CurrentRound, MigrationStats, ProgressCallback, RoundProgress, RoundStats
from .streams import open_data_streams
from .tls import TlsConfig, with_tls_error, wrap_tls

PhaseHook = Callable[[str], None]

# After the commit, how long to wait for the destination to say the guest runs (only the
# downtime figure depends on it: the guest is the destination's either way).
RESUMED_WAIT_S = 2.0
# With a destination older than protocol 8: how long a live round waits for the destination to
# take another byte of its pages before it ends anyway.
DELIVERY_WAIT_S = 2.0
# After a failure between COMMIT_REQUEST and COMMITTED, how long to try telling a destination that
# may hold the guest in doubt that the migration was aborted (the guest already runs here).
ABORT_RESOLVE_S = 10.0
# How long a source whose connection was lost waits for the destination's ABORT, which says why.
ABORT_PEEK_S = 0.25


class _Deadline:
    """A socket whose receives all end within one deadline, however the bytes trickle in: each
    waits in select() for what is left of it, then takes only what is there (a TLS session's
    records as much as a plain socket's bytes)."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock, self.end = sock, time.monotonic() + seconds

    def recv(self, size: int) -> bytes:
        pending = getattr(self.sock, "pending", None)  # a TLS session's plaintext, which select() does not see
        for _ in range(10_000):  # bounded; the deadline ends it first
            left = self.end - time.monotonic()
            if left <= 0:
                break
            if not (pending is not None and pending()) and not select.select([self.sock], [], [], left)[0]:
                break
            try:
                return self.sock.recv(size, socket.MSG_DONTWAIT)
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR):
                    raise
                # part of a TLS record: wait for the rest
        raise TimeoutError(errno.ETIMEDOUT, "the deadline passed")

    def __getattr__(self, name: str):
        return getattr(self.sock, name)


#: The CPUs this process may run on that a host needs for a source to send the state in parts
#: to a destination on the same host (``state_in_parts``).
PARTS_ON_ONE_HOST_CPUS = 4


def state_in_parts(sock: socket.socket) -> bool:
    """Whether to send the state in parts (protocol version 9) on this connection, a plain one
    (before TLS). To another host, always: its CPUs read the first parts while this one saves
    the rest. With both ends on this host, only where it has PARTS_ON_ONE_HOST_CPUS CPUs or more:
    the two overlap only where each has a CPU to itself. On a 2-CPU VM (live-idle, alternated
    pairs, docs/performance.md, session 37) the parts took 0.22 ms off a downtime of 2.3 ms with
    each end pinned to a CPU of its own, and 0.23-0.35 ms off 3.3 ms in two quiet sets of three
    (+0.05 in the third); beside a neighbour spinning on one CPU the destination's wake-ups took
    the CPU the source was saving on, and the downtime's median rose by 0.41-1.63 ms in three
    sets of four. "This host" is what the addresses say: a destination in another network
    namespace or container of this host, or behind a proxy, counts as another host."""
    here = sock.family == socket.AF_UNIX or peer_on_this_host(sock)
    return not here or len(os.sched_getaffinity(0)) >= PARTS_ON_ONE_HOST_CPUS


def streams_at_once(sock: socket.socket, streams: int, *, capped: bool) -> int:
    """How many of a round's ``streams`` may send a batch at a time on this connection (a plain
    one, before TLS). To another host, or with a bandwidth cap (each stream paced to its share),
    all of them: there streams are for the network, and a stream waiting for its turn would
    leave its share of the link idle. With both ends on this host, no more than the CPUs this
    process may use: the streams' senders and receivers share those CPUs, and more streams at
    once only take turns on them. On a 2-CPU VM, warm 1 GiB of random memory over 4 streams,
    alternated pairs (docs/performance.md, session 40): 4.56 GiB/s with 2 at once against 4.12
    with all 4 (ahead in 10 of 10, 0.53 CPU-s against 0.59), wired 4.21 against 3.28, beside a
    neighbour spinning on one CPU 3.77 against 3.51; on a slower spell of the host the same day,
    even in four sets and 4 % slower (on 9 % less CPU) beside the neighbour. The streams past
    these then stand down for the round once 64 MiB went quickly (``Turns::stands_down`` in
    rust/wire/streams.rs; session 42: 3.80 GiB/s against 2.60 with all four taking turns, as fast
    as 2 streams). "This host" is what the addresses say, as for ``state_in_parts``, so a tunnel
    to another host (``ssh -L``, a local proxy) looks like this host: the memory core then lets
    every stream go once 0.1 s passes with no stream finishing a batch (``SLOW_TURNS`` in
    rust/wire/streams.rs), as on such a link."""
    here = sock.family == socket.AF_UNIX or peer_on_this_host(sock)
    if not here or capped:
        return streams
    return max(1, min(streams, len(os.sched_getaffinity(0))))


def waiting_abort(sock: socket.socket, seconds: float) -> str | None:
    """The reason of an ABORT frame that is on ``sock`` or arrives within ``seconds`` in all;
    None if none does (silence, the end of the stream, another frame, an error, a closed socket)."""
    try:
        return P.decode_abort(P.read_frame(_Deadline(sock, seconds), allowed=(P.MessageType.ABORT,)).payload)
    except (MigrationError, OSError, ValueError):  # ValueError: select() of a socket already closed
        return None


def migrate(
    adapter: GuestHandle,
    host: str,
    port: int,
    *,
    live: bool,
    key: bytes | None = None,
    params: MigrationParams | None = None,
    cancel: threading.Event | None = None,
    progress: ProgressCallback | None = None,
    on_phase: PhaseHook | None = None,
    tls: TlsConfig | None = None,
) -> MigrationStats:
    """Migrate the guest behind ``adapter`` to ``host:port``; returns the statistics whatever
    happened (``status`` is completed, failed or cancelled, ``error`` says why). ``on_phase`` is
    called with "connect", "handshake", "streams" (with more than one), "round 0", "round N", "pause",
    "final", "state", "commit" as each begins (tests use it to cancel in a given state).
    ``progress`` is called with the statistics as each round begins (but a live migration's
    final round, the downtime), every ``TICK_S`` within it (from a ticker thread:
    ``stats.current_round`` has the round's live figures) and after it. With
    ``tls`` the connection is mutual TLS 1.3 (``vmmpy.migration.tls``), the key's
    challenge-response running inside it."""
    return _Source(adapter, host, port, live, key, params or MigrationParams(), cancel, progress, on_phase, tls).run()


class MigrationHandle:
    """A migration running in a thread: ``cancel()`` in any state, ``wait()`` for the stats."""

    def __init__(self, adapter: GuestHandle, host: str, port: int, **kwargs) -> None:
        self.cancel_event = kwargs.pop("cancel", None) or threading.Event()
        self._stats: MigrationStats | None = None
        self._error: BaseException | None = None
        live = kwargs.pop("live")
        self._source = _Source(adapter, host, port, live, kwargs.pop("key", None), kwargs.pop("params", None) or MigrationParams(),
                               self.cancel_event, kwargs.pop("progress", None), kwargs.pop("on_phase", None), kwargs.pop("tls", None))
        if kwargs:
            raise TypeError(f"MigrationHandle got unexpected arguments {sorted(kwargs)}")

        def run() -> None:
            try:
                self._stats = self._source.run()
            except BaseException as err:
                self._error = err

        self._thread = threading.Thread(target=run, name="migration-source", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self.cancel_event.set()

    def done(self) -> bool:
        return not self._thread.is_alive()

    @property
    def stats(self) -> MigrationStats:
        """The record as it is now: live while the migration runs (``current_round`` refreshed
        every ``TICK_S`` within a round), final once it is over."""
        return self._source.stats

    def wait(self, timeout: float | None = None) -> MigrationStats:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"migration still running after {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._stats is not None
        return self._stats

    def start_postcopy(self) -> None:
        """``--postcopy manual``: switch to post-copy at the end of the pre-copy round running now."""
        self._source.request_postcopy()

    def recover(self, host: str | None = None, port: int | None = None) -> None:
        """A post-copy migration whose page link failed: reconnect now (to ``host:port`` when
        given, e.g. the destination's new address) instead of waiting for the next attempt."""
        self._source.request_recover(host, port)

    @property
    def committing(self) -> bool:
        """COMMIT_REQUEST went out and the migration is not over: the guest is held paused for
        the commit; nothing but the migration may resume or stop it."""
        return not self.done() and self._source.commit_requested

    @property
    def in_doubt(self) -> bool:
        """The migration ended in doubt: the guest is held paused here until ``resolve``."""
        return self.done() and self._stats is not None and self._stats.status == "in-doubt"

    def resolve(self, action: str = "ask", *, force: bool = False, timeout: float | None = None) -> MigrationStats:
        """Settle a migration that ended in doubt (see ``_Source.resolve``); returns the record."""
        if not self.in_doubt:
            status = self._stats.status if self._stats is not None else "running"
            raise ValueError(f"nothing to resolve: the migration is {status}, not in doubt")
        return self._source.resolve(action, force=force, timeout=timeout)


class _Source:
    def __init__(self, adapter, host, port, live, key, params, cancel, progress, on_phase, tls=None) -> None:
        if key is not None and len(key) < 16:
            raise ValueError(f"migration key must be at least 16 bytes, got {len(key)}")
        self.adapter = adapter
        self.memory = adapter.memory
        self.host, self.port = host, port
        self.live = live
        self.key = key
        self.tls = tls
        self.params = params
        self.progress = progress
        self.on_phase = on_phase
        self.watcher = CancelWatcher(cancel)
        self.stats = MigrationStats(role="source", live=live, policy=params.policy if live else None, peer=format_address(host, port),
                                    downtime_target_ms=params.downtime_target_ms if live else None,
                                    bandwidth_cap=params.bandwidth_cap, verify=params.verify,
                                    compress=params.compress)
        # Every page starts stale; each round hashes the pages it sends into it on the way, and
        # the first round sends them all. Not used (None) when verify="full" recomputes it all.
        self.local = is_unix(host)  # a local migration: the memory is handed over, not sent
        self.tracker = self.memory.digest_tracker() if params.verify != "full" and not self.local else None
        # What the page batches use once the destination has answered the offer ("off" until then),
        # and the link speed the "auto" rule starts each round with: the cap, then what the last
        # round measured.
        self.compress = "off"
        self.link_rate: float | None = params.bandwidth_cap
        self.chan: Channel | None = None
        self.data: list[Channel] = []  # parallel streams 1..n-1 (protocol v3), beside the main channel
        self.transcript: tuple[bytes, bytes] = (b"", b"")  # HELLO and CHALLENGE as sent: the JOIN proofs bind them
        self.phase = "setup"
        self.paused = False
        self.committed = False
        self.downtime = DowntimeHold()  # the collector off, short slices: from the pause until RESUMED (downtime.py)
        self.commit_requested = False  # COMMIT_REQUEST went out: the destination may hold the guest in doubt
        self.state_in_parts = True  # the state goes in parts where the destination speaks version 9 (state_in_parts)
        self.streams_at_once = 1  # how many streams send a batch at a time (streams_at_once), set on connecting
        self.session = b""  # session_id() of the handshake (protocol version 5)
        self.last_sent: P.MessageType | None = None  # on the main connection (P.SOURCE_NEXT)
        self.paused_at = 0.0
        self.convergence: Convergence | None = None
        self.rtt_ms = 0.0
        self.round_progress: RoundProgress | None = None  # the round whose pages are going now
        # post-copy: the operator's switch (manual), whether the rounds ended in a switch, the
        # page server once switched, and the operator's recover (an address, or None for the same)
        self.postcopy_asked = threading.Event()
        self.postcopy_switch = False
        self.server = None
        self.recover_asked = threading.Event()
        self.recover_to: tuple[str, int] | None = None

    def request_postcopy(self) -> None:
        if self.params.postcopy != "manual":
            raise ValueError("this migration was not started with --postcopy manual" if self.params.postcopy is None
                             else f"this migration switches to post-copy by itself (--postcopy {self.params.postcopy})")
        if self.postcopy_switch or not self.phase.startswith("round"):
            raise ValueError(f"the switch to post-copy is asked for during the pre-copy rounds; the migration is in {self.phase}")
        self.postcopy_asked.set()

    def request_recover(self, host: str | None, port: int | None) -> None:
        if self.stats.status != "postcopy-paused":
            raise ValueError(f"nothing to recover: the migration is {self.stats.status}, not post-copy with its link down")
        if host is not None and port is not None:
            self.recover_to = (host, port)
        self.recover_asked.set()

    # -- plumbing --------------------------------------------------------------------------------
    def _enter(self, phase: str) -> None:
        self.phase = phase
        if self.on_phase is not None:
            self.on_phase(phase)
        self._check_cancel()

    def _check_cancel(self) -> None:
        if self.watcher.cancelled():
            raise Cancelled(f"cancelled during {self.phase}")

    def _send(self, msg_type: P.MessageType, payload: bytes = b"") -> bytes:
        """Send one frame on the main connection, in the order ``P.SOURCE_NEXT`` allows."""
        P.source_may_send(self.last_sent, msg_type)
        frame = P.encode_frame(msg_type, payload)
        try:
            P.send_bytes(self.chan.out, frame, msg_type.name)
        except MigrationError as err:
            raise self.chan.translate(err, msg_type.name) from None
        self.stats.bytes_total += len(frame)
        self.last_sent = msg_type
        return frame

    def _read(self) -> P.Frame:
        """The answer to the last message sent (``P.SOURCE_AWAITS``); REFUSE and ABORT end the
        migration, anything else is refused by name and phase."""
        expected = (P.SOURCE_AWAITS[self.last_sent],) if self.last_sent in P.SOURCE_AWAITS else ()
        frame = P.read_frame(self.chan.sock, allowed=(*expected, P.MessageType.REFUSE), where=f" from the destination during {self.phase}")
        if frame.type is P.MessageType.REFUSE:
            refusal = P.decode_refuse(frame.payload)
            raise Refused(f"destination refused the migration ({refusal.stage.name.lower()}): {refusal.reason}")
        if frame.type is P.MessageType.ABORT:
            raise Aborted(f"destination aborted: {P.decode_abort(frame.payload)}")
        if frame.type not in expected:
            names = " or ".join(t.name for t in expected)
            raise ProtocolError(f"expected {names} from the destination during {self.phase}, got {frame.type.name}")
        return frame

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> MigrationStats:
        try:
            self._migrate()
        except BaseException as err:
            self._fail(err)
            if not isinstance(err, Exception):
                raise
        finally:
            self.downtime.note_refusal(self.stats.notes)
            self.downtime.release()
            self._close_channels()
            self.watcher.close()
        return self.stats

    def _close_channels(self) -> None:
        for chan in (self.chan, *self.data):
            if chan is not None:
                chan.close()
        self.chan, self.data = None, []

    def _check_postcopy(self) -> None:
        """Post-copy moves a running guest over the network: refuse what it cannot go with."""
        if not self.live:
            raise MigrationError("post-copy is a live migration's way to finish: add --live (a warm migration pauses the guest "
                                 "for the whole copy anyway)")
        if self.local:
            raise MigrationError("a local migration copies no memory: post-copy does not apply")
        if self.memory.dirty_tracking in KVM_TRACKING:
            raise MigrationError("post-copy needs every access to guest memory to pass through vmmpy, which fetches a missing "
                                 "page first; a KVM guest's loads and stores reach its memory directly (docs/kvm.md): "
                                 "migrate it without --postcopy")
        if self.memory.lazy and not self.memory.lazy_status().resident:
            self.memory.load_all()  # the page server reads the memory as it is

    def _check_local(self) -> None:
        """A local migration hands over the memory itself: refuse what cannot be handed over,
        before anything is sent."""
        if self.memory.backing != "memfd":
            raise MigrationError("a local migration hands the guest's memory to the new vmmrun, so it must be memfd-backed; "
                                 "this guest's is anonymous: start it with --memory-backing memfd (-o memory.backing=memfd)")
        if self.live:
            raise MigrationError("a local migration copies no memory, so it has no live rounds: migrate it warm")
        if self.tls is not None:
            raise MigrationError("a local migration goes over a Unix socket on this host: TLS does not apply")
        if self.params.streams > 1:
            raise MigrationError("a local migration sends no pages: parallel streams do not apply (--streams 1)")
        if self.memory.lazy:
            # The destination maps plain memory: every chunk must be in the memfd first (before the pause).
            self.memory.load_all()

    def _migrate(self) -> None:
        p = self.params
        if self.local:
            self._check_local()
        if p.postcopy is not None:
            self._check_postcopy()
        self._enter("connect")
        sock = self._connect(self.watcher)
        self._enter("handshake")
        self._handshake()
        self.session = P.session_id(*self.transcript)
        if (self.stats.protocol_version or 1) >= P.OWNERSHIP_VERSION:
            self.stats.session = self.session.hex()
        self._send_spec()
        if p.streams > 1:
            self._enter("streams")
            self._open_streams()
        self.stats.setup_time_ms = self.stats.elapsed_ms()
        self.stats.status = "active"
        set_io_timeout(sock, p.io_timeout)
        if p.postcopy is not None and (self.stats.protocol_version or 1) < P.POSTCOPY_VERSION:
            raise ProtocolError(f"the destination speaks migration protocol {self.stats.protocol_version}, which has no post-copy "
                                f"(it needs {P.POSTCOPY_VERSION}); migrate without --postcopy")
        if self.local and (self.stats.protocol_version or 1) < P.LOCAL_VERSION:
            raise ProtocolError(f"the destination speaks migration protocol {self.stats.protocol_version}, which cannot take "
                                f"memory descriptors (a local migration needs {P.LOCAL_VERSION})")
        next_round = 0
        if self.live:
            next_round = self._precopy()
        if self.postcopy_switch:
            self._postcopy(next_round)
            return
        # From just before the pause until the destination says RESUMED (or the migration ends);
        # short slices for a live migration's last step, not for a warm one's bulk copy.
        self.downtime.start(slices=self.live)
        paused_at = self._pause()
        if self.local:
            self._enter("memory")
            t = time.monotonic()
            self._send_local_memory()
            self.stats.downtime_breakdown["memory_ms"] = (time.monotonic() - t) * 1000
            digest_job = InBackground(self._local_digest)
        else:
            # Memory is frozen from here. A full check hashes all of it beside the final pages and
            # the state.
            digest_job = InBackground(self.memory.commit_digest) if self.tracker is None else None
            self._enter("final")
            t = time.monotonic()
            self._send_round(next_round, final=True, all_pages=not self.live)
            self.stats.downtime_breakdown["final_pages_ms"] = (time.monotonic() - t) * 1000
            if digest_job is None and not digest_is_quick(self.tracker):
                # Pages are left to hash: on a thread, beside the state's save and encoding.
                digest_job = tracker_digest(self.tracker)
        self._send_state()
        t = time.monotonic()
        if digest_job is None:
            # Every page the guest wrote was sent, and hashed as it went: only combining is left,
            # done now that the state is on its way, while the destination decodes and restores
            # it, which takes longer.
            digest_job = tracker_digest(self.tracker)
        digest = digest_job.result()
        self.stats.downtime_breakdown["digest_ms"] = (time.monotonic() - t) * 1000  # beside the destination's restore
        self._enter("commit")
        t = time.monotonic()
        self.commit_requested = True
        self._send(P.MessageType.COMMIT_REQUEST, P.encode_digest(digest))
        set_io_timeout(sock, p.commit_timeout)
        ack = self._read()
        theirs = P.decode_digest(ack.type, ack.payload)
        if theirs != digest:
            raise ProtocolError(f"COMMIT_ACK carries digest {theirs:#034x}, but the source's memory digest is {digest:#034x}")
        self._check_cancel()
        if not self.watcher.commit_point():
            raise Cancelled("cancelled before commit")
        # The point of no return: from the first byte of COMMITTED the destination may run the guest.
        self.committed = True
        ownership = (self.stats.protocol_version or 1) >= P.OWNERSHIP_VERSION
        try:
            self._send(P.MessageType.COMMITTED)
            self.chan.flush(p.commit_timeout)
        except MigrationError as err:
            if not ownership:
                raise
            self._in_doubt(f"sending COMMITTED failed ({err})")
            return
        committed_at = time.monotonic()
        self.stats.downtime_breakdown["commit_ms"] = (committed_at - t) * 1000
        if not ownership:
            # An older destination: it runs the guest once it reads COMMITTED and nothing can ask it.
            self.adapter.stop_for_good(f"migrated to {self.stats.peer}")
            self.paused = False
            self.stats.owner = "destination"
            self.stats.downtime_ms = self._downtime_until_resumed(paused_at, committed_at, RESUMED_WAIT_S)
            self.downtime.release()
            self.stats.finish("completed")
            self._report()
            return
        try:
            self.stats.downtime_ms = self._downtime_until_resumed(paused_at, committed_at, p.commit_timeout, strict=True)
        except (MigrationError, OSError) as err:
            self._in_doubt(f"the destination did not confirm it runs the guest ({err})")
            return
        self.downtime.release()
        try:
            self._send(P.MessageType.RELEASED)
            self.chan.flush(1.0)
        except (MigrationError, OSError) as err:  # it keeps asking-answering until it hears; nothing is at stake
            self.stats.notes.append(f"could not say RELEASED ({err}); the destination keeps answering on its address")
        self._give_up_guest()
        self._report()

    def _pause(self) -> float:
        """Pause the guest for the last step (the final round, or the switch to post-copy); when."""
        self._enter("pause")
        self.adapter.pause()
        self.paused = True
        self.paused_at = time.monotonic()
        self.stats.paused_at = time.time()
        self.stats.status = "paused"
        return self.paused_at

    def _send_state(self) -> None:
        """The state: in parts of ``STATE_PART_SECTIONS`` sections as they are saved (version
        9: the destination checks each while the rest are saved), the last of them in STATE."""
        self._enter("state")
        t = time.monotonic()
        in_parts = (self.stats.protocol_version or 1) >= P.STATE_PART_VERSION and self.state_in_parts
        sent = 0
        part: list[Section] = []
        for section in self.adapter.save_sections():
            if in_parts and len(part) == P.STATE_PART_SECTIONS:  # a full part, and more to come
                sent += self._send_state_part(P.MessageType.STATE_PART, part, sent)
                part = []
            part.append(section)
        sent += self._send_state_part(P.MessageType.STATE, part, sent)
        self.stats.state_bytes = sent
        self.stats.downtime_breakdown["state_ms"] = (time.monotonic() - t) * 1000

    def _send_state_part(self, msg_type: P.MessageType, sections: list[Section], sent: int) -> int:
        blob = encode_sections(sections)
        if sent + len(blob) > self.params.max_state_bytes:
            upto = f" up to section '{sections[-1].name}'" if sent and sections else ""
            raise MigrationError(f"device state is {sent + len(blob)} bytes{upto}, more than max_state_bytes={self.params.max_state_bytes}")
        self._send(msg_type, blob)
        self.stats.state_parts += 1
        return len(blob)

    # -- post-copy (protocol version 7) ----------------------------------------------------------
    def _postcopy(self, rounds: int) -> None:
        """The switch: pause, POSTCOPY (what the destination lacks), STATE, the commit; then serve
        the destination's page requests until it has every page, reconnecting when the link fails."""
        p = self.params
        self.downtime.start()  # from just before the pause until RESUMED: the switch is the downtime
        paused_at = self._pause()
        self._enter("postcopy")
        t = time.monotonic()
        runs = self.memory.postcopy_runs(all_pages=rounds == 0)
        self.server = self.memory.postcopy_server(runs, p.postcopy_chunk)
        self._send(P.MessageType.POSTCOPY, P.encode_postcopy(P.Postcopy(p.postcopy_chunk, runs)))
        self.stats.postcopy = {"mode": p.postcopy, "after_rounds": rounds, "chunk_size": p.postcopy_chunk,
                               "pages_needed": self.server.pages}
        self.stats.downtime_breakdown["postcopy_ms"] = (time.monotonic() - t) * 1000
        self._send_state()
        self._enter("commit")
        t = time.monotonic()
        self.commit_requested = True
        # No digest: the destination does not hold the whole memory yet. Each page it fetches is
        # checked as it arrives (its reply's xxh3), against the source's memory as it is now.
        self._send(P.MessageType.COMMIT_REQUEST, P.encode_digest(0))
        set_io_timeout(self.chan.sock, p.commit_timeout)
        P.decode_digest(P.MessageType.COMMIT_ACK, self._read().payload)
        self._check_cancel()
        if not self.watcher.commit_point():
            raise Cancelled("cancelled before commit")
        # From the first byte of COMMITTED the destination may run the guest, whose memory is
        # partly only here: from now on nothing is aborted, and this copy is kept until the
        # destination has every page.
        self.committed = True
        self.stats.owner = "destination"
        try:
            self._send(P.MessageType.COMMITTED)
            self.chan.flush(p.commit_timeout)
            committed_at = time.monotonic()
            self.stats.downtime_breakdown["commit_ms"] = (committed_at - t) * 1000
            self.stats.downtime_ms = self._downtime_until_resumed(paused_at, committed_at, p.commit_timeout, strict=True)
            self.stats.postcopy["running_after_ms"] = (time.monotonic() - paused_at) * 1000
        except (MigrationError, OSError) as err:
            self.downtime.release()
            self._link_lost(f"after COMMITTED: {err}")
            self._recover()
        self.downtime.release()  # the guest runs there: serving its pages is not downtime
        self.stats.status = "postcopy"
        self._report()
        switched = time.monotonic()
        with Ticker(self._postcopy_tick):
            while True:
                try:
                    self.server.serve(for_page_requests(self.chan.sock, p.io_timeout))
                    break
                except (PageBatchError, OSError) as err:
                    self._link_lost(str(err))
                    self._recover()
        self._postcopy_tick()
        self.stats.postcopy["postcopy_ms"] = (time.monotonic() - switched) * 1000
        try:
            # What post-copy cost the guest is measured where it runs: the destination's figures.
            done = P.decode_postcopy_done(P.read_frame(self.chan.sock, allowed=(P.MessageType.POSTCOPY_DONE,),
                                                       where=" from the destination after the last page").payload)
            self.stats.postcopy.update(remote_faults=done.remote_faults, fault_p50_us=done.fault_p50_us,
                                       fault_p99_us=done.fault_p99_us, fault_max_us=done.fault_max_us,
                                       blocked_ms=done.blocked_us / 1000)
        except (MigrationError, OSError) as err:
            self.stats.notes.append(f"the destination's post-copy figures did not arrive ({err}); it has every page")
        try:
            self._send(P.MessageType.RELEASED)
            self.chan.flush(1.0)
        except (MigrationError, OSError) as err:
            self.stats.notes.append(f"could not say RELEASED after the last page ({err}); the destination has every page")
        self._give_up_guest()
        self._report()

    def _postcopy_tick(self) -> None:
        if self.server is not None and self.stats.postcopy is not None:
            served = self.server.stats()
            self.stats.postcopy.update(requested_pages=served.demand_pages, pushed_pages=served.background_pages,
                                       zero_pages=served.zero_pages, page_bytes=served.bytes,
                                       requests=served.demand_requests + served.background_requests)
        self._report()

    def _link_lost(self, why: str) -> None:
        self.stats.status = "postcopy-paused"
        self.stats.postcopy["link_failures"] = self.stats.postcopy.get("link_failures", 0) + 1
        self.stats.notes.append(f"post-copy page link failed ({why}): the guest waits for its pages on the destination, "
                                f"its memory is kept here; reconnecting for up to {self.params.recover_timeout:g} s")
        self._close_channels()
        self._report()

    def _recover(self) -> None:
        """Reconnect with RECOVER until the destination takes the page exchange up again: by
        itself for ``recover_timeout`` seconds, then whenever the operator asks (``recover``).
        Never gives up and never discards: the guest's memory is only whole here and there together."""
        deadline = time.monotonic() + self.params.recover_timeout
        delay = 0.05
        waiting = False
        while True:
            asked = self.recover_asked.is_set()
            self.recover_asked.clear()
            if self.recover_to is not None:
                (self.host, self.port), self.recover_to = self.recover_to, None
                self.stats.peer = format_address(self.host, self.port)
            if asked or not waiting:
                try:
                    self._recover_once()
                    self.stats.status = "postcopy"
                    self.stats.postcopy["recoveries"] = self.stats.postcopy.get("recoveries", 0) + 1
                    summary = getattr(self.chan.sock, "tls_summary", None)  # a new TLS handshake: say what it gave
                    self.stats.notes.append(f"post-copy page link recovered to {self.stats.peer}"
                                            + (f" ({summary()})" if summary is not None else ""))
                    self._report()
                    return
                except (MigrationError, OSError) as err:
                    last = str(err)
                if not waiting and time.monotonic() + delay > deadline:
                    waiting = True
                    self.stats.notes.append(f"could not reconnect within recover_timeout={self.params.recover_timeout:g} s ({last}); "
                                            "waiting for `vmmctl --migrate-recover HOST PORT`")
                    self._report()
            if waiting:
                self.recover_asked.wait(1.0)
            else:
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _recover_once(self) -> None:
        self._close_channels()
        try:
            self._connect(None)
            self._handshake()
            if (self.stats.protocol_version or 1) < P.POSTCOPY_VERSION:
                raise ProtocolError(f"the destination now speaks protocol {self.stats.protocol_version}, which cannot recover post-copy")
            self._send(P.MessageType.RECOVER, P.encode_recover(self.session))
            outcome = P.decode_recovered(self._read().payload)
            if outcome is not P.Outcome.RUNNING:
                raise MigrationError(f"the destination {format_address(self.host, self.port)} holds no such post-copy session "
                                     f"({outcome.name.lower()})")
        except BaseException:
            self._close_channels()
            raise

    def _send_local_memory(self) -> None:
        """LOCAL_MEMORY, then the memfds on one byte (SCM_RIGHTS): the guest is paused, so the
        dirty runs are exact, and they are only read: a failure leaves them as they were."""
        mem = self.memory
        segments = tuple((seg.name, seg.gpa, seg.size) for seg in mem.segments)
        self._send(P.MessageType.LOCAL_MEMORY, P.encode_local_memory(P.LocalMemory(segments, mem.peek_dirty_runs())))
        P.send_memory_fds(self.chan.sock, mem.memfds())

    def _local_digest(self) -> int:
        return P.local_digest([(s.name, s.gpa, s.size, *s.memfd_identity) for s in self.memory.segments])

    # -- ownership: in doubt and its resolution (protocol version 5) ----------------------------
    def _give_up_guest(self) -> None:
        self.adapter.stop_for_good(f"migrated to {self.stats.peer}")
        self.paused = False
        self.stats.owner = "destination"
        self.stats.finish("completed")

    def _in_doubt(self, why: str) -> None:
        """COMMITTED went (or may have gone) out and the destination did not confirm: hold the
        guest paused and deliver the decision by reconnecting, for resolve_timeout seconds."""
        self.downtime.release()  # the wait for an answer may be long; the hold need not last it
        self.stats.owner = "in doubt"
        self.stats.notes.append(f"in doubt: {why}; asking the destination again for up to {self.params.resolve_timeout:g} s")
        self.stats.finish("in-doubt", f"{why}; the guest is held paused here until the destination confirms it runs it")
        self._report()
        self._close_channels()
        self._settle(P.Decision.COMMIT, self.params.resolve_timeout, by="reconnecting")

    def _settle(self, decision: P.Decision, timeout: float, *, by: str, refused_means_nothing: bool = False) -> P.Outcome | None:
        """Deliver ``decision`` until the destination answers or ``timeout`` passes; act on the
        answer. Returns the outcome, or None when it could not be asked."""
        outcome = self._ask(decision, timeout, by=by, refused_means_nothing=refused_means_nothing)
        if outcome is not None:
            self._apply(decision, outcome, by)
        return outcome

    def _ask(self, decision: P.Decision, timeout: float, *, by: str, refused_means_nothing: bool = False) -> P.Outcome | None:
        """RESOLVE(decision) on new connections, with backoff, until one is answered or
        ``timeout`` passes (None, noted)."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        last = "no attempt was made"
        refused_since: float | None = None
        while True:
            try:
                return self._resolve_once(decision)
            except (MigrationError, OSError) as err:
                last = str(err)
                if isinstance(err, ConnectionLost) and "connection refused" in last:
                    refused_since = refused_since or time.monotonic()
                    # Nobody listens there: a version 5 destination listens from the end of the
                    # join window until it is settled, so it holds nothing in doubt.
                    if refused_means_nothing and time.monotonic() - refused_since > 0.5:
                        self.stats.notes.append("the destination does not listen any more: it holds no copy in doubt")
                        return None
                else:
                    refused_since = None
            if time.monotonic() + delay > deadline:
                self.stats.notes.append(f"could not reach the destination to say {decision.name.lower()} ({by}): {last}")
                return None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _resolve_once(self, decision: P.Decision) -> P.Outcome:
        self._close_channels()
        try:
            self._connect(None)
            self._handshake()
            if (self.stats.protocol_version or 1) < P.OWNERSHIP_VERSION:
                raise ProtocolError(f"the destination now speaks protocol {self.stats.protocol_version}, which cannot resolve")
            self._send(P.MessageType.RESOLVE, P.encode_resolve(P.Resolve(self.session, decision)))
            answer = P.decode_resolved(self._read().payload)
            if answer.outcome is P.Outcome.RUNNING:
                try:
                    self._send(P.MessageType.RELEASED)
                    self.chan.flush(1.0)
                except MigrationError:
                    pass  # it answers again if asked; the guest is its own either way
            return answer.outcome
        finally:
            self._close_channels()

    def _apply(self, decision: P.Decision, outcome: P.Outcome, by: str) -> None:
        where = format_address(self.host, self.port)
        if decision is P.Decision.ABORT:
            # The guest already runs here again; this only frees a copy held in doubt there.
            if outcome is P.Outcome.RUNNING:
                # Cannot happen with a correct destination (it runs only on COMMITTED or a commit RESOLVE).
                self.stats.notes.append(f"DANGER: the destination {where} says it runs the guest though this source "
                                        "never committed; two copies may run")
            else:
                self.stats.notes.append(f"told the destination {where} the migration was aborted ({by}): "
                                        f"it {'discarded its copy' if outcome is P.Outcome.DISCARDED else 'holds no copy'}")
            return
        if outcome is P.Outcome.RUNNING:
            self.stats.notes.append(f"the destination {where} confirmed it runs the guest ({by})")
            self.stats.downtime_ms = (time.monotonic() - self.paused_at) * 1000
            self.stats.notes.append("downtime measured to that confirmation")
            self._give_up_guest()
        elif outcome is P.Outcome.DISCARDED:
            # Its operator discarded the copy in doubt: the guest is ours again.
            self.adapter.resume()
            self.paused = False
            self.stats.owner = "source"
            self.stats.finish("failed", f"the destination {where} discarded the guest before it learned of the commit; "
                                        "the guest is this host's again, as it was before the migration (running, or paused)")
        else:
            self.stats.notes.append(f"the destination {where} holds no such session: the process that held it is gone "
                                    "or another one listens there")
        self._report()

    def resolve(self, action: str = "ask", *, force: bool = False, timeout: float | None = None) -> MigrationStats:
        """The operator's word on a migration in doubt. ``ask`` delivers the decision (commit)
        again; ``run-here`` asks the destination to abort and resumes the guest here once it has
        discarded its copy (with ``force``, also when it cannot be reached: only if you know it
        does not run the guest); ``discard-here`` stops the guest here for good (needs ``force``
        unless the destination confirms it runs it)."""
        if self.stats.status != "in-doubt":
            raise ValueError(f"nothing to resolve: the migration is {self.stats.status}, not in doubt")
        timeout = self.params.resolve_timeout if timeout is None else timeout
        if action == "ask":
            self._settle(P.Decision.COMMIT, timeout, by="the operator's resolve")
        elif action == "run-here":
            outcome = None if timeout <= 0 else self._settle_abort_for_operator(timeout)
            if outcome is None and self.stats.status == "in-doubt":
                if not force:
                    raise ValueError("the destination cannot be reached, so it may run the guest: run-here needs --force "
                                     "(only when you know the destination does not run it)")
                self.adapter.resume()
                self.paused = False
                self.stats.owner = "source"
                self.stats.finish("failed", "settled by the operator (run-here, forced): the guest is this host's again, "
                                            "as it was before the migration (running, or paused)")
        elif action == "discard-here":
            outcome = None if timeout <= 0 else self._settle(P.Decision.COMMIT, timeout, by="the operator's resolve")
            if self.stats.status == "in-doubt":
                if not force:
                    raise ValueError("the destination did not confirm it runs the guest: discard-here needs --force "
                                     "(only when you know it runs there)")
                self.stats.notes.append("settled by the operator (discard-here, forced)")
                self._give_up_guest()
        else:
            raise ValueError(f"unknown resolve action {action!r}: ask, run-here or discard-here")
        self._report()
        return self.stats

    def _settle_abort_for_operator(self, timeout: float) -> P.Outcome | None:
        """run-here: the source changes its mind, which is safe only while the destination has
        not run the guest; its answer decides."""
        outcome = self._ask(P.Decision.ABORT, timeout, by="the operator's run-here")
        if outcome is P.Outcome.RUNNING:
            self.stats.notes.append("run-here refused: the destination runs the guest; stopped it here")
            self._apply(P.Decision.COMMIT, outcome, "the operator's resolve")
        elif outcome is P.Outcome.DISCARDED:
            self.adapter.resume()
            self.paused = False
            self.stats.owner = "source"
            self.stats.finish("failed", "settled by the operator (run-here): the destination discarded its copy; the guest runs here")
        else:
            return None
        return outcome

    def _connect(self, watcher: CancelWatcher | None) -> socket.socket:
        """A new main connection (TLS when configured) as ``self.chan``; returns its socket."""
        p = self.params
        sock = connect(self.host, self.port, timeout=p.connect_timeout)
        if watcher is not None:
            watcher.watch(sock)
        self.state_in_parts = state_in_parts(sock)
        self.streams_at_once = streams_at_once(sock, self.params.streams, capped=bool(self.params.bandwidth_cap))
        if self.tls is not None:
            sock = wrap_tls(sock, self.tls, server_side=False,
                            server_hostname=self.tls.hostname or self.host, timeout=p.handshake_timeout)
            if watcher is not None:
                watcher.watch(sock)
            if self.chan is None and not self.committed and not self.commit_requested:  # the migration's own connection
                self.stats.notes.append(sock.tls_summary())
        set_io_timeout(sock, p.handshake_timeout)
        # With parallel streams each connection gets an even share of the cap: together they keep to it.
        self.chan = Channel(sock, p.bandwidth_cap / p.streams if p.bandwidth_cap and not self.local else None)
        self.last_sent = None  # a new connection starts the sequence again
        if watcher is not None:
            for s in self.chan.sockets():
                watcher.watch(s)
        return sock

    def _downtime_until_resumed(self, paused_at: float, committed_at: float, wait: float, *, strict: bool = False) -> float:
        """The guest's downtime, paused here to running there: until RESUMED arrives, less its
        time on the wire, taken as half of what the COMMITTED -> RESUMED exchange took beyond the
        destination's start (which RESUMED carries). Without RESUMED (the link died after the commit,
        or the destination is slow to start) it ends at COMMITTED sent, with a note; ``strict``
        raises instead (version 5: no RESUMED means the outcome is in doubt)."""
        try:
            set_io_timeout(self.chan.sock, wait)
            frame = self._read()
            start_us = P.decode_resumed(frame.payload)
        except (MigrationError, OSError) as err:
            if strict:
                raise
            self.stats.notes.append(f"the destination did not confirm the guest runs ({err}); downtime measured to COMMITTED sent")
            return (committed_at - paused_at) * 1000
        arrived = time.monotonic()
        # Each way on the wire is about the same: half the exchange less the start. (The
        # handshake's round trip was taken before: a cold destination's, often longer than this
        # whole exchange, so the downtime ended at COMMITTED sent, leaving out the start.)
        one_way = max(0.0, (arrived - committed_at - start_us / 1e6) / 2)
        resumed_at = arrived - one_way
        self.stats.downtime_breakdown["resume_ms"] = (resumed_at - committed_at) * 1000
        self.stats.destination_start_ms = start_us / 1000
        return (resumed_at - paused_at) * 1000

    def _handshake(self) -> None:
        t = time.monotonic()
        hello = self._send(P.MessageType.HELLO, P.encode_hello(P.Hello(P.PROTOCOL_VERSIONS, os.urandom(P.NONCE_SIZE))))
        challenge_frame = self._read()
        self.rtt_ms = (time.monotonic() - t) * 1000
        challenge = P.decode_challenge(challenge_frame.payload)
        if challenge.version not in P.PROTOCOL_VERSIONS:
            raise ProtocolError(f"destination chose protocol version {challenge.version}, which the source did not offer {list(P.PROTOCOL_VERSIONS)}")
        self.stats.protocol_version = challenge.version
        if self.key is not None and not challenge.key_required:
            raise AuthenticationError("the destination runs without a key but this migration has one: refusing to send the guest to an unauthenticated destination")
        mac = P.source_proof(self.key, hello, challenge_frame.raw) if self.key is not None else b""
        auth = self._send(P.MessageType.AUTH, P.encode_auth(mac))
        self.transcript = (hello, challenge_frame.raw)
        accept = P.decode_accept(self._read().payload)
        if accept.stage is not P.Stage.AUTH:
            raise ProtocolError(f"expected the destination to accept authentication, got an ACCEPT for {accept.stage.name}")
        if self.key is not None:
            expected = P.destination_proof(self.key, hello, challenge_frame.raw, auth)
            if not P.proofs_equal(accept.proof, expected):
                raise AuthenticationError("the destination's proof does not match the key: it does not hold the same key")

    def _send_spec(self) -> None:
        version = self.stats.protocol_version or 1
        # With parallel streams each stream compresses with a compressor of its own.
        offer = ("lz4",) if self.params.compress != "off" and version >= P.COMPRESSION_VERSION else ()
        spec = dataclasses.replace(P.Spec.from_dict(self.adapter.spec(), live=self.live), compression=offer)
        self._send(P.MessageType.SPEC, P.encode_spec(spec, version))
        accept = P.decode_accept(self._read().payload, version)
        if accept.stage is not P.Stage.SPEC:
            raise ProtocolError(f"expected the destination to accept the spec, got an ACCEPT for {accept.stage.name}")
        if accept.compression is not None and accept.compression not in offer:
            raise ProtocolError(f"the destination chose compression {accept.compression!r}, which the source did not offer {list(offer)}")
        self.stats.compression = accept.compression
        if accept.compression is not None:
            self.compress = self.params.compress
        elif self.params.compress != "off":
            why = "the destination cannot take compression (" + (
                f"it speaks protocol version {version}" if version < P.COMPRESSION_VERSION else "it declined the offer") + ")"
            self.stats.notes.append(f"page batches go uncompressed: {why}")

    def _open_streams(self) -> None:
        """Ask for ``params.streams`` streams on the main connection, then open and join the data
        connections (each proves it belongs to this session; the destination proves it holds the key)."""
        p = self.params
        version = self.stats.protocol_version or 1
        if version < P.STREAMS_VERSION:
            raise ProtocolError(f"the destination speaks migration protocol {version}, which has no parallel streams "
                                f"(they need {P.STREAMS_VERSION}); migrate with one stream (--streams 1)")
        self._send(P.MessageType.STREAMS, P.encode_streams(p.streams))
        grant = P.decode_streams_token(self._read().payload)
        if grant.count != p.streams:
            raise ProtocolError(f"STREAMS_TOKEN grants {grant.count} streams, the source asked for {p.streams}")
        hello, challenge = self.transcript
        wrap = None
        if self.tls is not None:  # each data connection is mutual TLS too, as the main one
            def wrap(sock: socket.socket) -> socket.socket:
                return wrap_tls(sock, self.tls, server_side=False,
                                server_hostname=self.tls.hostname or self.host, timeout=p.handshake_timeout)
        socks = open_data_streams(self.host, self.port, grant, key=self.key, hello=hello, challenge=challenge,
                                  connect_timeout=p.connect_timeout, handshake_timeout=p.handshake_timeout, watcher=self.watcher,
                                  wrap=wrap)
        for sock in socks:
            set_io_timeout(sock, p.io_timeout)
            chan = Channel(sock, p.bandwidth_cap / p.streams if p.bandwidth_cap else None)
            self.data.append(chan)
            for s in chan.sockets():
                self.watcher.watch(s)
        self.stats.streams = p.streams
        self.stats.streams_at_once = min(self.streams_at_once, p.streams)

    def _translate(self, err: BaseException, what: str) -> MigrationError:
        """A pacing relay's own failure, on whichever stream, explains a failed write best."""
        for chan in self.data:
            if chan.relay_error is not None:
                return chan.translate(err, what)
        return self.chan.translate(err, what)

    def _send_round(self, number: int, *, final: bool, all_pages: bool) -> RoundStats:
        """One MEMORY frame, the round's page batches, the end-of-round batch, MEMORY_END. While
        the pages go (one call into the memory core, GIL released), ``stats.current_round`` is
        refreshed from its progress meter and the progress callback called, every ``TICK_S``."""
        self.round_progress = RoundProgress(number, final)
        if not (final and self.live):
            # The round has begun: say so at once. Not for a live migration's final round: it is
            # the downtime, which a report (the statistics as JSON to vmmctl: 0.2-0.4 ms here)
            # would lengthen, and it is over in milliseconds; one that lasts ticks as any round.
            self._round_tick()
        try:
            with Ticker(self._round_tick):
                rnd = self._send_round_pages(number, final=final, all_pages=all_pages, meter=self.round_progress.meter)
        except BaseException:
            self.stats.interrupt_round(self._round_figures())
            raise
        finally:
            self.round_progress = None
        self.stats.current_round = None
        self.stats.bytes_total += rnd.bytes
        self.stats.add_round(rnd)
        return rnd

    def _round_figures(self) -> CurrentRound:
        rp = self.round_progress
        dirty = None
        if self.live and not rp.final:
            try:
                dirty = self.memory.dirty_count()  # since the round's harvest: bits are read, never cleared here
            except OSError:  # memory going away with a failed round: its figures go without the dirty rate
                pass
        paused_s = time.monotonic() - self.paused_at if self.paused else None
        return rp.figures(dirty_pages=dirty, fixed_ms=self.stats.expected_commit_ms or self.rtt_ms, paused_s=paused_s)

    def _round_tick(self) -> None:
        self.stats.current_round = self._round_figures()
        self._report()

    def _send_round_pages(self, number: int, *, final: bool, all_pages: bool, meter) -> RoundStats:
        flags = (P.MemoryFlags.ALL_PAGES if all_pages else P.MemoryFlags(0)) | (P.MemoryFlags.FINAL if final else P.MemoryFlags(0))
        throttle = self.convergence.throttle if self.convergence else 0.0
        start = time.monotonic()
        self._send(P.MessageType.MEMORY, P.encode_memory(P.Memory(number, flags)))
        fd = self.chan.out_fd
        detect_zero = self.params.detect_zero
        stream_bytes: list[int] = []
        try:
            if self.data:
                # Harvested once, spread over every stream; each stream's share ends with its own
                # empty batch, and each compresses where the destination agreed, as one stream does.
                fds = [fd, *(chan.out_fd for chan in self.data)]
                sent = self.memory.send_pages_multi(fds, all_pages=all_pages, detect_zero=detect_zero, tracker=self.tracker,
                                                   meter=meter, compress=self.compress, link_rate=self.link_rate,
                                                   at_once=self.streams_at_once)
                end_bytes = len(fds) * P.BATCH_HEADER_SIZE
                stream_bytes = [s["wire_bytes"] + P.BATCH_HEADER_SIZE for s in sent["streams"]]
            else:
                # One stream: batches may be compressed where the destination agreed.
                how = {"detect_zero": detect_zero, "tracker": self.tracker, "compress": self.compress, "link_rate": self.link_rate,
                       "meter": meter}
                sent = self.memory.send_all_pages(fd, **how) if all_pages else self.memory.send_dirty_pages(fd, **how)
                end = P.end_of_round_batch(self.memory.segments[0].gpa)
                self.chan.out.sendall(end)
                end_bytes = len(end)
        except (PageBatchError, OSError) as err:
            raise self._translate(err, f"round {number}'s page batches") from None
        wire = sent["wire_bytes"] + end_bytes
        if sent.get("link_rate"):
            cap = self.params.bandwidth_cap
            self.link_rate = min(cap, sent["link_rate"]) if cap else sent["link_rate"]
        self._send(P.MessageType.MEMORY_END, P.encode_memory_end(
            P.MemoryEnd(number, sent["batches"], sent["data_pages"], sent["zero_pages"], sent["wire_bytes"])))
        if not final:
            self._await_round_taken(number)
        duration = time.monotonic() - start
        rnd = RoundStats(
            round=number, final=final, pages_dirtied=sent["data_pages"] + sent["zero_pages"], pages_sent=sent["data_pages"],
            zero_pages=sent["zero_pages"], bytes=wire, duration_ms=duration * 1000,
            throughput=wire / duration if duration > 0 else 0.0, dirty_rate=0.0, throttle=throttle, stream_bytes=stream_bytes,
            compressed_batches=sent.get("compressed_batches", 0), saved_bytes=sent.get("saved_bytes", 0),
            compress_attempts=sent.get("compress_attempts", 0))
        return rnd

    def _await_round_taken(self, number: int) -> None:
        """A round that is not final ends when the destination has taken it, not when its pages
        are in this host's send buffers (megabytes of them, and more in the destination's
        receive buffers, which the kernel sizes): the throughput the convergence rule sees is the
        real one, and the pause for the final round does not wait behind the destination's
        backlog. Version 8 says so (ROUND_DONE); with an older destination, until the bytes reach
        its kernel, bounded."""
        socks = [self.chan.sock, *(chan.sock for chan in self.data)]
        if (self.stats.protocol_version or 1) < P.ROUND_DONE_VERSION:
            await_delivery(socks, DELIVERY_WAIT_S, stop=self.watcher.cancelled)
            self._check_cancel()
            return
        # On a slow link the backlog takes long to drain: the wait lasts while the destination
        # keeps taking bytes, and the answer's io_timeout starts once it has them all.
        timeout = self.params.io_timeout
        if not await_delivery(socks, timeout, stop=self.watcher.cancelled):
            self._check_cancel()
            stalled = OSError(errno.EAGAIN, "the destination took nothing")
            stalled.timeout = timeout  # type: ignore[attr-defined]
            raise self.chan.translate(stalled, f"round {number}'s page batches")
        try:
            done = P.decode_round_done(self._read().payload)
        except MigrationError as err:
            # The same kind of error, saying what the source was waiting for.
            raise type(err)(f"{err} (waiting for the destination to confirm round {number}: ROUND_DONE)") from None
        if done != number:
            raise ProtocolError(f"ROUND_DONE names round {done}, but round {number} was sent")

    def _precopy(self) -> int:
        """Live rounds until the convergence rule says switch over; returns the final round's number."""
        # The commit costs a round trip and the digest work that cannot hide behind the final
        # transfer: with verify="full", hashing all memory (timed here); incrementally, only
        # combining, since each round hashes its pages as it sends them (so a round's measured
        # throughput already includes the hashing).
        t = time.monotonic()
        full_ms = 0.0
        if self.params.verify == "full":
            self.memory.commit_digest()
            full_ms = (time.monotonic() - t) * 1000
        self.stats.expected_commit_ms = full_ms + self.rtt_ms
        self.convergence = Convergence(self.params, self.stats, self.adapter.throttle, fixed_ms=self.stats.expected_commit_ms)
        self._enter("round 0")
        self.memory.get_and_clear_dirty()  # round 0 sends everything as it is now; later writes show up in round 1
        after = self.params.postcopy_after()
        number = 0
        while True:
            if (after is not None and number >= after) or self.postcopy_asked.is_set():
                self.postcopy_switch = True
                self.stats.notes.append(f"switching to post-copy after {number} round{'s' if number != 1 else ''}: "
                                        + (f"--postcopy after={after}" if after is not None else "asked by the operator"))
                return number
            rnd = self._send_round(number, final=False, all_pages=number == 0)
            decision = self.convergence.after_round(rnd, self.memory.dirty_count())
            self._report()
            if decision == POSTCOPY:
                self.postcopy_switch = True
                return number + 1
            if decision == SWITCH and after is not None:
                decision = None  # after=N: post-copy after exactly N rounds, converged or not
            if decision == SWITCH:
                return number + 1
            if decision == GIVE_UP and after is None:
                raise NotConverging(self.convergence.reason)
            number += 1
            self._enter(f"round {number}")

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.stats)

    # -- failure ---------------------------------------------------------------------------------
    def _fail(self, err: BaseException) -> None:
        cancelled = isinstance(err, Cancelled) or self.watcher.fired
        if cancelled and not isinstance(err, Cancelled):
            message = f"cancelled during {self.phase}"
        elif isinstance(err, MigrationError):
            message = str(err)
        else:
            message = f"{type(err).__name__} during {self.phase}: {err}"
        if not cancelled and self.chan is not None:
            message = with_tls_error(message, self.chan.sock)
        if self.committed:
            if (self.stats.protocol_version or 1) >= P.OWNERSHIP_VERSION:
                # The decision was commit but nothing confirmed it: never resume, never stop.
                if self.stats.status not in ("completed", "in-doubt", "failed"):
                    self.stats.owner = "in doubt"
                    self.stats.finish("in-doubt", f"after commit: {message}; the guest is held paused here")
                return
            # An older destination: COMMITTED went out, the guest is its own now.
            self.stats.notes.append(f"after commit: {message}")
            try:
                self.adapter.stop_for_good(f"migrated to {self.stats.peer}")
            finally:
                self.stats.owner = "destination"
                self.stats.finish("completed")
            return
        if self.chan is not None and not self.watcher.fired and not isinstance(err, (Refused, Aborted)):
            self._try_abort(message)
        if self.convergence is not None:
            self.convergence.release()
        self.downtime.release()  # the guest runs here again (or is gone): nothing more is downtime
        if self.paused:
            self.adapter.resume()
            self.paused = False
        # The guest runs again before this end looks for the destination's word (a read, bounded): a
        # destination that lost one data stream closes the others and says why on the main
        # connection, which this end had no reason to read.
        said = (waiting_abort(self.chan.sock, ABORT_PEEK_S)
                if isinstance(err, ConnectionLost) and self.chan is not None and not cancelled else None)
        if said is not None:
            # The cause, where this end saw only its consequence (another stream closed under it).
            message = f"destination aborted: {said} (here: {message})"
        self.stats.owner = "source"
        self.stats.stopped_in = self.phase
        self.stats.finish("cancelled" if cancelled else "failed", message)
        if self.commit_requested and (self.stats.protocol_version or 1) >= P.OWNERSHIP_VERSION \
                and not isinstance(err, (Refused, Aborted)) and said is None:
            # The destination may have answered COMMIT_ACK and now hold the guest in doubt: tell it
            # the migration was aborted, so it lets its copy go (it never runs it without our word).
            # One that said ABORT has discarded already: from COMMIT_ACK on it never says it (v5).
            self._close_channels()
            self._settle(P.Decision.ABORT, min(self.params.resolve_timeout, ABORT_RESOLVE_S), by="after the failure",
                         refused_means_nothing=True)
        self._report()

    def _try_abort(self, reason: str) -> None:
        """Tell the destination why, if the connection still carries bytes; never block long."""
        try:
            set_io_timeout(self.chan.sock, 1.0)
            P.send_bytes(self.chan.out, P.encode_frame(P.MessageType.ABORT, P.encode_abort(reason)), "ABORT")
            self.chan.flush(1.0)
        except (MigrationError, OSError):
            pass
