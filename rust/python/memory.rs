//! `_core.GuestMemory`: a minimal binding of `vmm_core::memory::GuestMemory` (create, read,
//! write, harvest dirty pages), enough for the vCPU bindings and their tests. The fuller memory
//! binding keeps the class name and the `inner` field so `_core.Vcpu` can share the memory.

use std::sync::Arc;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::dirty::TrackingChoice;
use crate::memory::{GuestAddress, GuestMemory, MemoryError, MemoryOptions, PAGE_SHIFT};

pub(crate) fn memory_error(err: MemoryError) -> PyErr {
    match err {
        MemoryError::BadSize { .. } => PyValueError::new_err(err.to_string()),
        _ => PyOSError::new_err((err.errno(), err.to_string())),
    }
}

#[pyclass(frozen, name = "GuestMemory", module = "vmmpy._core")]
pub struct PyGuestMemory {
    pub inner: Arc<GuestMemory>,
}

#[pymethods]
impl PyGuestMemory {
    #[new]
    #[pyo3(signature = (memsize, wired = false, lowmem_limit = 3 << 30, dirty_tracking = "soft"))]
    fn new(py: Python<'_>, memsize: u64, wired: bool, lowmem_limit: u64, dirty_tracking: &str) -> PyResult<PyGuestMemory> {
        let tracking = TrackingChoice::parse(dirty_tracking).ok_or_else(|| {
            PyValueError::new_err(format!("dirty_tracking '{dirty_tracking}' is not one of 'soft', 'kernel', 'auto'"))
        })?;
        let opts = MemoryOptions { memsize, wired, lowmem_limit, tracking };
        let memory = py.detach(|| GuestMemory::new(&opts)).map_err(memory_error)?;
        Ok(PyGuestMemory { inner: Arc::new(memory) })
    }

    #[getter]
    fn memsize(&self) -> u64 {
        self.inner.memsize()
    }

    /// `n` bytes from guest-physical address `gpa`.
    fn read<'py>(&self, py: Python<'py>, gpa: u64, n: usize) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = vec![0u8; n];
        self.inner.read(GuestAddress(gpa), &mut out).map_err(memory_error)?;
        Ok(PyBytes::new(py, &out))
    }

    /// Write `data` at `gpa`, marking its pages dirty.
    fn write(&self, gpa: u64, data: &[u8]) -> PyResult<()> {
        self.inner.write(GuestAddress(gpa), data).map_err(memory_error)
    }

    /// The guest page frame numbers dirtied since the last call, as little-endian u64s, and clear them.
    fn get_and_clear_dirty<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let mut out = Vec::new();
        for (index, seg) in self.inner.segments().iter().enumerate() {
            let mut words = vec![0u64; seg.dirty_bitmap().words()];
            self.inner.get_and_clear_dirty_segment(index, &mut words).map_err(memory_error)?;
            let mut pages = Vec::new();
            crate::dirty::bitmap_to_pages(&words, seg.gpa().0 >> PAGE_SHIFT, &mut pages);
            out.extend(pages.iter().flat_map(|pfn| pfn.to_le_bytes()));
        }
        Ok(PyBytes::new(py, &out))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyGuestMemory>()
}
