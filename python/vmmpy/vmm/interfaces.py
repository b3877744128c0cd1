"""The small protocols between the kernel-emulated devices and whoever wires them.

Owns: the protocols (guest clock, vCPU, interrupt lines, local-APIC targets, exit-emulated
devices, timer devices), the two errors devices raise (bad guest access, bad saved state),
the ``DeviceState`` base every device's state dataclass derives from, and ``IsaIrqRouter``,
the fan-out of an ISA IRQ to the 8259 and the I/O APIC as a PC wires it.

Does not own any device behaviour, the run loop, or how state sections are framed on disk or
on the wire (``state/`` does that from ``to_dict()``).

Run-loop contract (what ``vm.Vm``'s VM_RUN does):
  1. run the vCPU until min(next_event_ns() over timer devices) or an exit;
  2. on a port/MMIO exit call the owning device's io_*/mmio_* method;
  3. call ``advance(clock.now_ns())`` on every timer device (each fires what is due, in time
     order, exactly once; register accesses also catch their device up first);
  4. call ``Vlapic.deliver()`` whenever the vCPU can take an interrupt.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable


@runtime_checkable
class GuestClock(Protocol):
    """Guest time: nanoseconds, monotonic, deterministic when driven by retired instructions."""

    def now_ns(self) -> int: ...


@runtime_checkable
class Vcpu(Protocol):
    """The vCPU side of interrupt delivery (the Rust vCPU has this method)."""

    def inject_interrupt(self, vector: int) -> None: ...


@runtime_checkable
class LapicTarget(Protocol):
    """What an interrupt message is delivered to: a local APIC accepting a vector."""

    apic_id: int

    def set_intr(self, vector: int, level_triggered: bool) -> None: ...


# route(destination, logical) -> the local APICs an interrupt message addressed so reaches.
LapicRoute = Callable[[int, bool], Sequence[LapicTarget]]


@runtime_checkable
class IrqSink(Protocol):
    """An interrupt controller's input lines (vioapic pins, vatpic IRQs, or a fan-out)."""

    def assert_irq(self, irq: int) -> None: ...

    def deassert_irq(self, irq: int) -> None: ...

    def pulse_irq(self, irq: int) -> None: ...


@runtime_checkable
class TimerDevice(Protocol):
    """A device with guest-time events."""

    def next_event_ns(self) -> int | None: ...

    def advance(self, now_ns: int) -> None: ...


@runtime_checkable
class PortDevice(Protocol):
    port_ranges: list[tuple[int, int]]

    def io_read(self, port: int, size: int) -> int: ...

    def io_write(self, port: int, size: int, value: int) -> None: ...


@runtime_checkable
class MmioDevice(Protocol):
    mmio_ranges: list[tuple[int, int]]

    def mmio_read(self, gpa: int, size: int) -> int: ...

    def mmio_write(self, gpa: int, size: int, value: int) -> None: ...


class DeviceAccessError(ValueError):
    """A port or MMIO access a device cannot take (wrong size, address outside the device)."""


class DeviceStateError(ValueError):
    """Saved device state that cannot be restored; the message names section, field, value."""


class IsaIrqRouter:
    """ISA IRQ fan-out as a PC wires it: IRQ n goes to 8259 input n and I/O APIC pin n,
    except IRQ0 (the PIT/HPET legacy timer), which reaches I/O APIC pin 2."""

    def __init__(self, atpic: IrqSink | None, ioapic: IrqSink | None) -> None:
        self.atpic = atpic
        self.ioapic = ioapic

    @staticmethod
    def ioapic_pin(irq: int) -> int:
        return 2 if irq == 0 else irq

    def _check(self, irq: int) -> None:
        if not 0 <= irq < 16:
            raise ValueError(f"isa irq router: IRQ {irq} out of range (0-15)")

    def assert_irq(self, irq: int) -> None:
        self._check(irq)
        if self.atpic is not None:
            self.atpic.assert_irq(irq)
        if self.ioapic is not None:
            self.ioapic.assert_irq(self.ioapic_pin(irq))

    def deassert_irq(self, irq: int) -> None:
        self._check(irq)
        if self.atpic is not None:
            self.atpic.deassert_irq(irq)
        if self.ioapic is not None:
            self.ioapic.deassert_irq(self.ioapic_pin(irq))

    def pulse_irq(self, irq: int) -> None:
        self._check(irq)
        if self.atpic is not None:
            self.atpic.pulse_irq(irq)
        if self.ioapic is not None:
            self.ioapic.pulse_irq(self.ioapic_pin(irq))


# --- saved state -------------------------------------------------------------------------

_SCALAR_TYPES = {int: "an int", bool: "a bool", str: "a string"}


def _type_ok(value: Any, expected: type) -> bool:
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


@dataclasses.dataclass
class DeviceState:
    """Base of every device's saved state: a plain struct, versioned, JSON-friendly.

    Field types are limited to int, bool, str (bytes as lowercase hex) and lists of those, so
    ``to_dict()`` output goes through ``json.dumps`` unchanged. ``to_dict()`` gives
    ``{"section": SECTION, "version": VERSION, "fields": {...}}``; ``from_dict`` refuses a
    different section, a newer version, a missing or unknown field and a wrongly typed value,
    then runs ``validate()`` (the device's range checks), naming section, field and value.
    """

    VERSION: ClassVar[int] = 0
    SECTION: ClassVar[str] = "?"

    def fail(self, field: str, message: str) -> DeviceStateError:
        return DeviceStateError(f"{self.SECTION}: {field}: {message}")

    def check_int(self, field: str, lo: int, hi: int) -> None:
        value = getattr(self, field)
        if not lo <= value <= hi:
            raise self.fail(field, f"{value} out of range ({lo}..{hi})")

    def check_list(self, field: str, length: int, lo: int | None = None, hi: int | None = None) -> None:
        values = getattr(self, field)
        if len(values) != length:
            raise self.fail(field, f"has {len(values)} entries, expected {length}")
        if lo is not None:
            for i, value in enumerate(values):
                if not lo <= value <= hi:
                    raise self.fail(f"{field}[{i}]", f"{value} out of range ({lo}..{hi})")

    def check_hex(self, field: str, nbytes: int) -> bytes:
        text = getattr(self, field)
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise self.fail(field, f"not a hex string: {text[:40]!r}") from None
        if len(raw) != nbytes:
            raise self.fail(field, f"holds {len(raw)} bytes, expected {nbytes}")
        return raw

    def validate(self) -> None:
        """Range and consistency checks; devices override."""

    def to_dict(self) -> dict[str, Any]:
        fields = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            fields[f.name] = list(value) if isinstance(value, list) else value
        return {"section": self.SECTION, "version": self.VERSION, "fields": fields}

    @classmethod
    def from_dict(cls, data: Any):
        section = cls.SECTION
        if not isinstance(data, dict):
            raise DeviceStateError(f"{section}: state must be a dict, got {type(data).__name__}")
        if data.get("section") != section:
            raise DeviceStateError(f"{section}: state is for section {data.get('section')!r}, not {section!r}")
        version = data.get("version")
        if not _type_ok(version, int) or version < 1:
            raise DeviceStateError(f"{section}: version must be a positive int, got {version!r}")
        if version > cls.VERSION:
            raise DeviceStateError(
                f"{section}: state version {version} is newer than this vmmpy reads ({cls.VERSION})")
        if version < cls.VERSION:
            raise DeviceStateError(
                f"{section}: state version {version} is older than this vmmpy reads ({cls.VERSION})")
        fields = data.get("fields")
        if not isinstance(fields, dict):
            raise DeviceStateError(f"{section}: 'fields' must be a dict, got {type(fields).__name__}")
        hints, names = _field_types(cls)
        unknown = sorted(set(fields) - set(names))
        if unknown:
            raise DeviceStateError(f"{section}: unknown field {unknown[0]!r}")
        values = {}
        for name in names:
            if name not in fields:
                raise DeviceStateError(f"{section}: missing field {name!r}")
            value = fields[name]
            expected = hints[name]
            if typing.get_origin(expected) is list:
                (item,) = typing.get_args(expected)
                if not isinstance(value, list):
                    raise DeviceStateError(f"{section}: {name}: expected a list, got {value!r:.60}")
                for i, v in enumerate(value):
                    if not _type_ok(v, item):
                        raise DeviceStateError(
                            f"{section}: {name}[{i}]: expected {_SCALAR_TYPES[item]}, got {v!r:.60}")
                value = list(value)
            elif not _type_ok(value, expected):
                raise DeviceStateError(
                    f"{section}: {name}: expected {_SCALAR_TYPES[expected]}, got {value!r:.60}")
            values[name] = value
        state = cls(**values)
        state.validate()
        return state


def check_access(device: str, what: str, size: int, allowed: tuple[int, ...]) -> None:
    """Refuse an access of a size the register does not take."""
    if size not in allowed:
        sizes = "/".join(str(s) for s in allowed)
        raise DeviceAccessError(f"{device}: {size}-byte access to {what}; it takes {sizes}-byte accesses")


@functools.cache
def _field_types(cls: type) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A state class's field types and names, resolved once: get_type_hints evaluates every
    annotation string on each call, which was most of restoring a guest's state (and so of a
    migration's downtime)."""
    return typing.get_type_hints(cls), tuple(f.name for f in dataclasses.fields(cls))


def resolve_state_types() -> int:
    """Resolve the field types of every state class defined so far, ahead of a restore that must
    be quick (a migration's destination does it during the handshake, not the downtime).
    Returns how many classes."""
    seen: set[type] = set()
    todo = list(DeviceState.__subclasses__())
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            _field_types(cls)
            todo.extend(cls.__subclasses__())
    return len(seen)
