"""The library's entry: :class:`Vm`, a guest in this process that boots, pauses, checkpoints,
restores, migrates and closes in the obvious order (docs/api.md has a worked example).

It is the same machine ``vmmrun`` runs, built the same way (:func:`build_machine`: memory first,
then the guest program loaded against its layout, vCPUs started last), and it hands the machine
to snapshot/ and migration/ through the same guest handle and runtime commands vmmrun serves.
Errors are exceptions under :class:`vmmpy.VmmpyError`; a migration that does not complete raises
:class:`~vmmpy.migration.MigrationError` carrying its statistics.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .devices.uart import CaptureConsole, ConsoleBackend
from .errors import VmmpyError
from .guest.programs import load_into
from .memory import KVM_TRACKING
from .migration import Destination, MigrationError, MigrationHandle, MigrationParams, MigrationStats, TlsConfig
from .runtime.commands import basic_metadata, build_machine, restore_machine
from .runtime.config import LPC_DEVICES, ConfigError, VmConfig, parse_slot
from .runtime.guest_handle import MachineHandle
from .runtime.process import EXIT_NAMES, Machine
from .snapshot.checkpoint import RECORD_SECONDS, RESTORE_MODES, RESTORE_PREFETCH, checkpoint_guest
from .snapshot.files import RESTORE_PAGE_CACHE
from .units import MiB, parse_size


def _boot(config: VmConfig) -> Callable[[Machine], None] | None:
    """The loader ``build_machine`` runs once memory is set up: ``config.guest`` assembled for it."""
    if not config.guest:
        raise ConfigError("no guest program: name a shipped one (vmmrun --list-guests) or an assembly file")
    return lambda machine: load_into(machine, config.guest, config.guest_args, memsize=config.memsize)


_names = itertools.count()


def _params(params: MigrationParams | Mapping[str, Any] | None) -> MigrationParams | None:
    """``params`` as MigrationParams; a misspelt or bad one is a ConfigError naming it, as any
    other option the library takes."""
    if not isinstance(params, Mapping):
        return params
    try:
        return MigrationParams(**params)
    except TypeError as err:  # an unknown keyword
        known = ", ".join(f.name for f in dataclasses.fields(MigrationParams))
        raise ConfigError(f"params: {err.args[0].split('__init__() ', 1)[-1]} (known: {known})") from None
    except ValueError as err:
        raise ConfigError(f"params: {err}") from None


class VmStateError(VmmpyError, RuntimeError):
    """A :class:`Vm` asked for something its state does not allow (start twice, wait before
    start, use after close); the message says which state it is in."""


def _config(guest: str | None, args: Mapping[str, Any] | None, *, name: str | None, memory: int | str, cpus: int,
            slots: Sequence[str], lpc: Mapping[str, str | None] | None, vendor: str, tsc: str, wired: bool,
            dirty_tracking: str | None, accel: str = "sim", idle: str = VmConfig.idle) -> tuple[VmConfig, dict[str, ConsoleBackend]]:
    """The VmConfig the keyword options describe, and the in-memory consoles it asks for."""
    lpc = {"com1": None} if lpc is None else dict(lpc)
    consoles: dict[str, ConsoleBackend] = {device: CaptureConsole() for device, backend in lpc.items() if backend is None}
    try:
        memsize = parse_size(memory, default_unit=MiB, what="memory") if isinstance(memory, str) else int(memory)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    config = VmConfig(
        name=name or f"vm-{os.getpid()}-{next(_names)}",
        ncpus=cpus,
        memsize=memsize,
        wired=wired,
        slots=[parse_slot(slot) for slot in slots],
        # An in-memory console has no file: its backend is given to the machine directly.
        lpc={device: backend or "memory" for device, backend in lpc.items()},
        guest=guest,
        guest_args={str(key): str(value) for key, value in (args or {}).items()},
        tsc=tsc,
        idle=idle,
        vendor=vendor,
        # KVM's dirty log is a KVM guest's; the soft bitmap is exact for the simulated vCPU.
        dirty_tracking=dirty_tracking or ("kvm" if accel == "kvm" else "soft"),
        accel=accel,
    )
    for device in config.lpc:
        if device not in LPC_DEVICES:
            raise ConfigError(f"lpc device {device!r}: choose from {', '.join(LPC_DEVICES)}")
    config.validate()
    return config, consoles


class Vm:
    """A guest running in this process, built from the options ``vmmrun`` takes.

    ``Vm("abtest", args={"sweeps": 3}, memory="64M")`` assembles the shipped guest program
    ``abtest`` (or an assembly file's path) for 64 MiB of memory and loads it; nothing runs until
    :meth:`start`. Options: ``args`` the guest's ``--guest-arg`` values, ``memory`` (``-m``: bytes
    or a size such as ``"1G"``), ``cpus`` (``-c``), ``slots`` (``-s`` strings such as
    ``"3,virtio-blk,disk.img"``), ``lpc`` (``-l``: ``{"com1": None}`` by default, where None keeps
    the console's output in memory for :attr:`console`; ``"stdio"`` or a file path as with
    vmmrun), ``vendor``, ``tsc``, ``idle`` (``--idle``: "sleep", the default, or "skip" to run an
    idle guest's timer ticks flat out), ``wired`` (``-S``), ``dirty_tracking`` and ``name`` (unique
    in this process; one is made up when not given).

    Then: :meth:`start`, :meth:`pause`, :meth:`resume`, :meth:`wait` for the exit status (bhyve's:
    0 reset, 1 powered off, 2 halted, 3 triple fault, 4 error), :meth:`checkpoint`,
    :meth:`suspend`, :meth:`migrate`; :meth:`restore` and :meth:`receive` make a Vm from a
    checkpoint or an incoming migration. :meth:`close` (or leaving a ``with`` block) powers the
    guest off if it runs and releases its memory at once. Bad options raise
    :class:`~vmmpy.ConfigError`, bad checkpoints :class:`~vmmpy.CheckpointError` or
    :class:`~vmmpy.SectionError`, failed migrations :class:`~vmmpy.MigrationError`: all
    :class:`~vmmpy.VmmpyError`.
    """

    def __init__(self, guest: str, *, args: Mapping[str, Any] | None = None, memory: int | str = "256M", cpus: int = 1,
                 slots: Sequence[str] = (), lpc: Mapping[str, str | None] | None = None, vendor: str = "intel",
                 tsc: str = "instructions", wired: bool = False, dirty_tracking: str | None = None, name: str | None = None,
                 accel: str = "sim", idle: str = VmConfig.idle) -> None:
        config, consoles = _config(guest, args, name=name, memory=memory, cpus=cpus, slots=slots, lpc=lpc, vendor=vendor,
                                   tsc=tsc, wired=wired, dirty_tracking=dirty_tracking, accel=accel, idle=idle)
        self._adopt(build_machine(config, consoles=consoles, load=_boot(config)), consoles)

    def _adopt(self, machine: Machine, consoles: Mapping[str, ConsoleBackend]) -> None:
        self._machine: Machine | None = machine
        self._consoles = dict(consoles)
        self._started = False
        self._pause_point: int | None = None
        self._incoming: Destination | None = None
        self._receiving: threading.Thread | None = None
        self._migration: MigrationHandle | None = None

    @classmethod
    def _from_machine(cls, machine: Machine, consoles: Mapping[str, ConsoleBackend]) -> Vm:
        vm = cls.__new__(cls)
        vm._adopt(machine, consoles)
        return vm

    # -- what it is
    @property
    def machine(self) -> Machine:
        """The runtime's machine underneath (``vmmpy.runtime.process.Machine``)."""
        if self._machine is None:
            raise VmStateError("this Vm is closed")
        return self._machine

    @property
    def config(self) -> VmConfig:
        """The configuration it was built from (after a restore: with the checkpoint's memory,
        vCPUs, vendor and TSC)."""
        return self.machine.config

    @property
    def name(self) -> str:
        return self.machine.config.name

    @property
    def console(self) -> str:
        """What the guest wrote to com1 so far, when com1's output is kept in memory (the default)."""
        backend = self._consoles.get("com1")
        if not isinstance(backend, CaptureConsole):
            raise ConfigError("com1's output is not kept in memory: build the Vm with lpc={'com1': None} to read vm.console")
        return backend.output.decode("utf-8", "replace")

    @property
    def state(self) -> str:
        """``created`` (built, not started), ``incoming`` (waiting for or receiving a migration),
        ``running``, ``paused``, ``in-doubt`` (held paused until :meth:`resolve_migration`),
        ``stopped`` or ``closed``."""
        if self._machine is None:
            return "closed"
        if self._incoming is not None and self._incoming.state in ("waiting", "migrating"):
            return "incoming"
        if self._migration is not None and self._migration.in_doubt:
            return "in-doubt"
        if self._machine.exit_status is not None:
            return "stopped"
        if not self._started:
            return "created"
        return "paused" if self._machine.paused else "running"

    @property
    def exit_reason(self) -> str:
        """Why the guest stopped (``powered off``, ``migrated to ...``), empty while it runs."""
        return self.machine.exit_reason

    @property
    def address(self) -> tuple[str, int]:
        """Where a :meth:`receive` Vm listens (the port chosen when 0 was given)."""
        if self._incoming is None:
            raise VmStateError("this Vm is not receiving a migration (make it with Vm.receive)")
        return self._incoming.address

    # -- running
    def start(self, *, pause_at: int | None = None) -> None:
        """Start the vCPUs. With ``pause_at`` the guest pauses itself once vCPU 0 has retired
        that many instructions (a point that is the same on every run: see
        :meth:`wait_paused`). A Vm made by :meth:`receive` starts by itself when its migration
        completes."""
        machine = self.machine
        if self._incoming is not None:
            raise VmStateError("a receiving Vm starts when its migration completes: call received() to wait for it")
        if self._started:
            raise VmStateError(f"VM '{self.name}' is already started")
        if machine.exit_status is not None:
            raise VmStateError(f"VM '{self.name}' has stopped ({machine.exit_reason}); it cannot start again")
        self._started = True
        self._pause_point = machine.pause_at = pause_at
        machine.start_vcpus()

    def restore_status(self) -> dict[str, Any] | None:
        """After a lazy restore: its statistics (``snapshot.checkpoint.LazyLoading.status``:
        chunks loaded on demand, prefetched and filled, how long the guest waited on loads, when
        it was fully resident, the working set used); None otherwise."""
        loading = self.machine.lazy_loading
        return None if loading is None else loading.status()

    def wait_paused(self, timeout: float | None = None) -> None:
        """Wait (at most ``timeout`` s) until a guest started with ``pause_at`` has paused itself
        there, and hold it paused as :meth:`pause` does. Raises VmStateError if it stopped first
        and TimeoutError if it has not got there in time."""
        machine = self.machine
        if self._pause_point is None:
            raise VmStateError(f"VM '{self.name}' has no pause point to wait for: start(pause_at=N) sets one")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not machine.paused:
            if machine.exit_status is not None:
                raise VmStateError(f"VM '{self.name}' stopped ({machine.exit_reason}) before its pause point")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"VM '{self.name}' did not reach its pause point within {timeout} s")
            time.sleep(0.001)
        machine.pause()
        self._pause_point = None

    def pause(self) -> None:
        """Stop every vCPU at an instruction boundary (devices too) until :meth:`resume`."""
        self.machine.pause()

    def resume(self) -> None:
        """Let a paused guest run on."""
        self.machine.resume()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the guest to stop: its exit status (0 reset, 1 powered off, 2 halted, 3 triple
        fault, 4 error), or None if it still runs after ``timeout`` seconds. A receiving Vm
        first waits for its migration (exit status 4 if that failed)."""
        machine = self.machine
        receiving = self._receiving
        if receiving is not None:
            started = time.monotonic()
            receiving.join(timeout)
            if receiving.is_alive():
                return None
            if timeout is not None:  # the whole wait is bounded by timeout, not each part of it
                timeout = max(0.0, timeout - (time.monotonic() - started))
        elif not self._started and machine.exit_status is None:
            raise VmStateError(f"VM '{self.name}' was never started: call start() first")
        return machine.wait(timeout)

    # -- save and restore
    def checkpoint(self, path: str | os.PathLike[str], *, key: bytes | None = None, diff: bool = False,
                   live: bool = False) -> dict[str, Any]:
        """Save the guest to ``path`` (and ``path.kern``, ``path.meta``, as vmmctl --checkpoint
        does) and let it run on; returns what was written. With ``key`` (at least 16 bytes) the
        checkpoint is keyed and :meth:`restore` needs the same key. With ``diff`` only the pages
        written since this guest's previous checkpoint (or its restore) are saved, over that one
        as parent (vmmctl --diff). With ``live`` the guest pauses only to freeze its state and
        runs while its memory (as at that pause) is written (vmmctl --live; not with ``diff``).
        Raises CheckpointError."""
        return self._save(path, key=key, suspend=False, diff=diff, live=live)

    def suspend(self, path: str | os.PathLike[str], *, key: bytes | None = None, diff: bool = False) -> dict[str, Any]:
        """Save the guest to ``path`` like :meth:`checkpoint`, then stop it for good (exit status
        0, as bhyve's suspend)."""
        return self._save(path, key=key, suspend=True, diff=diff)

    def _save(self, path: str | os.PathLike[str], *, key: bytes | None, suspend: bool, diff: bool,
              live: bool = False) -> dict[str, Any]:
        machine = self.machine
        if machine.exit_status is not None:
            raise VmStateError(f"VM '{self.name}' has stopped ({machine.exit_reason}): there is nothing to save")
        return checkpoint_guest(MachineHandle(machine), os.path.abspath(path), basic=basic_metadata(machine.config),
                                suspend=suspend, key=key, diff=diff, live=live)

    @classmethod
    def restore(cls, path: str | os.PathLike[str], *, mode: str = "eager", key: bytes | None = None, slots: Sequence[str] = (),
                lpc: Mapping[str, str | None] | None = None, dirty_tracking: str | None = None, name: str | None = None,
                prefetch: str = "working-set", record_working_set: float = RECORD_SECONDS, accel: str | None = None,
                page_cache: str = "auto", idle: str = VmConfig.idle) -> Vm:
        """A Vm from the checkpoint at ``path``, as ``vmmrun -r`` makes one: memory, vCPUs,
        vendor and TSC come from the checkpoint (``idle``, host policy, from the caller); ``slots`` and ``lpc`` must name the devices it
        was saved with. ``mode`` ``eager`` reads and verifies all memory now; ``lazy`` reads each
        chunk when first needed (a bad one stops the guest), and once started a background
        thread loads ahead as ``prefetch`` says ("working-set": the chunks in ``path``.ws, then
        the rest; "fill": every chunk in order; "none": nothing) while the chunks the guest
        touches in its first ``record_working_set`` seconds (0: not recorded) are written to
        ``path``.ws; :meth:`restore_status` has the statistics. ``key``: the
        checkpoint's key, if it was saved with one. ``accel``: the vCPU backend, which must be
        the one the checkpoint was made on (None: that one). ``page_cache``: "auto" (vmmrun's
        default) drops what the restore reads from the page cache when the memory file came from
        the disk, "keep" leaves it cached. Not started: call :meth:`start`.
        Raises CheckpointError or SectionError naming the file, with nothing left open."""
        if mode not in RESTORE_MODES:
            raise ConfigError(f"restore mode {mode!r}: choose {' or '.join(RESTORE_MODES)}")
        if prefetch not in RESTORE_PREFETCH:
            raise ConfigError(f"restore prefetch {prefetch!r}: choose {', '.join(RESTORE_PREFETCH)}")
        if page_cache not in RESTORE_PAGE_CACHE:
            raise ConfigError(f"restore page_cache {page_cache!r}: choose {' or '.join(RESTORE_PAGE_CACHE)}")
        if not record_working_set >= 0:
            raise ConfigError(f"record_working_set {record_working_set}: give 0 (do not record) or more seconds")
        # The backend comes from the checkpoint; a KVM tracking asked for says it is to be KVM's.
        config, consoles = _config(None, None, name=name, memory=VmConfig.memsize, cpus=VmConfig.ncpus, slots=slots, lpc=lpc,
                                   vendor=VmConfig.vendor, tsc=VmConfig.tsc, wired=False, dirty_tracking=dirty_tracking,
                                   accel=accel or ("kvm" if dirty_tracking in KVM_TRACKING else "sim"), idle=idle)
        machine = restore_machine(Path(path), config, mode=mode, key=key, consoles=consoles, prefetch=prefetch,
                                  record_seconds=record_working_set, accel=accel, page_cache=page_cache)
        return cls._from_machine(machine, consoles)

    # -- migration
    def migrate(self, host: str, port: int, *, live: bool = True, key: bytes | None = None,
                params: MigrationParams | Mapping[str, Any] | None = None, tls: TlsConfig | None = None,
                progress: Callable[[MigrationStats], None] | None = None) -> MigrationStats:
        """Migrate the guest to a destination listening on ``host:port`` (a :meth:`receive` Vm
        or ``vmmrun -R``): ``live`` pre-copies while it runs, otherwise it is paused first
        (warm). ``key`` is the shared migration key, ``params`` a MigrationParams (or a dict of
        its fields), ``progress`` is called with the statistics as each round begins (but a live
        migration's final round, the downtime), every 0.5 s within it (``stats.current_round`` has
        its live figures) and after it. Returns the
        statistics of a completed migration; the guest then runs there and this Vm has stopped
        (exit status 0). Raises MigrationError (``err.stats`` says how far it got) when it did
        not complete: the guest runs on here, except when the migration ended in doubt (the
        message says what to do)."""
        machine = self.machine
        if machine.exit_status is not None:
            raise VmStateError(f"VM '{self.name}' has stopped ({machine.exit_reason}): there is nothing to migrate")
        params = _params(params)
        self._migration = MigrationHandle(MachineHandle(machine), host, port, live=live, key=key, params=params,
                                          progress=progress, tls=tls)
        stats = self._migration.wait()
        if stats.status != "completed":
            raise _failed(f"migration of '{self.name}' to {host}:{port}", stats, machine)
        return stats

    def resolve_migration(self, action: str = "ask", *, force: bool = False, timeout: float | None = None) -> MigrationStats:
        """Settle this source's migration that ended in doubt (what ``vmmctl --migrate-resolve``
        does): ``ask`` delivers the decision to the destination again (the guest then runs
        there, or here if it never committed); ``run-here`` (with ``force``, when the
        destination is known not to run it) runs it here. Returns the migration's record;
        raises VmStateError when no migration of this Vm is in doubt."""
        handle = self._migration
        if handle is None or not handle.in_doubt:
            raise VmStateError(f"no migration of VM '{self.name}' is in doubt")
        return handle.resolve(action, force=force, timeout=timeout)

    @classmethod
    def receive(cls, host: str = "127.0.0.1", port: int = 0, *, memory: int | str = "256M", cpus: int = 1,
                slots: Sequence[str] = (), lpc: Mapping[str, str | None] | None = None, vendor: str = "intel",
                tsc: str = "instructions", wired: bool = False, dirty_tracking: str | None = None, key: bytes | None = None,
                tls: TlsConfig | None = None, params: MigrationParams | Mapping[str, Any] | None = None,
                accept_timeout: float = 300.0, name: str | None = None, accel: str = "sim", idle: str = VmConfig.idle,
                populate: bool = True) -> Vm:
        """A Vm waiting on ``host:port`` (0: any free port, see :attr:`address`) for one incoming
        migration, as ``vmmrun -R``: give the source's memory, vCPUs, devices, vendor and TSC.
        It listens when this returns and receives in the background; the guest runs as soon as
        the migration completes. :meth:`received` waits for that (raising MigrationError if it
        failed); :meth:`wait` waits for the guest to stop. ``populate=False`` leaves its memory
        untouched while it waits (``vmmrun -R --no-populate``)."""
        config, consoles = _config(None, None, name=name, memory=memory, cpus=cpus, slots=slots, lpc=lpc, vendor=vendor,
                                   tsc=tsc, wired=wired, dirty_tracking=dirty_tracking, accel=accel, idle=idle)
        params = _params(params)
        machine = build_machine(config, consoles=consoles)
        vm = cls._from_machine(machine, consoles)
        try:
            vm._incoming = Destination(MachineHandle.receiving(machine), host, port, key=key, tls=tls, params=params,
                                       cancel=threading.Event(), populate=populate)
        except BaseException:
            machine.close()
            raise
        incoming = vm._incoming
        vm._receiving = threading.Thread(target=incoming.run, args=(accept_timeout,), name=f"receive-{config.name}", daemon=True)
        vm._receiving.start()
        return vm

    def received(self, timeout: float | None = None) -> MigrationStats:
        """For a :meth:`receive` Vm: wait (at most ``timeout`` s) until the migration has come
        in and the guest runs here; its statistics. Raises MigrationError if it failed (the
        half-received guest is discarded) and TimeoutError if it is still under way."""
        incoming, receiving = self._incoming, self._receiving
        if incoming is None or receiving is None:
            raise VmStateError("this Vm is not receiving a migration (make it with Vm.receive)")
        receiving.join(timeout)
        if receiving.is_alive():
            raise TimeoutError(f"the migration into '{self.name}' is still under way after {timeout} s")
        stats = incoming.stats
        if stats is None or stats.status != "completed":
            raise _failed(f"incoming migration into '{self.name}'", stats, self.machine)
        self._started = True
        return stats

    # -- the end
    def close(self) -> None:
        """Power the guest off if it runs (or stop waiting for a migration), stop its threads
        and release its memory now. Closing twice is harmless. A guest held in doubt is ended
        too, as SIGKILL ends vmmrun's: settle it first (:meth:`resolve_migration`), or the
        destination's copy is the only one left (its operator can run it with ``run-here``)."""
        machine = self._machine
        if machine is None:
            return
        incoming, receiving = self._incoming, self._receiving
        if incoming is not None and receiving is not None and receiving.is_alive():
            incoming.cancel.set()  # wakes an accept or a transfer at once; the guest is discarded
            receiving.join(30)
        if incoming is not None:
            incoming.close()  # the listener a completed migration keeps for the source's RESOLVE
        if machine.exit_status is None:
            machine.destroy()  # powers off, waits for the vCPUs, closes
        else:
            machine.wait(10)
            machine.close()
        machine.release_memory()
        self._machine = None
        self._incoming = self._receiving = self._migration = None

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._machine is None:
            return "<Vm closed>"
        return f"<Vm {self.name!r} {self.state}>"


def _failed(what: str, stats: MigrationStats | None, machine: Machine) -> MigrationError:
    """The MigrationError a migration that did not complete raises, with its statistics."""
    if stats is None:
        err = MigrationError(f"{what}: no statistics (it did not run)")
    elif stats.status == "in-doubt":
        err = MigrationError(f"{what} is in doubt: {stats.error}. The guest is held paused here until the migration is "
                             "settled: Vm.resolve_migration() asks the destination again (docs/migration.md, \"When a "
                             "migration is in doubt\")")
    else:
        why = stats.error or stats.status
        if machine.exit_status is not None and stats.role == "source":
            why += f"; the guest stopped ({machine.exit_reason or EXIT_NAMES.get(machine.exit_status)}) meanwhile"
        err = MigrationError(f"{what} {stats.status}: {why}")
    err.stats = stats
    return err
