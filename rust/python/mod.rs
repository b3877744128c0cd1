//! PyO3 bindings: the `vmmpy._core` extension module. No logic lives here, only conversions
//! between Python objects and the Rust core, and the GIL released around long work.
//!
//! What a call returns is a typed class with named, read-only attributes (declared with
//! `result_class!`), never a bare tuple or dict, so callers and the stubs in `_core.pyi` name
//! every field. Dicts remain only where the keys are data: a register file by name, the ISA's
//! opcode table, and the vCPU's saved state (a persisted format, docs/isa.md).

/// A frozen Python class holding a call's result: named read-only attributes, `==`, a repr that
/// shows every field, and `as_dict()` for reports that add numbers of their own.
macro_rules! result_class {
    ($(#[$meta:meta])* $rust:ident as $name:literal { $($(#[$fmeta:meta])* $field:ident: $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[pyclass(frozen, get_all, eq, skip_from_py_object, name = $name, module = "vmmpy._core")]
        #[derive(Clone, PartialEq)]
        pub struct $rust {
            $($(#[$fmeta])* pub $field: $ty),*
        }

        #[pymethods]
        impl $rust {
            /// Every field by name, as a new dict.
            fn as_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, pyo3::types::PyDict>> {
                let d = pyo3::types::PyDict::new(py);
                $(d.set_item(stringify!($field), self.$field.clone())?;)*
                Ok(d)
            }

            fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
                use pyo3::IntoPyObjectExt;
                let fields: Vec<String> = vec![$(format!("{}={}", stringify!($field), self.$field.clone().into_bound_py_any(py)?.repr()?)),*];
                Ok(format!("{}({})", $name, fields.join(", ")))
            }
        }
    };
}

mod cpu;
mod errors;
mod kvm;
mod memory;
mod pages;
mod postcopy;
mod progress;
mod sched;
mod snapshot;
mod streams;
mod tls;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PAGE_SIZE", vmm_page_size())?;
    m.add("HIGHMEM_BASE", crate::memory::HIGHMEM_BASE)?;
    m.add("LOWMEM_LIMIT_DEFAULT", crate::memory::LOWMEM_LIMIT_DEFAULT)?;
    errors::register(m)?;
    // Long core work (wiring) stops for Ctrl-C instead of finishing first.
    crate::memory::set_interrupt_check(errors::python_interrupted);
    memory::register(m)?;
    pages::register(m)?;
    postcopy::register(m)?;
    snapshot::register(m)?;
    streams::register(m)?;
    tls::register(m)?;
    progress::register(m)?;
    sched::register(m)?;
    cpu::register(m)?;
    kvm::register(m)?;
    Ok(())
}

fn vmm_page_size() -> usize {
    crate::memory::PAGE_SIZE
}
