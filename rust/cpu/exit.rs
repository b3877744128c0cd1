//! What `Vcpu::run` returns: the simulated VM_RUN's `vm_exit`, and the faults that stop a guest.

use std::fmt;

/// Why the vCPU stopped. Every exit carries what the device model needs to handle it.
///
/// Retirement rules (docs/isa.md, "Exits"): writes (`out`, an MMIO store) and `hlt` retire before
/// the exit, so `rip` in the register file already points past them. Reads (`in`, an MMIO load) do
/// not: the vCPU holds a pending read that `Vcpu::complete_read` finishes. A faulting instruction
/// never retires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `in` or `out`. `value` is the data written (zero-extended from `size` bytes) for `out`, zero
    /// for `in`. `rip` is the address of the instruction.
    Inout { port: u16, size: u8, is_in: bool, value: u32, rip: u64 },
    /// A load or store to a guest-physical address no memory segment backs.
    Mmio { gpa: u64, size: u8, is_write: bool, value: u64, rip: u64 },
    /// `hlt` with no interrupt to wake it; `rip` is the address after the `hlt`.
    Hlt { rip: u64 },
    /// Another thread called `request_pause`.
    PauseRequested,
    /// The instruction budget given to `run` is spent.
    Budget,
    /// The instruction at `rip` cannot execute; it did not retire and nothing changed.
    Fault { kind: FaultKind, rip: u64 },
}

impl Exit {
    /// The short lower-case name Python sees as `VmExit.kind`.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Exit::Inout { .. } => "inout",
            Exit::Mmio { .. } => "mmio",
            Exit::Hlt { .. } => "hlt",
            Exit::PauseRequested => "pause_requested",
            Exit::Budget => "budget",
            Exit::Fault { .. } => "fault",
        }
    }
}

/// Faults are exits, not guest exceptions: the simulated vCPU does not deliver them through the
/// vector table. The device model (or the user) decides what a fault means; usually the guest is
/// dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Byte 0 is not an opcode of docs/isa.md.
    InvalidOpcode,
    /// A reserved bit of the instruction word is set.
    ReservedBits,
    /// `div`/`rem`/`idiv`/`irem` by zero, or `idiv`/`irem` of i64::MIN by -1.
    DivideError,
    /// Instruction fetch from an address no segment backs.
    FetchUnmapped,
    /// An access (fetch, load, store, stack, vector table) that starts in a segment and runs past
    /// its end.
    CrossesSegment,
    /// A push, pop, call, ret, iret or interrupt delivery touching memory no segment backs:
    /// the stack must be RAM.
    StackUnmapped,
    /// The vector table entry for an interrupt being delivered is not in RAM.
    VectorTableUnmapped,
    /// `rdmsr`/`wrmsr` of an MSR index the vCPU does not have.
    UnknownMsr,
    /// `mov` to or from a control register other than cr0, cr3, cr4.
    UnknownControlRegister,
    /// Guest memory was closed while the vCPU was running.
    MemoryClosed,
    /// Lazily restored memory the instruction needs could not be loaded and checked. Never an
    /// exit: `Vcpu::run` turns it into `CpuError::MemoryUnavailable`, which stops the guest.
    MemoryUnavailable,
}

impl FaultKind {
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::InvalidOpcode => "invalid_opcode",
            FaultKind::ReservedBits => "reserved_bits",
            FaultKind::DivideError => "divide_error",
            FaultKind::FetchUnmapped => "fetch_unmapped",
            FaultKind::CrossesSegment => "crosses_segment",
            FaultKind::StackUnmapped => "stack_unmapped",
            FaultKind::VectorTableUnmapped => "vector_table_unmapped",
            FaultKind::UnknownMsr => "unknown_msr",
            FaultKind::UnknownControlRegister => "unknown_control_register",
            FaultKind::MemoryClosed => "memory_closed",
            FaultKind::MemoryUnavailable => "memory_unavailable",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Exit::Inout { port, size, is_in, value, rip } => {
                let dir = if is_in { "in" } else { "out" };
                write!(f, "{dir}{} port {port:#x}", size * 8)?;
                if !is_in {
                    write!(f, " value {value:#x}")?;
                }
                write!(f, " at rip {rip:#x}")
            }
            Exit::Mmio { gpa, size, is_write, value, rip } => {
                let dir = if is_write { "write" } else { "read" };
                write!(f, "mmio {dir} of {size} bytes at gpa {gpa:#x}")?;
                if is_write {
                    write!(f, " value {value:#x}")?;
                }
                write!(f, " at rip {rip:#x}")
            }
            Exit::Hlt { rip } => write!(f, "hlt (rip {rip:#x})"),
            Exit::PauseRequested => f.write_str("pause requested"),
            Exit::Budget => f.write_str("instruction budget exhausted"),
            Exit::Fault { kind, rip } => write!(f, "fault {kind} at rip {rip:#x}"),
        }
    }
}
