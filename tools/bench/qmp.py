"""A small QMP client for the QEMU comparison (``qemu.py``): JSON lines over a UNIX socket, the
capabilities handshake, commands matched to their replies by id, events kept until asked for.
Every read has a deadline; nothing here waits forever. It also parses the replies the bench
reads (``query-migrate``, event timestamps). It does not start or stop QEMU."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 1 << 20  # no QMP reply the bench asks for comes near this


class QmpError(RuntimeError):
    """QEMU answered a command with an error, or the conversation broke."""


class QmpTimeout(QmpError):
    """Nothing (or nothing wanted) arrived before the deadline; the connection is still usable."""


def parse_message(line: bytes) -> dict[str, Any]:
    """One QMP message from one line of the stream."""
    try:
        message = json.loads(line)
    except ValueError as err:
        raise QmpError(f"QMP: not a JSON message: {line[:200]!r}") from err
    if not isinstance(message, dict):
        raise QmpError(f"QMP: expected a JSON object, got {line[:200]!r}")
    return message


def event_time(event: dict[str, Any]) -> float:
    """An event's host timestamp (QEMU's real-time clock, the clock of ``time.time()``) in seconds."""
    try:
        stamp = event["timestamp"]
        return stamp["seconds"] + stamp["microseconds"] / 1e6
    except (KeyError, TypeError) as err:
        raise QmpError(f"QMP: event without a timestamp: {event!r}") from err


@dataclass
class MigrateInfo:
    """What the bench reads from ``query-migrate``; times in ms, sizes in bytes. None where QEMU
    did not say (it fills in most fields only once a migration is active or done)."""

    status: str
    total_time_ms: float | None = None
    downtime_ms: float | None = None
    setup_time_ms: float | None = None
    expected_downtime_ms: float | None = None
    transferred: int | None = None
    normal_pages: int | None = None
    duplicate_pages: int | None = None
    dirty_sync_count: int | None = None
    mbps: float | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    @property
    def complete(self) -> bool:
        """Completed with its totals filled in: QEMU 7.2 briefly reports ``completed`` with a
        total-time of 0 before it writes the figures."""
        return self.status == "completed" and bool(self.total_time_ms)


def migrate_info(reply: dict[str, Any]) -> MigrateInfo:
    """Parse the ``return`` of ``query-migrate`` (a dict; empty before any migration)."""
    if not isinstance(reply, dict):
        raise QmpError(f"query-migrate: expected an object, got {reply!r}")
    ram = reply.get("ram") or {}
    return MigrateInfo(status=reply.get("status", "none"), total_time_ms=reply.get("total-time"),
                       downtime_ms=reply.get("downtime"), setup_time_ms=reply.get("setup-time"),
                       expected_downtime_ms=reply.get("expected-downtime"), transferred=ram.get("transferred"),
                       normal_pages=ram.get("normal"), duplicate_pages=ram.get("duplicate"),
                       dirty_sync_count=ram.get("dirty-sync-count"), mbps=ram.get("mbps"),
                       error=reply.get("error-desc"))


class Qmp:
    """One QMP connection. ``execute`` returns a command's ``return`` or raises QmpError with
    QEMU's error text; events that arrive meanwhile are kept for ``wait_event``."""

    def __init__(self, path: str, timeout: float = 30.0, alive: Callable[[], None] | None = None) -> None:
        """Connect to ``path`` (retrying while QEMU starts, until ``timeout``), read the greeting
        and leave capabilities negotiation. ``alive`` is called between retries and may raise
        (e.g. when the QEMU process has exited)."""
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._buffer = b""
        self._next_id = 0
        deadline = time.monotonic() + timeout
        self.sock = self._connect(deadline, alive)
        try:
            greeting = self._read(deadline)
            if "QMP" not in greeting:
                raise QmpError(f"QMP {path}: expected a greeting, got {greeting!r}")
            self.execute("qmp_capabilities", timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.sock.close()
            raise

    def _connect(self, deadline: float, alive: Callable[[], None] | None) -> socket.socket:
        while True:
            if alive is not None:
                alive()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as err:
                sock.close()
                if time.monotonic() >= deadline:
                    raise QmpError(f"QMP {self.path}: no QEMU listening ({err})") from err
                time.sleep(0.02)

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpTimeout(f"QMP {self.path}: no complete message before the deadline")
            if len(self._buffer) > MAX_MESSAGE:
                raise QmpError(f"QMP {self.path}: a message longer than {MAX_MESSAGE} bytes")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError as err:
                raise QmpTimeout(f"QMP {self.path}: no complete message before the deadline") from err
            if not data:
                raise QmpError(f"QMP {self.path}: QEMU closed the connection")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return parse_message(line) if line.strip() else self._read(deadline)

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        self._next_id += 1
        ident = f"bench-{self._next_id}"
        message: dict[str, Any] = {"execute": command, "id": ident}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != ident:
                continue  # a late reply to a command that timed out earlier
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"QMP {command}: {err.get('class', 'Error')}: {err.get('desc', err)}")
            return reply.get("return")

    def wait_event(self, name: str, predicate: Callable[[dict[str, Any]], bool] = lambda e: True,
                   timeout: float = 30.0) -> dict[str, Any]:
        """The first event ``name`` (kept or new) that ``predicate`` accepts; it is consumed."""
        deadline = time.monotonic() + timeout
        scanned = 0
        while True:
            for i in range(scanned, len(self.events)):
                event = self.events[i]
                if event.get("event") == name and predicate(event):
                    del self.events[i]
                    return event
            scanned = len(self.events)
            try:
                self.events.append(self._read(deadline))
            except QmpError as err:
                raise type(err)(f"QMP {self.path}: no {name} event within {timeout:g} s ({err})") from err

    def close(self) -> None:
        self.sock.close()
