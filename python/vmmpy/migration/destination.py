"""The destination side: listen, take one source, run the receiver state machine, own the result.

Nothing but HELLO and AUTH (each a few dozen bytes) is read before the source has proven it holds
the key (when this side has one); nothing but SPEC before it is accepted. While it waits, the
destination serves every connection on a thread of its own under one deadline for the whole
handshake: a stranger that sends garbage, stays silent or fails to authenticate is noted and
closed, and the wait goes on; the first source whose SPEC is accepted takes the destination.

Memory rounds go straight into guest memory through the memory core; a local migration's
LOCAL_MEMORY (protocol version 6, over a Unix socket only) instead brings the memfds of the
source's memory, which are mapped as this guest's memory in place of the empty one it was built
with, their dirty runs marked; nothing of it is written here before the commit. State is restored before
the commit, and the guest runs only after COMMITTED. Before COMMIT_ACK any failure discards the
guest (``adapter.discard()``), after telling the source why when the connection still works:
the source cannot have committed without that answer. After COMMIT_ACK (protocol version 5) the
destination cannot know what the source decided, so a failure there does not discard: the guest
is held paused **in doubt**, and the destination listens again on its address until the source
reconnects and says (RESOLVE), or the operator settles it. It runs the guest only on COMMITTED
or a RESOLVE that says commit, and discards it only on ABORT or a RESOLVE that says abort.

Post-copy (protocol version 7, docs/postcopy.md): POSTCOPY, after any rounds, makes this guest's
memory load the pages it lacks from the source on demand (``GuestMemory.postcopy_link``); the
guest runs at COMMITTED, the connection then carries the page exchange, and a background fill
fetches the rest from just past the last page the guest waited for. When that link fails the
guest's accesses wait and the destination takes the source's RECOVER on its address (a new
connection, same handshake): the exchange goes on there. The record ends once every page is here.
"""

from __future__ import annotations

import os
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..memory import GuestMemory, PageBatchError, PageBudget
from ..progress import Ticker
from ..state import SectionError, decode_sections, encode_sections
from ..state.handle import GuestHandle, LoadAtEnd, SectionLoader
from ..state.section import MAX_SECTIONS
from . import protocol as P
from .convergence import MigrationParams
from .digest import InBackground, Ready, tracker_digest
from .downtime import DowntimeHold
from .errors import Aborted, Cancelled, ConnectionLost, MigrationError, MigrationTimeout, ProtocolError, Refused, receive_error
from .net import (
    CancelWatcher,
    accepted_peer,
    fit_send_buffer,
    for_page_requests,
    format_address,
    is_unix,
    listen,
    set_io_timeout,
    shutdown_quietly,
    unlink_unix,
)
from .stats import MigrationStats, RoundProgress, RoundStats
from .streams import JoinWindow, new_token, receive_round
from .tls import TlsConfig, TlsSocket, reject_tls_client, with_tls_error, wrap_tls

RxState = P.RxState  # the receiver's states; P.RECEIVER is its transition table


class InDoubt(MigrationError):
    """The link failed after COMMIT_ACK (protocol version 5): the source may have committed."""


#: Connections a waiting destination serves at once before it closes new ones unread.
MAX_PENDING = 16
#: Strangers named one by one in the record's notes; the rest are counted.
MAX_NOTED = 8


class Destination:
    """A listening destination. ``address`` is known as soon as it is built (port 0 picks one).

    ``run()`` waits for one source and receives its guest. It owns what happens after the
    commit too (protocol version 5): ``state`` is ``waiting``, ``migrating``, ``in-doubt``,
    ``running`` or ``discarded``; while in doubt (or running but not yet known to the source to
    run) it answers the source's RESOLVE on its address, and ``resolve()`` lets the operator
    settle a guest in doubt when the source can no longer."""

    def __init__(
        self,
        adapter: GuestHandle,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        key: bytes | None = None,
        params: MigrationParams | None = None,
        cancel: threading.Event | None = None,
        tls: TlsConfig | None = None,
        populate: bool = True,
    ) -> None:
        self.adapter = adapter
        # Populate guest memory while waiting (not for a local migration: its memory is replaced
        # by the source's memfds). See run().
        self.populate = populate and not is_unix(host)
        self.key = key
        self.tls = tls
        self.params = params or MigrationParams()
        self.cancel = cancel
        self.host = host
        self.listener: socket.socket | None = listen(host, port)
        self.address: tuple[str, int] = (host, 0) if is_unix(host) else self.listener.getsockname()[:2]
        self.state = "waiting"
        self.stats: MigrationStats | None = None
        self.session: bytes | None = None
        self._cond = threading.Condition()
        self._strangers: list[str] = []
        self._stranger_count = 0
        self._winner: _Receiver | None = None  # the connection whose SPEC was accepted
        self._refused: str | None = None  # an authenticated source was refused: the wait is over
        self._stop_waiting = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._claimed = False
        # Connections in their handshake while waiting: the thread serving each, and its deadline.
        self._pending: dict[socket.socket, tuple[threading.Thread, HandshakeDeadline]] = {}
        self._closed = False
        self._service: threading.Thread | None = None
        self._receiver: _Receiver | None = None
        self.released = False

    # -- waiting for the source ------------------------------------------------------------------
    def run(self, accept_timeout: float = 60.0) -> MigrationStats:
        """Wait for one source (at most ``accept_timeout`` s until its SPEC is accepted) and
        receive its guest. Returns when the guest runs here, is discarded, or (with
        ``params.in_doubt_timeout``) stays in doubt past that time."""
        watcher = CancelWatcher(self.cancel)
        stop_populating = self._start_populating()
        self._warm_up_state()
        try:
            receiver, failure = self._wait_for_source(accept_timeout, watcher)
        finally:
            watcher.close()
            populated = stop_populating()
        if receiver is None:
            self._close_listener()
            stats = MigrationStats(role="destination", owner="nowhere")
            notes = self._stranger_notes()
            if failure == self._refused:  # its refusal is the error; the other strangers stay noted
                notes = [n for n in notes if failure not in n]
            stats.notes.extend(notes)
            stats.populate = populated
            stats.finish("cancelled" if failure == "cancelled while listening" else "failed", failure)
            self.stats = stats
            with self._cond:
                self.state = "discarded"
            self.adapter.discard()
            return stats
        with self._cond:
            self.state = "migrating"
        receiver.stats.populate = populated
        receiver.before_commit_ack = self._listen_again
        receiver.listener_done = self._start_service
        self.session = receiver.session
        self._receiver = receiver
        try:
            # Only now, with nobody else accepting on the listener, may the source go on (its
            # data streams connect right after this ACCEPT).
            receiver.send_spec_accept()
        except BaseException as err:
            receiver.fail_now(err)
        try:
            stats = receiver.run_after_spec()
        finally:
            receiver.close_quietly()
        stats.notes[:0] = self._stranger_notes()
        self.stats = stats
        if stats.status == "in-doubt":
            return self._hold_in_doubt(receiver)
        with self._cond:
            self.state = "running" if stats.status == "completed" else "discarded"
            self.released = receiver.released
            self._cond.notify_all()
        if stats.status == "completed" and not receiver.released and receiver.version >= P.OWNERSHIP_VERSION:
            # The source may not know the guest runs here: answer its questions until it does.
            stats.notes.append(f"the source has not confirmed it knows the guest runs here; answering on "
                               f"{format_address(*self.address)} until it does")
            self._start_service()
        else:
            self._close_listener()
        return stats

    def _warm_up_state(self) -> None:
        """Save, encode, decode and check this guest's own state once, while nothing waits on it.
        The source's state is decoded, checked and loaded here inside the downtime, and the first
        time that code runs in a process it took 0.25 ms more: an idle guest's sections in 0.82 ms
        cold, 0.58 ms after this (docs/performance.md, session 25). The guest has not run, so its
        state is read while nothing changes it, and nothing is loaded. Advisory: a failure here
        changes nothing, and the migration's own check says what is wrong, if anything is."""
        try:
            self.adapter.check_sections(decode_sections(encode_sections(self.adapter.save_sections())), what="warm-up")
        except Exception:  # advisory, see above
            pass

    def _start_populating(self) -> Callable[[], dict[str, Any] | None]:
        """Populate the guest's memory on a thread while waiting, as QEMU's ``prealloc=on`` does
        at start-up: the source's pages then land in memory that is there, and the host's
        faults and clearing are paid before the source stops its guest instead of on the
        migration's clock (docs/migration.md, "The destination's memory"). Bytes never change,
        and pages that arrive as zero are given back as before. Stopped once a source's SPEC is
        accepted (or the wait ends), at most one 2 MiB step later. Returns what stops it and
        gives the record's ``populate`` (None when it did not run, its reason when refused)."""
        if not self.populate:
            return lambda: None
        try:
            started = self.adapter.memory.start_prefault() > 0
        except (OSError, ValueError) as err:  # advisory: the migration goes on without it
            why = (err.strerror if isinstance(err, OSError) else None) or str(err)
            return lambda: {"error": why}
        return self.adapter.memory.stop_prefault if started else lambda: None

    def _wait_for_source(self, accept_timeout: float, watcher: CancelWatcher) -> tuple[_Receiver | None, str]:
        """Serve connections until one source's SPEC is accepted; returns it, or None and why not."""
        deadline = time.monotonic() + accept_timeout
        listener = self.listener
        listener.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(listener, selectors.EVENT_READ, "listener")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while True:
                with self._cond:
                    if self._winner is not None:
                        return self._winner, ""
                    if self._refused is not None:
                        return None, self._refused
                    if self._stop_waiting:
                        return None, "cancelled while listening"
                if watcher.cancelled():
                    return None, "cancelled while listening"
                left = deadline - time.monotonic()
                if left <= 0:
                    tried = f"; {self._stranger_count} connection(s) failed before a migration began" if self._stranger_count else ""
                    return None, f"no source connected to {format_address(*self.address)} within {accept_timeout:g} s{tried}"
                for key, _ in sel.select(min(left, 0.1)):
                    if key.data == "wake":
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                        continue
                    try:
                        conn, peer = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as err:
                        if watcher.cancelled():
                            return None, "cancelled while listening"
                        return None, f"accept failed: {err.strerror or err}"
                    conn.setblocking(True)
                    fit_send_buffer(conn)
                    self._serve_pending(conn, accepted_peer(conn, peer))
        finally:
            sel.close()
            self._end_pending()
            with self._cond:
                self._wake_r.close()
                self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def stop_waiting(self) -> None:
        """End the wait for a source (as a cancel does, but never touching a migration that has
        begun): ``run()`` returns "cancelled"."""
        with self._cond:
            self._stop_waiting = True
        self._wake()

    def _serve_pending(self, conn: socket.socket, peer: str) -> None:
        with self._cond:
            if len(self._pending) >= MAX_PENDING:
                self._note_stranger(peer, f"closed unread: {MAX_PENDING} connections were already being served")
                conn.close()
                return
            timer = HandshakeDeadline(conn, self.params.handshake_timeout)
            thread = threading.Thread(target=self._pending_connection, args=(conn, peer, timer), name="migration-pending",
                                      daemon=True)
            self._pending[conn] = (thread, timer)
        thread.start()

    def _pending_connection(self, conn: socket.socket, peer: str, timer: HandshakeDeadline) -> None:
        """One connection while waiting: its whole handshake under one deadline (``timer``); then
        a SPEC (a source: the first accepted takes the destination) or a RESOLVE (none is in doubt
        yet)."""
        receiver = _Receiver(self.adapter, conn, self.key, self.params, self.cancel, peer, self.tls, self.listener)
        won = False
        try:
            receiver.start()
            frame = receiver.read_request()
            if frame.type is P.MessageType.RESOLVE:
                receiver.answer_resolve(frame, lambda resolve: P.Outcome.UNKNOWN)
                raise Refused("asked to resolve a session this destination does not hold")
            with self._cond:
                busy = self._claimed
                self._claimed = True
            if busy:
                receiver.refuse(P.Stage.SPEC, "another source is already migrating to this destination")
            try:
                receiver.check_spec(frame)
            except Refused as err:
                with self._cond:
                    self._claimed = False
                    if self.key is not None or self.tls is not None:
                        # It proved itself (key or certificate), so it is the source the operator
                        # meant, and no other will come: its refusal ends the wait. Without
                        # authentication anyone could send a wrong SPEC, so the wait goes on.
                        self._refused = str(err)
                raise
            except BaseException:
                with self._cond:
                    self._claimed = False
                raise
            timer.cancel()
            with self._cond:
                if self._closed:  # the wait ended meanwhile (cancel, accept timeout)
                    raise Cancelled("the destination stopped waiting")
                self._winner = receiver
                won = True
                self._pending.pop(conn, None)
            self._wake()  # the waiting loop stops accepting, then answers its SPEC
        except BaseException as err:
            self._note_stranger(peer, timer.why(err, receiver.failure_text(err)))
            receiver.tell_why(err)
        finally:
            timer.cancel()
            if not won:
                receiver.close_quietly()
                with self._cond:
                    self._pending.pop(conn, None)

    def _end_pending(self) -> None:
        """Connections still in their handshake when the wait ends are cut and waited for."""
        with self._cond:
            self._closed = True
            pending = list(self._pending.values())
        for _, timer in pending:
            timer.cut("was still going when the wait ended")
        for thread, _ in pending:
            thread.join(5)

    def _note_stranger(self, peer: str, why: str) -> None:
        with self._cond:
            self._stranger_count += 1
            if len(self._strangers) < MAX_NOTED:
                self._strangers.append(f"{peer}: {why}")

    def _stranger_notes(self) -> list[str]:
        with self._cond:
            notes = [f"a connection that did not become the migration: {s}" for s in self._strangers]
            if self._stranger_count > len(self._strangers):
                notes.append(f"... and {self._stranger_count - len(self._strangers)} more such connections")
        return notes

    # -- after the commit: in doubt, or running but not yet known to the source ----------------
    def _hold_in_doubt(self, receiver: _Receiver) -> MigrationStats:
        stats = self.stats
        with self._cond:
            self.state = "in-doubt"
            self._cond.notify_all()
        self._start_service()
        limit = self.params.in_doubt_timeout
        give_up_at = None if limit is None else time.monotonic() + limit
        with self._cond:
            while self.state == "in-doubt":
                left = None if give_up_at is None else give_up_at - time.monotonic()
                if left is not None and left <= 0:
                    stats.notes.append(f"still in doubt after in_doubt_timeout={limit:g} s: the guest stays held paused")
                    return stats
                self._cond.wait(0.5 if left is None else min(left, 0.5))
        return stats

    @property
    def committing(self) -> bool:
        """COMMIT_ACK is about to go or went out and the session is not settled: the source may
        have committed, so nothing but the migration may end or run this guest."""
        receiver = self._receiver
        return self.state == "migrating" and receiver is not None and receiver.state in (RxState.AWAIT_COMMITTED, RxState.IN_DOUBT)

    def _listen_again(self) -> str | None:
        """Before COMMIT_ACK goes out (the join window closed the listener): from then on the
        source may need to reach us, and a connection that finds no listener tells it we hold
        nothing. Returns why it could not, or None."""
        with self._cond:
            if self.listener is not None and self.listener.fileno() != -1:
                return None
            try:
                self.listener = listen(self.host, self.address[1])
            except MigrationError as err:
                self.listener = None
                return str(err)
        return None

    def _start_service(self) -> None:
        """Answer RESOLVE on our address (listening again if need be), from the end of the join
        window until the guest is settled: a source that aborts is heard even by a destination
        still on its way to COMMIT_ACK, and a connection that finds nobody listening means
        nothing is held here."""
        if self._service is not None and self._service.is_alive():
            return
        why = self._listen_again()
        if why is not None:
            self._note(f"cannot listen again for the source's RESOLVE: {why}; settle with the operator's resolve")
            return
        self._service = threading.Thread(target=self._serve_resolves, name="migration-resolve", daemon=True)
        self._service.start()

    def _serve_resolves(self) -> None:
        with self._cond:
            listener = self.listener
        if listener is None:
            return
        try:
            listener.settimeout(0.2)
        except OSError:  # closed meanwhile: the session ended before the service began
            return
        slots = threading.BoundedSemaphore(MAX_PENDING)
        while True:
            with self._cond:
                if self.released or self.state == "discarded" or self.listener is not listener:
                    break
            try:
                conn, peer = listener.accept()
            except (TimeoutError, BlockingIOError, InterruptedError):
                continue
            except OSError:
                if listener.fileno() == -1:
                    break
                time.sleep(0.1)  # out of descriptors or memory for now: the source will try again
                continue
            if not slots.acquire(blocking=False):
                conn.close()  # as many as the waiting phase serves at once: a flood holds nothing
                continue

            fit_send_buffer(conn)
            peer_name = accepted_peer(conn, peer)

            def serve(conn=conn, peer=peer_name) -> None:
                try:
                    self._resolve_connection(conn, peer)
                finally:
                    slots.release()

            try:
                threading.Thread(target=serve, name="migration-resolve-conn", daemon=True).start()
            except RuntimeError:
                slots.release()
                conn.close()
        with self._cond:
            if self.listener is listener:
                self.listener = None
        listener.close()

    @property
    def record(self) -> MigrationStats | None:
        """The migration's record: final once :meth:`run` has it, the receiving connection's own
        while it runs (with ``current_round``, the live figures of the round arriving)."""
        return self.stats if self.stats is not None else (self._receiver.stats if self._receiver is not None else None)

    def _note(self, text: str) -> None:
        target = self.record
        if target is not None:
            target.notes.append(text)

    def _resolve_connection(self, conn: socket.socket, peer: str) -> None:
        receiver = _Receiver(self.adapter, conn, self.key, self.params, None, peer, self.tls, None)
        timer = HandshakeDeadline(conn, self.params.handshake_timeout)
        handed_over = False
        try:
            receiver.start()
            frame = receiver.read_request()
            if frame.type is P.MessageType.RECOVER:
                handed_over = self._recover_connection(receiver, frame)
                return
            if frame.type is not P.MessageType.RESOLVE:
                receiver.refuse(P.Stage.SPEC, f"this destination is busy ({self.state}): it takes no other migration")
            if receiver.version < P.OWNERSHIP_VERSION:
                raise ProtocolError(f"RESOLVE needs protocol version {P.OWNERSHIP_VERSION}, the session chose {receiver.version}")
            outcome = receiver.answer_resolve(frame, self._resolve_from_source)
            if outcome is P.Outcome.RUNNING:
                P.decode_empty(P.MessageType.RELEASED, receiver.read().payload)
                with self._cond:
                    self.released = True
                self._note("the source confirmed it knows the guest runs here (RELEASED on a new connection)")
        except BaseException as err:
            self._note(f"a RESOLVE connection from {peer} failed: {timer.why(err, receiver.failure_text(err))}")
        finally:
            timer.cancel()
            if not handed_over:
                receiver.close_quietly()

    def _recover_connection(self, conn: _Receiver, frame: P.Frame) -> bool:
        """RECOVER: the source of the post-copy session this destination runs takes the page
        exchange up again on this connection; any other session is answered UNKNOWN."""
        session = P.decode_recover(frame.payload)
        main = self._receiver
        if main is None or session != self.session or main.link is None or main.state is not RxState.RUNNING:
            conn.send_recovered(P.Outcome.UNKNOWN)
            self._note(f"a RECOVER for a session this destination does not run in post-copy was answered unknown ({conn.stats.peer})")
            return False
        conn.send_recovered(P.Outcome.RUNNING)
        main.take_page_connection(conn)
        return True

    def _resolve_from_source(self, resolve: P.Resolve) -> P.Outcome:
        if resolve.session != self.session:
            return P.Outcome.UNKNOWN
        commit = resolve.decision is P.Decision.COMMIT
        with self._cond:
            if self.state == "migrating" and not commit:
                # Still receiving (or slow to reach COMMIT_ACK): the source will never commit.
                self._receiver.abort_from_source()
            # Whatever the receiver does with the session decides the answer: wait for it.
            self._cond.wait_for(lambda: self.state != "migrating", timeout=self.params.commit_timeout)
            if self.state == "migrating":
                raise MigrationTimeout(f"the session is still being received after {self.params.commit_timeout:g} s")
        return self._settle(commit, "the source's RESOLVE after the link failed")

    def _settle(self, commit: bool, by: str) -> P.Outcome:
        """Act on a decision for the guest in doubt; returns what this destination now does."""
        with self._cond:
            if self.state == "in-doubt":
                stats = self.stats
                if commit:
                    t = time.monotonic()
                    try:
                        self.adapter.start_running()
                    except Exception as err:
                        self.state = "discarded"
                        stats.owner = "source"
                        stats.finish("failed", f"{stats.error}; the guest could not be started here ({err})")
                        self._cond.notify_all()
                        return P.Outcome.DISCARDED
                    stats.downtime_breakdown["start_ms"] = (time.monotonic() - t) * 1000
                    stats.running_at = time.time()
                    self.state = "running"
                    stats.owner = "destination"
                    stats.notes.append(f"committed by {by}: the guest runs here")
                    stats.finish("completed")
                else:
                    self.state = "discarded"
                    stats.owner = "source"
                    stats.finish("failed", f"{stats.error}; aborted by {by}: the guest was discarded here")
                self._cond.notify_all()
                if not commit:
                    self.adapter.discard()
            if self.state == "running":
                return P.Outcome.RUNNING
            return P.Outcome.DISCARDED if self.state == "discarded" else P.Outcome.UNKNOWN

    def resolve(self, action: str, *, force: bool = False) -> dict[str, object]:
        """The operator's word on a guest in doubt here: ``"run-here"`` or ``"discard-here"``.
        Only the source knows what it decided, so either needs ``force``: use it when the source
        cannot be asked (its host or process is gone) and you know what it did. Without an
        action (``"ask"``), returns where things stand and what to do."""
        with self._cond:
            state = self.state
        info: dict[str, object] = {"role": "destination", "state": state,
                                   "session": self.session.hex() if self.session else None}
        if action == "ask" or state != "in-doubt":
            if action != "ask":
                raise ValueError(f"nothing to resolve: this destination is {state}, not in doubt")
            if state == "in-doubt":
                info["advice"] = ("the source decides: `vmmctl --migrate-resolve` on the source delivers its decision; if the "
                                  "source is gone, `--migrate-resolve=run-here --force` here runs the guest (it never ran "
                                  "there after it paused), or `--migrate-resolve=discard-here --force` if the source runs it")
            return info
        if action not in ("run-here", "discard-here"):
            raise ValueError(f"unknown resolve action {action!r}: ask, run-here or discard-here")
        if not force:
            raise ValueError(f"{action} on the destination needs --force: only the source knows whether it committed; "
                             "make sure the source does not run the guest (run-here) or that it does (discard-here)")
        outcome = self._settle(action == "run-here", "the operator")
        info["state"] = self.state
        info["outcome"] = outcome.name.lower()
        return info

    def _close_listener(self) -> None:
        with self._cond:
            listener, self.listener = self.listener, None
        if listener is not None:
            # shutdown first: the resolve service may sit in poll() on it, which a bare close
            # neither wakes nor ends (the kernel would go on accepting until it returned).
            shutdown_quietly(listener)
            unlink_unix(listener)
            listener.close()

    def close(self) -> None:
        with self._cond:
            self.released = True
        self._close_listener()
        if self._service is not None:
            self._service.join(2)


def receive(adapter: GuestHandle, host: str, port: int, key: bytes | None = None, *, params: MigrationParams | None = None,
            cancel: threading.Event | None = None, accept_timeout: float = 60.0, tls: TlsConfig | None = None,
            populate: bool = True) -> MigrationStats:
    """Listen on ``host:port``, accept one source, receive its guest; returns the statistics."""
    return Destination(adapter, host, port, key=key, params=params, cancel=cancel, tls=tls, populate=populate).run(accept_timeout)


def serve_connection(adapter: GuestHandle, conn: socket.socket, *, key: bytes | None = None,
                     params: MigrationParams | None = None, cancel: threading.Event | None = None,
                     peer: str | None = None, tls: TlsConfig | None = None,
                     listener: socket.socket | None = None) -> MigrationStats:
    """Run the receiver state machine on an accepted (or any stream) socket. With ``tls`` the
    source must first complete mutual TLS 1.3 on it (``vmmpy.migration.tls``); without, a source
    that opens a TLS handshake is refused by name. With ``listener`` (the one ``conn`` came from)
    a version 3 source may open parallel data streams on it; the receiver closes it when the join
    window ends. Without one, STREAMS is refused."""
    return _Receiver(adapter, conn, key, params or MigrationParams(), cancel, peer, tls, listener).run()


class HandshakeDeadline:
    """A connection's whole handshake under one deadline, started at once: when it passes, or
    when the destination stops waiting (:meth:`cut`), the connection is shut down, which wakes
    whatever reads or writes it. A failure after that is the destination's doing, and :meth:`why`
    says so rather than blaming the peer for the closed socket."""

    def __init__(self, conn: socket.socket, seconds: float) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._timer = threading.Timer(seconds, self.cut, args=(f"did not finish within {seconds:g} s",))
        self._timer.daemon = True
        self._timer.start()

    def cut(self, reason: str) -> None:
        """Shut the connection down; ``reason`` completes "its handshake ..." (the first one given)."""
        with self._lock:
            if self._reason is None:
                self._reason = reason
        shutdown_quietly(self._conn)

    def cancel(self) -> None:
        self._timer.cancel()

    def why(self, err: BaseException, failure: str) -> str:
        """``failure`` (the text of ``err``) as the connection's failure, or, once the connection
        was cut, why first and ``failure`` (what the cut looked like from inside) after it. A
        refusal (a wrong or missing key, a SPEC this guest cannot take, a destination already
        taken) stands whatever the timer did: it is decided from a whole frame the peer sent or
        from this destination's own state, never by the socket, so a cut that came after one
        (the timer firing on its way out) is not blamed for it."""
        with self._lock:
            reason = self._reason
        if reason is None or isinstance(err, Refused):
            return failure
        return f"its handshake {reason}, so this destination cut it ({failure})"


class _Receiver:
    #: The protocol versions this destination speaks (a test plays an older destination).
    versions: tuple[int, ...] = P.PROTOCOL_VERSIONS

    def __init__(self, adapter, conn, key, params, cancel, peer, tls=None, listener=None) -> None:
        if key is not None and len(key) < 16:
            raise ValueError(f"migration key must be at least 16 bytes, got {len(key)}")
        self.adapter = adapter
        self.memory = adapter.memory
        self.conn = conn
        self.key = key
        self.tls = tls
        self.params = params
        self.watcher = CancelWatcher(cancel)
        self.state = RxState.AWAIT_HELLO
        self.stats = MigrationStats(role="destination", peer=peer)
        self.total_pages = sum(seg.pages for seg in self.memory.segments)
        self.next_round = 0
        self.have_all_pages = False
        self.tracker = self.memory.digest_tracker()  # hashes (or marks) every page received: exact in both verify modes
        self.digest_job: InBackground[int] | Ready[int] | None = None
        self.restored = False
        self.section_loader: SectionLoader | None = None  # the state's sections, read as they come (STATE_PART, STATE)
        self.state_read_s = 0.0  # reading and checking them
        self.state_sections = 0  # how many came
        self.refused_reason: str | None = None
        self.listener = listener  # open only until the data streams have joined or round 0 begins
        self.data_conns: list[socket.socket] = []  # streams 1..n-1 (protocol v3)
        self.transcript: tuple[bytes, bytes] = (b"", b"")  # HELLO and CHALLENGE as sent: the JOIN proofs bind them
        self.version = P.PROTOCOL_VERSIONS[0]
        self.compression: str | None = None  # the codec agreed for page batches
        self.session = b""  # session_id() of this connection's handshake
        self.released = False  # v5: the source said RELEASED (it knows the guest runs here)
        self.before_commit_ack = None  # Destination: listen again before COMMIT_ACK (v5), returns why not or None
        self.listener_done = None  # Destination: takes the listener back when the join window ends
        self.source_aborted = False  # a RESOLVE(abort) for this session came on another connection
        self.local = False  # a local migration: the memory was handed over (LOCAL_MEMORY)
        self.link = None  # post-copy (POSTCOPY): the memory's page link to the source
        self.downtime = DowntimeHold()  # the collector off from the final round (the handed-over memory, the switch) until RESUMED; short slices from the end of a live round
        self._conn_lock = threading.Lock()  # post-copy: the connection is replaced on RECOVER

    def run(self) -> MigrationStats:
        """The whole session on this one connection (``serve_connection``)."""
        try:
            self.start()
            self.accept_spec(self.read_request(P.MessageType.SPEC))
        except BaseException as err:
            self._fail(err)
            self._cleanup()
            if not isinstance(err, Exception):
                raise
            return self.stats
        return self.run_after_spec()

    def start(self) -> None:
        """TLS (when configured) and the handshake, up to the ACCEPT of the source's proof."""
        self.watcher.watch(self.conn)
        set_io_timeout(self.conn, self.params.handshake_timeout)
        if self.tls is not None:
            # The TLS socket is the TCP socket from here (the old object is detached from it).
            self.conn = wrap_tls(self.conn, self.tls, server_side=True,
                                 timeout=self.params.handshake_timeout)
            self.watcher.watch(self.conn)
            self.stats.notes.append(self.conn.tls_summary())
            set_io_timeout(self.conn, self.params.handshake_timeout)
        else:
            reject_tls_client(self.conn)
        self._handshake()

    def run_after_spec(self) -> MigrationStats:
        """Rounds, state and the commit, once the spec is accepted; every failure handled here."""
        if self.listener is not None:
            self.watcher.watch(self.listener)
        try:
            if self.state is not RxState.DISCARDED:
                self._rounds()
        except BaseException as err:
            self._fail(err)
            if not isinstance(err, Exception):
                raise
        finally:
            self._cleanup()
        return self.stats

    def _cleanup(self) -> None:
        self.downtime.note_refusal(self.stats.notes)
        self.downtime.release()
        self.watcher.close()
        self._join_hashing()
        if isinstance(self.conn, TlsSocket):
            self.conn.close()
        self._close_listener()
        for sock in self.data_conns:
            sock.close()

    def fail_now(self, err: BaseException) -> None:
        self._fail(err)

    def tell_why(self, err: BaseException) -> None:
        """A connection that did not become the migration: send it ABORT with the reason when
        it was not refused already and the connection still works (best effort, 1 s)."""
        if isinstance(err, (Aborted, Refused, ConnectionLost, Cancelled)):
            return
        try:
            set_io_timeout(self.conn, 1.0)
            self._send(P.MessageType.ABORT, P.encode_abort(self.failure_text(err)))
        except (MigrationError, OSError):
            pass

    def close_quietly(self) -> None:
        """A connection that did not become the migration: close it (TLS and all)."""
        self.watcher.close()
        shutdown_quietly(self.conn)
        self.conn.close()

    def failure_text(self, err: BaseException) -> str:
        if isinstance(err, MigrationError):
            return with_tls_error(str(err), self.conn)
        return f"{type(err).__name__} in state {self.state.value}: {err}"

    def _join_hashing(self) -> None:
        """No hashing thread outlives the transfer (its error, after a failure, adds nothing)."""
        if self.digest_job is not None:
            self.digest_job.join()

    def _close_listener(self) -> None:
        """The join window is over: hand the listener back to its owner (a Destination answers
        RESOLVE on it from here on), or close it."""
        if self.listener is not None:
            if self.listener_done is not None:
                self.listener_done()
            else:
                self.listener.close()
            self.listener = None

    def abort_from_source(self) -> None:
        """A RESOLVE(abort) for this session arrived on another connection while this one is
        still receiving: the source will never commit, so end here and discard (never in doubt)."""
        self.source_aborted = True
        shutdown_quietly(self.conn)

    # -- frames ----------------------------------------------------------------------------------
    def _expected(self) -> tuple[P.MessageType, ...]:
        """What this state reads (``P.RECEIVER``), at the session's version; STREAMS only before
        round 0, once."""
        return tuple(t for t in P.receiver_reads(self.state, self.version)
                     if t is not P.MessageType.STREAMS or self._may_ask_streams())

    def _advance(self, msg_type: P.MessageType) -> None:
        """``msg_type`` is handled: take its transition (``P.RECEIVER``)."""
        self.state = P.receiver_next(self.state, msg_type)

    def _read(self, *expected: P.MessageType) -> P.Frame:
        """The next frame, of a type this state reads (or a narrower ``expected``); any other is
        refused from its header, by name and state. ABORT ends the session."""
        expected = expected or self._expected()
        # The state's frames share one bound (protocol 9: its parts together): what is left of it.
        frame = P.read_frame(self.conn, max_state=self.params.max_state_bytes - self.stats.state_bytes, allowed=expected,
                             where=f" in state {self.state.value}")
        self.stats.bytes_total += len(frame.raw)
        if frame.type is P.MessageType.ABORT:
            raise Aborted(f"source aborted: {P.decode_abort(frame.payload)}")
        return frame

    def _send(self, msg_type: P.MessageType, payload: bytes = b"") -> bytes:
        return P.write_frame(self.conn, msg_type, payload)

    def _refuse(self, stage: P.Stage, reason: str) -> None:
        self.refused_reason = reason
        try:
            self._send(P.MessageType.REFUSE, P.encode_refuse(P.Refuse(stage, reason)))
        except MigrationError:
            pass
        raise Refused(f"refused the source ({stage.name.lower()}): {reason}")

    # -- the state machine -----------------------------------------------------------------------
    def _handshake(self) -> None:
        hello_frame = self._read()
        hello = P.decode_hello(hello_frame.payload)
        common = set(hello.versions) & set(self.versions)
        nonce = os.urandom(P.NONCE_SIZE)
        version = max(common) if common else self.versions[-1]
        challenge = self._send(P.MessageType.CHALLENGE, P.encode_challenge(P.Challenge(version, self.key is not None, nonce)))
        self.transcript = (hello_frame.raw, challenge)
        self._advance(P.MessageType.HELLO)
        auth_frame = self._read()
        mac = P.decode_auth(auth_frame.payload)
        if not common:
            self._refuse(P.Stage.AUTH, f"no common protocol version: the source speaks {sorted(hello.versions)}, "
                                       f"this destination {sorted(self.versions)}")
        self.stats.protocol_version = version
        self.version = version
        proof = b""
        if self.key is not None:
            if not mac:
                self._refuse(P.Stage.AUTH, "this destination requires a migration key and the source sent none")
            if not P.proofs_equal(mac, P.source_proof(self.key, hello_frame.raw, challenge)):
                self._refuse(P.Stage.AUTH, "authentication failed: the source's proof does not match this destination's key")
            proof = P.destination_proof(self.key, hello_frame.raw, challenge, auth_frame.raw)
        self._send(P.MessageType.ACCEPT, P.encode_accept(P.Accept(P.Stage.AUTH, proof)))
        self.session = P.session_id(hello_frame.raw, challenge)
        self._advance(P.MessageType.AUTH)

    def read_request(self, *types: P.MessageType) -> P.Frame:
        """What the authenticated peer wants: a SPEC (a migration), or on version 5 a RESOLVE
        (a question about a session in doubt)."""
        return self._read(*types)

    def read(self, *types: P.MessageType) -> P.Frame:
        return self._read(*types)

    def refuse(self, stage: P.Stage, reason: str) -> None:
        self._refuse(stage, reason)

    def answer_resolve(self, frame: P.Frame, decide) -> P.Outcome:
        """RESOLVE: ``decide(resolve)`` acts on it and says what this side now does; answered
        with RESOLVED."""
        resolve = P.decode_resolve(frame.payload)
        outcome = decide(resolve)
        self._send(P.MessageType.RESOLVED, P.encode_resolved(P.Resolved(outcome)))
        self._advance(P.MessageType.RESOLVE)
        return outcome

    def accept_spec(self, frame: P.Frame) -> None:
        self.check_spec(frame)
        self.send_spec_accept()

    def check_spec(self, frame: P.Frame) -> None:
        """Decode and check the SPEC (refusing it by name); nothing is answered yet."""
        spec = P.decode_spec(frame.payload, self.version)
        self.stats.live = spec.live
        try:
            self.adapter.check_spec(spec.to_dict())
        except Exception as err:
            self._refuse(P.Stage.SPEC, str(err) or type(err).__name__)
        # Take the source's first offered codec this side knows, unless told not to.
        if self.params.accept_compression:
            self.compression = next((c for c in spec.compression if c in P.CODECS), None)
        self.stats.compression = self.compression

    def send_spec_accept(self) -> None:
        """ACCEPT the checked SPEC: from here the migration owns this destination."""
        self._send(P.MessageType.ACCEPT, P.encode_accept(P.Accept(P.Stage.SPEC, compression=self.compression), self.version))
        self.stats.setup_time_ms = self.stats.elapsed_ms()
        self.stats.status = "active"
        self.stats.session = self.session.hex() if self.version >= P.OWNERSHIP_VERSION else None
        set_io_timeout(self.conn, self.params.io_timeout)
        self._advance(P.MessageType.SPEC)

    def _rounds(self) -> None:
        """READY and HAVE_STATE: what the table lets in, each to its handler, until the commit."""
        while True:
            frame = self._read()
            if frame.type is P.MessageType.STREAMS:
                self._join_streams(P.decode_streams(frame.payload))
                continue
            self._close_listener()  # the join window is over for good
            if frame.type is P.MessageType.LOCAL_MEMORY:
                self.downtime.start(slices=self.stats.live)  # the source is paused: the downtime has begun (a local migration is warm)
                self._take_local_memory(P.decode_local_memory(frame.payload))
            elif frame.type is P.MessageType.POSTCOPY:
                self.downtime.start()  # the source is paused: the switch has begun
                self._take_postcopy(P.decode_postcopy(frame.payload))
            elif frame.type is P.MessageType.MEMORY:
                if self.digest_job is not None:
                    raise ProtocolError("MEMORY after the final round: nothing may change memory once it is final")
                if self.link is not None:
                    raise ProtocolError("MEMORY after POSTCOPY: after the switch pages come only on request")
                memory = P.decode_memory(frame.payload)
                if memory.flags & P.MemoryFlags.FINAL:
                    # The source is paused: the downtime has begun. Short slices too, but for a
                    # warm migration's one bulk round.
                    self.downtime.start(slices=self.stats.live)
                else:
                    self.downtime.lengthen_slices()  # a bulk round
                self._receive_round(memory)
            elif frame.type is P.MessageType.STATE_PART:
                self._take_state(frame.payload, last=False)
                self._advance(P.MessageType.STATE_PART)
            elif frame.type is P.MessageType.STATE:
                self._take_state(frame.payload, last=True)
                self._restore()
            else:  # COMMIT_REQUEST, the only other message READY and HAVE_STATE read
                self._commit(P.decode_digest(frame.type, frame.payload))
                return

    def _may_ask_streams(self) -> bool:
        return (self.state is RxState.READY and (self.stats.protocol_version or 1) >= P.STREAMS_VERSION
                and self.next_round == 0 and not self.data_conns)

    def _join_streams(self, count: int) -> None:
        """STREAMS: hand out a session token, then accept count-1 data connections that prove
        they belong to this session (``streams.JoinWindow``)."""
        if self.listener is None:
            self._refuse(P.Stage.STREAMS, "this destination was handed one connection, not a listener: it takes one stream only")
        token = new_token()
        self._send(P.MessageType.STREAMS_TOKEN, P.encode_streams_token(P.StreamsToken(count, token)))
        self._advance(P.MessageType.STREAMS)
        hello, challenge = self.transcript
        wrap = None
        if self.tls is not None:  # each data connection must pass mutual TLS too before its JOIN is read
            def wrap(sock: socket.socket) -> socket.socket:
                return wrap_tls(sock, self.tls, server_side=True, timeout=self.params.handshake_timeout)
        window = JoinWindow(self.listener, self.conn, count=count, token=token, key=self.key, hello=hello, challenge=challenge,
                            timeout=self.params.handshake_timeout, watcher=self.watcher, notes=self.stats.notes, wrap=wrap)
        try:
            socks = window.run()
        finally:
            self._close_listener()
        for sock in socks:
            self.watcher.watch(sock)
            set_io_timeout(sock, self.params.io_timeout)
        self.data_conns = socks
        self.stats.streams = count
        self._advance(P.MessageType.JOIN)  # all n-1 accepted

    def _receive_round(self, memory: P.Memory) -> None:
        if memory.round != self.next_round:
            raise ProtocolError(f"MEMORY announces round {memory.round}, expected round {self.next_round}")
        if memory.round == 0 and not memory.flags & P.MemoryFlags.ALL_PAGES:
            raise ProtocolError("round 0 must carry all pages (ALL_PAGES flag missing)")
        self._advance(P.MessageType.MEMORY)
        start = time.monotonic()
        # Each stream's share is one call into the memory core (batches until its empty one, GIL
        # released); a round may not carry more pages than the guest has, over all its streams.
        budget = PageBudget(self.total_pages)
        # Live figures while the streams receive (GIL released): their shared meter, read every TICK_S.
        rp = RoundProgress(memory.round, bool(memory.flags & P.MemoryFlags.FINAL), knows_total=False)
        known = self.total_pages if memory.flags & P.MemoryFlags.ALL_PAGES else None

        def recv(sock: socket.socket) -> dict[str, int]:
            return self.memory.recv_share(sock, budget=budget, compressed=self.compression is not None, tracker=self.tracker,
                                          meter=rp.meter, streams=1 + len(self.data_conns))

        def tick() -> None:
            self.stats.current_round = rp.figures(pages_total=known)

        tick()
        try:
            with Ticker(tick):
                if self.data_conns:
                    per = receive_round(recv, [self.conn, *self.data_conns], round_number=memory.round,
                                        cancelled=self.watcher.cancelled, join_timeout=self.params.io_timeout + 10)
                else:
                    try:
                        per = [recv(self.conn)]
                    except PageBatchError as err:
                        if self.watcher.cancelled():
                            raise Cancelled(f"cancelled during round {memory.round}") from None
                        raise receive_error(err, f"round {memory.round}") from None
        except BaseException:
            self.stats.interrupt_round(rp.figures(pages_total=known))
            raise
        self.stats.current_round = None
        batches, data_pages, zero_pages, wire, compressed, saved = (
            sum(s[k] for s in per) for k in ("batches", "data_pages", "zero_pages", "wire_bytes", "compressed_batches", "saved_bytes"))
        stream_bytes = [s["wire_bytes"] for s in per] if self.data_conns else []
        self.stats.bytes_total += wire
        end = P.decode_memory_end(self._read().payload)
        ends = P.BATCH_HEADER_SIZE * (1 + len(self.data_conns))  # one end-of-round batch per stream
        mine = P.MemoryEnd(memory.round, batches, data_pages, zero_pages, wire - ends)
        if end != mine:
            raise ProtocolError(f"round {memory.round}: the source says it sent {end.batches} batches, {end.data_pages} data and "
                                f"{end.zero_pages} zero pages in {end.wire_bytes} bytes (round {end.round}); {batches}, "
                                f"{data_pages}, {zero_pages} and {mine.wire_bytes} arrived")
        if memory.flags & P.MemoryFlags.ALL_PAGES:
            if data_pages + zero_pages != self.total_pages:
                raise ProtocolError(f"round {memory.round} claims all pages but carried {data_pages + zero_pages} of {self.total_pages}")
            self.have_all_pages = True
        duration = time.monotonic() - start
        self.stats.add_round(RoundStats(
            round=memory.round, final=bool(memory.flags & P.MemoryFlags.FINAL), pages_dirtied=data_pages + zero_pages,
            pages_sent=data_pages, zero_pages=zero_pages, bytes=wire, duration_ms=duration * 1000,
            throughput=wire / duration if duration > 0 else 0.0, dirty_rate=0.0, throttle=0.0, stream_bytes=stream_bytes,
            compressed_batches=compressed, saved_bytes=saved))
        self.stats.installed_pages = self.memory.installed_pages()
        self.stats.huge_pages = self.memory.huge_pages()
        self.next_round += 1
        self._advance(P.MessageType.MEMORY_END)
        if not memory.flags & P.MemoryFlags.FINAL and self.version >= P.ROUND_DONE_VERSION:
            self._send(P.MessageType.ROUND_DONE, P.encode_round_done(memory.round))
        if not memory.flags & P.MemoryFlags.FINAL:
            # Waiting for the next round, which may be the final one: the source pauses before
            # it, so this process's wake-ups from here are downtime.
            self.downtime.shorten_slices()
        if memory.flags & P.MemoryFlags.FINAL:
            # No page changes after the final round, and every page was hashed as it arrived:
            # combine (at once when nothing is left to hash) before the state and the commit
            # request arrive.
            self.digest_job = tracker_digest(self.tracker)

    def _take_local_memory(self, m: P.LocalMemory) -> None:
        """LOCAL_MEMORY: take the memfds that follow it and map them as this guest's memory (the
        same pages as the source's, nothing copied or written), in place of the empty memory the
        guest was built with; then mark the source's dirty runs."""
        if getattr(self.conn, "family", None) != socket.AF_UNIX:
            raise ProtocolError("LOCAL_MEMORY over a network connection: memory descriptors pass only over a Unix socket "
                                "(vmmrun -R unix:PATH)")
        if self.next_round or self.have_all_pages:
            raise ProtocolError("LOCAL_MEMORY after memory rounds: a session's memory comes one way")
        t = time.monotonic()
        fds = P.recv_memory_fds(self.conn, len(m.segments))
        try:
            mine = tuple((seg.name, seg.gpa, seg.size) for seg in self.memory.segments)
            if m.segments != mine:
                raise ProtocolError(f"LOCAL_MEMORY describes the segments {list(m.segments)}; this guest's are {list(mine)}")
            old = self.memory
            try:
                memory = GuestMemory.from_fds(fds, old.memsize, wired=old.wired, lowmem_limit=old.lowmem_limit,
                                              dirty_tracking=old.dirty_tracking)
            except (OSError, ValueError) as err:
                raise MigrationError(f"cannot map the source's memory: {err}") from None
        finally:
            for fd in fds:
                os.close(fd)
        try:
            memory.mark_dirty_runs(m.dirty_runs)
            self.adapter.adopt_memory(memory)
        except BaseException as err:
            memory.close()
            if isinstance(err, (OSError, ValueError)):
                raise ProtocolError(f"LOCAL_MEMORY: {err}") from None
            raise
        self.memory = memory
        self.local = True
        self.have_all_pages = True
        self.stats.downtime_breakdown["memory_ms"] = (time.monotonic() - t) * 1000
        self._advance(P.MessageType.LOCAL_MEMORY)

    def _local_digest(self) -> int:
        return P.local_digest([(s.name, s.gpa, s.size, *s.memfd_identity) for s in self.memory.segments])

    # -- post-copy (protocol version 7) ----------------------------------------------------------
    def _take_postcopy(self, m: P.Postcopy) -> None:
        """POSTCOPY: from now on the chunks holding the pages the source names load from it on
        demand; every other page is as the rounds left it."""
        if self.link is not None or self.local:
            raise ProtocolError("POSTCOPY twice, or after LOCAL_MEMORY: a session switches once")
        if self.digest_job is not None:
            raise ProtocolError("POSTCOPY after the final round: the memory is complete already")
        try:
            self.link = self.memory.postcopy_link(m.needed_runs, m.chunk_size, f"the post-copy source {self.stats.peer}")
        except (ValueError, OSError) as err:
            raise ProtocolError(f"POSTCOPY: {err}") from None
        self.have_all_pages = True  # every access waits for its page from here on
        self.stats.postcopy = {"after_rounds": self.next_round, "chunk_size": m.chunk_size, "pages_needed": self.link.pages}
        self._advance(P.MessageType.POSTCOPY)

    def send_recovered(self, outcome: P.Outcome) -> None:
        self._send(P.MessageType.RECOVERED, P.encode_recovered(outcome))
        self._advance(P.MessageType.RECOVER)

    def take_page_connection(self, other: _Receiver) -> None:
        """A RECOVER connection (answered) carries the page exchange from now on."""
        endpoint = for_page_requests(other.conn, self.params.io_timeout)
        with self._conn_lock:
            old, self.conn = self.conn, other.conn
            self.link.attach(endpoint)
        shutdown_quietly(old)
        old.close()

    def _postcopy_tick(self, switched: float) -> bool:
        """The post-copy figures now; True once every page is here."""
        lazy = self.memory.lazy_status()
        figures = self.link.stats()
        self.stats.postcopy.update(
            requested_pages=figures.demand_pages, pushed_pages=figures.background_pages, zero_pages=figures.zero_pages,
            remote_faults=figures.demand_chunks, fault_p50_us=figures.fault_p50_us, fault_p99_us=figures.fault_p99_us,
            fault_max_us=figures.fault_max_us, blocked_ms=lazy.wait_seconds * 1000, waits=lazy.waits,
            link_failures=figures.link_failures, link_down=figures.down, postcopy_ms=(time.monotonic() - switched) * 1000)
        if self.state is RxState.RUNNING:
            self.stats.status = "postcopy" if figures.down is None else "postcopy-paused"
        return lazy.resident

    def _postcopy_pages(self) -> None:
        """The guest runs: hand the connection to the page link, fill in the background from
        just past the last page the guest waited for, wait (through link failures and their
        RECOVERs) until every page is here, tell the source, and read its RELEASED."""
        switched = time.monotonic()
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            self.link.notify_on_failure(write_end)
            with self._conn_lock:
                self.link.attach(for_page_requests(self.conn, self.params.io_timeout))
            self.memory.start_loading(fill=True, loaders=1, follow_demand=True)
            noted = 0
            while not self._postcopy_tick(switched):
                if select.select([read_end], [], [], 0.05)[0]:
                    os.read(read_end, 64)
                failures = self.stats.postcopy["link_failures"]
                if failures > noted:
                    noted = failures
                    self.stats.notes.append(f"post-copy page link failed ({self.stats.postcopy['link_down']}): the guest waits "
                                            "for its pages; nothing is discarded; listening for the source's RECOVER")
            while True:  # every page is here: say so on whichever connection works
                try:
                    self.link.finish()
                    break
                except OSError:
                    time.sleep(0.05)
            self._postcopy_tick(switched)
        finally:
            os.close(read_end)
            os.close(write_end)
        self.stats.notes.append("every page is here: the source's copy is no longer needed")
        with self._conn_lock:
            conn = self.conn
        set_io_timeout(conn, self.params.commit_timeout)
        pc = self.stats.postcopy
        try:
            P.write_frame(conn, P.MessageType.POSTCOPY_DONE, P.encode_postcopy_done(P.PostcopyDone(
                pc["remote_faults"], pc["fault_p50_us"], pc["fault_p99_us"], pc["fault_max_us"], int(pc["blocked_ms"] * 1000),
                pc["requested_pages"], pc["pushed_pages"])))
            P.decode_empty(P.MessageType.RELEASED, P.read_frame(conn, allowed=(P.MessageType.RELEASED,)).payload)
            self.released = True
        except (MigrationError, OSError) as err:
            self.stats.notes.append(f"the source did not say RELEASED after the last page ({err})")

    def _take_state(self, blob: bytes, *, last: bool) -> None:
        """A STATE_PART (``last`` false) or STATE: its sections read and checked, nothing loaded.
        The parts together are bounded as one STATE is: by max_state_bytes (``_read`` refuses
        a frame longer than what is left of it from its header, before reading it) and by
        MAX_SECTIONS (a STATE_PART carries at least one section, so their count is bounded too)."""
        t = time.monotonic()
        if not self.have_all_pages:
            raise ProtocolError("the state arrived before a round carrying all pages")
        self.stats.state_bytes += len(blob)  # within max_state_bytes: _read bounds each frame by what is left of it
        try:
            sections = decode_sections(blob, what="migration stream")
        except SectionError as err:
            raise ProtocolError(str(err)) from None
        if not last and not sections:
            raise ProtocolError("a STATE_PART carries no section")
        self.state_sections += len(sections)
        if self.state_sections > MAX_SECTIONS:
            raise ProtocolError(f"the state's parts carry more than the {MAX_SECTIONS} sections a state may have")
        if self.section_loader is None:
            self.section_loader = self._new_loader()
        try:
            self.section_loader.add(sections)
        except Exception as err:
            raise MigrationError(f"the guest's state was refused, nothing of it loaded: {err}") from None
        self.stats.state_parts += 1
        self.state_read_s += time.monotonic() - t

    def _new_loader(self) -> SectionLoader:
        """The guest handle's loader; for a handle written before ``section_loader`` (it
        checks and loads the state whole), one that keeps every check for the end."""
        make = getattr(self.adapter, "section_loader", None)
        return make(what="migration stream") if make is not None else LoadAtEnd(self.adapter, what="migration stream")

    def _restore(self) -> None:
        """STATE, the last part, read: check the state whole and load it."""
        t = time.monotonic()
        try:
            self.section_loader.restore()
        except Exception as err:
            raise MigrationError(f"restoring the guest's state failed: {err}") from None
        self.restored = True
        # Reading the state as it came, all of it: from protocol 9 the parts before the last ran
        # beside the source's save of the rest.
        self.stats.downtime_breakdown["state_read_ms"] = self.state_read_s * 1000
        self.stats.downtime_breakdown["restore_ms"] = (time.monotonic() - t) * 1000
        self._advance(P.MessageType.STATE)

    def _commit(self, source_digest: int) -> None:
        t = time.monotonic()
        if self.link is not None:
            mine = source_digest  # post-copy: no whole memory to hash yet; each page reply is checked as it arrives
        elif self.local:
            mine = self._local_digest()
        else:
            mine = self.digest_job.result() if self.digest_job is not None else self.tracker.digest()
        self.stats.downtime_breakdown["digest_ms"] = (time.monotonic() - t) * 1000  # the wait not hidden by the transfer
        if mine != source_digest:
            raise MigrationError(f"memory digest mismatch: source {source_digest:#034x}, destination {mine:#034x}; "
                                 "the memory that arrived is not the source's")
        set_io_timeout(self.conn, self.params.commit_timeout)
        if self.version >= P.OWNERSHIP_VERSION and self.before_commit_ack is not None:
            why = self.before_commit_ack()
            if why is not None:
                self.stats.notes.append(f"cannot listen for a RESOLVE should the link fail: {why}")
        # From the first byte of COMMIT_ACK the source may commit: a failure from here on
        # (version 5) holds the guest in doubt instead of discarding it.
        self._advance(P.MessageType.COMMIT_REQUEST)
        self._send(P.MessageType.COMMIT_ACK, P.encode_digest(mine))
        # While the source decides and COMMITTED travels: what start_running would do first.
        # Nothing may fail here (the source may commit from now on): start_running does it again.
        try:
            self.adapter.prepare_to_run()
        except Exception as err:
            self.stats.notes.append(f"could not get the guest ready to run before the commit ({err}); it starts after it")
        frame = self._read()
        P.decode_empty(frame.type, frame.payload)
        # The source has decided to commit: the guest is ours once it runs. Should it fail to
        # start (powered off meanwhile), no RESUMED goes back: the source keeps its copy.
        t = time.monotonic()
        self.adapter.start_running()
        started = time.monotonic() - t
        self.stats.running_at = time.time()
        self._advance(P.MessageType.COMMITTED)
        self.stats.owner = "destination"
        self.stats.downtime_breakdown["start_ms"] = started * 1000
        try:
            # Tells the source when the downtime ended; the guest runs whether or not it arrives.
            self._send(P.MessageType.RESUMED, P.encode_resumed(int(started * 1e6)))
        except (MigrationError, OSError):
            self.stats.notes.append("could not tell the source the guest runs (RESUMED); it runs")
        self.downtime.release()  # the guest runs here: the downtime is over
        if self.link is not None:
            self._postcopy_pages()
            self.stats.finish("completed")
            return
        self.stats.finish("completed")
        if self.version >= P.OWNERSHIP_VERSION:
            try:
                # The source holds its paused copy until it knows: RELEASED says it does.
                P.decode_empty(P.MessageType.RELEASED, self._read().payload)
                self.released = True
            except (MigrationError, OSError) as err:
                self.stats.notes.append(f"the source did not say RELEASED ({err})")

    # -- failure ---------------------------------------------------------------------------------
    def _fail(self, err: BaseException) -> None:
        cancelled = isinstance(err, Cancelled) or self.watcher.fired
        stopped_in = f"state {self.state.value}"
        if cancelled and not isinstance(err, Cancelled):
            message = f"cancelled in state {self.state.value}"
        elif isinstance(err, MigrationError):
            message = str(err)
        else:
            message = f"{type(err).__name__} in state {self.state.value}: {err}"
        if not cancelled:
            message = with_tls_error(message, self.conn)
        if self.state is RxState.RUNNING:
            self.stats.notes.append(f"after commit: {message}")
            self.stats.finish("completed")
            return
        if self.source_aborted:
            message = f"the source aborted (RESOLVE on another connection) in state {self.state.value}"
        elif self.state is RxState.AWAIT_COMMITTED and self.version >= P.OWNERSHIP_VERSION and not isinstance(err, Aborted):
            # The source may have sent COMMITTED: neither run nor discard until it (or the
            # operator) says which. The vCPU threads stay held at the pause rendezvous.
            self.state = RxState.IN_DOUBT
            self.stats.owner = "in doubt"
            self._join_hashing()
            self.stats.finish("in-doubt", f"the link failed after COMMIT_ACK ({message}); the source may have committed, "
                                          "so the guest is held paused here until it is settled")
            return
        # A lost data stream leaves the main connection up: the source learns from the ABORT which
        # stream broke, where otherwise it may only see this end close while it waits for an answer.
        main_lost = isinstance(err, ConnectionLost) and err.stream is None
        if not isinstance(err, (Aborted, Refused)) and not main_lost and not self.watcher.fired:
            try:
                set_io_timeout(self.conn, 1.0)
                self._send(P.MessageType.ABORT, P.encode_abort(message))
            except (MigrationError, OSError):
                pass
        self.state = RxState.DISCARDED
        self.stats.owner = "source"
        self._join_hashing()
        self.adapter.discard()
        self.stats.stopped_in = stopped_in
        self.stats.finish("cancelled" if cancelled else "failed", message)
