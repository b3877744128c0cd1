"""Checkpoint files: write, read and verify bhyve's three files, restore memory eagerly or lazily.

``files`` owns the files and their verification; it knows nothing of VMs (it takes guest memory,
state sections and basic metadata, and gives the same back). Save/restore orchestration, which
pauses vCPUs and asks devices for their sections, sits on top of it.
"""

from .files import (
    DEFAULT_CHUNK_SIZE,
    FORMAT_MAGIC,
    FORMAT_VERSION,
    KERN_STRUCTS,
    Checkpoint,
    CheckpointError,
    read_checkpoint,
    restore_memory,
    verify_memory,
    write_checkpoint,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_MAGIC",
    "FORMAT_VERSION",
    "KERN_STRUCTS",
    "Checkpoint",
    "CheckpointError",
    "read_checkpoint",
    "restore_memory",
    "verify_memory",
    "write_checkpoint",
]
