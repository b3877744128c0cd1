//! How core errors become Python exceptions: address and OS failures are `GuestMemoryError`, an
//! `OSError` carrying the errno a kernel would give; a chunk of lazily restored memory that could
//! not be loaded and checked is its subclass `LazyMemoryError`; impossible sizes are `ValueError`.
//! Work the process interrupted (wiring, on the main thread) raises what the signal handler
//! raised: Ctrl-C's `KeyboardInterrupt`, carrying the core's words on what was stopped where.

use std::sync::Mutex;

use pyo3::create_exception;
use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::memory::MemoryError;

/// The exception a Python signal handler raised while the core's long work asked
/// ([`python_interrupted`]), for the call that stopped to raise.
static INTERRUPTION: Mutex<Option<PyErr>> = Mutex::new(None);

/// The core's interrupt check (`memory::set_interrupt_check`): run Python's pending signal
/// handlers (on the main thread; elsewhere there are none to run). One that raised, as Ctrl-C's
/// does (KeyboardInterrupt), means interrupted; its exception is kept for [`memory_error`].
pub fn python_interrupted() -> bool {
    // Handlers run on the main thread only: elsewhere there is nothing to ask, and attaching
    // would take the interpreter lock from whatever Python runs meanwhile.
    // SAFETY: both calls only read the calling thread's and the process's ids.
    if unsafe { libc::gettid() != libc::getpid() } {
        return false;
    }
    Python::attach(|py| match py.check_signals() {
        Ok(()) => false,
        Err(err) => {
            *INTERRUPTION.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(err);
            true
        }
    })
}

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
        MemoryError::Interrupted { .. } => {
            // The handler's own exception, said with what was stopped where it is KeyboardInterrupt.
            let raised = INTERRUPTION.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
            Python::attach(|py| match raised {
                Some(e) if !e.is_instance_of::<PyKeyboardInterrupt>(py) => e,
                _ => PyKeyboardInterrupt::new_err(err.to_string()),
            })
        }
        MemoryError::ChunkUnavailable { .. } => LazyMemoryError::new_err((err.errno(), err.to_string())),
        _ => GuestMemoryError::new_err((err.errno(), err.to_string())),
    }
}
