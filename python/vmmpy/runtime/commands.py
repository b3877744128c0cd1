"""The commands the vmmrun process serves that hand the machine to snapshot/ and migration/:
checkpoint, suspend, restore (``vmmrun -r``), migrate (source) and receive (``vmmrun -R``).

The runtime composes them: snapshot/ and migration/ see the guest only through its guest handle
(``guest_handle.MachineHandle``); this module says what a checkpoint's basic metadata holds,
builds the machine a checkpoint is restored into, and serves the control-socket commands
(``vmmrun`` installs them, ``vmmctl`` asks for them). Each control command runs in the control
server's connection thread and streams progress back to vmmctl.

Restore (bhyve's ``-r``): read and verify all three files before anything is created (with the
checkpoint key when it was written with one); check the basic metadata this module wrote
(vendor, TSC, device options) and the ``vm`` section's fields it reads, by field; take the vCPU
count, memory size and wiring from the checkpoint and vendor and TSC from its ``vm`` section;
refuse device options that do not match the saved ones, naming the device; build the machine
and let snapshot/ restore the guest into it; only then are the console files opened and may the
vCPUs start, so a checkpoint refused at any step leaves no file written.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..devices.lpc import console_backend
from ..devices.uart import CaptureConsole, ConsoleBackend
from ..memory import KVM_TRACKING
from ..migration.net import format_address, is_local_address, measure_local_throughput
from ..progress import timed
from ..snapshot import CheckpointError
from ..snapshot.checkpoint import RECORD_SECONDS, checkpoint_guest, restore_guest
from ..snapshot.files import Checkpoint, merge_chain, read_checkpoint, verify_chain
from ..snapshot.meta import check_field
from ..snapshot.schema import array, integer, record, string
from ..state import SectionError, SectionRegistry
from ..state.kernel import configured_registry, kernel_registry
from .config import ACCELS, LPC_DEVICES, MAX_VCPUS, TSC_MODES, VENDORS, ConfigError, VmConfig
from .control import guest_stays_here
from .guest_handle import MachineHandle
from .process import Machine

if TYPE_CHECKING:
    # The migration engines, imported where a migration, a receive or an estimate starts (vmmrun
    # loads the source's on a thread once its guest runs): with their wire protocol (28 message
    # classes) they took 50 ms of every vmmrun start, a restore's included (docs/performance.md,
    # session 24).
    from ..migration import Destination, MigrationHandle, MigrationParams, MigrationStats
    from ..migration.tls import TlsConfig

#: The basic metadata keys a checkpoint carries beside bhyve's (snapshot.files checks those):
#: older checkpoints may lack the optional ones.
_BASIC_FIELDS = record(
    {"ncpus": integer(1, MAX_VCPUS)},
    {
        "vendor": string(choices=VENDORS),
        "tsc": string(choices=TSC_MODES),
        "accel": string(choices=ACCELS),
        "devices_config": record({
            "slots": array(string(), max_len=256 * 32 * 8),
            "lpc": array(string(choices=LPC_DEVICES), max_len=len(LPC_DEVICES)),
        }),
    },
    open=True,
)
#: The ``vm`` section's fields read before the machine is built; the kernel checks the rest
#: when it restores the section.
_VM_FIELDS = record(
    {"ncpus": integer(1, MAX_VCPUS), "vendor": string(choices=VENDORS), "tsc_mode": string(choices=TSC_MODES)},
    open=True,
)


def _device_config(config: VmConfig) -> dict[str, Any]:
    """The device options a restore must match (bhyve: "the same -s and -l options")."""
    return {
        "slots": [slot.pci_name for slot in config.slots],
        "lpc": sorted(config.lpc),
    }


def basic_metadata(config: VmConfig) -> dict[str, Any]:
    """What a checkpoint of a machine built from ``config`` records as its basic metadata."""
    return {
        "ncpus": config.ncpus,
        "vmname": config.name,
        "vendor": config.vendor,
        "tsc": config.tsc,
        "accel": config.accel,
        "devices_config": _device_config(config),
    }


def static_registry(config: VmConfig) -> SectionRegistry:
    """What a machine built from ``config`` reads, known before the machine exists: the kernel
    sections and, from the device classes themselves, every device section its options make."""
    try:
        return configured_registry([slot.pci_name for slot in config.slots])
    except ValueError as err:
        raise SectionError(str(err)) from None


def build_machine(config: VmConfig, *, consoles: Mapping[str, ConsoleBackend] | None = None,
                  load: Callable[[Machine], None] | None = None) -> Machine:
    """A machine from ``config`` with its memory set up and ``load`` run on it to put its guest
    program in place (``vmmrun`` and the library's ``vmmpy.Vm`` pass one that assembles a
    program for this layout: the runtime itself never imports guest programs): ready for
    ``start_vcpus``. Without ``load`` the memory stays empty, for an incoming migration. Nothing
    is left open if any step fails."""
    machine = Machine(config, consoles=dict(consoles) if consoles else None)
    try:
        machine.setup_memory()
        if load is not None:
            load(machine)
    except BaseException:
        machine.close()
        raise
    return machine


def restore_machine(
    path: str | Path,
    config: VmConfig,
    *,
    mode: str = "eager",
    key: bytes | None = None,
    consoles: dict[str, ConsoleBackend] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    prefetch: str = "working-set",
    record_seconds: float | None = RECORD_SECONDS,
    accel: str | None = None,
    page_cache: str = "auto",
) -> Machine:
    """Build a machine from checkpoint ``path``: ``config`` gives the name and device options;
    the vCPU count, memory, vendor and TSC come from the checkpoint. ``key`` is the checkpoint
    key: required for a keyed checkpoint, refused for an unkeyed one. ``consoles``: backends for
    LPC devices to use instead of opening ``config.lpc``'s (the library keeps output in memory).
    The vCPUs are not started. ``progress`` hears how far an eager restore's read has got
    (``vmmpy.progress.metered``'s messages). For a lazy restore, ``prefetch`` and
    ``record_seconds`` say what loads ahead and how long accesses are recorded once the vCPUs
    start (``snapshot.checkpoint.LazyLoading``, kept as ``machine.lazy_loading``).
    ``accel`` is the vCPU backend asked for: a checkpoint runs on the one it was made on (None:
    that one), never on another. ``page_cache``: "auto" drops the memory file's pages from the
    page cache as the restore reads them, when it came from the disk; "keep" leaves them
    (``files.restore_memory``).
    Raises CheckpointError or SectionError, with nothing left created and no console file
    opened, if anything does not fit."""
    def same_devices(basic: dict[str, Any]) -> None:
        basic = check_field(basic, _BASIC_FIELDS, os.fspath(path) + ".meta", "basic metadata")
        saved_devices = basic.get("devices_config")
        if isinstance(saved_devices, dict) and saved_devices != _device_config(config):
            raise SectionError(_device_mismatch(os.fspath(path), saved_devices, _device_config(config)))

    # The device options are compared first, from the verified metadata: a device saved but not
    # configured is named with the option that adds it, not as a section this machine cannot read.
    checkpoint = read_checkpoint(path, static_registry(config), key=key, check_basic=same_devices)
    basic, vm_payload = _checked_machine_fields(checkpoint)
    same_devices(basic)
    saved_accel = basic.get("accel", "sim")
    if accel is not None and accel != saved_accel:
        raise ConfigError(f"checkpoint '{os.fspath(path)}' was made on the {saved_accel} vCPU backend (--accel {saved_accel}); "
                          f"it cannot be restored on --accel {accel}: a guest's CPU state is its backend's")
    if saved_accel != "kvm" and config.dirty_tracking in KVM_TRACKING:
        raise ConfigError(f"checkpoint '{os.fspath(path)}' was made on the {saved_accel} vCPU backend: --dirty-tracking "
                          f"{config.dirty_tracking} is a KVM guest's only")
    config = replace(
        config,
        accel=saved_accel,
        # A KVM guest keeps the KVM log asked for (the bitmap unless kvm-ring was); a simulated one
        # anything but a KVM log.
        dirty_tracking=((config.dirty_tracking if config.dirty_tracking in KVM_TRACKING else "kvm") if saved_accel == "kvm"
                        else ("soft" if config.dirty_tracking in KVM_TRACKING else config.dirty_tracking)),
        ncpus=basic["ncpus"],
        memsize=checkpoint.memsize,
        wired=checkpoint.wired,
        vendor=vm_payload["vendor"],
        tsc=vm_payload["tsc_mode"],
    )
    # Consoles stay in memory until everything is restored: a refused checkpoint opens no file.
    machine = Machine(config, consoles={device: CaptureConsole() for device in config.lpc})
    try:
        machine.lazy_loading = restore_guest(MachineHandle(machine, hold_vcpus=False), checkpoint, mode=mode,
                                             dirty_tracking=config.dirty_tracking, progress=progress,
                                             backing=config.memory_backing, prefetch=prefetch, record_seconds=record_seconds,
                                             page_cache=page_cache)
        for uart in machine.uarts:
            device = uart.name.split(".", 1)[1]  # "lpc.com1"
            if consoles and device in consoles:
                uart.backend = consoles[device]
            elif device in config.lpc:
                uart.backend = console_backend(config.lpc[device], on_input=uart.receive)
    except BaseException:
        machine.close()
        raise
    return machine


def read_checkpoint_offline(path: str | Path, *, key: bytes | None = None) -> Checkpoint:
    """Read and verify checkpoint ``path`` (and its chain of parents, for a diff) with no
    machine: the sections it may hold are those of the devices its own metadata lists."""
    registry = kernel_registry()

    def saved_devices(basic: dict[str, Any]) -> None:
        basic = check_field(basic, _BASIC_FIELDS, os.fspath(path) + ".meta", "basic metadata")
        slots = basic.get("devices_config", {}).get("slots", [])
        try:
            devices = configured_registry(slots)
            registry.versions.update(devices.versions)
            registry.oldest.update(devices.oldest)
        except ValueError as err:
            raise SectionError(f"checkpoint '{os.fspath(path)}.meta': {err}") from None

    return read_checkpoint(path, registry, key=key, check_basic=saved_devices)


def check_checkpoint(path: str | Path, *, key: bytes | None = None) -> dict[str, Any]:
    """Verify a checkpoint without running it: for a diff, every file of its chain (metadata,
    state and every memory byte against its hashes, and each parent link). Returns the chain,
    root first; CheckpointError/SectionError names the first file that is wrong."""
    checkpoint = read_checkpoint_offline(path, key=key)
    verify_chain(checkpoint)
    return {"path": os.fspath(path), "keyed": checkpoint.keyed, "memory_bytes": checkpoint.memsize,
            "chain": [{"path": c.path, "diff": c.parent is not None,
                       "pages": sum(n for _, n in c.diff_runs) if c.diff_runs is not None else None}
                      for c in checkpoint.chain]}


def merge_checkpoint(path: str | Path, output: str | Path, *, key: bytes | None = None) -> dict[str, Any]:
    """Flatten checkpoint ``path`` (a diff and its chain) into one full checkpoint ``output``
    (keyed with ``key`` when the chain is), with the newest state; the chain is left as it was."""
    checkpoint = read_checkpoint_offline(path, key=key)
    stats = merge_chain(checkpoint, output, key=key)
    return {"path": os.fspath(output), "merged": len(checkpoint.chain), "memory_bytes": checkpoint.memsize,
            "bytes_written": stats["bytes_written"], "keyed": key is not None}


def _checked_machine_fields(checkpoint: Checkpoint) -> tuple[dict[str, Any], dict[str, Any]]:
    """The basic metadata and the ``vm`` section's payload, each field this module reads
    checked and named, before any of it builds a machine."""
    basic = check_field(checkpoint.basic, _BASIC_FIELDS, checkpoint.meta_path, "basic metadata")
    vm_section = next((s for s in checkpoint.sections if s.name == "vm"), None)
    if vm_section is None:
        raise CheckpointError(f"checkpoint '{checkpoint.kern_path}': kernel section 'vm' is missing")
    vm_payload = check_field(vm_section.payload, _VM_FIELDS, checkpoint.kern_path, "vm")
    if vm_payload["ncpus"] != basic["ncpus"]:
        raise CheckpointError(
            f"checkpoint '{checkpoint.kern_path}': section 'vm' is for {vm_payload['ncpus']} vCPUs, "
            f"the metadata ('{checkpoint.meta_path}') says {basic['ncpus']}"
        )
    return basic, vm_payload


def _device_mismatch(path: str, saved: dict[str, Any], mine: dict[str, Any]) -> str:
    for key, option in (("slots", "-s"), ("lpc", "-l")):
        missing = sorted(set(saved.get(key, [])) - set(mine.get(key, [])))
        extra = sorted(set(mine.get(key, [])) - set(saved.get(key, [])))
        if missing:
            return f"checkpoint '{path}': device '{missing[0]}' was saved but is not configured here (add its {option} option)"
        if extra:
            return f"checkpoint '{path}': device '{extra[0]}' is configured here but was not saved (remove its {option} option)"
    return f"checkpoint '{path}': device options differ from the saved ones ({saved} vs {mine})"


# -- the control-socket commands
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


class MachineCommands:
    """Checkpoint, suspend and migrate commands for one machine, and its incoming migration."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self._lock = threading.Lock()
        self._migration: MigrationHandle | None = None
        self._last_stats: dict[str, Any] | None = None
        self._estimating = False  # an estimate clears dirty bits: never beside a migration
        self._live_cancel: threading.Event | None = None  # set while a live checkpoint is written
        self.incoming: Destination | None = None  # vmmrun -R: the destination receiving this guest
        self.destroyed_while_receiving = False  # vmmctl --destroy ended the wait or the receive

    def listen_for_migration(self, host: str, port: int, *, key: bytes | None, tls: TlsConfig | None,
                             cancel: threading.Event, populate: bool = True, params: MigrationParams | None = None) -> None:
        """``vmmrun -R``: listen on ``host:port`` for one incoming migration into this (empty)
        machine (MigrationError if it cannot). vmmrun does it before its control socket answers,
        so whoever finds the VM there finds it listening too."""
        from ..migration import Destination

        self.incoming = Destination(MachineHandle.receiving(self.machine), host, port, key=key, tls=tls, cancel=cancel,
                                    populate=populate, params=params)

    def receive_migration(self, accept_timeout: float) -> MigrationStats:
        """Wait for the source :meth:`listen_for_migration` listens for and receive its guest;
        vmmctl --status and --migrate-resolve reach it meanwhile. The guest runs when it returns
        a completed migration's statistics."""
        if self.incoming is None:
            raise RuntimeError("receive_migration before listen_for_migration")
        return self.incoming.run(accept_timeout)

    def install(self) -> None:
        add = self.machine.add_control_handler
        self._builtin_destroy = self.machine.control_handlers()["destroy"]
        add("destroy", self.destroy)
        add("checkpoint", self.checkpoint)
        add("checkpoint-cancel", self.checkpoint_cancel)
        add("migrate", self.migrate)
        add("migrate-status", self.migrate_status)
        add("migrate-cancel", self.migrate_cancel)
        add("migrate-estimate", self.migrate_estimate)
        add("migrate-resolve", self.migrate_resolve)
        add("migrate-postcopy", self.migrate_postcopy)
        add("migrate-recover", self.migrate_recover)
        add("status", self.status)
        add("resume", self.resume)

    def destroy(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """vmmctl --destroy. A destination still waiting for its source, or receiving (not yet
        committing), stops as SIGTERM stops it: the wait ends and the process exits, instead of
        listening on until --accept-timeout with the guest's memory populated."""
        incoming = self.incoming
        if incoming is not None and incoming.cancel is not None and incoming.state in ("waiting", "migrating") \
                and self.in_doubt() is None:
            self.destroyed_while_receiving = True
            incoming.cancel.set()
        return self._builtin_destroy(request, progress)

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
        if self.incoming is not None and self.incoming.state in ("waiting", "migrating"):
            # Its guest is the source's until the commit: running it here could run it twice.
            raise OSError(errno.EBUSY, f"this VM is receiving a migration ({self.incoming.state}); its guest runs here once "
                                       "the migration commits (--migrate-cancel ends it)")
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
            live = bool(request.get("live"))
            self._live_cancel = threading.Event() if live else None
            try:
                return checkpoint_guest(MachineHandle(self.machine), path, basic=basic_metadata(self.machine.config),
                                        suspend=bool(request.get("suspend")), progress=progress, key=key,
                                        diff=bool(request.get("diff")), live=live, cancel=self._live_cancel)
            except CheckpointError as err:
                cancelled = isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ECANCELED
                raise OSError(errno.ECANCELED if cancelled else errno.EIO, str(err)) from None
            finally:
                self._live_cancel = None

    def checkpoint_cancel(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """Stop the live checkpoint being written: it fails leaving no file, the guest runs on."""
        cancel = self._live_cancel
        if cancel is None:
            raise OSError(errno.ENOENT, "no live checkpoint is being written (only a --live one can be cancelled)")
        cancel.set()
        return {"cancelled": True}

    # -- migration
    def migrate(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        host, port = request.get("host"), request.get("port")
        if not isinstance(host, str) or not isinstance(port, int):
            raise ValueError(f"migrate needs a host and a port, got {host!r} {port!r}")
        from ..migration import MigrationHandle, MigrationParams
        from ..migration.tls import TlsConfig

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
                progress({"migration": stats.to_dict()})

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
            raise OSError(code, f"migration {stats.status}: {stats.error}; {guest_stays_here(self.machine.status()['state'])}")
        return self._last_stats

    def migrate_status(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        handle = self._migration
        if handle is None:
            incoming = self.incoming
            if incoming is not None and incoming.record is not None:
                return incoming.record.to_dict()  # this VM receives (or received) a migration: the destination's record
            if incoming is not None:
                return {"role": "destination", "status": "setup" if incoming.state == "waiting" else incoming.state}
            raise OSError(errno.ENOENT, "no migration has run on this VM")
        # The record of this migration as it is now (never the last one's, while a new one sets
        # up), with the running round's live figures; once it is over, as migrate() left it.
        if handle.done() and self._last_stats is not None:
            return self._last_stats
        return handle.stats.to_dict()

    def migrate_postcopy(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """``--postcopy manual``: switch the running migration to post-copy after its current round."""
        handle = self._migration
        if handle is None or handle.done():
            raise OSError(errno.ENOENT, "no migration is running")
        handle.start_postcopy()
        return {"postcopy": "asked"}

    def migrate_recover(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        """A post-copy migration whose page link failed: reconnect now, to ``host:port`` if given."""
        host, port = request.get("host"), request.get("port")
        if not isinstance(host, str) or not isinstance(port, int):
            raise ValueError(f"migrate-recover needs a host and a port, got {host!r} {port!r}")
        handle = self._migration
        if handle is None or handle.done():
            raise OSError(errno.ENOENT, "no migration is running")
        handle.recover(host, port)
        return {"recover": format_address(host, port)}

    def migrate_cancel(self, request: dict[str, Any], progress: Progress) -> dict[str, Any]:
        handle = self._migration
        if handle is None or handle.done():
            raise OSError(errno.ENOENT, "no migration is running")
        if handle.stats.status in ("postcopy", "postcopy-paused"):
            raise OSError(errno.EBUSY, "the migration is in post-copy: the guest runs on the destination with part of its "
                                       "memory still here, so it cannot be cancelled; it ends once every page is there")
        handle.cancel()
        stats = handle.wait(60)
        # The guest's state after it: where a cancelled (or failed) migration left it, in words
        # its operator acts on (running, or paused as it was before the migration).
        return {"cancelled": stats.status == "cancelled", "status": stats.status, "state": self.machine.status()["state"]}

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
        from ..migration import MigrationParams, estimate, estimate_warm
        from ..migration.streams import measure_local_throughput_streams

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
                with timed(progress, "estimate", window):  # the dirty-rate window is the long part
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
