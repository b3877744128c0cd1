"""vmmpy: a bhyve-like simulated VMM with save/restore and warm/live migration.

The memory core and the simulated vCPU are Rust (``vmmpy._core``); the vmm surface, devices,
control tools and the migration protocol are Python on top.

The library's entry is :class:`vmmpy.Vm` (``vmmpy.vm``, docs/api.md): a guest built from
vmmrun's options that starts, pauses, checkpoints, restores, migrates and closes. Every error
vmmpy raises on purpose is a :class:`vmmpy.VmmpyError`. Everything else offered here, guest
memory included, is imported on first use: ``import vmmpy`` loads neither numpy nor the Rust
core, so the tools (``vmmpy.cli``) can set numpy's environment before anything loads it.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_names
from .errors import VmmpyError
from .units import format_size, parse_size

if TYPE_CHECKING:  # what type checkers see; at run time these come from _LAZY on first use
    from .memory import PAGE_SIZE, GuestMemory, GuestMemoryError, LazyMemoryError, PageBatchError

__version__ = "0.1.0"

#: Names offered here: (module, name), imported on first use.
_LAZY = {
    "PAGE_SIZE": (".memory", "PAGE_SIZE"),
    "GuestMemory": (".memory", "GuestMemory"),
    "GuestMemoryError": (".memory", "GuestMemoryError"),
    "LazyMemoryError": (".memory", "LazyMemoryError"),
    "PageBatchError": (".memory", "PageBatchError"),
    "Vm": (".vm", "Vm"),
    "VmStateError": (".vm", "VmStateError"),
    "VmConfig": (".runtime.config", "VmConfig"),
    "ConfigError": (".runtime.config", "ConfigError"),
    "ControlError": (".runtime.control", "ControlError"),
    "CheckpointError": (".snapshot.errors", "CheckpointError"),
    "SectionError": (".state.section", "SectionError"),
    "MigrationError": (".migration.errors", "MigrationError"),
    "MigrationParams": (".migration.convergence", "MigrationParams"),
    "MigrationStats": (".migration.stats", "MigrationStats"),
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())

__all__ = [
    "PAGE_SIZE",
    "CheckpointError",
    "ConfigError",
    "ControlError",
    "GuestMemory",
    "GuestMemoryError",
    "LazyMemoryError",
    "MigrationError",
    "MigrationParams",
    "MigrationStats",
    "PageBatchError",
    "SectionError",
    "Vm",
    "VmConfig",
    "VmStateError",
    "VmmpyError",
    "__version__",
    "format_size",
    "parse_size",
]
