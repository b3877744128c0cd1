//! The KVM vCPU backend (x86-64 Linux): real guest code on the host CPU, with EPT/NPT dirty
//! logging, through rust-vmm's kvm-ioctls.
//!
//! - `vm`: /dev/kvm, the VM (in-kernel irqchip; the dirty bitmap with manual protect, or the
//!   dirty ring), guest memory segments as memory slots, and each slot's dirty log as a
//!   [`DirtyLog`](crate::dirty::DirtyLog) (`memory` registers them when a guest's tracking is
//!   "kvm" or "kvm-ring").
//! - `vcpu`: a vCPU entered directly in long mode, its exits, stopping it from another thread.
//! - `state`: the vCPU's and VM's saved state (the kernel's structs as bytes).
//!
//! Mechanism only: which guest runs, when to save, what to refuse is decided in Python.

mod probe;
mod state;
mod vcpu;
mod vm;

pub use probe::ring_trusted;
pub use state::{KvmVcpuState, KvmVmState, MSR_TSC, SAVED_MSRS};
pub use vcpu::{registers_of, KvmExit, KvmVcpu, PendingRead, GDT_ADDRESS, GPR_NAMES, PML4_ADDRESS};
pub use vm::{DirtyMode, KvmError, KvmSlotLog, KvmVm, RING_BYTES};

#[cfg(test)]
mod tests;
