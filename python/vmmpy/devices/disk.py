"""Disk images behind the block devices (virtio-blk, virtio-scsi, nvme, ahci-hd).

Owns opening an image file for a device and sizing it in blocks, with the errors a user sees
at start. The devices own the I/O (``os.pread``/``os.pwrite`` on the descriptor) and flushing.
"""

from __future__ import annotations

import os

from .pci import PciConfigError


def open_image(device: str, path: str, *, read_only: bool = False, block: int = 512) -> tuple[int, int]:
    """Open ``path`` for ``device`` and return (fd, capacity in ``block``-byte blocks, rounded
    down). A file that cannot be opened, or holds less than one block, is refused by name."""
    try:
        fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
    except OSError as err:
        raise PciConfigError(f"{device}: cannot open image file {path!r}: {err.strerror}") from None
    size = os.fstat(fd).st_size
    if size < block:
        os.close(fd)
        raise PciConfigError(f"{device}: image file {path!r} is {size} bytes, smaller than one {block}-byte sector")
    return fd, size // block
