//! The vCPU: its register file, the interpreter loop, interrupt delivery, and the cross-thread
//! requests (pause, inject) it polls for. Semantics are docs/isa.md's; this file implements them.
//!
//! The loop decodes every instruction from guest memory as it executes it, so guest code that
//! rewrites itself (or is rewritten by a device or a restore) is always seen as it is now; there
//! is no decoded-instruction cache to invalidate.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::error::CpuError;
use super::exit::{Exit, FaultKind};
use super::isa::{self, msr, op, rflags, INSN_SIZE, RAX, RCX, RDX, RESERVED_MASK, RSP};
use super::state::{
    AmdMsrs, IntelMsrs, PendingRead, ReadSource, SvmSwCtx, TscMode, VcpuState, Vendor, VendorState, VmcbControl, VmcbSave, Vmcs, VmxCtx,
};
use crate::memory::{GuestAddress, GuestMemory, MemoryError, Segment};

/// Cross-thread requests are looked at after at most this many instructions.
pub const POLL_INTERVAL: u64 = 256;

/// PAT at reset, as on amd64.
const PAT_RESET: u64 = 0x0007_0406_0007_0406;
const PAT_MSR: u32 = 0x277;

/// Registers `get_register`/`set_register` know, by their amd64 names.
pub const REGISTER_NAMES: &[&str] = &[
    "rax",
    "rcx",
    "rdx",
    "rbx",
    "rsp",
    "rbp",
    "rsi",
    "rdi",
    "r8",
    "r9",
    "r10",
    "r11",
    "r12",
    "r13",
    "r14",
    "r15",
    "rip",
    "rflags",
    "cr0",
    "cr3",
    "cr4",
    "efer",
    "idtr",
    "fs_base",
    "gs_base",
    "kernel_gs_base",
    "tsc_aux",
    "apic_base",
    "pat",
];

/// What other threads may touch while the vCPU runs: a pause request and the pending-interrupt
/// set. Lock-free, so `run` never takes a lock.
#[derive(Default)]
struct Shared {
    pause_requested: AtomicBool,
    pending: [AtomicU64; 4],
}

impl Shared {
    fn any_pending(&self) -> bool {
        self.pending.iter().any(|w| w.load(Ordering::Acquire) != 0)
    }

    fn highest_pending(&self) -> Option<u8> {
        for word in (0..4).rev() {
            let bits = self.pending[word].load(Ordering::Acquire);
            if bits != 0 {
                return Some((word * 64 + 63 - bits.leading_zeros() as usize) as u8);
            }
        }
        None
    }

    fn snapshot(&self) -> [u64; 4] {
        std::array::from_fn(|i| self.pending[i].load(Ordering::Acquire))
    }
}

/// A cloneable handle for other threads: ask the vCPU to pause, inject interrupts.
#[derive(Clone)]
pub struct VcpuHandle {
    shared: Arc<Shared>,
}

impl VcpuHandle {
    /// `run` returns `Exit::PauseRequested` within `POLL_INTERVAL` instructions (at once if it is
    /// not running: the next `run` returns it before executing anything).
    pub fn request_pause(&self) {
        self.shared.pause_requested.store(true, Ordering::Release);
    }

    /// Mark `vector` pending. It is delivered at the next instruction boundary where IF=1, the
    /// highest pending vector first; a running vCPU sees it within `POLL_INTERVAL` instructions.
    pub fn inject_interrupt(&self, vector: u8) {
        self.shared.pending[vector as usize / 64].fetch_or(1 << (vector % 64), Ordering::AcqRel);
    }

    /// The pending vectors, ascending.
    pub fn pending_interrupts(&self) -> Vec<u8> {
        vectors_of(&self.shared.snapshot())
    }
}

/// The vectors set in a 256-bit pending set (bit v of word v/64), ascending.
pub fn vectors_of(words: &[u64; 4]) -> Vec<u8> {
    (0..256usize).filter(|v| words[v / 64] >> (v % 64) & 1 != 0).map(|v| v as u8).collect()
}

/// The host's monotonic clock in nanoseconds: the Host-mode TSC ticks at 1 GHz.
fn host_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// How a guest memory access went wrong.
enum Access {
    /// No segment backs the address: an MMIO exit for loads and stores.
    Unmapped,
    Fault(FaultKind),
}

/// Result of one chunk of execution: instructions retired and, if the chunk stopped early, why.
type Chunk = (u64, Option<Exit>);

pub struct Vcpu {
    id: u32,
    vendor: Vendor,
    tsc_mode: TscMode,
    memory: Arc<GuestMemory>,
    /// The segment at GPA 0 (lowmem), cached so the common access needs no search.
    low: Arc<Segment>,
    low_size: u64,
    /// How much of lowmem the fast path may touch unchecked: all of it, or while lazily restored
    /// memory is still loading, the chunks from GPA 0 on that are loaded (other accesses go
    /// through `translate`, which loads and checks their chunk). Raised as chunks load, every
    /// POLL_INTERVAL instructions; it never needs lowering (a loaded chunk stays loaded).
    fast_end: u64,
    /// Why the last access that found lazily restored memory unusable failed, for `run`'s error.
    /// Behind a Box so the Vcpu itself holds no interior mutability: then the compiler knows a
    /// `&self` call on the slow path leaves the register file alone. A Cell in the struct cost
    /// one host instruction per guest instruction of the dec/jnz loop (valgrind: 3.012e9 against
    /// 2.952e9 for 60M guest instructions).
    unavailable: Box<Cell<Option<MemoryError>>>,

    gpr: [u64; 16],
    rip: u64,
    cf: bool,
    zf: bool,
    sf: bool,
    of: bool,
    iflag: bool,
    cr0: u64,
    cr3: u64,
    cr4: u64,
    efer: u64,
    idtr: u64,
    fs_base: u64,
    gs_base: u64,
    kernel_gs_base: u64,
    tsc_aux: u64,
    apic_base: u64,
    pat: u64,

    /// Guest TSC = source + tsc_offset (wrapping), source per `tsc_mode`.
    tsc_offset: u64,
    retired: u64,
    halted: bool,
    pending_read: Option<PendingRead>,
    shared: Arc<Shared>,
}

impl Vcpu {
    /// A vCPU at amd64 reset state (all general registers zero, rip 0, rflags 0x2) on `memory`.
    pub fn new(memory: Arc<GuestMemory>, id: u32, vendor: Vendor, tsc_mode: TscMode) -> Vcpu {
        let low = memory
            .segments()
            .iter()
            .find(|s| s.gpa() == GuestAddress(0))
            .cloned()
            .expect("guest memory always has a lowmem segment at GPA 0");
        let low_size = low.size() as u64;
        let fast_end = memory.loaded_prefix().min(low_size);
        let apic_base = isa::APIC_BASE_DEFAULT | if id == 0 { isa::APIC_BASE_BSP } else { 0 };
        Vcpu {
            id,
            vendor,
            tsc_mode,
            memory,
            low,
            low_size,
            fast_end,
            unavailable: Box::new(Cell::new(None)),
            gpr: [0; 16],
            rip: 0,
            cf: false,
            zf: false,
            sf: false,
            of: false,
            iflag: false,
            cr0: isa::CR0_RESET,
            cr3: 0,
            cr4: 0,
            efer: 0,
            idtr: 0,
            fs_base: 0,
            gs_base: 0,
            kernel_gs_base: 0,
            tsc_aux: 0,
            apic_base,
            pat: PAT_RESET,
            tsc_offset: 0,
            retired: 0,
            halted: false,
            pending_read: None,
            shared: Arc::new(Shared::default()),
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }
    pub fn vendor(&self) -> Vendor {
        self.vendor
    }
    pub fn tsc_mode(&self) -> TscMode {
        self.tsc_mode
    }
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }
    pub fn handle(&self) -> VcpuHandle {
        VcpuHandle { shared: self.shared.clone() }
    }
    pub fn request_pause(&self) {
        self.handle().request_pause()
    }
    pub fn inject_interrupt(&self, vector: u8) {
        self.handle().inject_interrupt(vector)
    }
    pub fn pending_interrupts(&self) -> Vec<u8> {
        self.handle().pending_interrupts()
    }
    pub fn instructions_retired(&self) -> u64 {
        self.retired
    }
    pub fn halted(&self) -> bool {
        self.halted
    }
    pub fn pending_read(&self) -> Option<PendingRead> {
        self.pending_read
    }
    pub fn tsc_offset(&self) -> u64 {
        self.tsc_offset
    }
    pub fn set_tsc_offset(&mut self, offset: u64) {
        self.tsc_offset = offset;
    }

    fn tsc_source(&self, retired: u64) -> u64 {
        match self.tsc_mode {
            TscMode::Host => host_ns(),
            TscMode::Instructions => retired,
        }
    }

    /// The guest TSC now (between instructions).
    pub fn tsc(&self) -> u64 {
        self.tsc_source(self.retired).wrapping_add(self.tsc_offset)
    }

    pub fn rflags(&self) -> u64 {
        rflags::FIXED1
            | if self.cf { rflags::CF } else { 0 }
            | if self.zf { rflags::ZF } else { 0 }
            | if self.sf { rflags::SF } else { 0 }
            | if self.iflag { rflags::IF } else { 0 }
            | if self.of { rflags::OF } else { 0 }
    }

    /// Load rflags; bits the vCPU does not keep are dropped (iret) — `set_register` refuses them.
    fn load_rflags(&mut self, value: u64) {
        self.cf = value & rflags::CF != 0;
        self.zf = value & rflags::ZF != 0;
        self.sf = value & rflags::SF != 0;
        self.iflag = value & rflags::IF != 0;
        self.of = value & rflags::OF != 0;
    }

    pub fn get_register(&self, name: &str) -> Result<u64, CpuError> {
        if let Some(n) = isa::gpr_number(name) {
            return Ok(self.gpr[n]);
        }
        Ok(match name {
            "rip" => self.rip,
            "rflags" => self.rflags(),
            "cr0" => self.cr0,
            "cr3" => self.cr3,
            "cr4" => self.cr4,
            "efer" => self.efer,
            "idtr" => self.idtr,
            "fs_base" => self.fs_base,
            "gs_base" => self.gs_base,
            "kernel_gs_base" => self.kernel_gs_base,
            "tsc_aux" => self.tsc_aux,
            "apic_base" => self.apic_base,
            "pat" => self.pat,
            _ => return Err(CpuError::UnknownRegister { vcpu: self.id, name: name.to_string() }),
        })
    }

    /// Set a register by name. rflags must only have bits the vCPU keeps (CF ZF SF IF OF and the
    /// always-one bit 1); setting rip or any register does not touch a pending read.
    pub fn set_register(&mut self, name: &str, value: u64) -> Result<(), CpuError> {
        if let Some(n) = isa::gpr_number(name) {
            self.gpr[n] = value;
            return Ok(());
        }
        match name {
            "rip" => self.rip = value,
            "rflags" => {
                if value & !rflags::DEFINED != 0 {
                    return Err(CpuError::BadRegisterValue {
                        vcpu: self.id,
                        name: name.into(),
                        value,
                        why: format!(
                            "bits {:#x} are not kept by this vCPU (it has CF ZF SF IF OF and the fixed bit 1)",
                            value & !rflags::DEFINED
                        ),
                    });
                }
                self.load_rflags(value)
            }
            "cr0" => self.cr0 = value,
            "cr3" => self.cr3 = value,
            "cr4" => self.cr4 = value,
            "efer" => self.efer = value,
            "idtr" => self.idtr = value,
            "fs_base" => self.fs_base = value,
            "gs_base" => self.gs_base = value,
            "kernel_gs_base" => self.kernel_gs_base = value,
            "tsc_aux" => self.tsc_aux = value,
            "apic_base" => self.apic_base = value,
            "pat" => self.pat = value,
            _ => return Err(CpuError::UnknownRegister { vcpu: self.id, name: name.to_string() }),
        }
        Ok(())
    }

    /// Every register, in `REGISTER_NAMES` order.
    pub fn registers(&self) -> Vec<(&'static str, u64)> {
        REGISTER_NAMES.iter().map(|&n| (n, self.get_register(n).expect("listed registers exist"))).collect()
    }

    /// Finish the `in` or MMIO load the last exit stopped at: `value` (which must fit the access
    /// size) goes zero-extended into the destination register, rip moves past the instruction and
    /// it counts as retired.
    pub fn complete_read(&mut self, value: u64) -> Result<(), CpuError> {
        let read = self.pending_read.ok_or(CpuError::NoReadPending { vcpu: self.id })?;
        if read.size < 8 && value >> (read.size as u32 * 8) != 0 {
            return Err(CpuError::ReadValueTooWide { vcpu: self.id, read, value });
        }
        self.gpr[read.dst as usize] = value;
        self.rip = self.rip.wrapping_add(INSN_SIZE);
        self.retired += 1;
        self.pending_read = None;
        Ok(())
    }

    /// Execute until an exit, at most `budget` instructions (docs/isa.md, "Running").
    pub fn run(&mut self, budget: u64) -> Result<Exit, CpuError> {
        if let Some(read) = self.pending_read {
            return Err(CpuError::ReadPending { vcpu: self.id, read });
        }
        if let Some(seg) = self.memory.segments().iter().find(|s| s.is_closed()) {
            return Err(CpuError::MemoryClosed { vcpu: self.id, segment: seg.name().to_string() });
        }
        // Memory may have become lazy since the last run (a post-copy migration's destination
        // switches while the guest is paused): the fast path covers only what is loaded.
        self.fast_end = self.memory.loaded_prefix().min(self.low_size);
        match self.run_to_exit(budget) {
            // Not a guest fault: the host could not give it its memory. The guest must not go on.
            Exit::Fault { kind: FaultKind::MemoryUnavailable, rip } => Err(self.memory_unavailable(rip)),
            exit => Ok(exit),
        }
    }

    fn run_to_exit(&mut self, budget: u64) -> Exit {
        let mut left = budget;
        loop {
            if self.fast_end != self.low_size {
                self.fast_end = self.memory.loaded_prefix().min(self.low_size);
            }
            if self.shared.pause_requested.load(Ordering::Relaxed) && self.shared.pause_requested.swap(false, Ordering::AcqRel) {
                return Exit::PauseRequested;
            }
            if let Some(exit) = self.deliver_if_ready() {
                return exit;
            }
            if self.halted {
                return Exit::Hlt { rip: self.rip };
            }
            if left == 0 {
                return Exit::Budget;
            }
            let chunk = left.min(POLL_INTERVAL);
            let (done, exit) = self.execute(chunk);
            self.retired += done;
            left -= done;
            if let Some(exit) = exit {
                return exit;
            }
        }
    }

    /// Deliver the highest pending vector if IF=1. A delivery that faults leaves the vector pending.
    #[inline]
    fn deliver_if_ready(&mut self) -> Option<Exit> {
        if !self.iflag {
            return None;
        }
        let vector = self.shared.highest_pending()?;
        match self.deliver(vector) {
            Ok(()) => None,
            Err(kind) => Some(Exit::Fault { kind, rip: self.rip }),
        }
    }

    /// The error that stops a vCPU whose instruction at `rip` needed lazily restored memory that
    /// could not be loaded: nothing retired, and the guest must not go on.
    #[cold]
    fn memory_unavailable(&self, rip: u64) -> CpuError {
        let why = self.unavailable.take().map(|e| e.to_string()).unwrap_or_default();
        CpuError::MemoryUnavailable { vcpu: self.id, rip, why }
    }

    #[cold]
    fn access_error(&self, err: MemoryError) -> Access {
        match err {
            MemoryError::Unmapped { .. } => Access::Unmapped,
            MemoryError::CrossesSegment { .. } => Access::Fault(FaultKind::CrossesSegment),
            MemoryError::ChunkUnavailable { .. } => {
                self.unavailable.set(Some(err));
                Access::Fault(FaultKind::MemoryUnavailable)
            }
            // Closed memory is refused at `run` entry; a close racing a running vCPU is seen here.
            _ => Access::Fault(FaultKind::MemoryClosed),
        }
    }

    /// Push rflags then rip, clear IF, jump to the handler at `idtr + 8 * vector`.
    fn deliver(&mut self, vector: u8) -> Result<(), FaultKind> {
        let entry = self.idtr.wrapping_add(8 * vector as u64);
        let handler = match self.load::<8>(entry) {
            Ok(bytes) => u64::from_le_bytes(bytes),
            Err(Access::Unmapped) => return Err(FaultKind::VectorTableUnmapped),
            Err(Access::Fault(kind)) => return Err(kind),
        };
        let frame = self.gpr[RSP].wrapping_sub(16);
        self.stack_ram(frame, 16)?;
        self.stack_store(frame + 8, self.rflags())?;
        self.stack_store(frame, self.rip)?;
        self.gpr[RSP] = frame;
        self.shared.pending[vector as usize / 64].fetch_and(!(1 << (vector % 64)), Ordering::AcqRel);
        self.iflag = false;
        self.halted = false;
        self.rip = handler;
        Ok(())
    }

    // ---- guest memory -------------------------------------------------------------------------

    #[inline(always)]
    fn load<const N: usize>(&self, gpa: u64) -> Result<[u8; N], Access> {
        if gpa < self.fast_end && self.fast_end - gpa >= N as u64 {
            // SAFETY: gpa..gpa+N lies below `fast_end`, which is at most lowmem's size and at most
            // the loaded prefix of lazily restored memory: inside lowmem (GPA = offset) and accessible.
            return Ok(unsafe { self.low.load_unchecked::<N>(gpa as usize) });
        }
        self.load_slow::<N>(gpa)
    }

    #[inline(never)]
    fn load_slow<const N: usize>(&self, gpa: u64) -> Result<[u8; N], Access> {
        let (seg, off) = self.memory.translate(GuestAddress(gpa), N).map_err(|e| self.access_error(e))?;
        // SAFETY: `translate` checked the range against the segment and made it accessible.
        Ok(unsafe { seg.load_unchecked::<N>(off) })
    }

    #[inline(always)]
    fn store<const N: usize>(&self, gpa: u64, bytes: [u8; N]) -> Result<(), Access> {
        if gpa < self.fast_end && self.fast_end - gpa >= N as u64 {
            // SAFETY: as in `load`: gpa..gpa+N is inside lowmem and accessible.
            unsafe { self.low.store_unchecked::<N>(gpa as usize, bytes) };
            return Ok(());
        }
        self.store_slow::<N>(gpa, bytes)
    }

    #[inline(never)]
    fn store_slow<const N: usize>(&self, gpa: u64, bytes: [u8; N]) -> Result<(), Access> {
        let (seg, off) = self.memory.translate(GuestAddress(gpa), N).map_err(|e| self.access_error(e))?;
        // SAFETY: `translate` checked the range against the segment and made it accessible.
        unsafe { seg.store_unchecked::<N>(off, bytes) };
        Ok(())
    }

    #[inline(always)]
    fn fetch(&self, rip: u64) -> Result<u64, FaultKind> {
        match self.load::<8>(rip) {
            Ok(bytes) => Ok(u64::from_le_bytes(bytes)),
            Err(Access::Unmapped) => Err(FaultKind::FetchUnmapped),
            Err(Access::Fault(kind)) => Err(kind),
        }
    }

    /// Check that `len` bytes of stack at `gpa` are RAM before a multi-word push or pop, so a
    /// stack fault changes no memory.
    fn stack_ram(&self, gpa: u64, len: usize) -> Result<(), FaultKind> {
        match self.memory.translate(GuestAddress(gpa), len) {
            Ok(_) => Ok(()),
            Err(err) => Err(stack_fault(self.access_error(err))),
        }
    }

    #[inline(always)]
    fn stack_store(&self, gpa: u64, value: u64) -> Result<(), FaultKind> {
        self.store::<8>(gpa, value.to_le_bytes()).map_err(stack_fault)
    }

    #[inline(always)]
    fn stack_load(&self, gpa: u64) -> Result<u64, FaultKind> {
        self.load::<8>(gpa).map(u64::from_le_bytes).map_err(stack_fault)
    }

    /// Push a qword: rsp moves only if the store succeeded, so a stack fault changes nothing.
    #[inline(always)]
    fn push(&mut self, value: u64) -> Result<(), FaultKind> {
        let sp = self.gpr[RSP].wrapping_sub(8);
        self.stack_store(sp, value)?;
        self.gpr[RSP] = sp;
        Ok(())
    }

    /// Pop a qword: rsp moves only if the load succeeded.
    #[inline(always)]
    fn pop(&mut self) -> Result<u64, FaultKind> {
        let sp = self.gpr[RSP];
        let value = self.stack_load(sp)?;
        self.gpr[RSP] = sp.wrapping_add(8);
        Ok(value)
    }

    // ---- flags --------------------------------------------------------------------------------

    #[inline(always)]
    fn set_zs(&mut self, r: u64) {
        self.zf = r == 0;
        self.sf = (r as i64) < 0;
    }

    #[inline(always)]
    fn logic(&mut self, r: u64) -> u64 {
        self.set_zs(r);
        self.cf = false;
        self.of = false;
        r
    }

    #[inline(always)]
    fn add_flags(&mut self, a: u64, b: u64) -> u64 {
        let (r, carry) = a.overflowing_add(b);
        self.cf = carry;
        self.of = ((a ^ r) & (b ^ r)) >> 63 != 0;
        self.set_zs(r);
        r
    }

    #[inline(always)]
    fn sub_flags(&mut self, a: u64, b: u64) -> u64 {
        let r = a.wrapping_sub(b);
        self.cf = a < b;
        self.of = ((a ^ b) & (a ^ r)) >> 63 != 0;
        self.set_zs(r);
        r
    }

    /// shl/shr/sar by `count & 63`; a zero count changes nothing, flags included.
    #[inline(always)]
    fn shift(&mut self, opcode: u8, a: u64, count: u64) -> u64 {
        let c = (count & 63) as u32;
        if c == 0 {
            return a;
        }
        let (r, out) = match opcode {
            op::SHL => (a << c, (a >> (64 - c)) & 1),
            op::SHR => (a >> c, (a >> (c - 1)) & 1),
            _ => (((a as i64) >> c) as u64, (((a as i64) >> (c - 1)) & 1) as u64),
        };
        self.cf = out != 0;
        self.of = false;
        self.set_zs(r);
        r
    }

    #[inline(always)]
    fn mul_flags(&mut self, a: u64, b: u64) -> u64 {
        let wide = a as u128 * b as u128;
        let r = wide as u64;
        self.cf = (wide >> 64) != 0;
        self.of = self.cf;
        self.set_zs(r);
        r
    }

    /// div/rem/idiv/irem; `None` is a divide error (zero divisor, or i64::MIN / -1).
    #[inline(always)]
    fn divide(opcode: u8, a: u64, b: u64) -> Option<u64> {
        match opcode {
            op::DIV => a.checked_div(b),
            op::REM => a.checked_rem(b),
            op::IDIV => (a as i64).checked_div(b as i64).map(|q| q as u64),
            _ => (a as i64).checked_rem(b as i64).map(|r| r as u64),
        }
    }

    #[inline(always)]
    fn condition(&self, opcode: u8) -> bool {
        match opcode {
            op::JE => self.zf,
            op::JNE => !self.zf,
            op::JL => self.sf != self.of,
            op::JLE => self.zf || self.sf != self.of,
            op::JG => !self.zf && self.sf == self.of,
            op::JGE => self.sf == self.of,
            op::JB => self.cf,
            op::JBE => self.cf || self.zf,
            op::JA => !self.cf && !self.zf,
            op::JAE => !self.cf,
            op::JS => self.sf,
            op::JNS => !self.sf,
            op::JO => self.of,
            _ => !self.of,
        }
    }

    // ---- the interpreter ----------------------------------------------------------------------

    /// Execute up to `chunk` instructions. Returns how many retired and the exit if one happened.
    /// Registers other than rip live in `self`; rip is kept in a local and written back on leaving.
    fn execute(&mut self, chunk: u64) -> Chunk {
        let mut n = 0u64;
        let mut rip = self.rip;
        macro_rules! fault {
            ($kind:expr) => {{
                self.rip = rip;
                return (n, Some(Exit::Fault { kind: $kind, rip }));
            }};
        }
        macro_rules! try_fault {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(kind) => fault!(kind),
                }
            };
        }
        // An instruction that retires and then exits: count it, move rip, return.
        macro_rules! retire_exit {
            ($next:expr, $exit:expr) => {{
                self.rip = $next;
                return (n + 1, Some($exit));
            }};
        }
        while n < chunk {
            let word = try_fault!(self.fetch(rip));
            if word & RESERVED_MASK != 0 {
                fault!(FaultKind::ReservedBits);
            }
            let opcode = word as u8;
            let a = ((word >> 8) & 15) as usize;
            let b = ((word >> 16) & 15) as usize;
            let imm = ((word as i64) >> 32) as u64;
            let next = rip.wrapping_add(INSN_SIZE);
            match opcode {
                op::DEC => {
                    let v = self.gpr[a];
                    let r = v.wrapping_sub(1);
                    self.of = v == 1 << 63;
                    self.set_zs(r);
                    self.gpr[a] = r;
                    rip = next;
                }
                op::INC => {
                    let v = self.gpr[a];
                    let r = v.wrapping_add(1);
                    self.of = r == 1 << 63;
                    self.set_zs(r);
                    self.gpr[a] = r;
                    rip = next;
                }
                op::JE..=op::JNO => {
                    rip = if self.condition(opcode) { next.wrapping_add(imm) } else { next };
                }
                op::MOV => {
                    self.gpr[a] = self.gpr[b];
                    rip = next;
                }
                op::MOVI => {
                    self.gpr[a] = imm;
                    rip = next;
                }
                op::MOVABS => {
                    let value = try_fault!(self.fetch(next));
                    self.gpr[a] = value;
                    rip = next.wrapping_add(INSN_SIZE);
                }
                op::LEA => {
                    self.gpr[a] = self.gpr[b].wrapping_add(imm);
                    rip = next;
                }
                op::ADD | op::ADDI | op::SUB | op::SUBI | op::CMP | op::CMPI => {
                    let src = if opcode & op::IMM_FORM != 0 { imm } else { self.gpr[b] };
                    let x = self.gpr[a];
                    let r = if opcode & !op::IMM_FORM == op::ADD { self.add_flags(x, src) } else { self.sub_flags(x, src) };
                    if opcode & !op::IMM_FORM != op::CMP {
                        self.gpr[a] = r;
                    }
                    rip = next;
                }
                op::AND | op::ANDI | op::OR | op::ORI | op::XOR | op::XORI | op::TEST | op::TESTI => {
                    let src = if opcode & op::IMM_FORM != 0 { imm } else { self.gpr[b] };
                    let x = self.gpr[a];
                    let base = opcode & !op::IMM_FORM;
                    let r = match base {
                        op::OR => x | src,
                        op::XOR => x ^ src,
                        _ => x & src,
                    };
                    self.logic(r);
                    if base != op::TEST {
                        self.gpr[a] = r;
                    }
                    rip = next;
                }
                op::SHL | op::SHLI | op::SHR | op::SHRI | op::SAR | op::SARI => {
                    let src = if opcode & op::IMM_FORM != 0 { imm } else { self.gpr[b] };
                    self.gpr[a] = self.shift(opcode & !op::IMM_FORM, self.gpr[a], src);
                    rip = next;
                }
                op::MUL | op::MULI => {
                    let src = if opcode & op::IMM_FORM != 0 { imm } else { self.gpr[b] };
                    self.gpr[a] = self.mul_flags(self.gpr[a], src);
                    rip = next;
                }
                op::DIV | op::DIVI | op::REM | op::REMI | op::IDIV | op::IDIVI | op::IREM | op::IREMI => {
                    let src = if opcode & op::IMM_FORM != 0 { imm } else { self.gpr[b] };
                    match Self::divide(opcode & !op::IMM_FORM, self.gpr[a], src) {
                        Some(r) => self.gpr[a] = r,
                        None => fault!(FaultKind::DivideError),
                    }
                    rip = next;
                }
                op::NEG => {
                    let v = self.gpr[a];
                    self.gpr[a] = self.sub_flags(0, v);
                    rip = next;
                }
                op::NOT => {
                    self.gpr[a] = !self.gpr[a];
                    rip = next;
                }
                op::JMP => rip = next.wrapping_add(imm),
                op::JMPR => rip = self.gpr[a],
                op::CALL | op::CALLR => {
                    let target = if opcode == op::CALL { next.wrapping_add(imm) } else { self.gpr[a] };
                    try_fault!(self.push(next));
                    rip = target;
                }
                op::RET => rip = try_fault!(self.pop()),
                op::PUSH => {
                    try_fault!(self.push(self.gpr[a]));
                    rip = next;
                }
                op::POP => {
                    let value = try_fault!(self.pop());
                    self.gpr[a] = value;
                    rip = next;
                }
                op::LD8 | op::LD16 | op::LD32 | op::LD64 => {
                    let gpa = self.gpr[b].wrapping_add(imm);
                    let loaded = match opcode {
                        op::LD8 => self.load::<1>(gpa).map(|v| v[0] as u64),
                        op::LD16 => self.load::<2>(gpa).map(|v| u16::from_le_bytes(v) as u64),
                        op::LD32 => self.load::<4>(gpa).map(|v| u32::from_le_bytes(v) as u64),
                        _ => self.load::<8>(gpa).map(u64::from_le_bytes),
                    };
                    match loaded {
                        Ok(v) => self.gpr[a] = v,
                        Err(Access::Fault(kind)) => fault!(kind),
                        Err(Access::Unmapped) => {
                            let size = 1u8 << (opcode - op::LD8);
                            self.pending_read = Some(PendingRead { source: ReadSource::Mmio(gpa), size, dst: a as u8 });
                            self.rip = rip;
                            return (n, Some(Exit::Mmio { gpa, size, is_write: false, value: 0, rip }));
                        }
                    }
                    rip = next;
                }
                op::ST8 | op::ST16 | op::ST32 | op::ST64 => {
                    let gpa = self.gpr[a].wrapping_add(imm);
                    let value = self.gpr[b];
                    let stored = match opcode {
                        op::ST8 => self.store::<1>(gpa, [value as u8]),
                        op::ST16 => self.store::<2>(gpa, (value as u16).to_le_bytes()),
                        op::ST32 => self.store::<4>(gpa, (value as u32).to_le_bytes()),
                        _ => self.store::<8>(gpa, value.to_le_bytes()),
                    };
                    match stored {
                        Ok(()) => {}
                        Err(Access::Fault(kind)) => fault!(kind),
                        Err(Access::Unmapped) => {
                            let size = 1u8 << (opcode - op::ST8);
                            let value = if size == 8 { value } else { value & ((1u64 << (size * 8)) - 1) };
                            retire_exit!(next, Exit::Mmio { gpa, size, is_write: true, value, rip });
                        }
                    }
                    rip = next;
                }
                op::IN8 | op::IN16 | op::IN32 | op::IN8R | op::IN16R | op::IN32R => {
                    let port = if opcode >= op::IN8R { self.gpr[b] as u16 } else { imm as u16 };
                    let size = 1u8 << (opcode & 3);
                    self.pending_read = Some(PendingRead { source: ReadSource::Port(port), size, dst: a as u8 });
                    self.rip = rip;
                    return (n, Some(Exit::Inout { port, size, is_in: true, value: 0, rip }));
                }
                op::OUT8 | op::OUT16 | op::OUT32 | op::OUT8R | op::OUT16R | op::OUT32R => {
                    let port = if opcode >= op::OUT8R { self.gpr[a] as u16 } else { imm as u16 };
                    let size = 1u8 << (opcode & 3);
                    let value = (self.gpr[b] & ((1u64 << (size as u32 * 8)) - 1)) as u32;
                    retire_exit!(next, Exit::Inout { port, size, is_in: false, value, rip });
                }
                op::NOP | op::PAUSE => rip = next,
                op::HLT => {
                    if self.iflag && self.shared.any_pending() {
                        // Woken at once: hlt retires and the interrupt is taken as after any instruction.
                        self.rip = next;
                        n += 1;
                        if let Some(exit) = self.deliver_if_ready() {
                            return (n, Some(exit));
                        }
                        rip = self.rip;
                        continue;
                    }
                    self.halted = true;
                    retire_exit!(next, Exit::Hlt { rip: next });
                }
                op::CLI => {
                    self.iflag = false;
                    rip = next;
                }
                op::STI | op::IRET => {
                    if opcode == op::IRET {
                        let sp = self.gpr[RSP];
                        try_fault!(self.stack_ram(sp, 16));
                        let target = try_fault!(self.stack_load(sp));
                        let flags = try_fault!(self.stack_load(sp.wrapping_add(8)));
                        self.gpr[RSP] = sp.wrapping_add(16);
                        self.load_rflags(flags);
                        self.rip = target;
                    } else {
                        self.iflag = true;
                        self.rip = next;
                    }
                    n += 1;
                    // IF may have just become 1: a pending interrupt is taken before the next instruction.
                    if let Some(exit) = self.deliver_if_ready() {
                        return (n, Some(exit));
                    }
                    rip = self.rip;
                    continue;
                }
                op::RDTSC | op::RDTSCP => {
                    let tsc = self.tsc_source(self.retired + n).wrapping_add(self.tsc_offset);
                    self.gpr[RAX] = tsc & 0xFFFF_FFFF;
                    self.gpr[RDX] = tsc >> 32;
                    if opcode == op::RDTSCP {
                        self.gpr[RCX] = self.tsc_aux & 0xFFFF_FFFF;
                    }
                    rip = next;
                }
                op::RDMSR => {
                    let value = match self.gpr[RCX] as u32 {
                        msr::TSC => self.tsc_source(self.retired + n).wrapping_add(self.tsc_offset),
                        msr::APIC_BASE => self.apic_base,
                        msr::EFER => self.efer,
                        msr::FS_BASE => self.fs_base,
                        msr::GS_BASE => self.gs_base,
                        msr::KERNEL_GS_BASE => self.kernel_gs_base,
                        msr::TSC_AUX => self.tsc_aux,
                        PAT_MSR => self.pat,
                        _ => fault!(FaultKind::UnknownMsr),
                    };
                    self.gpr[RAX] = value & 0xFFFF_FFFF;
                    self.gpr[RDX] = value >> 32;
                    rip = next;
                }
                op::WRMSR => {
                    let value = (self.gpr[RDX] << 32) | (self.gpr[RAX] & 0xFFFF_FFFF);
                    match self.gpr[RCX] as u32 {
                        msr::TSC => self.tsc_offset = value.wrapping_sub(self.tsc_source(self.retired + n)),
                        msr::APIC_BASE => self.apic_base = value,
                        msr::EFER => self.efer = value,
                        msr::FS_BASE => self.fs_base = value,
                        msr::GS_BASE => self.gs_base = value,
                        msr::KERNEL_GS_BASE => self.kernel_gs_base = value,
                        msr::TSC_AUX => self.tsc_aux = value,
                        PAT_MSR => self.pat = value,
                        _ => fault!(FaultKind::UnknownMsr),
                    }
                    rip = next;
                }
                op::LIDT => {
                    self.idtr = self.gpr[a];
                    rip = next;
                }
                op::SIDT => {
                    self.gpr[a] = self.idtr;
                    rip = next;
                }
                op::MOV_TO_CR => {
                    let value = self.gpr[b];
                    match a {
                        0 => self.cr0 = value,
                        3 => self.cr3 = value,
                        4 => self.cr4 = value,
                        _ => fault!(FaultKind::UnknownControlRegister),
                    }
                    rip = next;
                }
                op::MOV_FROM_CR => {
                    self.gpr[a] = match b {
                        0 => self.cr0,
                        3 => self.cr3,
                        4 => self.cr4,
                        _ => fault!(FaultKind::UnknownControlRegister),
                    };
                    rip = next;
                }
                _ => fault!(FaultKind::InvalidOpcode),
            }
            n += 1;
        }
        self.rip = rip;
        (n, None)
    }

    // ---- save and restore ---------------------------------------------------------------------

    /// The vCPU's whole state in its vendor's layout. Call it between runs (the Python binding
    /// guarantees that); pending interrupts injected concurrently are caught up to this moment.
    pub fn save_state(&self) -> VcpuState {
        let g = &self.gpr;
        let registers = match self.vendor {
            Vendor::Intel => VendorState::Intel {
                vmcs: Vmcs {
                    guest_rip: self.rip,
                    guest_rsp: g[4],
                    guest_rflags: self.rflags(),
                    guest_cr0: self.cr0,
                    guest_cr3: self.cr3,
                    guest_cr4: self.cr4,
                    guest_ia32_efer: self.efer,
                    guest_ia32_pat: self.pat,
                    guest_idtr_base: self.idtr,
                    guest_fs_base: self.fs_base,
                    guest_gs_base: self.gs_base,
                    tsc_offset: self.tsc_offset,
                    vpid: self.id as u64 + 1,
                },
                vmxctx: VmxCtx {
                    guest_rax: g[0],
                    guest_rcx: g[1],
                    guest_rdx: g[2],
                    guest_rbx: g[3],
                    guest_rbp: g[5],
                    guest_rsi: g[6],
                    guest_rdi: g[7],
                    guest_r8: g[8],
                    guest_r9: g[9],
                    guest_r10: g[10],
                    guest_r11: g[11],
                    guest_r12: g[12],
                    guest_r13: g[13],
                    guest_r14: g[14],
                    guest_r15: g[15],
                },
                guest_msrs: IntelMsrs { kernel_gs_base: self.kernel_gs_base, tsc_aux: self.tsc_aux, apic_base: self.apic_base },
            },
            Vendor::Amd => VendorState::Amd {
                vmcb_save: VmcbSave {
                    rip: self.rip,
                    rsp: g[4],
                    rax: g[0],
                    rflags: self.rflags(),
                    cr0: self.cr0,
                    cr3: self.cr3,
                    cr4: self.cr4,
                    efer: self.efer,
                    g_pat: self.pat,
                    idtr_base: self.idtr,
                    fs_base: self.fs_base,
                    gs_base: self.gs_base,
                    kernel_gs_base: self.kernel_gs_base,
                    cpl: 0,
                },
                vmcb_control: VmcbControl { tsc_offset: self.tsc_offset, asid: self.id as u64 + 1 },
                swctx: SvmSwCtx {
                    sctx_rcx: g[1],
                    sctx_rdx: g[2],
                    sctx_rbx: g[3],
                    sctx_rbp: g[5],
                    sctx_rsi: g[6],
                    sctx_rdi: g[7],
                    sctx_r8: g[8],
                    sctx_r9: g[9],
                    sctx_r10: g[10],
                    sctx_r11: g[11],
                    sctx_r12: g[12],
                    sctx_r13: g[13],
                    sctx_r14: g[14],
                    sctx_r15: g[15],
                },
                guest_msrs: AmdMsrs { tsc_aux: self.tsc_aux, apic_base: self.apic_base },
            },
        };
        VcpuState {
            vcpu_id: self.id,
            tsc_mode: self.tsc_mode,
            registers,
            pending_interrupts: self.shared.snapshot(),
            halted: self.halted,
            pending_read: self.pending_read,
            instructions_retired: self.retired,
            guest_tsc: self.tsc(),
        }
    }

    /// Load a saved state. Everything is checked before anything changes: a refused state leaves
    /// the vCPU as it was. A host-clock vCPU re-bases its TSC offset so the guest TSC continues
    /// from `guest_tsc`; an instruction-count vCPU takes the offset as saved.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<(), CpuError> {
        let vcpu = self.id;
        if state.registers.vendor() != self.vendor {
            return Err(CpuError::VendorMismatch { vcpu, ours: self.vendor, theirs: state.registers.vendor() });
        }
        if state.tsc_mode != self.tsc_mode {
            return Err(CpuError::TscModeMismatch { vcpu, ours: self.tsc_mode, theirs: state.tsc_mode });
        }
        if state.vcpu_id != self.id {
            return Err(CpuError::VcpuIdMismatch { vcpu, theirs: state.vcpu_id });
        }
        let bad = |field: &str, value: u64, why: &str| CpuError::BadState { vcpu, field: field.into(), value, why: why.into() };
        if let Some(read) = state.pending_read {
            if !matches!(read.size, 1 | 2 | 4 | 8) || (matches!(read.source, ReadSource::Port(_)) && read.size == 8) {
                return Err(bad("pending_read.size", read.size as u64, "is not a size this access can have"));
            }
            if read.dst >= 16 {
                return Err(bad("pending_read.register", read.dst as u64, "is not a general register number (0..15)"));
            }
        }
        let (gpr, rip, flags, cr, efer, pat, idtr, fs, gs, kgs, aux, apic, offset) = match &state.registers {
            VendorState::Intel { vmcs: v, vmxctx: x, guest_msrs: m } => (
                [
                    x.guest_rax,
                    x.guest_rcx,
                    x.guest_rdx,
                    x.guest_rbx,
                    v.guest_rsp,
                    x.guest_rbp,
                    x.guest_rsi,
                    x.guest_rdi,
                    x.guest_r8,
                    x.guest_r9,
                    x.guest_r10,
                    x.guest_r11,
                    x.guest_r12,
                    x.guest_r13,
                    x.guest_r14,
                    x.guest_r15,
                ],
                v.guest_rip,
                v.guest_rflags,
                [v.guest_cr0, v.guest_cr3, v.guest_cr4],
                v.guest_ia32_efer,
                v.guest_ia32_pat,
                v.guest_idtr_base,
                v.guest_fs_base,
                v.guest_gs_base,
                m.kernel_gs_base,
                m.tsc_aux,
                m.apic_base,
                v.tsc_offset,
            ),
            VendorState::Amd { vmcb_save: s, vmcb_control: c, swctx: x, guest_msrs: m } => {
                if s.cpl != 0 {
                    return Err(bad("vmcb_save.cpl", s.cpl, "must be 0: the simulated vCPU runs at CPL 0 only"));
                }
                (
                    [
                        s.rax, x.sctx_rcx, x.sctx_rdx, x.sctx_rbx, s.rsp, x.sctx_rbp, x.sctx_rsi, x.sctx_rdi, x.sctx_r8, x.sctx_r9,
                        x.sctx_r10, x.sctx_r11, x.sctx_r12, x.sctx_r13, x.sctx_r14, x.sctx_r15,
                    ],
                    s.rip,
                    s.rflags,
                    [s.cr0, s.cr3, s.cr4],
                    s.efer,
                    s.g_pat,
                    s.idtr_base,
                    s.fs_base,
                    s.gs_base,
                    s.kernel_gs_base,
                    m.tsc_aux,
                    m.apic_base,
                    c.tsc_offset,
                )
            }
        };
        if flags & !rflags::DEFINED != 0 {
            return Err(bad("rflags", flags, "has bits this vCPU does not keep"));
        }
        if self.tsc_mode == TscMode::Instructions && state.instructions_retired.wrapping_add(offset) != state.guest_tsc {
            return Err(bad(
                "guest_tsc",
                state.guest_tsc,
                &format!(
                    "disagrees with instructions_retired {} + tsc_offset {offset:#x} (an instruction-count TSC is exactly their sum)",
                    state.instructions_retired
                ),
            ));
        }
        self.gpr = gpr;
        self.rip = rip;
        self.load_rflags(flags);
        [self.cr0, self.cr3, self.cr4] = cr;
        self.efer = efer;
        self.pat = pat;
        self.idtr = idtr;
        self.fs_base = fs;
        self.gs_base = gs;
        self.kernel_gs_base = kgs;
        self.tsc_aux = aux;
        self.apic_base = apic;
        self.retired = state.instructions_retired;
        self.tsc_offset = match self.tsc_mode {
            TscMode::Instructions => offset,
            TscMode::Host => state.guest_tsc.wrapping_sub(host_ns()),
        };
        self.halted = state.halted;
        self.pending_read = state.pending_read;
        for (word, bits) in self.shared.pending.iter().zip(state.pending_interrupts) {
            word.store(bits, Ordering::Release);
        }
        Ok(())
    }
}

fn stack_fault(access: Access) -> FaultKind {
    match access {
        Access::Unmapped => FaultKind::StackUnmapped,
        Access::Fault(kind) => kind,
    }
}
