"""The guest handle for a real machine (``runtime.process.Machine``): what checkpoints and the
migration engine drive, implementing ``state.handle.GuestHandle``.

Pausing: ``pause``/``resume`` are the machine's vCPU rendezvous; a machine paused before
(``vmmctl --pause``, or by its own ``--pause-at``) stays paused, with its devices quiesced. ``stop_for_good`` ends the vmmrun process with status 0, as
bhyve exits after a suspend or a migration.

Restoring: a machine being restored was built from the same options, with empty memory (a
migration) or none yet (a checkpoint: ``adopt_memory``). ``restore_sections`` loads the state.
For a migration (``hold_vcpus``) ``prepare_to_run`` starts the vCPU threads held paused once
the destination has acknowledged the commit, while COMMITTED is on its way, so
``start_running`` only has to release them (the start, 0.3 ms here, was inside the downtime
when the state restore did it; starting them as the migration begins was tried,
docs/performance.md); ``discard`` ends vmmrun with an error status and the half-received guest
is thrown away.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..memory import GuestMemory
from ..state import Section, decode_sections, encode_sections
from ..state.handle import spec_mismatches
from ..state.kernel import MachineSectionLoader, check_sections, iter_sections, prepare_declarations, section_registry
from .process import EXIT_ERROR, Machine

#: How many times :meth:`MachineHandle.receiving` runs the restore's code ahead: CPython
#: specializes a function's code after about eight calls, and a restore calls its top-level
#: functions once each.
REHEARSALS = 10

#: How long ``prepare_to_run`` waits for the vCPU threads it started to park (a few hundred µs
#: here); they are held either way, so a slower start only moves that wait into the downtime.
PARK_WAIT_S = 1.0


class _Loader(MachineSectionLoader):
    """The machine's loader; once loaded, a guest held for ``start_running`` parks its vCPUs."""

    def __init__(self, handle: MachineHandle, *, what: str) -> None:
        super().__init__(handle.machine, what=what)
        self.handle = handle

    def restore(self) -> None:
        super().restore()
        if self.handle.hold_vcpus:
            # vCPU threads started from here on stop at the pause rendezvous.
            self.machine.pause()


class MachineHandle:
    def __init__(self, machine: Machine, *, hold_vcpus: bool = True) -> None:
        self.machine = machine
        self.hold_vcpus = hold_vcpus  # False: a checkpoint restore, whose vCPUs vmmrun starts itself
        self._paused_by_us = False
        self._held = False  # vCPU threads started, waiting for start_running
        # Saving or restoring state first resolves every declaration's field types (tens of ms
        # once, then 0.2 ms): do it now, so no pause (a live checkpoint's few ms, a migration's
        # downtime) pays for it.
        prepare_declarations()

    @classmethod
    def receiving(cls, machine: Machine) -> MachineHandle:
        """The handle of a machine built to receive a migration, whose state restore (the
        destination's part of the downtime) has had its reading half rehearsed on the machine's
        own state, changing nothing: saved and encoded (to have sections to read), decoded and
        checked, :data:`REHEARSALS` times. Applying them (the kernel's and the devices' restore)
        is not rehearsed: that would change the machine. A first restore in a process runs cold
        code: traced in live-idle (30 migrations a side, alternated), the STATE message's decode
        and restore took 0.96 ms (median) unrehearsed, 0.79 ms rehearsed. It costs about 7 ms
        once, before the destination listens. A rehearsal that fails leaves the code cold,
        nothing else."""
        handle = cls(machine)
        try:
            for _ in range(REHEARSALS):
                handle.check_sections(decode_sections(encode_sections(handle.save_sections())), what="rehearsal")
        except Exception:  # only a warm-up: the real restore reports what is wrong
            pass
        return handle

    @property
    def memory(self) -> GuestMemory:
        return self.machine.vm.memory

    def spec(self) -> dict[str, Any]:
        memory = self.memory
        config = self.machine.config
        return {
            "page_size": 4096,
            "vendor": config.vendor,
            "vcpus": config.ncpus,
            "tsc": config.tsc,
            "lowmem_size": memory.lowmem.size,
            "highmem_size": memory.highmem.size if memory.highmem is not None else 0,
            "wired": config.wired,
            "devices": dict(section_registry(self.machine).versions),
        }

    def check_spec(self, remote_spec: dict[str, Any]) -> None:
        local = self.spec()
        problems = spec_mismatches(local, remote_spec)
        if problems:
            raise ValueError("; ".join(problems))

    def pause(self) -> float:
        if self.machine.paused:
            # Paused before (vmmctl --pause, or the guest stopped itself at --pause-at): it stays
            # paused, but a guest stopped at its pause point still has to park its vCPUs and
            # quiesce its devices (virtio-net takes in the frames its peer already answered).
            self.machine.pause()
            return 0.0
        seconds = self.machine.pause()
        self._paused_by_us = True
        return seconds

    def resume(self) -> None:
        self.machine.set_throttle(0.0)
        if self._paused_by_us:
            self._paused_by_us = False
            self.machine.resume()

    def save_sections(self) -> Iterator[Section]:
        return iter_sections(self.machine)

    def check_sections(self, sections: list[Section], *, what: str) -> None:
        check_sections(self.machine, sections, what=what)

    def adopt_memory(self, memory: GuestMemory) -> None:
        # A local migration's destination was built with empty memory (no vCPU ran on it): the
        # handed-over memory takes its place.
        self.machine.vm.adopt_memory(memory, replace=True)

    def restore_sections(self, sections: list[Section], *, what: str) -> None:
        loader = self.section_loader(what=what)
        loader.add(sections)
        loader.restore()

    def section_loader(self, *, what: str) -> _Loader:
        return _Loader(self, what=what)

    def prepare_to_run(self) -> None:
        if not self.hold_vcpus or self._held or self.machine.exit_status is not None:
            return
        # Start the vCPU threads now, held at the pause rendezvous: the commit then only wakes
        # them (starting threads took up to tens of ms on a busy machine, after the commit).
        try:
            # The restore left the machine paused and vmmctl may not resume it meanwhile; pausing
            # again (no thread yet: at once) makes sure the threads start held whatever happened.
            self.machine.pause()
            self.machine.start_vcpus()
        except Exception:  # no thread or pipe to be had now: start_running tries again, and says why
            return
        self._held = True
        # Until they are parked, a starting thread holds the GIL the destination needs to read
        # COMMITTED: let them get there first (COMMITTED waits in the socket meanwhile).
        self.machine.wait_parked(PARK_WAIT_S)

    def throttle(self, fraction: float) -> None:
        self.machine.set_throttle(min(fraction, 0.99))

    def stop_for_good(self, reason: str) -> None:
        self.machine.finish(0, reason)

    def start_running(self) -> None:
        if self.machine.exit_status is not None:
            # Powered off or failed while the migration ran: there is no guest left to start here.
            raise RuntimeError(f"the guest stopped here ({self.machine.exit_reason}) before it could run")
        if not self.hold_vcpus:
            self.machine.start_vcpus()
            return
        if not self._held:  # prepare_to_run was not called, or could not start them all
            self.machine.start_vcpus()  # they stop at the pause the restore left, until resumed below
        self._held = False
        self.machine.resume()

    def discard(self) -> None:
        self.machine.finish(EXIT_ERROR, "incoming migration failed")
