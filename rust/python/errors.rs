//! How core errors become Python exceptions: address and OS failures are `GuestMemoryError`, an
//! `OSError` carrying the errno a kernel would give; impossible sizes are `ValueError`.

use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::memory::MemoryError;

create_exception!(_core, GuestMemoryError, PyOSError, "A guest memory access or mapping failed; errno says how.");

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("GuestMemoryError", m.py().get_type::<GuestMemoryError>())
}

pub fn memory_error(err: MemoryError) -> PyErr {
    match err {
        MemoryError::BadSize { .. } => PyValueError::new_err(err.to_string()),
        _ => GuestMemoryError::new_err((err.errno(), err.to_string())),
    }
}
