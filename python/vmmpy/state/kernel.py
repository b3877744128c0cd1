"""The kernel and device state of a running machine as sections, and back: what checkpoints write and migrations send.

Order follows bhyve's (kernel structs, then devices), with the restore dependencies made
explicit: the ``vm`` struct first (it carries guest time), then the vCPUs, then the interrupt
controllers before the timers that drive their lines, then userspace devices.

Every section's name and version is checked against :func:`section_registry` before anything
is restored, and the set of device sections must match the machine's devices exactly, so a
checkpoint or migration from a differently configured VM is refused naming the device. Then
every payload is read into its declared state type at the version it was written with
(``state/persist.py``: defaults for fields added since, unknown fields refused); only when all
of them read does anything change.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from ..vmm.ioctl import Ioctl, SnapshotOp, SnapshotReq, VmRestoreTime, VmSnapshotMeta, vmm_error
from ..vmm.vatpic import VatpicState
from ..vmm.vatpit import VatpitState
from ..vmm.vhpet import VhpetState
from ..vmm.vioapic import VioapicState
from ..vmm.vm import KvmState, VcpusState, VlapicsState, VmState
from ..vmm.vpmtmr import VpmtmrState
from ..vmm.vrtc import VrtcState
from . import persist
from .section import Section, SectionError, SectionRegistry

if TYPE_CHECKING:
    from .handle import SavableMachine as Machine  # the protocol, not runtime's Machine: state never imports runtime


class KernelSection(NamedTuple):
    name: str
    req: SnapshotReq
    state: type  #: the declaration (state/persist.py): fields, VERSION, MIN_VERSION

    @property
    def version(self) -> int:
        return self.state.VERSION


#: The kernel's sections, in save and restore order: the one list (the checkpoint metadata's
#: "kern_structs" are these names too).
KERNEL_SECTIONS: list[KernelSection] = [
    KernelSection("vm", SnapshotReq.STRUCT_VM, VmState),
    KernelSection("vmcx", SnapshotReq.STRUCT_VMCX, VcpusState),
    KernelSection("kvm", SnapshotReq.STRUCT_KVM, KvmState),
    KernelSection("vioapic", SnapshotReq.STRUCT_VIOAPIC, VioapicState),
    KernelSection("vatpic", SnapshotReq.STRUCT_VATPIC, VatpicState),
    KernelSection("vlapic", SnapshotReq.STRUCT_VLAPIC, VlapicsState),
    KernelSection("vatpit", SnapshotReq.STRUCT_VATPIT, VatpitState),
    KernelSection("vhpet", SnapshotReq.STRUCT_VHPET, VhpetState),
    KernelSection("vrtc", SnapshotReq.STRUCT_VRTC, VrtcState),
    KernelSection("vpmtmr", SnapshotReq.STRUCT_VPMTMR, VpmtmrState),
]
KERNEL_NAMES = tuple(k.name for k in KERNEL_SECTIONS)
#: Kernel sections older checkpoints and sources lack, and what each reads as then.
OPTIONAL_KERNEL = {"kvm": lambda: KvmState([], None)}


def kernel_registry() -> SectionRegistry:
    """The kernel sections this vmmpy reads, with the versions of each."""
    registry = SectionRegistry()
    for k in KERNEL_SECTIONS:
        registry.register(k.name, k.version, persist.min_version_of(k.state))
    return registry


def configured_registry(pci_names: list[str]) -> SectionRegistry:
    """What a machine with these PCI functions (``EMU@pci.B.S.F``) reads, known before it exists:
    the kernel sections and, from the device classes' declarations, every device section.
    ValueError names an unknown emulation."""
    from ..devices.registry import device_states

    registry = kernel_registry()
    for name, state in device_states(pci_names).items():
        registry.register(name, state.VERSION, persist.min_version_of(state))
    return registry


def section_registry(machine: Machine) -> SectionRegistry:
    """The sections (and versions) this vmmpy reads, for this machine's devices."""
    registry = kernel_registry()
    for device in machine.devices:
        registry.register(device.name, device.STATE.VERSION, persist.min_version_of(device.STATE))
    return registry


def prepare_declarations() -> int:
    """Resolve every declaration's field types ahead of a restore that must be quick."""
    from ..devices.registry import state_declarations

    return persist.prepare(*(k.state for k in KERNEL_SECTIONS), *state_declarations())


def save_sections(machine: Machine) -> list[Section]:
    """Every section of a paused machine, in order."""
    return list(iter_sections(machine))


def iter_sections(machine: Machine) -> Iterator[Section]:
    """Every section of a paused machine, in order, each taken when it is reached."""
    vm = machine.vm
    for k in KERNEL_SECTIONS:
        state = vm.ioctl(Ioctl.VM_SNAPSHOT_REQ, VmSnapshotMeta(k.req, SnapshotOp.SAVE))
        yield _section(k.name, k.state, state)
    for device in machine.devices:
        yield _section(device.name, device.STATE, device.save())


def _section(name: str, declared: type, state: Any) -> Section:
    """The section of ``state``, which must be of the declaration its reader uses: the version
    written and the fields written then come from one place, and a save can never produce a
    section its own reader refuses."""
    if type(state) is not declared:
        raise TypeError(f"section '{name}': save produced {type(state).__name__}, but the section is declared as "
                        f"{declared.__name__}")
    return Section(name, declared.VERSION, persist.dump(state))


class MachineSectionLoader:
    """Sections read into their declared states as they come, then checked as a whole and
    loaded: what a migration whose state comes in parts (protocol version 9) uses, so the
    destination reads the first sections while the source still saves the rest.

    ``add`` checks each section on its own (its name and version against the registry, its
    payload read at its version) and refuses a name it has seen; ``check`` then checks the set
    (no kernel or device section missing, the vCPU backend and count the machine's) and
    returns the states; ``restore`` checks and loads them (``state.handle.SectionLoader`` is
    the shape). Nothing changes the machine before ``restore``, and nothing that ``add`` or
    ``check`` refuses changes it at all."""

    def __init__(self, machine: Machine, *, what: str) -> None:
        self.machine = machine
        self.what = what
        self.registry = section_registry(machine)
        self.declarations = {k.name: k.state for k in KERNEL_SECTIONS} | {d.name: d.STATE for d in machine.devices}
        self.states: dict[str, Any] = {}

    def add(self, sections: Iterable[Section]) -> None:
        what = self.what
        for section in sections:
            if section.name in self.states:
                raise SectionError(f"{what}: section '{section.name}' came twice")
            self.registry.check(section.name, section.version, what=what)
            declared = self.declarations.get(section.name)
            if declared is None:
                raise SectionError(f"{what}: device '{section.name}' was saved but this VM has no such device (check -s/-l options)")
            try:
                self.states[section.name] = persist.load(declared, section.payload, section.version, where=f"section '{section.name}'")
            except persist.PersistError as err:
                raise SectionError(f"{what}: {err}") from None

    def check(self) -> dict[str, Any]:
        """Every section's state, once the set is complete; SectionError naming what is not."""
        what, machine, states = self.what, self.machine, dict(self.states)
        missing_kernel = [n for n in KERNEL_NAMES if n not in states and n not in OPTIONAL_KERNEL]
        if missing_kernel:
            raise SectionError(f"{what}: kernel section '{missing_kernel[0]}' is missing")
        for name in sorted({d.name for d in machine.devices} - states.keys()):
            raise SectionError(f"{what}: device '{name}' of this VM has no saved state (check -s/-l options)")
        for name, default in OPTIONAL_KERNEL.items():
            states.setdefault(name, default())
        vm_state = states["vm"]
        vm = machine.vm
        if vm_state.accel != vm.accel:
            raise SectionError(f"{what}: the guest ran on the {vm_state.accel} vCPU backend (--accel {vm_state.accel}); this VM runs "
                               f"--accel {vm.accel}: a checkpoint or migration cannot change a guest's vCPU backend")
        for key, value in {"ncpus": vm.ncpus, "vendor": vm.vendor, "tsc_mode": vm.tsc_mode}.items():
            if getattr(vm_state, key) != value:
                raise SectionError(f"{what}: section 'vm' has {key}={getattr(vm_state, key)!r}, this VM has {value!r}")
        return states

    def restore(self) -> None:
        """Check the set (``check``), then load it into the machine, whose vCPUs are not running."""
        states = self.check()
        what = self.what
        machine = self.machine
        vm = machine.vm
        for k in KERNEL_SECTIONS:
            try:
                vm.ioctl(Ioctl.VM_SNAPSHOT_REQ, VmSnapshotMeta(k.req, SnapshotOp.RESTORE, states[k.name]))
            except OSError as err:
                raise vmm_error(err.errno or errno.EINVAL, f"{what}: section '{k.name}': {err.strerror or err}") from None
            if k.name == "vmcx":
                # Guest time continues from the saved value before any timer is restored against it.
                vm.ioctl(Ioctl.VM_RESTORE_TIME, VmRestoreTime())
        for device in machine.devices:
            try:
                device.restore(states[device.name])
            except (KeyError, TypeError, ValueError) as err:
                raise vmm_error(errno.EINVAL, f"{what}: device '{device.name}': {err}") from None
        machine.devices_restored()


def check_sections(machine: Machine, sections: list[Section], *, what: str) -> dict[str, Any]:
    """Refuse sections this machine cannot take, before anything is restored; returns each
    section's state as its declared type, read at the section's version (defaults filled)."""
    loader = MachineSectionLoader(machine, what=what)
    loader.add(sections)
    return loader.check()


def restore_sections(machine: Machine, sections: list[Section], *, what: str = "state") -> None:
    """Load sections into a machine whose vCPUs are not running; checks everything first."""
    loader = MachineSectionLoader(machine, what=what)
    loader.add(sections)
    loader.restore()
