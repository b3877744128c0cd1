//! The simulated vCPU: a deterministic interpreter for the ISA in docs/isa.md, with amd64-named
//! state, bhyve-style exits, interrupt delivery through a vector table in guest memory, a TSC
//! (host clock or instruction count) with an offset, and save/restore in an Intel (VMCS-like) or
//! AMD (VMCB-like) layout.
//!
//! This module owns the register file and the execution loop. It does not own guest memory (it
//! holds an `Arc<GuestMemory>` and writes through `Segment::store`, so every store is dirty-
//! tracked), nor device models, nor any policy about when to run or what to do with an exit.

pub mod encode;
mod error;
mod exit;
pub mod isa;
mod state;
mod vcpu;

#[cfg(test)]
mod tests;

pub use error::CpuError;
pub use exit::{Exit, FaultKind};
pub use state::{
    AmdMsrs, IntelMsrs, PendingRead, ReadSource, SvmSwCtx, TscMode, VcpuState, Vendor, VendorState, VmcbControl, VmcbSave, Vmcs, VmxCtx,
};
pub use vcpu::{vectors_of, Vcpu, VcpuHandle, POLL_INTERVAL, REGISTER_NAMES};
