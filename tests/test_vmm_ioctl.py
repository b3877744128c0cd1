"""The vmm ioctl surface fails as a kernel does: the right errno and a message naming the problem."""

import errno

import pytest

from vmmpy.vmm.ioctl import (
    ALL_VCPUS,
    Ioctl,
    MemsegId,
    SnapshotOp,
    SnapshotReq,
    SuspendHow,
    VmCpuset,
    VmDirtyPageList,
    VmInjectInterrupt,
    VmMemseg,
    VmMmapMemseg,
    VmRegister,
    VmReinit,
    VmRun,
    VmSnapshotMeta,
    VmStats,
    VmSuspend,
)
from vmmpy.vmm.vioapic import VioapicState
from vmmpy.vmm.vm import vm_create, vm_destroy, vm_open


@pytest.fixture
def vm(request):
    name = f"ioctl-{request.node.name}"[:60]
    vm = vm_create(name)
    yield vm
    vm_destroy(name)


def expect(code, match, fn, *args):
    with pytest.raises(OSError, match=match) as err:
        fn(*args)
    assert err.value.errno == code, f"errno {err.value.errno}, expected {code}"


def test_vms_are_created_by_name_once(vm):
    assert vm_open(vm.name) is vm
    expect(errno.EEXIST, "already exists", vm_create, vm.name)
    expect(errno.ENOENT, "no VM named 'nope'", vm_open, "nope")


def test_unknown_commands_and_wrong_argument_types(vm):
    expect(errno.ENOTTY, "ioctl 999 is not a vmm command", vm.ioctl, 999, None)
    expect(errno.EINVAL, "VM_RUN takes a VmRun, not VmStats", vm.ioctl, Ioctl.VM_RUN, VmStats(0))


def test_memory_must_be_allocated_then_mapped_as_laid_out(vm):
    expect(errno.ENXIO, "no memory mapped yet", vm.ioctl, Ioctl.VM_RUN, VmRun(0))
    expect(errno.EINVAL, "before VM_ALLOC_MEMSEG", vm.ioctl, Ioctl.VM_MMAP_MEMSEG, VmMmapMemseg(0, 0, 0, 4096))
    expect(errno.EINVAL, "positive multiple of 4 KiB", vm.ioctl, Ioctl.VM_ALLOC_MEMSEG, VmMemseg(MemsegId.SYSMEM, 1000))
    vm.ioctl(Ioctl.VM_ALLOC_MEMSEG, VmMemseg(MemsegId.SYSMEM, 8 << 20))
    expect(errno.EEXIST, "already has system memory", vm.ioctl, Ioctl.VM_ALLOC_MEMSEG, VmMemseg(MemsegId.SYSMEM, 8 << 20))
    expect(errno.EINVAL, r"cannot map 0x1000 bytes of system memory at gpa 0x5000 \(offset 0x0\); the layout is lowmem: gpa 0x0 len 0x800000",
           vm.ioctl, Ioctl.VM_MMAP_MEMSEG, VmMmapMemseg(0x5000, 0, 0, 4096))
    vm.ioctl(Ioctl.VM_MMAP_MEMSEG, VmMmapMemseg(0, 0, 0, 8 << 20))
    expect(errno.EEXIST, "already mapped", vm.ioctl, Ioctl.VM_MMAP_MEMSEG, VmMmapMemseg(0, 0, 0, 8 << 20))
    assert len(vm.vcpus) == 1


def test_registers_by_name(vm):
    vm.setup_memory(4 << 20)
    vm.ioctl(Ioctl.VM_SET_REGISTER, VmRegister(0, "rbx", 0x1234))
    assert vm.ioctl(Ioctl.VM_GET_REGISTER, VmRegister(0, "rbx")) == 0x1234
    expect(errno.EINVAL, "vcpu 3 does not exist", vm.ioctl, Ioctl.VM_GET_REGISTER, VmRegister(3, "rax"))
    expect(errno.EINVAL, "rxx", vm.ioctl, Ioctl.VM_GET_REGISTER, VmRegister(0, "rxx"))


def test_snapshot_requests_need_stopped_vcpus_and_refuse_bad_state(vm):
    vm.setup_memory(4 << 20)
    data = vm.ioctl(Ioctl.VM_SNAPSHOT_REQ, VmSnapshotMeta(SnapshotReq.STRUCT_VIOAPIC, SnapshotOp.SAVE))
    assert isinstance(data, VioapicState), "the kernel hands out typed state; state/ makes it a section"
    data.redirection = data.redirection[:3]
    expect(errno.EINVAL, "STRUCT_VIOAPIC.*redirection", vm.ioctl, Ioctl.VM_SNAPSHOT_REQ,
           VmSnapshotMeta(SnapshotReq.STRUCT_VIOAPIC, SnapshotOp.RESTORE, data))
    vm_state = vm.ioctl(Ioctl.VM_SNAPSHOT_REQ, VmSnapshotMeta(SnapshotReq.STRUCT_VM, SnapshotOp.SAVE))
    vm_state.vendor = "amd"
    expect(errno.EINVAL, "vendor amd", vm.ioctl, Ioctl.VM_SNAPSHOT_REQ,
           VmSnapshotMeta(SnapshotReq.STRUCT_VM, SnapshotOp.RESTORE, vm_state))


def test_suspend_once_then_run_reports_it(vm):
    vm.setup_memory(4 << 20)
    vm.ioctl(Ioctl.VM_SUSPEND, VmSuspend(SuspendHow.POWEROFF))
    expect(errno.EALREADY, "already suspended", vm.ioctl, Ioctl.VM_SUSPEND, VmSuspend(SuspendHow.HALT))
    exit_ = vm.ioctl(Ioctl.VM_RUN, VmRun(0))
    assert exit_.kind == "suspended" and exit_.how == SuspendHow.POWEROFF


def test_reinit_needs_a_suspended_vm(vm):
    vm.setup_memory(4 << 20)
    expect(errno.EBUSY, "must be suspended", vm.ioctl, Ioctl.VM_REINIT, VmReinit())


def test_paused_vcpus_return_from_vm_run_until_resumed(vm):
    vm.setup_memory(4 << 20)
    vm.ioctl(Ioctl.VM_PAUSE_VCPUS, VmCpuset(ALL_VCPUS))
    assert vm.ioctl(Ioctl.VM_RUN, VmRun(0)).kind == "paused"
    vm.ioctl(Ioctl.VM_RESUME_VCPUS, VmCpuset(ALL_VCPUS))
    # Memory is all zero: opcode 0 is invalid, so the resumed vCPU faults at once.
    assert vm.ioctl(Ioctl.VM_RUN, VmRun(0)).kind == "fault"


def test_dirty_page_list_and_stats(vm):
    mem = vm.setup_memory(4 << 20)
    mem.write(0x3000, b"x")
    assert vm.ioctl(Ioctl.VM_GET_DIRTY_PAGE_LIST, VmDirtyPageList()).tolist() == [3]
    assert vm.ioctl(Ioctl.VM_GET_STATS, VmStats(0))["instructions_retired"] == 0
    expect(errno.EINVAL, "vector 300", vm.ioctl, Ioctl.VM_INJECT_INTERRUPT, VmInjectInterrupt(0, 300))


def test_a_destroyed_vm_refuses_everything(vm):
    vm_destroy(vm.name)
    expect(errno.ENXIO, "was destroyed", vm.ioctl, Ioctl.VM_GET_STATS, VmStats(0))
    vm_create(vm.name)  # for the fixture's teardown
