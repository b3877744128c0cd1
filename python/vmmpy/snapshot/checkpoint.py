"""Save/restore orchestration: a running machine to bhyve's three files, and back.

Checkpoint (bhyve's ``vm_checkpoint``): pause the vCPUs (rendezvous) and quiesce devices, take
every state section, write the files atomically, then resume the guest — or, for a suspend,
stop it for good (vmmrun then exits 0, as bhyve does). A failure leaves the guest running as it
was and no files behind.

Restore (bhyve's ``-r``): read and verify all three files before anything is created (with the
checkpoint key when it was written with one); check the basic metadata this module wrote
(vendor, TSC, device options) and the ``vm`` section's fields it reads, by field; take the vCPU
count, memory size and wiring from the checkpoint and vendor and TSC from its ``vm`` section;
refuse device options that do not match the saved ones, naming the device; restore memory
eagerly (verified against the chunk hashes before anything runs) or lazily (each chunk verified
against its hash when first needed; a bad one stops the guest); load the sections; only then are the console files opened and may the vCPUs start, so a checkpoint
refused at any step leaves no file written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..devices.lpc import console_backend
from ..devices.uart import CaptureConsole
from ..runtime.config import LPC_DEVICES, MAX_VCPUS, TSC_MODES, VENDORS, VmConfig
from ..runtime.process import Machine
from ..state import SectionError, SectionRegistry
from ..state.kernel import check_sections, kernel_registry, restore_sections, save_sections
from ..state.persist import min_version_of
from .errors import CheckpointError
from .files import Checkpoint, read_checkpoint, restore_memory, write_checkpoint
from .meta import check_field
from .schema import array, integer, record, string

RESTORE_MODES = ("eager", "lazy")

#: The basic metadata keys this module writes beside bhyve's (files checks those): older
#: checkpoints may lack the optional ones.
_BASIC_FIELDS = record(
    {"ncpus": integer(1, MAX_VCPUS)},
    {
        "vendor": string(choices=VENDORS),
        "tsc": string(choices=TSC_MODES),
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


def checkpoint_machine(
    machine: Machine,
    path: str | Path,
    *,
    suspend: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    key: bytes | None = None,
) -> dict[str, Any]:
    """Save ``machine`` to ``path`` (+ ``.kern``, ``.meta``); keep it running unless ``suspend``.
    With ``key`` the checkpoint is keyed (HMAC-SHA256): only a restore with the same key takes it."""
    path = str(path)
    started = time.perf_counter()
    was_paused = machine.paused
    pause_seconds = 0.0 if was_paused else machine.pause()
    if progress:
        progress({"phase": "paused", "seconds": round(pause_seconds, 6)})
    try:
        sections = save_sections(machine)
        config = machine.config
        basic = {
            "ncpus": config.ncpus,
            "vmname": config.name,
            "vendor": config.vendor,
            "tsc": config.tsc,
            "devices_config": _device_config(config),
        }
        stats = write_checkpoint(path, machine.vm.memory, sections, basic, key=key)
    except Exception:
        if not was_paused:
            machine.resume()
        raise
    downtime = time.perf_counter() - started
    if suspend:
        machine.finish(0, f"suspended to {path}")
    elif not was_paused:
        machine.resume()
    seconds = stats["total_seconds"]
    result = {
        "path": path,
        "suspended": suspend,
        "keyed": key is not None,
        "memory_bytes": machine.vm.memory.memsize,
        "bytes_written": stats["bytes_written"],
        "kern_bytes": stats["kern_bytes"],
        "data_pages": stats["data_pages"],
        "zero_pages": stats["zero_pages"],
        "untouched_pages": stats["untouched_pages"],
        "write_seconds": round(seconds, 6),
        "throughput_bytes_per_s": round(stats["bytes_written"] / seconds) if seconds > 0 else 0,
        "guest_paused_seconds": round(downtime, 6),
    }
    if progress:
        progress({"phase": "written", **result})
    return result


def static_registry(config: VmConfig) -> SectionRegistry:
    """What a machine built from ``config`` reads, known before the machine exists: the kernel
    sections and, from the device classes themselves, every device section its options make."""
    from ..devices.registry import device_states

    registry = kernel_registry()
    try:
        states = device_states([slot.pci_name for slot in config.slots])
    except ValueError as err:
        raise SectionError(str(err)) from None
    for name, state in states.items():
        registry.register(name, state.VERSION, min_version_of(state))
    return registry


def restore_machine(
    path: str | Path,
    config: VmConfig,
    *,
    mode: str = "eager",
    key: bytes | None = None,
) -> Machine:
    """Build a machine from checkpoint ``path``: ``config`` gives the name and device options;
    the vCPU count, memory, vendor and TSC come from the checkpoint. ``key`` is the checkpoint
    key: required for a keyed checkpoint, refused for an unkeyed one. Raises CheckpointError or
    SectionError, with nothing left created and no console file opened, if anything does not fit."""
    if mode not in RESTORE_MODES:
        raise ValueError(f"restore mode {mode!r}: choose {' or '.join(RESTORE_MODES)}")
    checkpoint = read_checkpoint(path, static_registry(config), key=key)
    basic, vm_payload = _checked_machine_fields(checkpoint)
    saved_devices = basic.get("devices_config")
    if saved_devices is not None and saved_devices != _device_config(config):
        raise SectionError(_device_mismatch(checkpoint.path, saved_devices, _device_config(config)))
    config = replace(
        config,
        ncpus=basic["ncpus"],
        memsize=checkpoint.memsize,
        wired=checkpoint.wired,
        vendor=vm_payload["vendor"],
        tsc=vm_payload["tsc_mode"],
    )
    # Consoles stay in memory until everything is restored: a refused checkpoint opens no file.
    machine = Machine(config, consoles={device: CaptureConsole() for device in config.lpc})
    try:
        check_sections(machine, checkpoint.sections, what=f"checkpoint '{checkpoint.kern_path}'")
        memory = restore_memory(checkpoint, mode, dirty_tracking=config.dirty_tracking)
        machine.vm.adopt_memory(memory)
        restore_sections(machine, checkpoint.sections, what=f"checkpoint '{checkpoint.kern_path}'")
        for uart in machine.uarts:
            device = uart.name.split(".", 1)[1]  # "lpc.com1"
            if device in config.lpc:
                uart.backend = console_backend(config.lpc[device], on_input=uart.receive)
    except BaseException:
        machine.close()
        raise
    return machine


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


__all__ = ["RESTORE_MODES", "CheckpointError", "checkpoint_machine", "restore_machine", "static_registry"]
