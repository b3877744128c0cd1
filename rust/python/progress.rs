//! Binding of the progress meter: a long call given one advances it with the GIL released, and
//! Python reads it from another thread meanwhile.

use std::sync::Arc;

use pyo3::prelude::*;

use crate::progress::Meter;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyProgressMeter>()
}

/// Counters a long call (`send_*_pages`, `send_pages_multi`, `recv_share`, `write_memory_file`,
/// `read_memory_file`) advances as it goes, a window or piece at a time, readable from another
/// thread while it runs: pages (all it covers) and data pages (those whose bytes it moves), done
/// and in all (a total is 0 until the call knows it), and bytes moved. One meter may serve several
/// calls (a round's streams); its figures only grow.
#[pyclass(name = "ProgressMeter", module = "vmmpy._core", frozen)]
pub struct PyProgressMeter {
    pub(super) inner: Arc<Meter>,
}

#[pymethods]
impl PyProgressMeter {
    #[new]
    fn new() -> PyProgressMeter {
        PyProgressMeter { inner: Arc::new(Meter::new()) }
    }

    /// (pages_total, data_pages_total, pages_done, data_pages_done, bytes_done), read together.
    fn read(&self) -> (u64, u64, u64, u64, u64) {
        let r = self.inner.read();
        (r.pages_total, r.data_pages_total, r.pages_done, r.data_pages_done, r.bytes_done)
    }

    fn __repr__(&self) -> String {
        let r = self.inner.read();
        format!(
            "ProgressMeter(pages {}/{}, data pages {}/{}, {} bytes)",
            r.pages_done, r.pages_total, r.data_pages_done, r.data_pages_total, r.bytes_done
        )
    }
}

/// The core meter behind an optional Python one, for a call to carry into `py.detach`.
pub(super) fn meter_of(meter: Option<PyRef<'_, PyProgressMeter>>) -> Option<Arc<Meter>> {
    meter.map(|m| m.inner.clone())
}
