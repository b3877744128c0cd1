"""Save/restore orchestration: a running machine to bhyve's three files, and back.

Checkpoint (bhyve's ``vm_checkpoint``): pause the vCPUs (rendezvous) and quiesce devices, take
every state section, write the files atomically, then resume the guest — or, for a suspend,
stop it for good (vmmrun then exits 0, as bhyve does). A failure leaves the guest running as it
was and no files behind.

Restore (bhyve's ``-r``): read and verify all three files before anything is created; take the
vCPU count, memory size and wiring from the checkpoint and vendor and TSC from its ``vm``
section; refuse device options that do not match the saved ones, naming the device; restore
memory eagerly (verified against the chunk hashes before anything runs) or lazily (each chunk
verified against its hash when first needed; a bad one stops the guest); load the sections; only
then may the vCPUs start.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..runtime.config import VmConfig
from ..runtime.machine import Machine
from ..state import SectionError, SectionRegistry
from ..state.machine import KERNEL_SECTIONS, check_sections, restore_sections, save_sections
from .files import CheckpointError, read_checkpoint, restore_memory, write_checkpoint

RESTORE_MODES = ("eager", "lazy")


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
) -> dict[str, Any]:
    """Save ``machine`` to ``path`` (+ ``.kern``, ``.meta``); keep it running unless ``suspend``."""
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
        stats = write_checkpoint(path, machine.vm.memory, sections, basic)
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
    from ..devices.registry import device_sections

    registry = SectionRegistry({name: version for name, _, version in KERNEL_SECTIONS})
    try:
        sections = device_sections([slot.pci_name for slot in config.slots])
    except ValueError as err:
        raise SectionError(str(err)) from None
    for name, version in sections.items():
        registry.register(name, version)
    return registry


def restore_machine(
    path: str | Path,
    config: VmConfig,
    *,
    mode: str = "eager",
) -> Machine:
    """Build a machine from checkpoint ``path``: ``config`` gives the name and device options;
    the vCPU count, memory, vendor and TSC come from the checkpoint. Raises CheckpointError or
    SectionError, with nothing left created, if anything does not fit."""
    if mode not in RESTORE_MODES:
        raise ValueError(f"restore mode {mode!r}: choose {' or '.join(RESTORE_MODES)}")
    checkpoint = read_checkpoint(path, static_registry(config))
    basic = checkpoint.basic
    vm_section = next(s for s in checkpoint.sections if s.name == "vm")
    saved_devices = basic.get("devices_config")
    if saved_devices is not None and saved_devices != _device_config(config):
        raise SectionError(_device_mismatch(checkpoint.path, saved_devices, _device_config(config)))
    config = replace(
        config,
        ncpus=int(basic["ncpus"]),
        memsize=checkpoint.memsize,
        wired=checkpoint.wired,
        vendor=str(vm_section.payload.get("vendor", config.vendor)),
        tsc=str(vm_section.payload.get("tsc_mode", config.tsc)),
    )
    machine = Machine(config)
    try:
        check_sections(machine, checkpoint.sections, what=f"checkpoint '{checkpoint.kern_path}'")
        memory = restore_memory(checkpoint, mode, dirty_tracking=config.dirty_tracking)
        machine.vm.adopt_memory(memory)
        restore_sections(machine, checkpoint.sections, what=f"checkpoint '{checkpoint.kern_path}'")
    except BaseException:
        machine.close()
        raise
    return machine


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
