"""A VM's configuration as vmmrun's options describe it, checked before anything is built.

bhyve spellings: ``-s SLOT[:FUNC],EMULATION[,CONF]`` (or ``BUS:SLOT:FUNC``), ``-l com1,stdio|FILE``,
``-m 512`` (MiB without a suffix), ``-c 2``, ``-S``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import VmmpyError
from ..memory import DIRTY_TRACKING_CHOICES, KVM_TRACKING
from ..units import MiB, parse_size
from ..vmm.vm import IDLE_MODES  # what a halted vCPU does with the instruction-count TSC

VENDORS = ("intel", "amd")
TSC_MODES = ("instructions", "host")
DIRTY_TRACKING = DIRTY_TRACKING_CHOICES
#: The vCPU backends: the simulated vCPU, or KVM (real x86-64 code on the host CPU, docs/kvm.md).
ACCELS = ("sim", "kvm")
MEMORY_BACKINGS = ("anon", "memfd")
LPC_DEVICES = ("com1", "com2")
MAX_VCPUS = 16


class ConfigError(VmmpyError, ValueError):
    """A configuration that cannot be built; the message names the option and value."""


@dataclass(frozen=True)
class SlotConfig:
    """One ``-s`` option: a PCI device model at ``bus:slot.func`` with its options (``conf``);
    :func:`parse_slot` reads bhyve's spelling."""

    bus: int
    slot: int
    func: int
    emulation: str
    conf: str | None = None

    @property
    def pci_name(self) -> str:
        """bhyve's device name in state: ``EMU@pci.B.S.F``."""
        return f"{self.emulation}@pci.{self.bus}.{self.slot}.{self.func}"


@dataclass
class VmConfig:
    """A guest as vmmrun's options describe it: ``name`` (``VMNAME``), ``ncpus`` (``-c``),
    ``memsize`` in bytes (``-m``), ``wired`` (``-S``), ``slots`` (``-s``, :class:`SlotConfig`),
    ``lpc`` (``-l``: device -> ``stdio`` or a file path), ``guest`` and ``guest_args``
    (``--guest``, ``--guest-arg``), ``tsc``, ``idle``, ``vendor``, ``dirty_tracking`` and ``accel``. ``validate()``
    checks it, raising :class:`ConfigError` that names the option. ``vmmpy.Vm`` builds one from
    keyword options; the runtime's ``Machine`` and ``build_machine`` take one.
    """

    name: str
    ncpus: int = 1
    memsize: int = 256 * MiB
    wired: bool = False
    slots: list[SlotConfig] = field(default_factory=list)
    lpc: dict[str, str] = field(default_factory=dict)
    guest: str | None = None
    guest_args: dict[str, str] = field(default_factory=dict)
    tsc: str = "instructions"
    # Host policy, not guest state: an idle guest on the instruction-count TSC sleeps until the
    # host's clock reaches its next timer tick ("sleep") or runs its ticks flat out ("skip"); --idle.
    idle: str = "sleep"
    vendor: str = "intel"
    # Every guest write goes through vmmpy (vCPU stores, device DMA), so the soft bitmap is exact;
    # the kernel backend costs a fault per first write to a page per round and a page-table walk
    # of all memory per harvest (docs/performance.md), so a VM uses it only when asked.
    dirty_tracking: str = "soft"
    # What backs guest memory: "anon" (private anonymous) or "memfd" (shared, so a local
    # migration can hand it to another process); --memory-backing.
    memory_backing: str = "anon"
    # The vCPU backend (--accel): "sim" (the simulated vCPU) or "kvm", whose memory is tracked
    # by KVM's dirty log (dirty_tracking "kvm", which only it uses).
    accel: str = "sim"

    def validate(self) -> None:
        if not 1 <= self.ncpus <= MAX_VCPUS:
            raise ConfigError(f"-c {self.ncpus}: the vCPU count must be between 1 and {MAX_VCPUS}")
        if self.memsize <= 0 or self.memsize % 4096:
            raise ConfigError(f"-m: memory size {self.memsize} must be a positive multiple of 4 KiB")
        if self.vendor not in VENDORS:
            raise ConfigError(f"--vendor {self.vendor!r}: choose one of {', '.join(VENDORS)}")
        if self.tsc not in TSC_MODES:
            raise ConfigError(f"--tsc {self.tsc!r}: choose one of {', '.join(TSC_MODES)}")
        if self.idle not in IDLE_MODES:
            raise ConfigError(f"--idle {self.idle!r}: choose one of {', '.join(IDLE_MODES)}")
        if self.dirty_tracking not in DIRTY_TRACKING:
            raise ConfigError(f"--dirty-tracking {self.dirty_tracking!r}: choose one of {', '.join(DIRTY_TRACKING)}")
        if self.accel not in ACCELS:
            raise ConfigError(f"--accel {self.accel!r}: choose one of {', '.join(ACCELS)}")
        if (self.accel == "kvm") != (self.dirty_tracking in KVM_TRACKING):
            raise ConfigError(f"--dirty-tracking {self.dirty_tracking} with --accel {self.accel}: a KVM guest's memory is tracked by "
                              "KVM's dirty log (--dirty-tracking kvm, or kvm-ring for its dirty ring), and only a KVM guest's can be")
        if self.accel == "kvm" and self.ncpus != 1:
            raise ConfigError(f"-c {self.ncpus}: --accel kvm runs guests with one vCPU (the shipped x86-64 guests use one)")
        if self.memory_backing not in MEMORY_BACKINGS:
            raise ConfigError(f"--memory-backing {self.memory_backing!r}: choose one of {', '.join(MEMORY_BACKINGS)}")
        seen: dict[tuple[int, int, int], SlotConfig] = {}
        for slot in self.slots:
            key = (slot.bus, slot.slot, slot.func)
            if key in seen:
                raise ConfigError(
                    f"-s {slot.bus}:{slot.slot}:{slot.func}: slot already holds {seen[key].emulation}; "
                    f"cannot also place {slot.emulation} there"
                )
            seen[key] = slot


def parse_slot(text: str) -> SlotConfig:
    """``0,hostbridge`` / ``3:1,virtio-blk,disk.img`` / ``0:3:1,virtio-blk,disk.img``."""
    where, sep, rest = text.partition(",")
    if not sep or not rest:
        raise ConfigError(f"-s {text!r}: expected SLOT[:FUNC],EMULATION[,CONF]")
    emulation, _, conf = rest.partition(",")
    try:
        numbers = [int(part, 0) for part in where.split(":")]
    except ValueError:
        raise ConfigError(f"-s {text!r}: slot {where!r} is not a number (SLOT, SLOT:FUNC or BUS:SLOT:FUNC)") from None
    if len(numbers) == 1:
        bus, slot, func = 0, numbers[0], 0
    elif len(numbers) == 2:
        bus, (slot, func) = 0, numbers
    elif len(numbers) == 3:
        bus, slot, func = numbers
    else:
        raise ConfigError(f"-s {text!r}: expected SLOT, SLOT:FUNC or BUS:SLOT:FUNC")
    if not 0 <= bus <= 255 or not 0 <= slot <= 31 or not 0 <= func <= 7:
        raise ConfigError(f"-s {text!r}: bus 0-255, slot 0-31 and function 0-7 only")
    if not emulation:
        raise ConfigError(f"-s {text!r}: no emulation named")
    return SlotConfig(bus, slot, func, emulation, conf or None)


def parse_lpc(text: str) -> tuple[str, str]:
    """``com1,stdio`` or ``com1,/path/to/file`` -> (device, backend)."""
    device, sep, backend = text.partition(",")
    device = device.lower()
    if device not in LPC_DEVICES:
        raise ConfigError(f"-l {text!r}: LPC device {device!r} is not one of {', '.join(LPC_DEVICES)}")
    if not sep or not backend:
        raise ConfigError(f"-l {text!r}: expected {device},stdio or {device},FILE")
    return device, backend


def parse_guest_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--guest-arg {text!r}: expected KEY=VALUE")
    return key, value


def parse_memsize(text: str) -> int:
    try:
        return parse_size(text, default_unit=MiB, what="-m memory size")
    except ValueError as err:
        raise ConfigError(str(err)) from None
