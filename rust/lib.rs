//! vmm_core: the "hardware" under vmmpy.
//!
//! Guest memory (`memory`), EPT-like dirty tracking (`dirty`), page batches on the wire (`wire`),
//! page hashes and the commit digest (`digest`), checkpoint memory files (`snapshot`), the
//! simulated vCPU (`cpu`), the KVM vCPU backend (`kvm`), the meter long calls advance while
//! another thread reads it (`progress`) and a thread's slice of the host scheduler (`sched`).
//! Everything here is mechanism, fast and free of the GIL; policy (what to save, when to migrate)
//! lives in the Python package. The PyO3 bindings (`python`) are compiled only with the `python`
//! feature, which maturin turns on, so `cargo test` and `cargo bench` never
//! link libpython.

pub mod cpu;
pub mod digest;
pub mod dirty;
pub mod kvm;
pub mod memory;
pub mod progress;
pub mod sched;
pub mod snapshot;
mod uffd;
pub mod wire;

#[cfg(feature = "python")]
mod python;
