"""vmmpy: a bhyve-like simulated VMM with save/restore and warm/live migration.

The memory core and the simulated vCPU are Rust (``vmmpy._core``); everything else is Python.
"""

__version__ = "0.1.0"
