"""The one interface every userspace device implements, and the I/O-port dispatch table.

A device claims port ranges and/or MMIO ranges and emulates accesses to them; it can be paused
(in-flight work finished or held, backends flushed), resumed, and saved and restored as a state
section (name, version, JSON-friendly dict). A device that cannot save raises
:class:`DeviceSaveError` naming itself, so a checkpoint fails rather than skipping it.
"""

from __future__ import annotations

import errno
from typing import Any, ClassVar


class DeviceSaveError(OSError):
    """A device cannot be saved or restored; the message names the device."""


class Device:
    """Base class: subclasses set SECTION/VERSION and override what they emulate."""

    SECTION: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1

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

    def save(self) -> dict[str, Any]:
        raise DeviceSaveError(errno.ENOTSUP, f"device '{self.name}' cannot save its state")

    def restore(self, state: dict[str, Any]) -> None:
        raise DeviceSaveError(errno.ENOTSUP, f"device '{self.name}' cannot restore state")

    def close(self) -> None:
        """Release backends (files, sockets)."""


def require_fields(section: str, state: dict[str, Any], fields: dict[str, type]) -> None:
    """Refuse a state dict that lacks a field or has one of the wrong type, naming both."""
    if not isinstance(state, dict):
        raise ValueError(f"{section}: state must be a mapping, got {type(state).__name__}")
    for field, kind in fields.items():
        if field not in state:
            raise ValueError(f"{section}: state lacks field '{field}'")
        if not isinstance(state[field], kind) or (kind is int and isinstance(state[field], bool)):
            raise ValueError(f"{section}: field '{field}' must be {kind.__name__}, got {state[field]!r}")


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
