"""Control-socket commands that need the layers above the runtime: checkpoint and migration.

``vmmrun`` adds these to its machine's control socket; ``vmmctl`` asks for them. Each runs in
the control server's connection thread and streams progress back to vmmctl.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import Any

from ..migration import Destination, MigrationHandle, MigrationParams, estimate, estimate_warm
from ..migration.net import format_address, is_local_address, measure_local_throughput
from ..migration.streams import measure_local_throughput_streams
from ..migration.tls import TlsConfig
from ..runtime.guest_handle import MachineHandle
from ..runtime.process import Machine
from ..snapshot import CheckpointError
from ..snapshot.checkpoint import checkpoint_machine

Progress = Callable[[dict[str, Any]], None]


def _request_key(request: dict[str, Any]) -> bytes | None:
    """The key vmmctl read from --key-file, sent as hex in the request (None when not given)."""
    key = request.get("key")
    if key is None:
        return None
    try:
        return bytes.fromhex(key)
    except (TypeError, ValueError):
        raise ValueError("the request's key must be hex digits (vmmctl sends --key-file's bytes so)") from None


class MachineServices:
    """Checkpoint, suspend and migrate commands for one machine."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._lock = threading.Lock()
        self._migration: MigrationHandle | None = None
        self._last_stats: dict[str, Any] | None = None
        self._latest: dict[str, Any] | None = None
        self._estimating = False  # an estimate clears dirty bits: never beside a migration
        self.incoming: Destination | None = None  # vmmrun -R: the destination receiving this guest

    def install(self) -> None:
        add = self.machine.add_control_handler
        add("checkpoint", self.checkpoint)
        add("migrate", self.migrate)
        add("migrate-status", self.migrate_status)
        add("migrate-cancel", self.migrate_cancel)
        add("migrate-estimate", self.migrate_estimate)
        add("migrate-resolve", self.migrate_resolve)
        add("status", self.status)
        add("resume", self.resume)

    # -- a migration in doubt holds the guest: nothing may run it but the resolution
    def in_doubt(self) -> str | None:
        """Which side of a migration in doubt this VM is, or None."""
        if self._migration is not None and (self._migration.in_doubt or self._migration.committing):
            return "source"
        if self.incoming is not None and (self.incoming.state == "in-doubt" or self.incoming.committing):
            return "destination"
        return None

    def status(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        result = self.machine.status()
        side = self.in_doubt()
        if side is not None:
            result["state"] = "in-doubt"
            result["migration"] = f"in doubt ({side}): the guest is held paused until `vmmctl --migrate-resolve` settles it"
        elif self.incoming is not None and self.incoming.state in ("waiting", "migrating"):
            result["state"] = "incoming"
            result["migration"] = f"destination {self.incoming.state}"
        return result

    def resume(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        if self._migration is not None and not self._migration.done():
            raise OSError(errno.EBUSY, "a migration is running and holds the guest's pause; --migrate-cancel it first")
        side = self.in_doubt()
        if side is not None:
            raise OSError(errno.EBUSY, f"this guest's migration is in doubt ({side}); resuming it here could run it twice: "
                                       "settle it with --migrate-resolve")
        self.machine.resume()
        return {"paused": False}

    def migrate_resolve(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Settle a migration in doubt: ``action`` ask (default), run-here or discard-here; ``force``."""
        action = request.get("action", "ask")
        force = bool(request.get("force"))
        if action not in ("ask", "run-here", "discard-here"):
            raise ValueError(f"unknown resolve action {action!r}: ask, run-here or discard-here")
        if self._migration is not None and self._migration.committing:
            raise OSError(errno.EBUSY, "the migration is still settling its commit by itself (it reconnects for up to "
                                       "its resolve timeout); wait for vmmctl's answer, then resolve if it is in doubt")
        if self._migration is not None and self._migration.in_doubt:
            stats = self._migration.resolve(action, force=force).to_dict()
            self._last_stats = stats
            return stats
        if self.incoming is not None and self.incoming.state in ("in-doubt", "running", "discarded"):
            return self.incoming.resolve(action, force=force)
        raise OSError(errno.ENOENT, "no migration of this guest is in doubt")

    # -- checkpoint and suspend
    def checkpoint(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        path = request.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise ValueError(f"checkpoint path must be an absolute path (vmmctl makes it so), got {path!r}")
        key = _request_key(request)
        with self._lock:
            if self._migration is not None and not self._migration.done():
                raise OSError(errno.EBUSY, "a migration is running; cancel it or wait before checkpointing")
            if request.get("suspend") and self.in_doubt() is not None:
                raise OSError(errno.EBUSY, "the guest's migration is in doubt: suspending would end this copy; settle it "
                                           "with --migrate-resolve (a --checkpoint is allowed)")
            try:
                return checkpoint_machine(self.machine, path, suspend=bool(request.get("suspend")), progress=progress, key=key)
            except CheckpointError as err:
                raise OSError(errno.EIO, str(err)) from None

    # -- migration
    def migrate(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        host, port = request.get("host"), request.get("port")
        if not isinstance(host, str) or not isinstance(port, int):
            raise ValueError(f"migrate needs a host and a port, got {host!r} {port!r}")
        key = _request_key(request)
        tls = TlsConfig.from_dict(request["tls"]) if request.get("tls") else None  # vmmctl's paths, read here
        params = MigrationParams(**request.get("params", {}))
        with self._lock:
            if self._migration is not None and not self._migration.done():
                raise OSError(errno.EBUSY, "a migration is already running")
            if self.in_doubt() is not None:
                raise OSError(errno.EBUSY, "the last migration is in doubt: settle it with --migrate-resolve first")
            self._estimating_guard()

            def on_progress(stats) -> None:
                snapshot = stats.to_dict()
                self._latest = snapshot
                progress({"migration": snapshot})

            self._migration = MigrationHandle(
                MachineHandle(self.machine), host, port, live=bool(request.get("live")), key=key,
                params=params, progress=on_progress, tls=tls,
            )
        stats = self._migration.wait()
        self._last_stats = stats.to_dict()
        if stats.status == "in-doubt":
            raise OSError(errno.EINPROGRESS, in_doubt_message(stats.to_dict(), self.machine.config.name))
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
            incoming = self.incoming
            if incoming is not None and incoming.stats is not None:
                return incoming.stats.to_dict()  # this VM received a migration: the destination's record
            if incoming is not None:
                return {"role": "destination", "status": "setup" if incoming.state == "waiting" else incoming.state}
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

    # -- estimate: predict without migrating
    PROBE_SECONDS = 0.3

    def _estimating_guard(self) -> None:
        if self._estimating:
            raise OSError(errno.EBUSY, "an estimate is measuring this guest's dirty rate; wait for it to finish")

    def migrate_estimate(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Predict a warm or live migration to host:port without migrating or contacting the
        destination. Bandwidth: ``params.bandwidth_cap`` when given; otherwise measured with a
        short TCP probe when the host is an address of this machine; a remote host without a
        bandwidth is refused (measuring that link would need the destination's cooperation)."""
        host, port = request.get("host"), request.get("port")
        if not isinstance(host, str) or not isinstance(port, int):
            raise ValueError(f"migrate-estimate needs a host and a port, got {host!r} {port!r}")
        live = bool(request.get("live"))
        window = float(request.get("window", 1.0))
        params = MigrationParams(**request.get("params", {}))
        where = format_address(host, port)
        notes: list[str] = ["the destination was not contacted: its spec and key are checked only by a real migration"]
        local = is_local_address(host)
        measured = None
        if local:
            if params.streams > 1:  # the link the migration will use: that many connections at once
                measured = measure_local_throughput_streams(host, params.streams, self.PROBE_SECONDS)
            else:
                measured = measure_local_throughput(host, self.PROBE_SECONDS)
        if params.bandwidth_cap is not None:
            bandwidth = params.bandwidth_cap if measured is None else min(params.bandwidth_cap, measured)
            source = "--bandwidth" if measured is None or params.bandwidth_cap <= measured else "measured on this host (below --bandwidth)"
            if measured is None:
                notes.append(f"{host} is another host: the link was not measured; --bandwidth is taken as what it carries")
        elif measured is not None:
            streams = "one TCP stream" if params.streams == 1 else f"{params.streams} TCP streams at once"
            bandwidth, source = measured, f"measured: {streams} to {host} on this host for {self.PROBE_SECONDS:g} s"
        else:
            raise ValueError(
                f"cannot measure the link to {where}: {host} is not an address of this host, and probing it would need "
                "the destination's cooperation; give --bandwidth RATE (what the link carries, e.g. as iperf3 measures it)")
        with self._lock:
            if self._migration is not None and not self._migration.done():
                raise OSError(errno.EBUSY, "a migration is running: its statistics (--migrate-status) hold the live estimate")
            self._estimating_guard()
            self._estimating = True
        try:
            adapter = MachineHandle(self.machine)
            if live:
                est = estimate(adapter, bandwidth, window, params)
            else:
                est = estimate_warm(adapter, bandwidth, params)
        finally:
            self._estimating = False
        if self.machine.paused:
            notes.append("the guest is paused now, so it dirties nothing: resume it for a live estimate that means something")
        result = est.to_dict()
        result.update({
            "host": host, "port": port, "live": live, "bandwidth_source": source,
            "measured_bandwidth": measured, "policy": params.policy, "max_rounds": params.max_rounds,
            "guest_state": "paused" if self.machine.paused else "running", "notes": notes,
        })
        return result


def in_doubt_message(stats: dict[str, Any], vmname: str) -> str:
    """What an operator must know about a migration that ended in doubt, and what to do."""
    return (f"migration in doubt: {stats.get('error')}. The guest is held paused here; the destination "
            f"{stats.get('peer')} holds it paused or runs it, and never runs it unless this source said commit. "
            f"Run `vmmctl --vm={vmname} --migrate-resolve` to ask it again (it settles without ever running both); "
            "see docs/migration.md, \"When a migration is in doubt\"")
