"""Loopback TCP proxies between a migration's source and destination: cut, corrupt or slow the stream
at a byte offset (``Proxy``), cut or stall one of a migration's connections (``StreamProxy``), or cut,
stall and corrupt on demand (``ManualProxy``)."""

from __future__ import annotations

import socket
import struct
import threading
import time

from vmmpy.migration.net import await_delivery


class Proxy:
    """Forwards one connection; from the source's ``cut_after``-th byte on, nothing more; flips
    ``garbage`` bytes from ``flip_at``; with ``rate``, forwards at most that many bytes a second
    towards the destination (a slow link)."""

    def __init__(self, target: tuple[str, int], *, cut_after: int | None = None, flip_at: int | None = None,
                 garbage: int = 1, rate: float | None = None) -> None:
        self.target = target
        self.rate = rate
        self.cut_after = cut_after
        self.flip_at = flip_at
        self.garbage = garbage  # bytes from flip_at on that are overwritten (1: one byte flipped)
        self.forwarded = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client = _accept_first(self.listener)
        if client is None:
            return
        upstream = socket.create_connection(self.target, timeout=30)
        back = threading.Thread(target=_forward, args=(upstream, client), daemon=True)
        back.start()
        try:
            while True:
                data = bytearray(client.recv(65536))
                if not data:
                    break
                start = self.forwarded
                if self.flip_at is not None:
                    for at in range(max(start, self.flip_at), min(start + len(data), self.flip_at + self.garbage)):
                        data[at - start] ^= 0xFF
                if self.cut_after is not None and start + len(data) >= self.cut_after:
                    upstream.sendall(data[: self.cut_after - start])
                    self.forwarded = self.cut_after
                    break
                upstream.sendall(data)
                self.forwarded += len(data)
                if self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            _shut_both(client, upstream, back)
            client.close()
            upstream.close()
            self.listener.close()


class StreamProxy:
    """A loopback TCP proxy for every connection of a migration (the main one and its parallel
    streams, in the order they connect): connection ``victim`` is cut after ``cut_after`` bytes
    (both of its ends closed, as a dead peer's would be), or with ``stall`` stops being forwarded
    (held open) once it has carried that many. With ``sink`` (seconds), the source's bytes after
    those are taken and dropped, and once the source has sent nothing for that long (0: at once)
    the destination's end alone is reset: only the destination sees the stream break. With
    ``hold_others`` too, every other connection stops forwarding the source's bytes once it has
    carried ``cut_after`` of them, until that reset (10 s at most): a source with more to send is
    then still sending on them when the destination closes them, whatever the two hosts' speeds."""

    def __init__(self, target: tuple[str, int], *, victim: int, cut_after: int, stall: bool = False, sink: float | None = None,
                 hold_others: bool = False, connections: int = 16) -> None:
        self.target = target
        self.victim, self.cut_after, self.stall, self.sink = victim, cut_after, stall, sink
        self.hold_others = hold_others
        self.sunk = 0  # the source's bytes taken and dropped on the victim
        self.reset_at: float | None = None  # time.monotonic() when a sink reset the destination's end
        self.reset = threading.Event()  # set with reset_at (and by close())
        self.hold_timed_out = False  # a held connection waited 10 s for the reset in vain
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(30)
        self.port = self.listener.getsockname()[1]
        self.released = threading.Event()
        self.stalled_at: float | None = None  # time.monotonic() when the victim stopped being forwarded
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, args=(connections,), daemon=True)
        self._accepting.start()

    def _accept(self, connections: int) -> None:
        for index in range(connections):
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=30)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            thread = threading.Thread(target=self._relay, args=(client, upstream, index == self.victim), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _relay(self, client: socket.socket, upstream: socket.socket, victim: bool) -> None:
        back = threading.Thread(target=_forward, args=(upstream, client), daemon=True)
        back.start()
        carried = 0
        hold = self.hold_others and not victim
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                if hold and carried >= self.cut_after:
                    hold = False  # once: 10 s at most, ended by the reset or by close()
                    if not self.reset.wait(10):
                        self.hold_timed_out = True
                if victim and carried + len(data) >= self.cut_after:
                    upstream.sendall(data[: self.cut_after - carried])
                    if self.sink is not None:
                        self.sunk = carried + len(data) - self.cut_after
                        self._sink(client, upstream)
                    elif self.stall:
                        self.stalled_at = time.monotonic()
                        self.released.wait(60)  # hold both ends open, forwarding nothing
                    break
                try:
                    upstream.sendall(data)
                except OSError:
                    # The destination's end went: what it said before (an ABORT) reaches the source first.
                    back.join(1.0)
                    raise
                carried += len(data)
        except OSError:
            pass
        finally:
            _shut_both(client, upstream, back)
            with self._lock:
                for s in (client, upstream):
                    if s in self._open:
                        self._open.remove(s)
                        s.close()  # unread bytes make this a reset, which a writer blocked on it sees at once

    def _sink(self, client: socket.socket, upstream: socket.socket) -> None:
        """Take the source's bytes and drop them; reset the destination's end once the source has
        been quiet for ``sink`` seconds (0: at once); go on taking them until close()."""
        client.settimeout(self.sink or 0.1)
        quiet_for = 0.0  # a timed-out read means quiet for self.sink
        for _ in range(100_000):  # bounded: 6.4 GB of 64 KiB reads, or 10 000 s of quiet
            if self.reset_at is None and quiet_for >= self.sink:
                # What was forwarded reaches the destination first (a reset discards what its
                # send queue still holds), bounded: the destination is reading this stream.
                await_delivery([upstream], 5.0)
                upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                upstream.shutdown(socket.SHUT_RD)  # ends the back thread's read, which a close alone would not wake
                self.reset_at = time.monotonic()
                upstream.close()  # a reset, to the destination only; the source's end stays open
                self.reset.set()
                client.settimeout(0.1)
            if self.released.is_set():
                return
            try:
                data = client.recv(65536)
            except TimeoutError:
                quiet_for = self.sink
                continue
            if not data:
                return
            quiet_for = 0
            self.sunk += len(data)

    def close(self) -> None:
        self.released.set()
        self.reset.set()
        self.listener.close()
        with self._lock:
            for s in self._open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self._threads:
            t.join(10)
        with self._lock:
            for s in self._open:
                s.close()
            self._open.clear()


def _shut_both(client: socket.socket, upstream: socket.socket, back: threading.Thread) -> None:
    """End a forwarded connection both ways (as a dead peer would) and wait for its back thread."""
    for s in (client, upstream):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    back.join(5)

class ManualProxy:
    """Forwards the first connection to ``target`` both ways until ``cut()``; refuses any later one
    (the path is gone). ``stall()`` stops forwarding without closing anything (a silent path);
    ``corrupt()`` flips a byte in the middle of the next data going the source's way to the
    destination."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()[:2]
        self.target = target
        self.socks: list[socket.socket] = []
        self.flip = threading.Event()
        self.stalled = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        client = _accept_first(self.listener)
        self.listener.close()  # later connections are refused: the path is gone
        if client is None:
            return
        upstream = socket.create_connection(self.target, timeout=30)
        self.socks = [client, upstream]
        for a, b, flip in ((client, upstream, self.flip), (upstream, client, None)):
            threading.Thread(target=_forward, args=(a, b, self._hook(flip)), daemon=True).start()

    def _hook(self, flip: threading.Event | None):
        def hook(data: bytearray) -> None:
            while self.stalled.is_set():  # nothing passes, nothing is closed
                time.sleep(0.05)
            if flip is not None and flip.is_set() and len(data) > 64:
                flip.clear()
                data[len(data) // 2] ^= 0x5A
        return hook

    def corrupt(self) -> None:
        self.flip.set()

    def stall(self) -> None:
        self.stalled.set()

    def cut(self) -> None:
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _forward(a: socket.socket, b: socket.socket, hook=None) -> None:
    """Copy what ``a`` receives to ``b`` until ``a`` ends or either fails; ``hook`` may hold or
    change each piece first."""
    try:
        while data := bytearray(a.recv(65536)):
            if hook is not None:
                hook(data)
            b.sendall(data)
    except OSError:
        pass


def _accept_first(listener: socket.socket) -> socket.socket | None:
    """The first connection to ``listener`` within 30 s, or None."""
    listener.settimeout(30)
    try:
        return listener.accept()[0]
    except OSError:
        return None
