//! How core errors become Python exceptions: address and OS failures are `GuestMemoryError`, an
//! `OSError` carrying the errno a kernel would give; a chunk of lazily restored memory that could
//! not be loaded and checked is its subclass `LazyMemoryError`; impossible sizes are `ValueError`.

use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::memory::MemoryError;

create_exception!(_core, GuestMemoryError, PyOSError, "A guest memory access or mapping failed; errno says how.");
create_exception!(
    _core,
    LazyMemoryError,
    GuestMemoryError,
    "Lazily restored memory the guest needs could not be loaded and checked; the message names the file, the chunk's guest-physical range and what was wrong."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("GuestMemoryError", m.py().get_type::<GuestMemoryError>())?;
    m.add("LazyMemoryError", m.py().get_type::<LazyMemoryError>())
}

pub fn memory_error(err: MemoryError) -> PyErr {
    match err {
        MemoryError::BadSize { .. } => PyValueError::new_err(err.to_string()),
        MemoryError::ChunkUnavailable { .. } => LazyMemoryError::new_err((err.errno(), err.to_string())),
        _ => GuestMemoryError::new_err((err.errno(), err.to_string())),
    }
}
