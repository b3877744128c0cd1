"""Checkpoint files: write, read and verify bhyve's three files, restore memory eagerly or lazily.

``files`` owns the files and their verification; it knows nothing of VMs (it takes guest memory,
state sections and basic metadata, and gives the same back). ``meta`` owns the metadata
document (fields, checksum, MAC), ``schema`` the typed field checks it is written in,
``digests`` the SHA-256 digests a keyed checkpoint adds. ``checkpoint`` orchestrates save and
restore on top of them, seeing the guest only through the guest handle (``state.handle``).
"""

from .errors import CheckpointError
from .files import (
    DEFAULT_CHUNK_SIZE,
    KERN_STRUCTS,
    Checkpoint,
    read_checkpoint,
    restore_memory,
    verify_memory,
    verify_memory_sha256,
    write_checkpoint,
)
from .meta import FORMAT_MAGIC, FORMAT_VERSION, KEYED_FORMAT_VERSION, MIN_KEY_BYTES

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_MAGIC",
    "FORMAT_VERSION",
    "KERN_STRUCTS",
    "KEYED_FORMAT_VERSION",
    "MIN_KEY_BYTES",
    "Checkpoint",
    "CheckpointError",
    "read_checkpoint",
    "restore_memory",
    "verify_memory",
    "verify_memory_sha256",
    "write_checkpoint",
]
