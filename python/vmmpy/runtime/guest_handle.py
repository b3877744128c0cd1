"""The guest handle for a real machine (``runtime.process.Machine``): what the migration engine drives.

Source: ``pause``/``resume`` are the machine's vCPU rendezvous; ``stop_for_good`` ends the
vmmrun process with status 0, as bhyve exits after a migration. Destination: the machine was
built from the same options with empty memory; ``restore_sections`` loads the state and starts
the vCPU threads held paused, so ``start_running`` only has to release them (thread start-up
stays out of the downtime); ``discard`` ends vmmrun with an error status and the half-received
guest is thrown away.
"""

from __future__ import annotations

from typing import Any

from ..migration.adapter import spec_mismatches
from ..state import Section
from ..state.kernel import prepare_declarations, restore_sections, save_sections, section_registry
from .process import EXIT_ERROR, Machine


class MachineAdapter:
    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.memory = machine.vm.memory
        self._paused_by_us = False
        self._held = False  # destination: vCPU threads started, waiting for start_running

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
        prepare_declarations()  # now, not when the state arrives inside the downtime

    def pause(self) -> None:
        if not self.machine.paused:
            self.machine.pause()
            self._paused_by_us = True

    def resume(self) -> None:
        self.machine.set_throttle(0.0)
        if self._paused_by_us:
            self._paused_by_us = False
            self.machine.resume()

    def save_sections(self) -> list[Section]:
        return save_sections(self.machine)

    def restore_sections(self, sections: list[Section]) -> None:
        restore_sections(self.machine, sections, what="migration stream")
        # Start the vCPU threads now, held at the pause rendezvous: the commit then only wakes
        # them (starting threads took up to tens of ms on a busy machine, inside the downtime).
        self.machine.pause()
        self.machine.start_vcpus()
        self._held = True

    def throttle(self, fraction: float) -> None:
        self.machine.set_throttle(min(fraction, 0.99))

    def stop_for_good(self) -> None:
        self.machine.finish(0, "migrated away")

    def start_running(self) -> None:
        if self.machine.exit_status is not None:
            # Powered off or failed while the migration ran: there is no guest left to start here.
            raise RuntimeError(f"the guest stopped here ({self.machine.exit_reason}) before it could run")
        if self._held:
            self._held = False
            self.machine.resume()
        else:
            self.machine.start_vcpus()

    def discard(self) -> None:
        self.machine.finish(EXIT_ERROR, "incoming migration failed")
