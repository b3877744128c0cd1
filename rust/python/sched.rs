//! Bindings for `crate::sched`: a thread's scheduler slice.

use pyo3::prelude::*;

/// The slice thread `tid` (0: the calling thread) runs with, in nanoseconds, or None when its
/// policy is not a normal one. Raises OSError (ESRCH for a thread that is gone).
#[pyfunction]
fn thread_slice(tid: i32) -> PyResult<Option<u64>> {
    Ok(crate::sched::slice(tid)?)
}

/// Ask for a slice of `slice_ns` nanoseconds for thread `tid` (0: the calling thread; 0 ns: the
/// scheduler's default), keeping its policy and nice value. Returns the slice it had, or None
/// (nothing changed) when its policy is not a normal one. Raises OSError.
#[pyfunction]
fn set_thread_slice(tid: i32, slice_ns: u64) -> PyResult<Option<u64>> {
    Ok(crate::sched::set_slice(tid, slice_ns)?)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MIN_THREAD_SLICE_NS", crate::sched::MIN_SLICE_NS)?;
    m.add_function(wrap_pyfunction!(thread_slice, m)?)?;
    m.add_function(wrap_pyfunction!(set_thread_slice, m)?)?;
    Ok(())
}
