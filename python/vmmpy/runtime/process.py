"""The bhyve process: a VM built from a :class:`VmConfig`, one thread per vCPU, userspace exits
dispatched to device models, and the control socket.

A vCPU thread loops on VM_RUN. Exits the kernel hands back go to the userspace devices: the
LPC UARTs, power management and the PCI configuration ports by fixed port, then PCI functions
by their BARs as the guest has them programmed (I/O BARs for port exits, memory BARs in the
3-4 GiB hole for MMIO exits); a halted-forever
vCPU halts the VM; a fault stops it as bhyve stops on a triple fault. A pause parks the thread
until resumed, which is how checkpoints and migrations stop the guest (bhyve's
``vm_vcpu_pause`` rendezvous).

Lazily restored memory that cannot be loaded and checked (``LazyMemoryError``: a damaged or
truncated checkpoint) stops the guest with exit status 4 and the error as the reason, whoever
finds it: the vCPU that needed it, a device's DMA on a vCPU thread, or any other thread (a
checkpoint, a migration, a view), which the memory reports through a pipe a watcher thread reads.

Exit status follows bhyve(8): 0 reset, 1 powered off, 2 halted, 3 triple fault, 4 error.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..devices.base import PortBus
from ..devices.lpc import make_uarts
from ..devices.pci import PciBus, PciConfigError, PciFunction, PciHost
from ..devices.pm import PowerManagement
from ..devices.registry import PCI_EMULATIONS, device_sections
from ..devices.uart import ConsoleBackend
from ..memory import LazyMemoryError
from ..vmm.ioctl import ALL_VCPUS, Ioctl, SuspendHow, VmCpuset, VmRun, VmStats, VmSuspend, vmm_error
from ..vmm.vm import Vm, vm_create, vm_destroy
from .config import ConfigError, VmConfig
from .control import ControlServer

log = logging.getLogger(__name__)

EXIT_RESET, EXIT_POWEROFF, EXIT_HALT, EXIT_TRIPLEFAULT, EXIT_ERROR = 0, 1, 2, 3, 4
_STATUS_OF = {
    SuspendHow.RESET: EXIT_RESET,
    SuspendHow.POWEROFF: EXIT_POWEROFF,
    SuspendHow.HALT: EXIT_HALT,
    SuspendHow.TRIPLEFAULT: EXIT_TRIPLEFAULT,
}
EXIT_NAMES = {EXIT_RESET: "reset", EXIT_POWEROFF: "powered off", EXIT_HALT: "halted", EXIT_TRIPLEFAULT: "triple fault", EXIT_ERROR: "error"}

#: Emulations ``-s`` accepts: every complete PCI device model.
SLOT_EMULATIONS = tuple(PCI_EMULATIONS)

#: Instructions per VM_RUN while throttled: short enough that sleeps between them are smooth.
THROTTLE_SLICE = 1 << 18

#: Where guest programs are loaded and their stack starts (docs/guests.md).
GUEST_LOAD_ADDRESS = 0x100000


class Machine:
    """A configured guest and the threads that run it."""

    def __init__(self, config: VmConfig, *, consoles: dict[str, ConsoleBackend] | None = None) -> None:
        config.validate()
        for slot in config.slots:
            if slot.emulation not in SLOT_EMULATIONS:
                raise ConfigError(
                    f"-s {slot.slot},{slot.emulation}: unknown emulation '{slot.emulation}' "
                    f"(this vmmpy has: {', '.join(SLOT_EMULATIONS)})"
                )
        self.config = config
        self.pci = PciBus(self._set_ioapic_pin)
        self.pci_functions = self._build_pci_functions(config)
        try:
            self.vm: Vm = vm_create(config.name, ncpus=config.ncpus, vendor=config.vendor, tsc=config.tsc, accel=config.accel,
                                     idle=config.idle)
        except OSError as err:
            for function in self.pci_functions:
                function.close()
            if err.errno == errno.ENODEV:
                raise ConfigError(f"--accel {config.accel}: {err.strerror}") from None
            raise
        except BaseException:
            for function in self.pci_functions:
                function.close()
            raise
        self.ports = PortBus()
        self.uarts = make_uarts(config.lpc, self.vm.raise_irq, consoles)
        self.pm = PowerManagement(self.suspend)
        for device in (*self.uarts, self.pm, self.pci):
            self.ports.register(device)
        for function in self.pci_functions:
            if consoles and function.name in consoles and hasattr(function, "backend"):
                function.backend = consoles[function.name]
        self.devices = [*self.uarts, self.pm, self.pci, *self.pci_functions]
        self._threads: list[threading.Thread] = []
        self._parked = [False] * config.ncpus
        self._quiesced = False  # pause() quiesced the devices; resume() ends it
        self._halted: set[int] = set()
        self._cond = threading.Condition()
        self._exit_status: int | None = None
        self._exit_reason = ""
        self._control: ControlServer | None = None
        self._extra_handlers: dict[str, Callable[..., Any]] = {}
        self._memory_watch: int | None = None  # write end of the lazy-failure pipe
        #: After a lazy restore: what loads ahead and is recorded once the vCPUs start
        #: (``snapshot.checkpoint.LazyLoading``); None otherwise.
        self.lazy_loading: Any = None
        self.started_at: float | None = None
        self.throttle = 0.0
        #: Pause every vCPU once vCPU 0 has retired this many instructions (``--pause-at``).
        self.pause_at: int | None = None

    # ---- construction -------------------------------------------------------------------
    def _set_ioapic_pin(self, pin: int, level: bool) -> None:
        self.vm.set_ioapic_pin(pin, level)

    def _guest_memory(self) -> Any:
        return self.vm.memory

    def _build_pci_functions(self, config: VmConfig) -> list[PciFunction]:
        """Every ``-s`` device, placed and given BAR addresses; a bad option is a ConfigError
        naming the slot, with nothing left open."""
        host = PciHost(self._guest_memory, self._set_ioapic_pin)
        functions: list[PciFunction] = []
        try:
            for slot in config.slots:
                cls = PCI_EMULATIONS[slot.emulation]
                where = f"-s {slot.bus}:{slot.slot}:{slot.func},{slot.emulation}{',' + slot.conf if slot.conf else ''}"
                try:
                    function = cls(host, slot.bus, slot.slot, slot.func, slot.conf)
                except PciConfigError as err:
                    raise ConfigError(f"{where}: {err} (it takes: {cls.OPTIONS_HELP})") from None
                functions.append(function)
                self.pci.add(function)
            try:
                self.pci.finish()
            except PciConfigError as err:
                raise ConfigError(f"-s: {err}") from None
        except BaseException:
            for function in functions:
                function.close()
            raise
        functions.sort(key=lambda f: (f.bus_number, f.slot, f.func))
        return functions

    def device_sections(self) -> dict[str, int]:
        """Section name -> version of every device this machine has (as the registry plans)."""
        return device_sections([f.name for f in self.pci_functions])

    def devices_restored(self) -> None:
        """After every device section is loaded: shared PCI interrupt lines follow the
        functions' restored levels (the I/O APIC restored its pins from its own section)."""
        self.pci.resync_pins()

    def setup_memory(self) -> None:
        self.vm.setup_memory(self.config.memsize, wired=self.config.wired, dirty_tracking=self.config.dirty_tracking,
                             backing=self.config.memory_backing)

    def load_program(self, program: Any) -> None:
        """Load an assembled guest program and point the BSP at its ``start``."""
        if "start" not in program.symbols:
            raise ConfigError("guest program has no 'start' label to begin at")
        self.vm.memory.write(program.origin, program.code)
        if self.config.accel == "kvm":
            # Real x86-64 code: the VMM builds page tables and a GDT and enters long mode.
            self.vm.vcpus[0].enter_long_mode(self.vm.memory.core, program.symbols["start"], GUEST_LOAD_ADDRESS)
            return
        self.vm.vcpus[0].set_register("rip", program.symbols["start"])
        self.vm.vcpus[0].set_register("rsp", GUEST_LOAD_ADDRESS)

    # ---- running -------------------------------------------------------------------------
    def serve(self, control_dir: Path | None = None) -> None:
        """Open the control socket (before the vCPUs start, so a VM waiting for an incoming
        migration already answers vmmctl)."""
        self._control = ControlServer(self.config.name, self.control_handlers(), directory=control_dir)
        self._control.start()

    def start_vcpus(self) -> None:
        """Start the vCPU threads; called again after it failed (a thread that could not be had, a
        pipe for the lazy memory's watcher), it starts what was not started yet."""
        if self.started_at is None:  # set once everything before the threads has started
            self._watch_lazy_memory()
            if self.lazy_loading is not None:
                self.lazy_loading.start()
            self.started_at = time.monotonic()
        for i in range(len(self._threads), self.config.ncpus):
            thread = threading.Thread(target=self._vcpu_loop, args=(i,), name=f"{self.config.name}/vcpu{i}", daemon=True)
            thread.start()  # RuntimeError when no thread can be had: this one is not counted as started
            self._threads.append(thread)

    def start(self, *, control_dir: Path | None = None, serve_control: bool = True) -> None:
        if serve_control:
            self.serve(control_dir)
        self.start_vcpus()

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the guest to stop; its bhyve exit status, or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                return None
        return self._exit_status

    @property
    def exit_status(self) -> int | None:
        return self._exit_status

    @property
    def exit_reason(self) -> str:
        return self._exit_reason

    def suspend(self, how: SuspendHow) -> None:
        """Stop the guest for good (power off, reset, halt, triple fault)."""
        try:
            self.vm.ioctl(Ioctl.VM_SUSPEND, VmSuspend(how))
        except OSError as err:
            if err.errno != errno.EALREADY:
                raise
        with self._cond:
            self._cond.notify_all()

    def finish(self, status: int, reason: str) -> None:
        """Stop the guest for good with this exit status: it was suspended to a file or
        migrated away (bhyve exits 0 then), or a migration into it failed."""
        with self._cond:
            if self._exit_status is None:
                self._exit_status = status
                self._exit_reason = reason
        self.suspend(SuspendHow.POWEROFF)

    def _fail(self, vcpuid: int, reason: str, status: int = EXIT_ERROR) -> None:
        self._stop(f"vcpu {vcpuid}: {reason}", status)

    def _stop(self, reason: str, status: int = EXIT_ERROR) -> None:
        with self._cond:
            if self._exit_status is None:
                self._exit_status = status
                self._exit_reason = reason
        log.error("%s", reason)
        self.suspend(SuspendHow.TRIPLEFAULT if status == EXIT_TRIPLEFAULT else SuspendHow.HALT)

    def _memory_unavailable(self, err: LazyMemoryError) -> None:
        """Lazily restored memory the guest needs cannot be had: it must not run on."""
        self._stop(f"guest stopped: {err.strerror or err}")

    def _watch_lazy_memory(self) -> None:
        """For lazily restored memory not loaded whole: a thread that stops the guest as soon as
        any thread finds a chunk that cannot be loaded (the memory writes to a pipe)."""
        memory = self.vm.memory
        if memory is None or not memory.lazy or self._memory_watch is not None:
            return
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        memory.notify_lazy_failure(write_end)
        self._memory_watch = write_end

        def watch() -> None:
            try:
                os.read(read_end, 1)
            finally:
                os.close(read_end)
            with self._cond:
                ending = self._memory_watch is None
            if ending:
                return  # woken by shutdown: the vm may be destroyed, there is no guest left to stop
            failure = memory.lazy_failure
            if failure is not None:
                self._stop(f"guest stopped: {failure}")

        threading.Thread(target=watch, name="lazy-memory-watch", daemon=True).start()

    def set_throttle(self, fraction: float) -> None:
        """Let the vCPUs run only ``1 - fraction`` of the time (auto-converge); 0 is full speed."""
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"throttle {fraction} must be in [0, 1)")
        changed = fraction != self.throttle
        self.throttle = fraction
        if changed:
            self.vm.notify_vcpus()  # a VM_RUN in progress would not see it until its next exit

    def _vcpu_loop(self, vcpuid: int) -> None:
        vm = self.vm
        try:
            while True:
                throttle = self.throttle
                if throttle:
                    # Run a short slice, then sleep so that running is 1 - throttle of the time.
                    t0 = time.monotonic()
                    ex = vm.ioctl(Ioctl.VM_RUN, VmRun(vcpuid, THROTTLE_SLICE))
                    ran = time.monotonic() - t0
                    time.sleep(min(ran * throttle / (1.0 - throttle), 0.1))
                    if ex.kind == "budget":
                        continue
                elif vcpuid == 0 and self.pause_at is not None:
                    left = self.pause_at - vm.vcpus[0].instructions_retired
                    if left <= 0:
                        self.pause_at = None
                        vm.ioctl(Ioctl.VM_PAUSE_VCPUS, VmCpuset(ALL_VCPUS))
                        continue
                    ex = vm.ioctl(Ioctl.VM_RUN, VmRun(vcpuid, left))
                    if ex.kind == "budget":
                        continue
                else:
                    ex = vm.ioctl(Ioctl.VM_RUN, VmRun(vcpuid))
                kind = ex.kind
                if kind == "suspended":
                    with self._cond:
                        if self._exit_status is None:
                            self._exit_status = _STATUS_OF[ex.how]
                            self._exit_reason = EXIT_NAMES[self._exit_status]
                    return
                if kind == "paused":
                    self._park(vcpuid)
                elif kind == "waiting":
                    continue  # an AP before its STARTUP IPI: VM_RUN waited a little; ask again
                elif kind == "inout":
                    self._handle_inout(vcpuid, ex.exit)
                elif kind == "mmio":
                    self._handle_mmio(vcpuid, ex.exit)
                elif kind == "hlt":
                    self._halted_forever(vcpuid)
                elif kind == "fault":
                    e = ex.exit
                    self._fail(vcpuid, f"guest fault {e.fault} at rip {e.rip:#x}", EXIT_TRIPLEFAULT)
        except LazyMemoryError as err:  # the vCPU or a device's DMA needed a chunk that is bad
            self._memory_unavailable(err)
        except Exception as err:  # a bug in a device model must stop the VM, not hang it
            log.exception("vcpu %d loop failed", vcpuid)
            self._fail(vcpuid, f"internal error: {type(err).__name__}: {err}")

    def _handle_mmio(self, vcpuid: int, e: Any) -> None:
        device = self.pci.mmio_owner(e.gpa)
        if device is None:
            self._fail(vcpuid, f"unhandled MMIO {'write' if e.is_write else 'read'} of {e.size} bytes at gpa {e.gpa:#x} (rip {e.rip:#x})")
            return
        if e.is_write:
            device.mmio_write(e.gpa, e.size, e.value)
        else:
            self.vm.complete_read(vcpuid, device.mmio_read(e.gpa, e.size))

    def _halted_forever(self, vcpuid: int) -> None:
        """``cli; hlt``: this vCPU can never wake. The VM halts when every started vCPU has, as
        bhyve's vm_handle_hlt does; until then this thread waits for the end."""
        with self._cond:
            self._halted.add(vcpuid)
            everyone = all(i in self._halted for i in range(self.config.ncpus) if self.vm.started[i])
        if everyone:
            self.suspend(SuspendHow.HALT)
            return
        with self._cond:
            while self.vm.suspended is None:
                self._cond.wait(0.1)

    def _handle_inout(self, vcpuid: int, e: Any) -> None:
        device = self.ports.lookup(e.port) or self.pci.io_owner(e.port)
        if device is None:
            self._fail(vcpuid, f"unhandled {'in' if e.is_in else 'out'}{e.size * 8} port {e.port:#x} (rip {e.rip:#x})")
            return
        if e.is_in:
            self.vm.complete_read(vcpuid, device.io_read(e.port, e.size))
        else:
            device.io_write(e.port, e.size, e.value)

    def _park(self, vcpuid: int) -> None:
        with self._cond:
            self._parked[vcpuid] = True
            self._cond.notify_all()
            while self.vm.vcpu_paused(vcpuid) and self.vm.suspended is None:
                self._cond.wait(0.1)
            self._parked[vcpuid] = False
            self._cond.notify_all()

    # ---- pause / resume (bhyve's vm_vcpu_pause rendezvous) ---------------------------------
    def pause(self, timeout: float = 10.0) -> float:
        """Stop every vCPU at an instruction boundary, wait until each has parked, and quiesce
        the devices (once per pause); returns how long it took (seconds). A guest that stopped
        itself at ``pause_at`` is paused but neither parked nor quiesced: pausing it again
        completes that."""
        t0 = time.monotonic()
        if self._exit_status is not None or self.vm.suspended is not None:
            raise vmm_error(errno.EINVAL, f"VM '{self.config.name}' has stopped ({self._exit_reason or 'suspended'}); there is nothing to pause")
        self.vm.ioctl(Ioctl.VM_PAUSE_VCPUS, VmCpuset(ALL_VCPUS))
        if not self.wait_parked(timeout):
            self.vm.ioctl(Ioctl.VM_RESUME_VCPUS, VmCpuset(ALL_VCPUS))
            raise vmm_error(errno.ETIMEDOUT, f"vCPUs of '{self.config.name}' did not stop within {timeout} s")
        if not self._quiesced:
            for device in self.devices:
                device.pause()
            self._quiesced = True
        return time.monotonic() - t0

    def _all_parked(self) -> bool:
        """Whether every vCPU is stopped at the pause rendezvous (``_cond`` held). A vCPU whose
        thread has not started (a control request can come between serving the socket and
        ``start_vcpus``) is stopped too: it sees the pause when it starts."""
        return all(self._parked[i] or i in self._halted or i >= len(self._threads) or not self._threads[i].is_alive()
                   for i in range(self.config.ncpus))

    def wait_parked(self, timeout: float) -> bool:
        """Wait until the vCPU threads of a paused machine have all parked; whether they did
        within ``timeout`` seconds. Unlike ``pause`` it changes nothing, even when they did not."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._all_parked():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def resume(self) -> None:
        self._quiesced = False
        for device in self.devices:
            device.resume()
        self.vm.ioctl(Ioctl.VM_RESUME_VCPUS, VmCpuset(ALL_VCPUS))
        with self._cond:
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return any(self.vm.vcpu_paused(i) for i in range(self.config.ncpus))

    # ---- teardown ------------------------------------------------------------------------
    def destroy(self) -> None:
        self.suspend(SuspendHow.POWEROFF)
        with self._cond:
            if self._exit_status is None:
                self._exit_status = EXIT_POWEROFF
                self._exit_reason = "destroyed"
        self.wait(10)
        self.close()

    def close(self) -> None:
        # May run in two threads at once (a destroy request's teardown and vmmrun's main thread):
        # both close the control server (it is safe to), so whichever ends the process has
        # removed the socket first.
        control = self._control
        if control is not None:
            control.close()
            self._control = None
        with self._cond:
            watch, self._memory_watch = self._memory_watch, None
        if watch is not None:
            try:
                os.write(watch, b"c")  # wake the watcher: it finds no failure and ends
            except BrokenPipeError:
                pass  # it has ended already
            os.close(watch)
        if self.lazy_loading is not None:
            self.lazy_loading.finish()
        for device in self.devices:
            device.close()
        try:
            vm_destroy(self.config.name)
        except OSError:
            pass

    def release_memory(self) -> bool:
        """After ``close``: unmap guest memory now. The machine, its VM and devices hold each
        other in cycles that only the cycle collector would free, so the mapping (gigabytes,
        perhaps) would outlive ``close`` by an unknown time. Not while a vCPU thread still runs
        (it would find its memory gone); a numpy view or memoryview over the memory keeps it
        until the view goes. False if a vCPU thread runs. (``close`` leaves the memory readable:
        tests and tools read a stopped guest's memory after closing its machine.)"""
        if any(thread.is_alive() for thread in self._threads):
            return False
        memory = self.vm.release_memory()
        if memory is not None:
            try:
                memory.close()
            except BufferError:
                pass  # a view over it is alive: the memory goes with the last of them
        return True

    # ---- the control socket ----------------------------------------------------------------
    def add_control_handler(self, name: str, handler: Callable[[dict[str, Any], Callable[[dict[str, Any]], None]], Any]) -> None:
        """Serve another control command (``commands`` adds checkpoint and migration, which hand
        this machine to snapshot/ and migration/), or wrap a built-in one (``commands`` refuses
        ``resume`` while a migration is in doubt)."""
        self._extra_handlers[name] = handler

    def control_handlers(self) -> dict[str, Callable[[dict[str, Any], Callable[[dict[str, Any]], None]], Any]]:
        return {
            "status": lambda req, progress: self.status(),
            "stats": lambda req, progress: self.statistics(),
            "registers": lambda req, progress: self.registers(),
            "pause": lambda req, progress: {"paused": True, "seconds": round(self.pause(), 6)},
            "resume": lambda req, progress: (self.resume(), {"paused": False})[1],
            "destroy": lambda req, progress: self._destroy_from_control(),
            **self._extra_handlers,
        }

    def _destroy_from_control(self) -> dict[str, Any]:
        # Answer first, then tear down: the control server thread must not join itself.
        threading.Thread(target=self.destroy, daemon=True).start()
        return {"destroyed": self.config.name}

    def status(self) -> dict[str, Any]:
        c = self.config
        state = "stopped" if self._exit_status is not None else ("paused" if self.paused else "running")
        return {
            "name": c.name,
            "state": state,
            "ncpus": c.ncpus,
            "memsize": c.memsize,
            "wired": c.wired,
            "vendor": c.vendor,
            "tsc": c.tsc,
            "idle": c.idle,
            "dirty_tracking": self.vm.memory.dirty_tracking if self.vm.memory else None,
            **({"wiring": self.vm.memory.wiring()} if self.vm.memory and c.wired else {}),
            "uptime_s": round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            **({"restore": self.lazy_loading.status()} if self.lazy_loading is not None else {}),
        }

    def statistics(self) -> dict[str, Any]:
        vcpus = {}
        for i in range(self.config.ncpus):
            vcpus[str(i)] = self.vm.ioctl(Ioctl.VM_GET_STATS, VmStats(i))
        memory = self.vm.memory
        return {
            "vcpus": vcpus,
            "vm": {
                "resident_bytes": memory.resident_pages() * 4096 if memory else 0,
                "dirty_pages": memory.dirty_count() if memory else 0,
            },
        }

    def registers(self) -> dict[str, dict[str, int]]:
        if not self.paused:
            raise vmm_error(errno.EBUSY, f"VM '{self.config.name}' is running: pause it first (vmmctl --pause) to read registers")
        return {str(i): dict(self.vm.vcpus[i].registers()) for i in range(self.config.ncpus)}
