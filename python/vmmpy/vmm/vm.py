"""The ``Vm``: what vmm.ko is to bhyve — memory, vCPUs, kernel-emulated devices, VM_RUN.

A ``Vm`` is created by name (like ``/dev/vmm/NAME``) and driven through :meth:`Vm.ioctl`, whose
commands and argument types are in :mod:`vmmpy.vmm.ioctl`. VM_RUN runs a vCPU and handles in the
"kernel" everything bhyve's vmm.ko handles without leaving it: the local APIC, I/O APIC and HPET
(MMIO), the 8259s, 8254, RTC and ACPI PM timer (ports), their timers, interrupt delivery, and
HLT (with the instruction-count TSC, guest time moves to the next timer event, once the thread
has slept until the host's clock caught up with it, unless told to fast-forward; with the host
clock the thread sleeps until the event). It returns to userspace only for exits a device model must
handle (other ports and MMIO), a halted guest that can never wake, a suspend, or a pause.

Determinism: with the instruction-count TSC, every point at which the kernel touches devices or
delivers interrupts is fixed by the instruction count alone: slice boundaries are aligned to
absolute instruction counts, timer deadlines are absolute guest times, and a pause request (the
one point that depends on the host) does no device work. So a guest run for N instructions ends
in the same state however it was paused, suspended or migrated in between.

This module knows nothing of files, sockets or the runtime's threads.
"""

from __future__ import annotations

import dataclasses
import errno
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from .. import _core
from ..memory import KVM_TRACKING, GuestMemory
from .interfaces import DeviceAccessError, IsaIrqRouter
from .ioctl import (
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
    VmRestoreTime,
    VmRun,
    VmSnapshotMeta,
    VmStats,
    VmSuspend,
    check_arg,
    vmm_error,
)
from .vatpic import Vatpic
from .vatpit import Vatpit
from .vhpet import Vhpet
from .vioapic import Vioapic
from .vlapic import ApicBus, Vlapic, VlapicState
from .vpmtmr import Vpmtmr
from .vrtc import Vrtc

#: Instructions per run slice: the kernel looks at timers and interrupts at least this often.
#: Slices end at multiples of it in retired instructions, so their ends are deterministic.
SLICE = 1 << 16
#: Longest a halted vCPU that follows the host clock sleeps before looking again (seconds).
HALT_POLL_S = 0.01
RFLAGS_IF = 1 << 9
VENDORS = ("intel", "amd")
TSC_MODES = ("instructions", "host")
#: What a halted vCPU does with the instruction-count TSC before its time moves to its next timer
#: event: "sleep" until the host's clock has caught up with it (an idle guest's time follows the
#: host's and costs it little CPU, as on hardware; QEMU's ``-icount sleep=on``), or "skip" at
#: once (fast-forward: an idle guest runs its timer ticks flat out). Without interrupts from
#: outside (devices' threads, other vCPUs) the guest sees the same either way (Vm._pace). The
#: host-clock TSC always sleeps.
IDLE_MODES = ("sleep", "skip")
#: How far guest time may fall behind (or get ahead of) its idle pace's anchor on the host clock
#: and still be made up by sleeping less (or more); beyond it the anchor starts again (ns).
PACE_LAG_NS = 10_000_000
#: Longest one wait of an idle sleep lasts before the vCPU looks again (seconds): interrupts,
#: pauses and suspends wake it at once; this only bounds what a missed wake-up could cost.
PACE_SLICE_S = 0.1
#: A timer event further off than this (146 years of guest time) is no event: an HPET comparator
#: left at its reset value (2^64 ticks away) must not move guest time past the TSC's range (ns).
NEVER_NS = 1 << 62
ACCELS = ("sim", "kvm")

# --- saved state (declarations in state/persist.py's pattern) ----------------------------------


@dataclass
class VmState:
    """The ``vm`` section: what the VM struct itself carries across a save (bhyve's STRUCT_VM)."""

    VERSION: ClassVar[int] = 2
    MIN_VERSION: ClassVar[int] = 1
    SECTION: ClassVar[str] = "vm"

    ncpus: int
    vendor: str
    tsc_mode: str
    last_tsc: list[int]
    host_tsc_offset: int
    at_deterministic_point: list[bool]
    started: list[bool]
    guest_time_ns: int
    # Version 2: the vCPU backend the guest ran on; a restore into another is refused.
    accel: str = dataclasses.field(default="sim", metadata={"since": 2})

    def validate(self) -> None:
        for name in ("last_tsc", "at_deterministic_point", "started"):
            if len(getattr(self, name)) != self.ncpus:
                raise ValueError(f"vm: {name}: has {len(getattr(self, name))} entries for {self.ncpus} vCPUs")
        values = {"host_tsc_offset": self.host_tsc_offset, "guest_time_ns": self.guest_time_ns}
        values.update((f"last_tsc[{i}]", tsc) for i, tsc in enumerate(self.last_tsc))
        for name, value in values.items():
            if not 0 <= value < 1 << 64:
                raise ValueError(f"vm: {name}: {value} is not a 64-bit unsigned value")


@dataclass
class VcpuState:
    """One saved vCPU, as the vCPU core's ``save_state()`` gives it (docs/isa.md "Saved state").

    The register file is a vendor's layout, declared where it lives (``rust/cpu/state.rs``): here
    it is ``registers``, group name -> register name -> value, and the core's binding checks every
    group and register by name on restore. ``format`` is the core's own layout number."""

    format: int
    vcpu_id: int
    vendor: str
    tsc_mode: str
    registers: dict[str, dict[str, int]]
    pending_interrupts: list[int]
    halted: bool
    pending_read: dict | None  # {"source", "port" or "gpa", "size", "register"}, checked by the core
    instructions_retired: int
    guest_tsc: int

    @classmethod
    def from_core(cls, saved: dict[str, Any]) -> VcpuState:
        """From ``Vcpu.save_state()``: its register groups are the keys beside the common ones."""
        common = {f.name for f in dataclasses.fields(cls)} - {"registers"}
        return cls(**{k: saved[k] for k in common}, registers={k: v for k, v in saved.items() if k not in common})

    def to_core(self) -> dict[str, Any]:
        """What ``Vcpu.restore_state()`` takes."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "registers"}
        out.update(self.registers)
        return out


@dataclass
class VcpusState:
    """The ``vmcx`` section: one saved vCPU per entry."""

    VERSION: ClassVar[int] = 1
    MIN_VERSION: ClassVar[int] = 1
    SECTION: ClassVar[str] = "vmcx"

    vcpus: list[VcpuState]


@dataclass
class KvmVcpuState:
    """One KVM vCPU, as ``KvmVcpu.save_state()`` gives it: the kernel's structs as their bytes
    (the x86-64 KVM ABI), MSRs by hex index, the MP state and the TSC frequency (kHz)."""

    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    lapic: bytes
    events: bytes
    mp_state: int
    msrs: dict[str, int]
    tsc_khz: int


@dataclass
class KvmChipsState:
    """The KVM VM's in-kernel 8259s and I/O APIC (KVM_GET_IRQCHIP) and kvmclock, as bytes."""

    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    clock: bytes


@dataclass
class KvmState:
    """The ``kvm`` section: under ``--accel kvm`` the vCPUs and interrupt controllers KVM runs
    (the ``vmcx`` section is then empty); on the simulated vCPU, nothing (no vCPUs, no chips)."""

    VERSION: ClassVar[int] = 1
    MIN_VERSION: ClassVar[int] = 1
    SECTION: ClassVar[str] = "kvm"

    vcpus: list[KvmVcpuState]
    chips: KvmChipsState | None


@dataclass
class VlapicsState:
    """The ``vlapic`` section: one local APIC per vCPU. Its versions are ``VlapicState``'s."""

    VERSION: ClassVar[int] = VlapicState.VERSION
    MIN_VERSION: ClassVar[int] = VlapicState.MIN_VERSION
    SECTION: ClassVar[str] = "vlapic"

    vcpus: list[VlapicState]

    def validate(self) -> None:
        for state in self.vcpus:
            state.validate()


_registry: dict[str, Vm] = {}
_registry_lock = threading.Lock()


def vm_create(name: str, *, ncpus: int = 1, vendor: str = "intel", tsc: str = "instructions", accel: str = "sim",
              idle: str = "sleep") -> Vm:
    """Create a VM by name, as ``vm_create()`` makes ``/dev/vmm/NAME``; EEXIST if it exists."""
    with _registry_lock:
        if name in _registry:
            raise vmm_error(errno.EEXIST, f"a VM named '{name}' already exists")
        vm = Vm(name, ncpus=ncpus, vendor=vendor, tsc=tsc, accel=accel, idle=idle)
        _registry[name] = vm
        return vm


def vm_open(name: str) -> Vm:
    with _registry_lock:
        vm = _registry.get(name)
    if vm is None:
        raise vmm_error(errno.ENOENT, f"no VM named '{name}'")
    return vm


def vm_destroy(name: str) -> None:
    with _registry_lock:
        vm = _registry.pop(name, None)
    if vm is None:
        raise vmm_error(errno.ENOENT, f"no VM named '{name}'")
    vm.destroyed = True


class VmClock:
    """Guest time for devices shared by all vCPUs: nanoseconds of the guest TSC (1 GHz).

    With the instruction-count TSC it is the latest TSC any vCPU reached at its last exit (with
    one vCPU: exactly that vCPU's TSC). With the host TSC it is the host's CLOCK_MONOTONIC plus
    the VM's TSC offset, readable from any thread.
    """

    def __init__(self, vm: Vm) -> None:
        self.vm = vm

    def now_ns(self) -> int:
        if self.vm.tsc_mode == "host":
            return (time.monotonic_ns() + self.vm.host_tsc_offset) & ((1 << 64) - 1)
        return max(self.vm.last_tsc)


class VcpuClock:
    """One vCPU's own guest time (its local APIC's timer runs on it)."""

    def __init__(self, vm: Vm, vcpuid: int) -> None:
        self.vm = vm
        self.vcpuid = vcpuid

    def now_ns(self) -> int:
        if self.vm.tsc_mode == "host":
            return (time.monotonic_ns() + self.vm.host_tsc_offset) & ((1 << 64) - 1)
        return self.vm.last_tsc[self.vcpuid]


@dataclass
class UserExit:
    """What VM_RUN hands to userspace: the vCPU's exit, or a suspend."""

    kind: str  # "inout", "mmio", "hlt", "suspended", "paused", "waiting" (an AP before STARTUP), "fault", "budget"
    vcpuid: int
    exit: Any = None  # the _core.VmExit, when there is one
    how: SuspendHow | None = None

    def __str__(self) -> str:
        if self.kind == "suspended":
            return f"vcpu {self.vcpuid}: suspended ({self.how.name.lower()})"
        return f"vcpu {self.vcpuid}: {self.kind} {self.exit!r}" if self.exit is not None else f"vcpu {self.vcpuid}: {self.kind}"


class Vm:
    """One virtual machine. Use :func:`vm_create`; drive it with :meth:`ioctl`."""

    def __init__(self, name: str, *, ncpus: int = 1, vendor: str = "intel", tsc: str = "instructions", accel: str = "sim",
                 idle: str = "sleep") -> None:
        if accel not in ACCELS:
            raise vmm_error(errno.EINVAL, f"vCPU backend {accel!r} is not one of {', '.join(ACCELS)}")
        if accel == "kvm":
            why = _core.kvm_unavailable()
            if why is not None:
                raise vmm_error(errno.ENODEV, why)
        if vendor not in VENDORS:
            raise vmm_error(errno.EINVAL, f"vendor {vendor!r} is not one of {', '.join(VENDORS)}")
        if tsc not in TSC_MODES:
            raise vmm_error(errno.EINVAL, f"TSC mode {tsc!r} is not one of {', '.join(TSC_MODES)}")
        if idle not in IDLE_MODES:
            raise vmm_error(errno.EINVAL, f"idle mode {idle!r} is not one of {', '.join(IDLE_MODES)}")
        if not 1 <= ncpus <= 16:
            raise vmm_error(errno.EINVAL, f"{ncpus} vCPUs: a VM has 1 to 16")
        self.name = name
        self.ncpus = ncpus
        self.vendor = vendor
        self.tsc_mode = tsc
        #: IDLE_MODES: host policy, not guest state (nothing saves it; a restored or migrated
        #: guest follows its new host's setting).
        self.idle = idle
        #: "sim": the simulated vCPU; "kvm": KVM vCPUs on memory that is the KVM VM's memory slots.
        self.accel = accel
        self.destroyed = False
        self.memory: GuestMemory | None = None
        self._mapped: dict[str, bool] = {}
        self.vcpus: list[Any] = []
        self.last_tsc = [0] * ncpus
        # Per vCPU, a host time and the guest time it stands for, which idle sleeps keep guest
        # time from running ahead of (see _pace); None until its first halt.
        self._pace_anchor: list[tuple[int, int] | None] = [None] * ncpus
        # vCPUs waiting in hlt (changed with the kernel lock held): an interrupt entering one's
        # local APIC wakes it (_intr_raised).
        self._halted_waiting: set[int] = set()
        self.host_tsc_offset = 0
        self.suspended: SuspendHow | None = None
        # The kernel lock: device emulation, timers and interrupt delivery happen under it; vCPU
        # execution does not. Userspace device models take it (through raise_irq) too.
        self.lock = threading.RLock()
        self._running = [False] * ncpus
        self._paused = [False] * ncpus
        # The BSP runs from the start; application processors wait for a STARTUP IPI.
        self.started = [i == 0 for i in range(ncpus)]
        self._at_deterministic_point = [True] * ncpus
        self._wakeup = threading.Condition(self.lock)
        self.stats = [Counter() for _ in range(ncpus)]
        self._build_kernel_devices()

    # ---- kernel-emulated devices --------------------------------------------------------
    def _build_kernel_devices(self) -> None:
        self.clock = VmClock(self)
        self.apic_bus = ApicBus()
        self.vlapics: list[Vlapic] = []
        self.vioapic = Vioapic(self.apic_bus.route)
        self.vatpic = Vatpic(self._atpic_intr)
        self.isa_irq = IsaIrqRouter(self.vatpic, self.vioapic)
        self.vatpit = Vatpit(self.clock, self.isa_irq)
        self.vhpet = Vhpet(self.clock, self.vioapic, self.isa_irq)
        self.vrtc = Vrtc(self.clock, self.isa_irq)
        self.vpmtmr = Vpmtmr(self.clock)
        self._port_devices: dict[int, Any] = {}
        for device in (self.vatpic, self.vatpit, self.vrtc, self.vpmtmr):
            for first, count in device.port_ranges:
                for port in range(first, first + count):
                    self._port_devices[port] = device
        self._mmio_devices = [self.vioapic, self.vhpet]
        self._timer_devices: list[Any] = [self.vatpit, self.vhpet, self.vrtc]

    def _atpic_intr(self, vector: int) -> None:
        # The 8259's INTR line reaches the BSP as an external interrupt (PIC mode).
        if self.vcpus:
            self.vcpus[0].inject_interrupt(vector)
            self.kick(0)

    def _startup_ap(self, apic_id: int, vector: int) -> None:
        """A STARTUP IPI: a waiting AP begins at ``vector`` * 4 KiB (an AP that runs ignores it)."""
        if not 0 <= apic_id < self.ncpus or self.started[apic_id]:
            return
        self.vcpus[apic_id].set_register("rip", vector << 12)
        self.started[apic_id] = True
        self.stats[apic_id]["startup_ipis"] += 1
        self.kick()

    # ---- ioctl ------------------------------------------------------------------------------
    def ioctl(self, cmd: int, arg: Any) -> Any:
        """Dispatch a vmm command; fails with OSError(errno) as vmm.ko would."""
        if self.destroyed:
            raise vmm_error(errno.ENXIO, f"VM '{self.name}' was destroyed")
        command = check_arg(cmd, arg)
        handler = getattr(self, f"_ioctl_{command.name.lower()}")
        return handler(arg)

    def _check_vcpu(self, vcpuid: int, *, allow_all: bool = False) -> None:
        if allow_all and vcpuid == ALL_VCPUS:
            return
        if not isinstance(vcpuid, int) or not 0 <= vcpuid < self.ncpus:
            raise vmm_error(errno.EINVAL, f"vcpu {vcpuid} does not exist (VM '{self.name}' has {self.ncpus})")
        if not self.vcpus:
            raise vmm_error(errno.ENXIO, f"VM '{self.name}' has no memory mapped yet, so no vCPUs")

    def _vcpu_ids(self, vcpuid: int) -> range:
        return range(self.ncpus) if vcpuid == ALL_VCPUS else range(vcpuid, vcpuid + 1)

    # -- memory
    def _ioctl_vm_alloc_memseg(self, arg: VmMemseg) -> None:
        if arg.segid != MemsegId.SYSMEM:
            raise vmm_error(errno.EINVAL, f"memory segment id {arg.segid} is not SYSMEM ({MemsegId.SYSMEM})")
        if self.memory is not None:
            raise vmm_error(errno.EEXIST, f"VM '{self.name}' already has system memory ({self.memory.memsize} bytes)")
        try:
            self._check_tracking(arg.dirty_tracking)
            self.memory = GuestMemory(arg.len, wired=arg.wired, dirty_tracking=arg.dirty_tracking, backing=arg.backing)
        except ValueError as err:
            raise vmm_error(errno.EINVAL, str(err)) from None
        self._mapped = {seg.name: False for seg in self.memory.segments}

    def _ioctl_vm_mmap_memseg(self, arg: VmMmapMemseg) -> None:
        if self.memory is None:
            raise vmm_error(errno.EINVAL, "VM_MMAP_MEMSEG before VM_ALLOC_MEMSEG: there is no segment to map")
        # System memory is one object: lowmem maps its first bytes at GPA 0, highmem the rest at
        # 4 GiB, exactly as bhyve's vm_setup_memory maps them.
        offset = 0
        for seg in self.memory.segments:
            if (arg.gpa, arg.segoff, arg.len) == (seg.gpa, offset, seg.size):
                if self._mapped[seg.name]:
                    raise vmm_error(errno.EEXIST, f"segment '{seg.name}' is already mapped at {seg.gpa:#x}")
                self._mapped[seg.name] = True
                if all(self._mapped.values()):
                    self._create_vcpus()
                return
            offset += seg.size
        layout = ", ".join(f"{s.name}: gpa {s.gpa:#x} len {s.size:#x}" for s in self.memory.segments)
        raise vmm_error(
            errno.EINVAL,
            f"cannot map {arg.len:#x} bytes of system memory at gpa {arg.gpa:#x} (offset {arg.segoff:#x}); the layout is {layout}",
        )

    def setup_memory(self, memsize: int, *, wired: bool = False, dirty_tracking: str = "auto", backing: str = "anon") -> GuestMemory:
        """libvmmapi's ``vm_setup_memory``: allocate system memory and map lowmem and highmem."""
        self.ioctl(Ioctl.VM_ALLOC_MEMSEG, VmMemseg(MemsegId.SYSMEM, memsize, wired, dirty_tracking, backing))
        offset = 0
        for seg in self.memory.segments:
            self.ioctl(Ioctl.VM_MMAP_MEMSEG, VmMmapMemseg(seg.gpa, MemsegId.SYSMEM, offset, seg.size))
            offset += seg.size
        return self.memory

    def _check_tracking(self, dirty_tracking: str) -> None:
        """KVM vCPUs run only on memory that is a KVM VM's memory slots, and only they on it."""
        if (self.accel == "kvm") != (dirty_tracking in KVM_TRACKING):
            raise vmm_error(errno.EINVAL, f"VM '{self.name}' runs the {self.accel} vCPU backend; memory tracked by "
                            f"'{dirty_tracking}' is not for it (a KVM guest's memory is tracked by 'kvm' or 'kvm-ring', "
                            "and only its)")

    def adopt_memory(self, memory: GuestMemory, *, replace: bool = False) -> None:
        """Use memory made elsewhere (a restore or a migration receive) as system memory. With
        ``replace``, memory the VM has already (empty, no vCPU ever ran on it: a local migration's
        destination is built with some) is released and closed first."""
        self._check_tracking(memory.dirty_tracking)
        if self.memory is not None and replace and self.vlapics:
            old = self.release_memory()
            if old is not None:
                old.close()
            # The local APICs stay (on the APIC bus, with their state): only their vCPUs are new.
            self.memory = memory
            self._mapped = {seg.name: True for seg in memory.segments}
            self.vcpus = self._new_vcpus()
            for lapic, vcpu in zip(self.vlapics, self.vcpus, strict=True):
                lapic.vcpu = vcpu
            return
        if self.memory is not None:
            raise vmm_error(errno.EEXIST, f"VM '{self.name}' already has system memory")
        self.memory = memory
        self._mapped = {seg.name: True for seg in memory.segments}
        self._create_vcpus()

    def release_memory(self) -> GuestMemory | None:
        """After the VM is destroyed and no vCPU runs: drop every reference this VM holds to its
        system memory (the memory itself and the vCPUs and local APICs that point into it), so
        the mapping goes as soon as its last user lets go, not when the cycle collector runs.
        Returns the memory (None if it had none) for its owner to close."""
        memory, self.memory = self.memory, None
        for lapic in self.vlapics:
            lapic.vcpu = None
        self.vcpus = []
        self._mapped = {}
        return memory

    def _new_vcpus(self) -> list:
        if self.accel == "kvm":
            return [_core.KvmVcpu(self.memory.core, i) for i in range(self.ncpus)]
        return [_core.Vcpu(self.memory.core, i, vendor=self.vendor, tsc=self.tsc_mode) for i in range(self.ncpus)]

    def _create_vcpus(self) -> None:
        self.vcpus = self._new_vcpus()
        for i in range(self.ncpus):
            lapic = Vlapic(VcpuClock(self, i), self.vcpus[i], apic_id=i, bus=self.apic_bus, eoi_sink=self.vioapic.eoi,
                           startup_sink=self._startup_ap, intr_sink=self._intr_raised)
            self.vlapics.append(lapic)
        self._timer_devices.extend(self.vlapics)

    # -- registers
    def _ioctl_vm_get_register(self, arg: VmRegister) -> int:
        self._check_vcpu(arg.vcpuid)
        arg.regval = self._vcpu_call(arg.vcpuid, "get_register", arg.regname)
        return arg.regval

    def _ioctl_vm_set_register(self, arg: VmRegister) -> None:
        self._check_vcpu(arg.vcpuid)
        self._vcpu_call(arg.vcpuid, "set_register", arg.regname, arg.regval)

    def _vcpu_call(self, vcpuid: int, method: str, *args: Any) -> Any:
        try:
            return getattr(self.vcpus[vcpuid], method)(*args)
        except ValueError as err:
            raise vmm_error(errno.EINVAL, str(err)) from None

    def _ioctl_vm_inject_interrupt(self, arg: VmInjectInterrupt) -> None:
        self._check_vcpu(arg.vcpuid)
        if not 0 <= arg.vector <= 255:
            raise vmm_error(errno.EINVAL, f"vector {arg.vector} is not 0..255")
        with self.lock:
            self.vlapics[arg.vcpuid].set_intr(arg.vector)
        self.kick(arg.vcpuid)

    # -- run
    def _ioctl_vm_run(self, arg: VmRun) -> UserExit:
        self._check_vcpu(arg.vcpuid)
        arg.exit = self._run_kvm(arg.vcpuid) if self.accel == "kvm" else self._run(arg.vcpuid, arg.budget)
        return arg.exit

    def complete_read(self, vcpuid: int, value: int) -> None:
        """Give a userspace-emulated ``in`` or MMIO load its value before the next VM_RUN."""
        self._check_vcpu(vcpuid)
        self.vcpus[vcpuid].complete_read(value)

    def _run(self, vcpuid: int, budget: int) -> UserExit:
        vcpu = self.vcpus[vcpuid]
        refused = self._enter(vcpuid)
        if refused is not None:
            return refused
        stats = self.stats[vcpuid]
        start = vcpu.instructions_retired
        try:
            if self._at_deterministic_point[vcpuid]:
                self._kernel_work(vcpuid)
            self._at_deterministic_point[vcpuid] = True
            while True:
                used = vcpu.instructions_retired - start
                if used >= budget:
                    # The caller's budget is host policy (throttling), not guest time: like a
                    # pause, where it ends must not move device work.
                    self._at_deterministic_point[vcpuid] = False
                    stats["budget_returns"] += 1
                    return UserExit("budget", vcpuid)
                slice_left = SLICE - vcpu.instructions_retired % SLICE
                run_for = min(slice_left, budget - used)
                deadline = self._next_deadline(vcpuid)
                if deadline is not None and self.tsc_mode == "instructions":
                    run_for = max(1, min(run_for, deadline - self.last_tsc[vcpuid]))
                ex = vcpu.run(run_for)
                self.last_tsc[vcpuid] = vcpu.tsc
                kind = ex.kind
                stats[f"exits_{kind}"] += 1
                if kind == "pause_requested":
                    # Host-timed: do no device work here, so where it lands changes nothing.
                    self._at_deterministic_point[vcpuid] = False
                    with self.lock:
                        if self.suspended is not None:
                            return UserExit("suspended", vcpuid, how=self.suspended)
                    return UserExit("paused", vcpuid, ex)
                if kind == "budget" and vcpu.instructions_retired % SLICE and (
                    deadline is None or self.tsc_mode != "instructions" or self.last_tsc[vcpuid] < deadline
                ):
                    # Neither a slice end nor a timer deadline: the caller's budget ran out.
                    self._at_deterministic_point[vcpuid] = False
                    stats["budget_returns"] += 1
                    return UserExit("budget", vcpuid)
                if kind == "inout" and ex.port in self._port_devices:
                    self._emulate_port(vcpuid, ex)
                elif kind == "mmio" and self._kernel_mmio(vcpuid, ex.gpa) is not None:
                    self._emulate_mmio(vcpuid, ex)
                elif kind == "hlt":
                    if not self._halt(vcpuid):
                        stats["halted_forever"] += 1
                        return UserExit("hlt", vcpuid, ex)
                elif kind in ("inout", "mmio", "fault"):
                    stats["userspace_exits"] += 1
                    return UserExit(kind, vcpuid, ex)
                self._kernel_work(vcpuid)
        finally:
            stats["instructions"] += vcpu.instructions_retired - start
            with self.lock:
                self._running[vcpuid] = False

    def _enter(self, vcpuid: int) -> UserExit | None:
        """Mark the vCPU running, or the exit that says why it may not run now."""
        with self.lock:
            if self._running[vcpuid]:
                raise vmm_error(errno.EBUSY, f"vcpu {vcpuid} of VM '{self.name}' is already running")
            if self.suspended is not None:
                return UserExit("suspended", vcpuid, how=self.suspended)
            if self._paused[vcpuid]:
                return UserExit("paused", vcpuid)
            if not self.started[vcpuid]:
                # An AP waiting for its STARTUP IPI, like a halted vCPU: look again shortly.
                self._wakeup.wait(HALT_POLL_S)
                return UserExit("waiting", vcpuid)
            self._running[vcpuid] = True
        return None

    def _run_kvm(self, vcpuid: int) -> UserExit:
        """VM_RUN on a KVM vCPU: KVM itself runs the local APIC, I/O APIC, 8259s, interrupt
        delivery and hlt; the exits left are ports and MMIO for device models (the kernel
        devices' ports here, the rest for userspace), a pause, or a guest that cannot go on.
        The caller's instruction budget does not apply (KVM counts no instructions)."""
        refused = self._enter(vcpuid)
        if refused is not None:
            return refused
        vcpu = self.vcpus[vcpuid]
        stats = self.stats[vcpuid]
        try:
            if self.memory.lazy:
                # KVM reaches guest memory through the host's page tables, not through vmmpy,
                # so a chunk cannot be loaded when the guest first touches it: load them all
                # (LazyMemoryError for a bad one, which stops the guest) before it runs.
                self.memory.load_all()
            while True:
                ex = vcpu.run()
                kind = ex.kind
                stats[f"exits_{kind}"] += 1
                if kind == "pause_requested":
                    with self.lock:
                        if self.suspended is not None:
                            return UserExit("suspended", vcpuid, how=self.suspended)
                    return UserExit("paused", vcpuid, ex)
                if kind == "inout" and ex.port in self._port_devices:
                    self._emulate_port(vcpuid, ex)
                    continue
                stats["userspace_exits"] += 1
                return UserExit(kind, vcpuid, ex)
        finally:
            with self.lock:
                self._running[vcpuid] = False

    def _next_deadline(self, vcpuid: int) -> int | None:
        with self.lock:
            times = [t for t in (d.next_event_ns() for d in self._timer_devices) if t is not None]
        return min(times) if times else None

    def _kernel_work(self, vcpuid: int) -> None:
        """At a deterministic point: fire due timers, then offer the vCPU its interrupts."""
        with self.lock:
            now = self.clock.now_ns()
            for device in self._timer_devices:
                device.advance(now)
            self._deliver(vcpuid)

    def _deliver(self, vcpuid: int) -> None:
        vcpu = self.vcpus[vcpuid]
        if vcpu.get_register("rflags") & RFLAGS_IF:
            if self.vlapics[vcpuid].deliver() is not None:
                self.stats[vcpuid]["interrupts_delivered"] += 1

    def _emulate_port(self, vcpuid: int, ex: Any) -> None:
        device = self._port_devices[ex.port]
        with self.lock:
            try:
                if ex.is_in:
                    self.vcpus[vcpuid].complete_read(device.io_read(ex.port, ex.size))
                else:
                    device.io_write(ex.port, ex.size, ex.value)
            except DeviceAccessError:
                # A malformed access to a device port reads all-ones and writes nothing, as on a PC.
                if ex.is_in:
                    self.vcpus[vcpuid].complete_read((1 << (8 * ex.size)) - 1)
        self.stats[vcpuid]["kernel_port_exits"] += 1

    def _kernel_mmio(self, vcpuid: int, gpa: int) -> Any | None:
        lapic = self.vlapics[vcpuid]
        for device in (lapic, *self._mmio_devices):
            for base, length in device.mmio_ranges:
                if base <= gpa < base + length:
                    return device
        return None

    def _emulate_mmio(self, vcpuid: int, ex: Any) -> None:
        device = self._kernel_mmio(vcpuid, ex.gpa)
        with self.lock:
            try:
                if ex.is_write:
                    device.mmio_write(ex.gpa, ex.size, ex.value)
                else:
                    self.vcpus[vcpuid].complete_read(device.mmio_read(ex.gpa, ex.size))
            except DeviceAccessError:
                if not ex.is_write:
                    self.vcpus[vcpuid].complete_read((1 << (8 * ex.size)) - 1)
        self.stats[vcpuid]["kernel_mmio_exits"] += 1

    def _halt(self, vcpuid: int) -> bool:
        """A vCPU executed hlt with nothing to wake it now. Wait for the next timer event (skip
        to it, with the instruction TSC) or an interrupt from elsewhere. False if it can never
        wake: interrupts off and nothing can change that."""
        vcpu = self.vcpus[vcpuid]
        interrupts_on = bool(vcpu.get_register("rflags") & RFLAGS_IF)
        if not interrupts_on:
            return False
        with self.lock:
            # Waiting in hlt: an interrupt entering its local APIC wakes it (_intr_raised).
            self._halted_waiting.add(vcpuid)
            try:
                return self._halt_wait(vcpuid)
            finally:
                self._halted_waiting.discard(vcpuid)

    def _halt_wait(self, vcpuid: int) -> bool:
        """_halt's waiting, the kernel lock held (released while it waits)."""
        vcpu = self.vcpus[vcpuid]
        while True:
            if self.vlapics[vcpuid].pending_vector() is not None or vcpu.pending_interrupts:
                return True
            if self.suspended is not None or self._paused[vcpuid]:
                return True  # the next run() returns the suspend or pause
            deadline = self._next_deadline(vcpuid)
            now = self.last_tsc[vcpuid] if self.tsc_mode == "instructions" else self.clock.now_ns()
            if deadline is not None and deadline - now > NEVER_NS:
                deadline = None  # a comparator left at its reset value, centuries away: no event
            if self.tsc_mode == "instructions":
                if deadline is None:
                    # Only an interrupt from another thread (a device, an IPI) can wake it.
                    self._wakeup.wait(HALT_POLL_S)
                    continue
                skip = deadline - now
                if skip > 0 and self.idle == "sleep":
                    skip = self._pace(vcpuid, now, skip)
                if skip > 0:
                    vcpu.tsc_offset = (vcpu.tsc_offset + skip) & ((1 << 64) - 1)
                    self.last_tsc[vcpuid] = vcpu.tsc
                    self.stats[vcpuid]["halt_skipped_ns"] += skip
                return True
            wait = HALT_POLL_S if deadline is None else max(0.0, (deadline - self.clock.now_ns()) / 1e9)
            if wait == 0.0:
                return True
            self._wakeup.wait(min(wait, HALT_POLL_S))
            if deadline is not None and self.clock.now_ns() >= deadline:
                return True

    def _pace(self, vcpuid: int, before: int, skip: int) -> int:
        """Idle mode "sleep": a halted vCPU at guest time ``before`` whose next timer event is
        ``skip`` ns on sleeps (the kernel lock held, so released while waiting) until the host's
        clock has caught up with that event, measured from this vCPU's anchor (a host time and
        the guest time it stands for). Returns how far guest time moves on:

        * all of ``skip`` when the sleep ran its course, or when a pause or suspend ended it
          (where skip mode would have put the guest, so where a pause lands changes nothing; the
          anchor is dropped, so the rest of the sleep is not owed after the resume);
        * when an interrupt for this vCPU from another thread (a device, an injection, another
          vCPU) ended it, the guest time the host has reached, at most ``skip``: the guest takes
          the interrupt when it came, as on hardware.

        With neither, a single-vCPU guest sees exactly what skip mode gives it. Wake-ups for
        anything else (another vCPU's interrupt, a throttle change) only make it look again.
        Lag of up to PACE_LAG_NS (the vCPU runs slower than its TSC counts) is made up by
        sleeping less; more than that (a long computation, a pause), or guest time ahead of the
        anchor (a restore set it), starts a new anchor."""
        vcpu, lapic = self.vcpus[vcpuid], self.vlapics[vcpuid]
        start = time.monotonic_ns()
        anchor = self._pace_anchor[vcpuid]
        if anchor is None or abs((before - anchor[1]) - (start - anchor[0])) > PACE_LAG_NS:
            anchor = self._pace_anchor[vcpuid] = (start, before)
        target = anchor[0] + (before + skip - anchor[1])
        try:
            while True:
                now = time.monotonic_ns()
                if self.suspended is not None or self._paused[vcpuid]:
                    self._pace_anchor[vcpuid] = None
                    return skip
                if lapic.pending_vector() is not None or vcpu.pending_interrupts:
                    return min(skip, max(0, anchor[1] + (now - anchor[0]) - before))
                if now >= target:
                    return skip
                # In slices, so a wake-up that were ever missed costs one slice at most.
                self._wakeup.wait(min((target - now) / 1e9, PACE_SLICE_S))
        finally:
            self.stats[vcpuid]["halt_slept_ns"] += time.monotonic_ns() - start

    def _intr_raised(self, vcpuid: int) -> None:
        """An interrupt entered vCPU ``vcpuid``'s local APIC (an IPI, a timer another vCPU's
        kernel work fired, the I/O APIC): if that vCPU waits in hlt, wake it to look."""
        if vcpuid in self._halted_waiting:
            self.kick()

    def kick(self, vcpuid: int | None = None) -> None:
        """Wake halted vCPUs to look for interrupts (after a device raised one)."""
        with self._wakeup:
            self._wakeup.notify_all()

    def raise_irq(self, irq: int, level: bool | None = None) -> None:
        """A userspace device's ISA interrupt line: True asserts, False deasserts, None pulses."""
        with self.lock:
            if level is None:
                self.isa_irq.pulse_irq(irq)
            elif level:
                self.isa_irq.assert_irq(irq)
            else:
                self.isa_irq.deassert_irq(irq)
        self.kick()

    def set_ioapic_pin(self, pin: int, level: bool) -> None:
        """Drive an I/O APIC pin directly (bhyve's VM_IOAPIC_ASSERT_IRQ/DEASSERT_IRQ): PCI INTx
        lines are routed to pins 16-23, which have no 8259 counterpart."""
        if not 16 <= pin < 24:
            raise vmm_error(errno.EINVAL, f"I/O APIC pin {pin}: PCI interrupt lines use pins 16-23")
        with self.lock:
            if level:
                self.vioapic.assert_irq(pin)
            else:
                self.vioapic.deassert_irq(pin)
        if level:
            self.kick()

    # -- suspend, pause
    def _ioctl_vm_suspend(self, arg: VmSuspend) -> None:
        with self.lock:
            if self.suspended is not None:
                raise vmm_error(errno.EALREADY, f"VM '{self.name}' is already suspended ({self.suspended.name.lower()})")
            self.suspended = SuspendHow(arg.how)
            for i, vcpu in enumerate(self.vcpus):
                if self._running[i]:
                    vcpu.request_pause()
        self.kick()

    def _ioctl_vm_reinit(self, arg: Any) -> None:
        with self.lock:
            if self.suspended is None or any(self._running):
                raise vmm_error(errno.EBUSY, f"VM '{self.name}' must be suspended with no vCPU running to reinit")
            self.suspended = None
            self._paused = [False] * self.ncpus
            self._at_deterministic_point = [True] * self.ncpus
            self.last_tsc = [0] * self.ncpus
            self._pace_anchor = [None] * self.ncpus
            self.started = [i == 0 for i in range(self.ncpus)]
            self._build_kernel_devices()
            if self.memory is not None:
                self._create_vcpus()

    def _ioctl_vm_pause_vcpus(self, arg: VmCpuset) -> None:
        self._check_vcpu(arg.vcpuid, allow_all=True)
        with self.lock:
            for i in self._vcpu_ids(arg.vcpuid):
                self._paused[i] = True
                # A vCPU not in VM_RUN sees the flag when it enters; only a running one needs
                # stopping (a request left pending would stop its next run for nothing).
                if self._running[i]:
                    self.vcpus[i].request_pause()
        self.kick()

    def _ioctl_vm_resume_vcpus(self, arg: VmCpuset) -> None:
        self._check_vcpu(arg.vcpuid, allow_all=True)
        with self.lock:
            for i in self._vcpu_ids(arg.vcpuid):
                self._paused[i] = False
        self.kick()

    def notify_vcpus(self) -> None:
        """Make running vCPUs return from VM_RUN so userspace sees a changed setting (bhyve's
        vcpu_notify_event); they come back as ``paused`` exits and simply run again."""
        with self.lock:
            for i, running in enumerate(self._running):
                if running:
                    self.vcpus[i].request_pause()
        self.kick()

    def vcpu_running(self, vcpuid: int) -> bool:
        with self.lock:
            return self._running[vcpuid]

    def vcpu_paused(self, vcpuid: int) -> bool:
        with self.lock:
            return self._paused[vcpuid]

    # -- stats, dirty pages
    def _ioctl_vm_get_stats(self, arg: VmStats) -> dict[str, int]:
        self._check_vcpu(arg.vcpuid)
        stats = dict(self.stats[arg.vcpuid])
        if not self.vcpu_running(arg.vcpuid):
            stats["instructions_retired"] = self.vcpus[arg.vcpuid].instructions_retired
            stats["tsc"] = self.vcpus[arg.vcpuid].tsc
        arg.stats = stats
        return stats

    def _ioctl_vm_get_dirty_page_list(self, arg: VmDirtyPageList) -> Any:
        if self.memory is None:
            raise vmm_error(errno.EINVAL, f"VM '{self.name}' has no memory")
        arg.pfns = self.memory.get_and_clear_dirty()
        return arg.pfns

    # -- snapshot
    _KERNEL_STRUCTS = {
        SnapshotReq.STRUCT_VIOAPIC: "vioapic",
        SnapshotReq.STRUCT_VHPET: "vhpet",
        SnapshotReq.STRUCT_VATPIC: "vatpic",
        SnapshotReq.STRUCT_VATPIT: "vatpit",
        SnapshotReq.STRUCT_VPMTMR: "vpmtmr",
        SnapshotReq.STRUCT_VRTC: "vrtc",
    }

    def _require_stopped(self, what: str) -> None:
        if any(self._running):
            busy = [i for i, r in enumerate(self._running) if r]
            raise vmm_error(errno.EBUSY, f"{what}: vcpu {busy[0]} of VM '{self.name}' is running; pause the vCPUs first")

    def _ioctl_vm_snapshot_req(self, arg: VmSnapshotMeta) -> Any:
        with self.lock:
            self._require_stopped(f"VM_SNAPSHOT_REQ {SnapshotReq(arg.req).name}")
            req = SnapshotReq(arg.req)
            if arg.op == SnapshotOp.SAVE:
                arg.data = self._snapshot_save(req)
                return arg.data
            self._snapshot_restore(req, arg.data)
            return None

    def _snapshot_save(self, req: SnapshotReq) -> Any:
        if req == SnapshotReq.STRUCT_VM:
            return VmState(
                ncpus=self.ncpus,
                vendor=self.vendor,
                tsc_mode=self.tsc_mode,
                last_tsc=list(self.last_tsc),
                host_tsc_offset=self.host_tsc_offset,
                at_deterministic_point=list(self._at_deterministic_point),
                started=list(self.started),
                guest_time_ns=self.clock.now_ns(),
                accel=self.accel,
            )
        if req == SnapshotReq.STRUCT_KVM:
            if self.accel != "kvm":
                return KvmState([], None)
            return KvmState([KvmVcpuState(**vcpu.save_state()) for vcpu in self.vcpus],
                            KvmChipsState(**_core.kvm_save_vm(self.memory.core)))
        if req == SnapshotReq.STRUCT_VMCX:
            if self.accel == "kvm":
                return VcpusState([])  # KVM's vCPUs are in the kvm section
            return VcpusState([VcpuState.from_core(vcpu.save_state()) for vcpu in self.vcpus])
        if req == SnapshotReq.STRUCT_VLAPIC:
            return VlapicsState([lapic.save() for lapic in self.vlapics])
        return getattr(self, self._KERNEL_STRUCTS[req]).save()

    def _snapshot_restore(self, req: SnapshotReq, data: Any) -> None:
        try:
            if req == SnapshotReq.STRUCT_VM:
                data.validate()
                if data.accel != self.accel:
                    raise ValueError(f"vm: the guest was saved on the {data.accel} vCPU backend (--accel {data.accel}); this VM runs "
                                     f"--accel {self.accel}, and a guest's CPU state cannot change backend")
                if (data.ncpus, data.vendor, data.tsc_mode) != (self.ncpus, self.vendor, self.tsc_mode):
                    raise ValueError(
                        f"vm: saved for {data.ncpus} vCPUs, vendor {data.vendor}, TSC {data.tsc_mode}; "
                        f"this VM has {self.ncpus}, {self.vendor}, {self.tsc_mode}"
                    )
                self.last_tsc = list(data.last_tsc)
                self._pace_anchor = [None] * self.ncpus
                self.host_tsc_offset = data.host_tsc_offset
                self._at_deterministic_point = list(data.at_deterministic_point)
                self.started = list(data.started)
                self._saved_guest_time_ns = data.guest_time_ns
            elif req == SnapshotReq.STRUCT_KVM:
                self._restore_kvm(data)
            elif req == SnapshotReq.STRUCT_VMCX and self.accel == "kvm":
                if data.vcpus:
                    raise ValueError(f"vmcx: {len(data.vcpus)} simulated vCPU states for a KVM guest (its vCPUs are in the kvm section)")
            elif req == SnapshotReq.STRUCT_VMCX:
                if len(data.vcpus) != self.ncpus:
                    raise ValueError(f"vmcx: {len(data.vcpus)} vCPU states for a VM of {self.ncpus}")
                for vcpu, state in zip(self.vcpus, data.vcpus):
                    vcpu.restore_state(state.to_core())
            elif req == SnapshotReq.STRUCT_VLAPIC:
                if len(data.vcpus) != self.ncpus:
                    raise ValueError(f"vlapic: {len(data.vcpus)} local APIC states for a VM of {self.ncpus}")
                for lapic, state in zip(self.vlapics, data.vcpus):
                    lapic.restore(state)
            else:
                getattr(self, self._KERNEL_STRUCTS[req]).restore(data)
        except (AttributeError, KeyError, TypeError, ValueError) as err:
            raise vmm_error(errno.EINVAL, f"VM_SNAPSHOT_REQ restore of {req.name}: {err}") from None

    def _restore_kvm(self, data: KvmState) -> None:
        if self.accel != "kvm":
            if data.vcpus or data.chips is not None:
                raise ValueError("kvm: KVM vCPU state for a VM on the simulated vCPU (--accel sim)")
            return
        if len(data.vcpus) != self.ncpus or data.chips is None:
            raise ValueError(f"kvm: {len(data.vcpus)} KVM vCPU states{'' if data.chips else ' and no interrupt controllers'} "
                             f"for a KVM guest of {self.ncpus} vCPUs")
        _core.kvm_restore_vm(self.memory.core, dataclasses.asdict(data.chips))
        for i, (vcpu, state) in enumerate(zip(self.vcpus, data.vcpus, strict=True)):
            if not vcpu.restore_state(dataclasses.asdict(state)):
                # This host's KVM cannot offset the TSC (docs/kvm.md): the guest sees the host's.
                self.stats[i]["tsc_not_continuous"] += 1

    def _ioctl_vm_restore_time(self, arg: VmRestoreTime) -> None:
        """After a restore, make the guest clock continue from the saved value (host TSC mode):
        it neither runs backwards nor jumps by the time the VM spent suspended."""
        with self.lock:
            self._require_stopped("VM_RESTORE_TIME")
            if self.tsc_mode != "host":
                return  # the instruction TSC restores exactly with the vCPU state
            saved = getattr(self, "_saved_guest_time_ns", None)
            if saved is None:
                raise vmm_error(errno.EINVAL, "VM_RESTORE_TIME without a restored 'vm' struct")
            self.host_tsc_offset = (saved - time.monotonic_ns()) & ((1 << 64) - 1)
            for vcpu in self.vcpus:
                vcpu.tsc_offset = self.host_tsc_offset

    def __repr__(self) -> str:
        memsize = self.memory.memsize if self.memory is not None else 0
        return f"<Vm {self.name} ncpus={self.ncpus} memsize={memsize} vendor={self.vendor} tsc={self.tsc_mode}>"
