"""The one interface every userspace device implements, and the I/O-port dispatch table.

A device claims port ranges and/or MMIO ranges and emulates accesses to them; it can be paused
(in-flight work finished or held, backends flushed), resumed, and saved and restored as a state
section. Its state is declared once, as a dataclass in ``state/persist.py``'s pattern (fields and
their types, ``VERSION``, ``MIN_VERSION``, defaults for fields added later), named by the device's
``STATE``: ``save()`` returns one, ``restore()`` gets one already checked against the
declaration and read at the section's version. A device that cannot save raises
:class:`DeviceSaveError` naming itself, so a checkpoint fails rather than skipping it.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar


class DeviceSaveError(OSError):
    """A device cannot be saved or restored; the message names the device."""


class Device:
    """Base class: subclasses set SECTION and STATE and override what they emulate."""

    SECTION: ClassVar[str] = ""
    #: The declaration of this device's saved state (its VERSION is the section's).
    STATE: ClassVar[type]

    #: (first port, count) pairs this device answers.
    port_ranges: list[tuple[int, int]] = []
    #: (gpa, length) pairs this device answers.
    mmio_ranges: list[tuple[int, int]] = []

    @property
    def name(self) -> str:
        return self.SECTION

    def io_read(self, port: int, size: int) -> int:
        raise NotImplementedError(f"{self.name} does not emulate port reads")

    def io_write(self, port: int, size: int, value: int) -> None:
        raise NotImplementedError(f"{self.name} does not emulate port writes")

    def mmio_read(self, gpa: int, size: int) -> int:
        raise NotImplementedError(f"{self.name} does not emulate MMIO reads")

    def mmio_write(self, gpa: int, size: int, value: int) -> None:
        raise NotImplementedError(f"{self.name} does not emulate MMIO writes")

    def pause(self) -> None:
        """Quiesce: finish or hold in-flight work and flush backends. Default: nothing in flight."""

    def resume(self) -> None:
        """Undo :meth:`pause`."""

    def save(self) -> Any:
        raise DeviceSaveError(errno.ENOTSUP, f"device '{self.name}' cannot save its state")

    def restore(self, state: Any) -> None:
        raise DeviceSaveError(errno.ENOTSUP, f"device '{self.name}' cannot restore state")

    def close(self) -> None:
        """Release backends (files, sockets)."""


class PortBus:
    """Maps I/O ports to devices; refuses overlapping claims at registration."""

    def __init__(self) -> None:
        self._ports: dict[int, Any] = {}

    def register(self, device: Any, ranges: list[tuple[int, int]] | None = None) -> None:
        for first, count in ranges if ranges is not None else device.port_ranges:
            for port in range(first, first + count):
                other = self._ports.get(port)
                if other is not None:
                    raise ValueError(f"I/O port {port:#x} of {device.name} is already claimed by {other.name}")
            for port in range(first, first + count):
                self._ports[port] = device

    def lookup(self, port: int) -> Any | None:
        return self._ports.get(port)
