//! Errors from the vCPU's control surface (not guest faults: those are `Exit::Fault`). Each names
//! the vCPU, the thing and the value.

use std::fmt;

use super::state::{PendingRead, TscMode, Vendor};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CpuError {
    UnknownRegister {
        vcpu: u32,
        name: String,
    },
    BadRegisterValue {
        vcpu: u32,
        name: String,
        value: u64,
        why: String,
    },
    /// `run` was called while an `in`/MMIO load waits for `complete_read`.
    ReadPending {
        vcpu: u32,
        read: PendingRead,
    },
    /// `complete_read` was called with nothing waiting.
    NoReadPending {
        vcpu: u32,
    },
    /// The value given to `complete_read` does not fit the access.
    ReadValueTooWide {
        vcpu: u32,
        read: PendingRead,
        value: u64,
    },
    VendorMismatch {
        vcpu: u32,
        ours: Vendor,
        theirs: Vendor,
    },
    TscModeMismatch {
        vcpu: u32,
        ours: TscMode,
        theirs: TscMode,
    },
    VcpuIdMismatch {
        vcpu: u32,
        theirs: u32,
    },
    /// A saved state field is out of range.
    BadState {
        vcpu: u32,
        field: String,
        value: u64,
        why: String,
    },
    /// Guest memory was closed; the vCPU cannot run on it.
    MemoryClosed {
        vcpu: u32,
        segment: String,
    },
    /// The instruction at `rip` needs lazily restored memory that could not be loaded and
    /// checked (`why`, naming the file and the chunk); it did not retire, and the guest must stop.
    MemoryUnavailable {
        vcpu: u32,
        rip: u64,
        why: String,
    },
}

impl fmt::Display for CpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuError::UnknownRegister { vcpu, name } => {
                write!(f, "vcpu {vcpu}: unknown register '{name}' (known: {})", super::REGISTER_NAMES.join(", "))
            }
            CpuError::BadRegisterValue { vcpu, name, value, why } => {
                write!(f, "vcpu {vcpu}: register '{name}' cannot be set to {value:#x}: {why}")
            }
            CpuError::ReadPending { vcpu, read } => {
                write!(f, "vcpu {vcpu} is waiting for the result of '{read}'; call complete_read(value) before running it again")
            }
            CpuError::NoReadPending { vcpu } => write!(f, "vcpu {vcpu} has no in/mmio read waiting for a value"),
            CpuError::ReadValueTooWide { vcpu, read, value } => {
                write!(f, "vcpu {vcpu}: value {value:#x} does not fit the {} bytes of '{read}'", read.size)
            }
            CpuError::VendorMismatch { vcpu, ours, theirs } => {
                write!(f, "vcpu {vcpu} is an {ours} vcpu and cannot restore {theirs} state")
            }
            CpuError::TscModeMismatch { vcpu, ours, theirs } => {
                write!(f, "vcpu {vcpu} keeps its TSC by '{}' and cannot restore state saved with TSC mode '{}'", ours.name(), theirs.name())
            }
            CpuError::VcpuIdMismatch { vcpu, theirs } => write!(f, "vcpu {vcpu} cannot restore the state of vcpu {theirs}"),
            CpuError::BadState { vcpu, field, value, why } => {
                write!(f, "vcpu {vcpu}: saved state field '{field}' = {value:#x} {why}")
            }
            CpuError::MemoryClosed { vcpu, segment } => {
                write!(f, "vcpu {vcpu} cannot run: guest memory segment '{segment}' was closed")
            }
            CpuError::MemoryUnavailable { vcpu, rip, why } => write!(f, "vcpu {vcpu} stopped at rip {rip:#x}: {why}"),
        }
    }
}

impl std::error::Error for CpuError {}
