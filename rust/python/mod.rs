//! PyO3 bindings: the `vmmpy._core` extension module. No logic lives here, only conversions
//! between Python objects and the Rust core, and the GIL released around long work.

mod cpu;
mod errors;
mod memory;
mod pages;
mod snapshot;
mod streams;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PAGE_SIZE", vmm_page_size())?;
    m.add("HIGHMEM_BASE", crate::memory::HIGHMEM_BASE)?;
    m.add("LOWMEM_LIMIT_DEFAULT", crate::memory::LOWMEM_LIMIT_DEFAULT)?;
    errors::register(m)?;
    memory::register(m)?;
    pages::register(m)?;
    snapshot::register(m)?;
    streams::register(m)?;
    cpu::register(m)?;
    Ok(())
}

fn vmm_page_size() -> usize {
    crate::memory::PAGE_SIZE
}
