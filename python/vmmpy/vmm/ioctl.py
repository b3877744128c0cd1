"""The vmm ioctl surface: command numbers, typed arguments, and how failures look.

Numbers follow FreeBSD's ``vmm_dev.h`` IOCNUM values where bhyve has the command (VM_RUN is 1,
VM_SNAPSHOT_REQ 113, VM_RESTORE_TIME 115, the UPB migration branch's VM_GET_DIRTY_PAGE_LIST
117). Each command takes one argument object of a fixed type; :meth:`Vm.ioctl
<vmmpy.vmm.vm.Vm.ioctl>` checks the type, dispatches, and fails as a kernel does: ``OSError``
with the errno bhyve's vmm.ko would return and a message that names what was wrong.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class Ioctl(IntEnum):
    VM_RUN = 1
    VM_SUSPEND = 4
    VM_REINIT = 5
    VM_ALLOC_MEMSEG = 14
    VM_MMAP_MEMSEG = 16
    VM_SET_REGISTER = 20
    VM_GET_REGISTER = 21
    VM_INJECT_INTERRUPT = 30
    VM_GET_STATS = 50
    VM_PAUSE_VCPUS = 93  # bhyve's VM_SUSPEND_CPU
    VM_RESUME_VCPUS = 94  # bhyve's VM_RESUME_CPU
    VM_SNAPSHOT_REQ = 113
    VM_RESTORE_TIME = 115
    VM_GET_DIRTY_PAGE_LIST = 117


class SuspendHow(IntEnum):
    """Why a VM stopped (bhyve's ``enum vm_suspend_how``)."""

    RESET = 1
    POWEROFF = 2
    HALT = 3
    TRIPLEFAULT = 4


class MemsegId(IntEnum):
    SYSMEM = 0


class SnapshotReq(IntEnum):
    """bhyve's ``enum snapshot_req``: which kernel struct a VM_SNAPSHOT_REQ saves or restores."""

    STRUCT_VIOAPIC = 1
    STRUCT_VM = 2
    STRUCT_VLAPIC = 3
    STRUCT_VHPET = 5
    STRUCT_VMCX = 6
    STRUCT_VATPIC = 7
    STRUCT_VATPIT = 8
    STRUCT_VPMTMR = 9
    STRUCT_VRTC = 10
    #: vmmpy's own: the KVM backend's vCPU and interrupt-controller state (empty on the simulated vCPU).
    STRUCT_KVM = 64


class SnapshotOp(IntEnum):
    SAVE = 0
    RESTORE = 1


ALL_VCPUS = -1


def vmm_error(code: int, message: str) -> OSError:
    """An OSError as vmm.ko would fail: errno plus a message naming the problem."""
    return OSError(code, message)


# ---- argument types -------------------------------------------------------------------------
@dataclass
class VmRun:
    vcpuid: int
    budget: int = 1 << 62
    exit: Any = None  # filled: the userspace exit


@dataclass
class VmSuspend:
    how: SuspendHow


@dataclass
class VmReinit:
    pass


@dataclass
class VmMemseg:
    segid: int
    len: int
    wired: bool = False
    dirty_tracking: str = "auto"
    backing: str = "anon"


@dataclass
class VmMmapMemseg:
    gpa: int
    segid: int
    segoff: int
    len: int


@dataclass
class VmRegister:
    vcpuid: int
    regname: str
    regval: int = 0


@dataclass
class VmInjectInterrupt:
    vcpuid: int
    vector: int


@dataclass
class VmStats:
    vcpuid: int
    stats: dict[str, int] = field(default_factory=dict)  # filled


@dataclass
class VmCpuset:
    vcpuid: int = ALL_VCPUS


@dataclass
class VmSnapshotMeta:
    req: SnapshotReq
    op: SnapshotOp
    data: Any = None  # filled on SAVE; given on RESTORE


@dataclass
class VmRestoreTime:
    pass


@dataclass
class VmDirtyPageList:
    pfns: Any = None  # filled: numpy uint64 array of page frame numbers, harvested and cleared


ARG_TYPES: dict[Ioctl, type] = {
    Ioctl.VM_RUN: VmRun,
    Ioctl.VM_SUSPEND: VmSuspend,
    Ioctl.VM_REINIT: VmReinit,
    Ioctl.VM_ALLOC_MEMSEG: VmMemseg,
    Ioctl.VM_MMAP_MEMSEG: VmMmapMemseg,
    Ioctl.VM_SET_REGISTER: VmRegister,
    Ioctl.VM_GET_REGISTER: VmRegister,
    Ioctl.VM_INJECT_INTERRUPT: VmInjectInterrupt,
    Ioctl.VM_GET_STATS: VmStats,
    Ioctl.VM_PAUSE_VCPUS: VmCpuset,
    Ioctl.VM_RESUME_VCPUS: VmCpuset,
    Ioctl.VM_SNAPSHOT_REQ: VmSnapshotMeta,
    Ioctl.VM_RESTORE_TIME: VmRestoreTime,
    Ioctl.VM_GET_DIRTY_PAGE_LIST: VmDirtyPageList,
}


def check_arg(cmd: int, arg: Any) -> Ioctl:
    """The command as an Ioctl, after checking it exists and its argument has the right type."""
    try:
        command = Ioctl(cmd)
    except ValueError:
        raise vmm_error(errno.ENOTTY, f"ioctl {cmd} is not a vmm command") from None
    expected = ARG_TYPES[command]
    if not isinstance(arg, expected):
        raise vmm_error(errno.EINVAL, f"{command.name} takes a {expected.__name__}, not {type(arg).__name__}")
    return command
