//! PyO3 bindings: the `vmmpy._core` extension module. Bindings only; no logic lives here.

mod cpu;
mod memory;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    memory::register(m)?;
    cpu::register(m)?;
    Ok(())
}
