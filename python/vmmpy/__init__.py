"""vmmpy: a bhyve-like simulated VMM with save/restore and warm/live migration.

The memory core and the simulated vCPU are Rust (``vmmpy._core``); the vmm surface, devices,
control tools and the migration protocol are Python on top.
"""

from .memory import PAGE_SIZE, GuestMemory, GuestMemoryError, LazyMemoryError, PageBatchError
from .units import format_size, parse_size

__version__ = "0.1.0"

__all__ = ["PAGE_SIZE", "GuestMemory", "GuestMemoryError", "LazyMemoryError", "PageBatchError", "__version__", "format_size", "parse_size"]
