//! One KVM vCPU: created on a [`KvmVm`], entered directly in 64-bit long mode (identity page
//! tables, a flat GDT and the control registers set by the VMM, as Firecracker boots a kernel),
//! run until an exit userspace must handle, stopped from any thread.
//!
//! Stopping a running vCPU is KVM's usual pair: set `immediate_exit` in the shared `kvm_run` area
//! (which makes a KVM_RUN about to start return at once) and signal the thread inside KVM_RUN
//! (which makes one in progress return with EINTR). The signal has an empty handler.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, TryLockError};

use kvm_bindings::{kvm_run, kvm_segment, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::vm::{KvmError, KvmVm, EXIT_DIRTY_RING_FULL};
use crate::memory::{GuestAddress, GuestMemory, HIGHMEM_BASE};

/// Where the VMM puts the boot structures in low guest memory (below the programs' stack, which
/// ends at 1 MiB): the GDT, then the page tables (PML4, one PDPT, one page directory per GiB).
pub const GDT_ADDRESS: u64 = 0x500;
pub const PML4_ADDRESS: u64 = 0x1000;
const PDPT_ADDRESS: u64 = 0x2000;
const PD_ADDRESS: u64 = 0x3000;
/// The page directories must end below this (the programs' stack starts here, docs/guests.md).
const BOOT_AREA_END: u64 = 0xF0000;

const GIB: u64 = 1 << 30;
/// The real-time signal that kicks a vCPU thread out of KVM_RUN (SIGRTMIN + this).
const KICK_SIGNAL_OFFSET: i32 = 2;

/// Why a KVM vCPU stopped running, as bhyve's `struct vm_exit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmExit {
    /// An `in` or `out`: `value` is what was written (out).
    Inout { port: u16, size: u8, is_in: bool, value: u32, rip: u64 },
    /// A load or store to a guest-physical address no memory slot backs.
    Mmio { gpa: u64, size: u8, is_write: bool, value: u64, rip: u64 },
    /// `hlt` (only seen without the in-kernel irqchip; KVM waits for interrupts itself).
    Hlt { rip: u64 },
    /// Someone asked the vCPU to stop ([`KvmVcpu::request_pause`]).
    PauseRequested,
    /// The guest cannot go on: `kind` is "triple_fault" (KVM_EXIT_SHUTDOWN), "entry_failed",
    /// "kvm_internal_error", "memory_fault" or "unhandled_exit"; `detail` says more.
    Fault { kind: &'static str, detail: String, rip: u64 },
}

/// A read the guest is waiting for: the next run gives it the value `complete_read` stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingRead {
    Port { port: u16, size: u8 },
    Mmio { gpa: u64, size: u8 },
}

pub(super) struct VcpuInner {
    pub(super) fd: VcpuFd,
    pending: Option<PendingRead>,
}

pub struct KvmVcpu {
    id: u32,
    pub(super) vm: Arc<KvmVm>,
    inner: Mutex<VcpuInner>,
    /// The `kvm_run` area (mapped for the vCPU's life), for `immediate_exit` from other threads.
    run_area: *mut kvm_run,
    pause: AtomicBool,
    /// The pthread inside `run`, 0 when none.
    thread: AtomicU64,
}

// SAFETY: `run_area` points into the vCPU's kvm_run mapping, which lives as long as the VcpuFd
// inside `inner`; other threads only write its `immediate_exit` byte, which KVM defines for that.
unsafe impl Send for KvmVcpu {}
unsafe impl Sync for KvmVcpu {}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // Keep what its ring still holds, and unmap the ring before the vCPU's file closes.
        if let Some(rings) = &self.vm.rings {
            rings.remove_vcpu(self.id, &self.vm.vm);
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn kick_signal() -> i32 {
    static REGISTER: Once = Once::new();
    let signal = SIGRTMIN() + KICK_SIGNAL_OFFSET;
    REGISTER.call_once(|| {
        // A failure leaves kicks to `immediate_exit` alone (a vCPU in KVM_RUN then stops at its
        // next exit): never unsafe, only slower.
        let _ = register_signal_handler(signal, kick_handler);
    });
    signal
}

fn ioctl_failed(id: u32, what: &str, err: kvm_ioctls::Error) -> KvmError {
    KvmError(format!("vcpu {id}: {what} failed: {err}"))
}

fn little_endian(data: &[u8]) -> u64 {
    data.iter().rev().fold(0u64, |acc, &b| (acc << 8) | b as u64)
}

impl KvmVcpu {
    /// vCPU `id` of `vm`, with the CPUID KVM supports on this host (its APIC ID set to `id`).
    pub fn new(vm: Arc<KvmVm>, id: u32) -> Result<KvmVcpu, KvmError> {
        let mut fd = vm.vm.create_vcpu(id as u64).map_err(|e| ioctl_failed(id, "KVM_CREATE_VCPU", e))?;
        let mut cpuid = vm.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|e| ioctl_failed(id, "KVM_GET_SUPPORTED_CPUID", e))?;
        for entry in cpuid.as_mut_slice() {
            if entry.function == 1 {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | (id << 24);
            }
        }
        fd.set_cpuid2(&cpuid).map_err(|e| ioctl_failed(id, "KVM_SET_CPUID2", e))?;
        if let Some(rings) = &vm.rings {
            rings.add_vcpu(id, &fd)?;
        }
        let run_area = fd.get_kvm_run() as *mut kvm_run;
        kick_signal();
        Ok(KvmVcpu {
            id,
            vm,
            inner: Mutex::new(VcpuInner { fd, pending: None }),
            run_area,
            pause: AtomicBool::new(false),
            thread: AtomicU64::new(0),
        })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// The vCPU's file and pending read, or None while `run` holds them.
    pub(super) fn lock(&self) -> Option<MutexGuard<'_, VcpuInner>> {
        match self.inner.try_lock() {
            Ok(guard) => Some(guard),
            Err(TryLockError::WouldBlock) => None,
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        }
    }

    fn busy(&self) -> KvmError {
        KvmError(format!("vcpu {} is running", self.id))
    }

    /// Run until an exit userspace must handle. Blocks (call it with the GIL released).
    pub fn run(&self) -> Result<KvmExit, KvmError> {
        let mut inner = self.inner.try_lock().map_err(|_| self.busy())?;
        // SAFETY: pthread_self has no preconditions.
        self.thread.store(unsafe { libc::pthread_self() } as u64, Ordering::SeqCst);
        let result = self.run_locked(&mut inner);
        self.thread.store(0, Ordering::SeqCst);
        result
    }

    fn set_immediate_exit(&self, value: u8) {
        // SAFETY: the kvm_run area is mapped for the vCPU's life; KVM reads this byte at entry.
        unsafe { std::ptr::addr_of_mut!((*self.run_area).immediate_exit).write_volatile(value) };
    }

    fn run_locked(&self, inner: &mut VcpuInner) -> Result<KvmExit, KvmError> {
        let id = self.id;
        loop {
            if self.pause.swap(false, Ordering::SeqCst) {
                self.set_immediate_exit(0);
                return Ok(KvmExit::PauseRequested);
            }
            let exit = match inner.fd.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    Some(KvmExit::Inout { port, size: data.len() as u8, is_in: false, value: little_endian(data) as u32, rip: 0 })
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    let size = data.len() as u8;
                    inner.pending = Some(PendingRead::Port { port, size });
                    Some(KvmExit::Inout { port, size, is_in: true, value: 0, rip: 0 })
                }
                Ok(VcpuExit::MmioWrite(gpa, data)) => {
                    Some(KvmExit::Mmio { gpa, size: data.len() as u8, is_write: true, value: little_endian(data), rip: 0 })
                }
                Ok(VcpuExit::MmioRead(gpa, data)) => {
                    let size = data.len() as u8;
                    inner.pending = Some(PendingRead::Mmio { gpa, size });
                    Some(KvmExit::Mmio { gpa, size, is_write: false, value: 0, rip: 0 })
                }
                Ok(VcpuExit::Hlt) => Some(KvmExit::Hlt { rip: 0 }),
                Ok(VcpuExit::Intr) => None,
                // The vCPU's dirty ring is full: harvest it into the slots' logs, then go on.
                Ok(VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL)) => {
                    self.vm.drain_rings().map_err(|e| KvmError(format!("vcpu {id}: its dirty ring is full and {e}")))?;
                    None
                }
                Ok(VcpuExit::Shutdown) => Some(KvmExit::Fault { kind: "triple_fault", detail: String::new(), rip: 0 }),
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    Some(KvmExit::Fault { kind: "entry_failed", detail: format!("hardware reason {reason:#x} on cpu {cpu}"), rip: 0 })
                }
                Ok(VcpuExit::InternalError) => Some(KvmExit::Fault { kind: "kvm_internal_error", detail: String::new(), rip: 0 }),
                Ok(VcpuExit::MemoryFault { gpa, size, .. }) => {
                    Some(KvmExit::Fault { kind: "memory_fault", detail: format!("gpa {gpa:#x}, {size} bytes"), rip: 0 })
                }
                Ok(other) => Some(KvmExit::Fault { kind: "unhandled_exit", detail: format!("{other:?}"), rip: 0 }),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Err(e) if e.errno() == libc::EFAULT => {
                    return Err(KvmError(format!(
                        "vcpu {id}: KVM_RUN could not reach guest memory (EFAULT): a memory slot's mapping is gone"
                    )));
                }
                Err(e) => return Err(ioctl_failed(id, "KVM_RUN", e)),
            };
            match exit {
                // Kicked (a signal or immediate_exit): stop if a pause was asked, else go on.
                None => self.set_immediate_exit(0),
                Some(mut exit) => {
                    let at = inner.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                    match &mut exit {
                        KvmExit::Inout { rip, .. } | KvmExit::Mmio { rip, .. } | KvmExit::Hlt { rip } | KvmExit::Fault { rip, .. } => {
                            *rip = at
                        }
                        KvmExit::PauseRequested => {}
                    }
                    return Ok(exit);
                }
            }
        }
    }

    /// Make `run` return [`KvmExit::PauseRequested`] now (or at its next call): from any thread.
    pub fn request_pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        self.set_immediate_exit(1);
        let thread = self.thread.load(Ordering::SeqCst);
        if thread != 0 {
            // SAFETY: the thread is inside `run` (or has just left it, and then the signal's empty
            // handler runs in a live thread of this process: the thread is joined by Python,
            // never while it is in `run`).
            unsafe { libc::pthread_kill(thread as libc::pthread_t, kick_signal()) };
        }
    }

    /// Give a pending `in` or MMIO load its value, before the next `run`.
    pub fn complete_read(&self, value: u64) -> Result<(), KvmError> {
        let mut inner = self.lock().ok_or_else(|| self.busy())?;
        let Some(pending) = inner.pending.take() else {
            return Err(KvmError(format!("vcpu {}: no port or MMIO read is waiting for a value", self.id)));
        };
        let run = inner.fd.get_kvm_run();
        let bytes = value.to_le_bytes();
        match pending {
            PendingRead::Port { size, .. } => {
                // SAFETY: the last exit was KVM_EXIT_IO (in), so `io` is the union's live field and
                // data_offset points inside the kvm_run mapping, `size` bytes long.
                unsafe {
                    let offset = run.__bindgen_anon_1.io.data_offset as usize;
                    let data = (run as *mut kvm_run as *mut u8).add(offset);
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), data, size as usize);
                }
            }
            PendingRead::Mmio { size, .. } => {
                // SAFETY: the last exit was KVM_EXIT_MMIO (read), so `mmio` is the live field.
                unsafe { run.__bindgen_anon_1.mmio.data[..size as usize].copy_from_slice(&bytes[..size as usize]) };
            }
        }
        Ok(())
    }

    /// The read waiting for `complete_read`, if any.
    pub fn pending_read(&self) -> Result<Option<PendingRead>, KvmError> {
        Ok(self.lock().ok_or_else(|| self.busy())?.pending)
    }

    /// A general register, rip or rflags by its amd64 name; or a control register (cr0, cr3,
    /// cr4, efer).
    pub fn get_register(&self, name: &str) -> Result<u64, KvmError> {
        let inner = self.lock().ok_or_else(|| self.busy())?;
        let regs = inner.fd.get_regs().map_err(|e| ioctl_failed(self.id, "KVM_GET_REGS", e))?;
        if let Some(v) = gpr(&regs, name) {
            return Ok(v);
        }
        let sregs = inner.fd.get_sregs().map_err(|e| ioctl_failed(self.id, "KVM_GET_SREGS", e))?;
        match name {
            "cr0" => Ok(sregs.cr0),
            "cr3" => Ok(sregs.cr3),
            "cr4" => Ok(sregs.cr4),
            "efer" => Ok(sregs.efer),
            _ => Err(KvmError(format!("vcpu {}: no register named '{name}' (the KVM vCPU has {})", self.id, REGISTER_NAMES.join(", ")))),
        }
    }

    /// Set a general register, rip or rflags.
    pub fn set_register(&self, name: &str, value: u64) -> Result<(), KvmError> {
        let inner = self.lock().ok_or_else(|| self.busy())?;
        let mut regs = inner.fd.get_regs().map_err(|e| ioctl_failed(self.id, "KVM_GET_REGS", e))?;
        let Some(slot) = gpr_mut(&mut regs, name) else {
            return Err(KvmError(format!("vcpu {}: cannot set '{name}': settable are {}", self.id, GPR_NAMES.join(", "))));
        };
        *slot = value;
        inner.fd.set_regs(&regs).map_err(|e| ioctl_failed(self.id, "KVM_SET_REGS", e))
    }

    /// Enter 64-bit long mode at `rip` with stack `rsp`: write the GDT and identity page tables
    /// (2 MiB pages over every guest-physical address up to the end of `memory`, the 3-4 GiB hole
    /// included, where the local APIC lives) into guest memory, then set the segment, control
    /// registers and EFER as a 64-bit kernel would find them.
    pub fn enter_long_mode(&self, memory: &GuestMemory, rip: u64, rsp: u64) -> Result<(), KvmError> {
        write_boot_tables(memory)?;
        let inner = self.lock().ok_or_else(|| self.busy())?;
        let mut sregs = inner.fd.get_sregs().map_err(|e| ioctl_failed(self.id, "KVM_GET_SREGS", e))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x8,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment { selector: 0x10, type_: 0x3, db: 1, l: 0, ..code };
        let tss = kvm_segment { selector: 0x18, type_: 0xb, s: 0, db: 0, l: 0, g: 0, limit: 0x67, ..code };
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        sregs.tr = tss;
        sregs.gdt.base = GDT_ADDRESS;
        sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
        sregs.idt.base = 0;
        sregs.idt.limit = 0;
        sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
        sregs.cr3 = PML4_ADDRESS;
        sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
        sregs.efer = EFER_LME | EFER_LMA;
        inner.fd.set_sregs(&sregs).map_err(|e| ioctl_failed(self.id, "KVM_SET_SREGS", e))?;
        let regs = kvm_bindings::kvm_regs { rip, rsp, rflags: 0x2, ..Default::default() };
        inner.fd.set_regs(&regs).map_err(|e| ioctl_failed(self.id, "KVM_SET_REGS", e))
    }
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// The flat GDT: null, 64-bit code (0x8), data (0x10), the TSS KVM requires (0x18).
const GDT: [u64; 4] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff, 0x0000_8b00_0000_0067];

/// Write the GDT and identity page tables; refused when the guest's addresses need more page
/// directories than fit below the programs' stack.
fn write_boot_tables(memory: &GuestMemory) -> Result<(), KvmError> {
    let end = memory.segments().iter().map(|s| s.gpa().0 + s.size() as u64).max().unwrap_or(0).max(HIGHMEM_BASE);
    let gibs = end.div_ceil(GIB);
    if PD_ADDRESS + gibs * 4096 > BOOT_AREA_END {
        return Err(KvmError(format!(
            "guest-physical addresses up to {end:#x} need {gibs} page directories, more than fit below {BOOT_AREA_END:#x}"
        )));
    }
    let write = |gpa: u64, words: &[u64]| {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        memory.write(GuestAddress(gpa), &bytes).map_err(|e| KvmError(format!("writing the boot page tables at {gpa:#x}: {e}")))
    };
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    write(GDT_ADDRESS, &GDT)?;
    write(PML4_ADDRESS, &[PDPT_ADDRESS | PRESENT_RW])?;
    let pdpt: Vec<u64> = (0..gibs).map(|i| (PD_ADDRESS + i * 4096) | PRESENT_RW).collect();
    write(PDPT_ADDRESS, &pdpt)?;
    let pds: Vec<u64> = (0..gibs * 512).map(|i| (i << 21) | PRESENT_RW | HUGE).collect();
    write(PD_ADDRESS, &pds)
}

/// Registers `get_register` knows, general ones first.
pub const GPR_NAMES: [&str; 18] =
    ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags"];
const REGISTER_NAMES: [&str; 22] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags", "cr0",
    "cr3", "cr4", "efer",
];

fn gpr(regs: &kvm_bindings::kvm_regs, name: &str) -> Option<u64> {
    let mut copy = *regs;
    gpr_mut(&mut copy, name).map(|v| *v)
}

fn gpr_mut<'a>(regs: &'a mut kvm_bindings::kvm_regs, name: &str) -> Option<&'a mut u64> {
    Some(match name {
        "rax" => &mut regs.rax,
        "rbx" => &mut regs.rbx,
        "rcx" => &mut regs.rcx,
        "rdx" => &mut regs.rdx,
        "rsi" => &mut regs.rsi,
        "rdi" => &mut regs.rdi,
        "rsp" => &mut regs.rsp,
        "rbp" => &mut regs.rbp,
        "r8" => &mut regs.r8,
        "r9" => &mut regs.r9,
        "r10" => &mut regs.r10,
        "r11" => &mut regs.r11,
        "r12" => &mut regs.r12,
        "r13" => &mut regs.r13,
        "r14" => &mut regs.r14,
        "r15" => &mut regs.r15,
        "rip" => &mut regs.rip,
        "rflags" => &mut regs.rflags,
        _ => return None,
    })
}

/// The registers by name (general ones, rip, rflags, cr0, cr3, cr4, efer).
pub fn registers_of(vcpu: &KvmVcpu) -> Result<Vec<(&'static str, u64)>, KvmError> {
    REGISTER_NAMES.iter().map(|&n| vcpu.get_register(n).map(|v| (n, v))).collect()
}
