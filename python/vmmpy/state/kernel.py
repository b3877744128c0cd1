"""The kernel and device state of a running machine as sections, and back: what checkpoints write and migrations send.

Order follows bhyve's (kernel structs, then devices), with the restore dependencies made
explicit: the ``vm`` struct first (it carries guest time), then the vCPUs, then the interrupt
controllers before the timers that drive their lines, then userspace devices.

Every section's name and version is checked against :func:`section_registry` before anything
is restored, and the set of device sections must match the machine's devices exactly, so a
checkpoint or migration from a differently configured VM is refused naming the device.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

from ..vmm.ioctl import Ioctl, SnapshotOp, SnapshotReq, VmRestoreTime, VmSnapshotMeta, vmm_error
from ..vmm.vatpic import VatpicState
from ..vmm.vatpit import VatpitState
from ..vmm.vhpet import VhpetState
from ..vmm.vioapic import VioapicState
from ..vmm.vlapic import VlapicState
from ..vmm.vpmtmr import VpmtmrState
from ..vmm.vrtc import VrtcState
from .section import Section, SectionError, SectionRegistry

if TYPE_CHECKING:
    from .handle import SavableMachine as Machine  # the protocol, not runtime's Machine: state never imports runtime

VM_SECTION_VERSION = 1
VCPU_SECTION_VERSION = 1

#: (section name, snapshot request, version), in save and restore order.
KERNEL_SECTIONS: list[tuple[str, SnapshotReq, int]] = [
    ("vm", SnapshotReq.STRUCT_VM, VM_SECTION_VERSION),
    ("vmcx", SnapshotReq.STRUCT_VMCX, VCPU_SECTION_VERSION),
    ("vioapic", SnapshotReq.STRUCT_VIOAPIC, VioapicState.VERSION),
    ("vatpic", SnapshotReq.STRUCT_VATPIC, VatpicState.VERSION),
    ("vlapic", SnapshotReq.STRUCT_VLAPIC, VlapicState.VERSION),
    ("vatpit", SnapshotReq.STRUCT_VATPIT, VatpitState.VERSION),
    ("vhpet", SnapshotReq.STRUCT_VHPET, VhpetState.VERSION),
    ("vrtc", SnapshotReq.STRUCT_VRTC, VrtcState.VERSION),
    ("vpmtmr", SnapshotReq.STRUCT_VPMTMR, VpmtmrState.VERSION),
]
KERNEL_NAMES = [name for name, _, _ in KERNEL_SECTIONS]


def section_registry(machine: Machine) -> SectionRegistry:
    """The sections (and versions) this vmmpy reads, for this machine's devices."""
    registry = SectionRegistry({name: version for name, _, version in KERNEL_SECTIONS})
    for device in machine.devices:
        registry.register(device.name, device.VERSION)
    return registry


def save_sections(machine: Machine) -> list[Section]:
    """Every section of a paused machine, in order."""
    vm = machine.vm
    sections = []
    for name, req, version in KERNEL_SECTIONS:
        data = vm.ioctl(Ioctl.VM_SNAPSHOT_REQ, VmSnapshotMeta(req, SnapshotOp.SAVE))
        payload = {"vcpus": data} if isinstance(data, list) else data
        sections.append(Section(name, version, payload))
    for device in machine.devices:
        sections.append(Section(device.name, device.VERSION, device.save()))
    return sections


def check_sections(machine: Machine, sections: list[Section], *, what: str) -> None:
    """Refuse sections this machine cannot take, before anything is restored."""
    registry = section_registry(machine)
    for section in sections:
        registry.check(section.name, section.version, what=what)
    names = [s.name for s in sections]
    missing_kernel = [n for n in KERNEL_NAMES if n not in names]
    if missing_kernel:
        raise SectionError(f"{what}: kernel section '{missing_kernel[0]}' is missing")
    have = {d.name for d in machine.devices}
    saved = {n for n in names if n not in KERNEL_NAMES}
    for name in sorted(saved - have):
        raise SectionError(f"{what}: device '{name}' was saved but this VM has no such device (check -s/-l options)")
    for name in sorted(have - saved):
        raise SectionError(f"{what}: device '{name}' of this VM has no saved state (check -s/-l options)")
    vm_payload = next(s.payload for s in sections if s.name == "vm")
    vm = machine.vm
    mine = {"ncpus": vm.ncpus, "vendor": vm.vendor, "tsc_mode": vm.tsc_mode}
    for key, value in mine.items():
        if vm_payload.get(key) != value:
            raise SectionError(f"{what}: section 'vm' has {key}={vm_payload.get(key)!r}, this VM has {value!r}")


def restore_sections(machine: Machine, sections: list[Section], *, what: str = "state") -> None:
    """Load sections into a machine whose vCPUs are not running; checks everything first."""
    check_sections(machine, sections, what=what)
    by_name = {s.name: s for s in sections}
    vm = machine.vm
    for name, req, _ in KERNEL_SECTIONS:
        payload: Any = by_name[name].payload
        data = payload["vcpus"] if name in ("vmcx", "vlapic") else payload
        try:
            vm.ioctl(Ioctl.VM_SNAPSHOT_REQ, VmSnapshotMeta(req, SnapshotOp.RESTORE, data))
        except OSError as err:
            raise vmm_error(err.errno or errno.EINVAL, f"{what}: section '{name}': {err.strerror or err}") from None
        if name == "vmcx":
            # Guest time continues from the saved value before any timer is restored against it.
            vm.ioctl(Ioctl.VM_RESTORE_TIME, VmRestoreTime())
    for device in machine.devices:
        try:
            device.restore(by_name[device.name].payload)
        except (KeyError, TypeError, ValueError) as err:
            raise vmm_error(errno.EINVAL, f"{what}: device '{device.name}': {err}") from None
    machine.devices_restored()
