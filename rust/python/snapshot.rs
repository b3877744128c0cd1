//! Bindings for the checkpoint memory file: write it sparse, read it back verified, hash it.
//! All of it runs with the GIL released.

use std::os::fd::RawFd;

use pyo3::create_exception;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::memory_error;
use super::memory::PyGuestMemory;
use crate::snapshot::{self, SnapshotError, DEFAULT_CHUNK_SIZE};

create_exception!(
    _core,
    MemoryFileError,
    PyOSError,
    "Writing, reading or verifying a checkpoint memory file failed; the message says where."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MemoryFileError", m.py().get_type::<MemoryFileError>())?;
    m.add("DEFAULT_CHUNK_SIZE", DEFAULT_CHUNK_SIZE)?;
    m.add_function(wrap_pyfunction!(write_memory_file, m)?)?;
    m.add_function(wrap_pyfunction!(read_memory_file, m)?)?;
    m.add_function(wrap_pyfunction!(memory_chunk_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(hash_memory_file, m)?)?;
    Ok(())
}

pub(super) fn snapshot_error(err: SnapshotError) -> PyErr {
    match err {
        SnapshotError::Memory(e) => memory_error(e),
        other => MemoryFileError::new_err((other.errno(), other.to_string())),
    }
}

/// Write guest memory to `fd` (a regular file; truncated first) as a sparse checkpoint memory
/// image: lowmem, then highmem; never-touched and all-zero pages left as holes. Returns a dict:
/// bytes_written, data_pages, zero_pages, untouched_pages, pwrite_calls, file_size, chunk_size,
/// chunk_hashes (xxh3-128 of each chunk, as ints), seconds.
#[pyfunction]
#[pyo3(signature = (memory, fd, *, chunk_size = DEFAULT_CHUNK_SIZE))]
fn write_memory_file<'py>(py: Python<'py>, memory: PyRef<'py, PyGuestMemory>, fd: RawFd, chunk_size: u64) -> PyResult<Bound<'py, PyDict>> {
    let mem = memory.inner.clone();
    let s = py.detach(move || snapshot::write_memory_file(&mem, fd, chunk_size)).map_err(snapshot_error)?;
    let d = PyDict::new(py);
    d.set_item("bytes_written", s.bytes_written)?;
    d.set_item("data_pages", s.data_pages)?;
    d.set_item("zero_pages", s.zero_pages)?;
    d.set_item("untouched_pages", s.untouched_pages)?;
    d.set_item("pwrite_calls", s.pwrite_calls)?;
    d.set_item("file_size", s.file_size)?;
    d.set_item("chunk_size", s.chunk_size)?;
    d.set_item("chunk_hashes", s.chunk_hashes)?;
    d.set_item("seconds", s.seconds)?;
    Ok(d)
}

/// Read the memory file at `fd` into fresh guest memory of the same layout, only its data
/// extents, without marking pages dirty. With `chunk_hashes`, every chunk is hashed and compared
/// before this returns; a mismatch raises MemoryFileError naming the chunk and its guest-physical
/// range, and the memory must be discarded. Returns a dict: bytes_read, hole_bytes, data_extents,
/// verified, seconds.
#[pyfunction]
#[pyo3(signature = (memory, fd, *, chunk_hashes = None, chunk_size = DEFAULT_CHUNK_SIZE))]
fn read_memory_file<'py>(
    py: Python<'py>,
    memory: PyRef<'py, PyGuestMemory>,
    fd: RawFd,
    chunk_hashes: Option<Vec<u128>>,
    chunk_size: u64,
) -> PyResult<Bound<'py, PyDict>> {
    let mem = memory.inner.clone();
    let s = py
        .detach(move || snapshot::read_memory_file(&mem, fd, chunk_hashes.as_deref().map(|h| (h, chunk_size))))
        .map_err(snapshot_error)?;
    let d = PyDict::new(py);
    d.set_item("bytes_read", s.bytes_read)?;
    d.set_item("hole_bytes", s.hole_bytes)?;
    d.set_item("data_extents", s.data_extents)?;
    d.set_item("verified", s.verified)?;
    d.set_item("seconds", s.seconds)?;
    Ok(d)
}

/// The chunk hashes guest memory has now, in memory-file order (what a write would record).
#[pyfunction]
#[pyo3(signature = (memory, *, chunk_size = DEFAULT_CHUNK_SIZE))]
fn memory_chunk_hashes(py: Python<'_>, memory: PyRef<'_, PyGuestMemory>, chunk_size: u64) -> PyResult<Vec<u128>> {
    let mem = memory.inner.clone();
    py.detach(move || snapshot::memory_chunk_hashes(&mem, chunk_size)).map_err(snapshot_error)
}

/// The chunk hashes of a memory file, reading only its data extents: (hashes, file size).
#[pyfunction]
#[pyo3(signature = (fd, *, chunk_size = DEFAULT_CHUNK_SIZE))]
fn hash_memory_file(py: Python<'_>, fd: RawFd, chunk_size: u64) -> PyResult<(Vec<u128>, u64)> {
    py.detach(move || snapshot::hash_memory_file(fd, chunk_size)).map_err(snapshot_error)
}
