"""Control-socket commands that need the layers above the runtime: checkpoint and migration.

``vmmrun`` adds these to its machine's control socket; ``vmmctl`` asks for them. Each runs in
the control server's connection thread and streams progress back to vmmctl.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any, Callable

from ..migration import MigrationHandle, MigrationParams
from ..migration.machine import MachineAdapter
from ..runtime.machine import Machine
from ..snapshot.checkpoint import checkpoint_machine

Progress = Callable[[dict[str, Any]], None]


class MachineServices:
    """Checkpoint, suspend and migrate commands for one machine."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._lock = threading.Lock()
        self._migration: MigrationHandle | None = None
        self._last_stats: dict[str, Any] | None = None
        self._latest: dict[str, Any] | None = None

    def install(self) -> None:
        add = self.machine.add_control_handler
        add("checkpoint", self.checkpoint)
        add("migrate", self.migrate)
        add("migrate-status", self.migrate_status)
        add("migrate-cancel", self.migrate_cancel)

    # -- checkpoint and suspend
    def checkpoint(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        path = request.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise ValueError(f"checkpoint path must be an absolute path (vmmctl makes it so), got {path!r}")
        with self._lock:
            if self._migration is not None and not self._migration.done():
                raise OSError(errno.EBUSY, "a migration is running; cancel it or wait before checkpointing")
            return checkpoint_machine(self.machine, path, suspend=bool(request.get("suspend")), progress=progress)

    # -- migration
    def migrate(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        host, port = request.get("host"), request.get("port")
        if not isinstance(host, str) or not isinstance(port, int):
            raise ValueError(f"migrate needs a host and a port, got {host!r} {port!r}")
        key = bytes.fromhex(request["key"]) if request.get("key") else None
        params = MigrationParams(**request.get("params", {}))
        with self._lock:
            if self._migration is not None and not self._migration.done():
                raise OSError(errno.EBUSY, "a migration is already running")

            def on_progress(stats) -> None:
                snapshot = stats.to_dict()
                self._latest = snapshot
                progress({"migration": snapshot})

            self._migration = MigrationHandle(
                MachineAdapter(self.machine), host, port, live=bool(request.get("live")), key=key,
                params=params, progress=on_progress,
            )
        stats = self._migration.wait()
        self._last_stats = stats.to_dict()
        if stats.status != "completed":
            code = errno.ECANCELED if stats.status == "cancelled" else errno.EIO
            if self.machine.exit_status is not None:
                raise OSError(code, f"migration {stats.status}: the guest stopped ({self.machine.exit_reason}) "
                                    "while it was being migrated; there is nothing left to migrate")
            raise OSError(code, f"migration {stats.status}: {stats.error}; the guest keeps running here")
        return self._last_stats

    def migrate_status(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        handle = self._migration
        if handle is None:
            raise OSError(errno.ENOENT, "no migration has run on this VM")
        if handle.done():
            return self._last_stats or self._latest or {}
        return self._latest or {"status": "setup"}

    def migrate_cancel(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        handle = self._migration
        if handle is None or handle.done():
            raise OSError(errno.ENOENT, "no migration is running")
        handle.cancel()
        stats = handle.wait(60)
        return {"cancelled": stats.status == "cancelled", "status": stats.status}
