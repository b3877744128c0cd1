//! Bindings for the checkpoint memory file: write it sparse, read it back verified, hash it.
//! All of it runs with the GIL released.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use pyo3::create_exception;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;

use super::errors::memory_error;
use super::memory::PyGuestMemory;
use super::progress::{meter_of, PyProgressMeter};
use crate::memory::{GuestMemory, LiveCapture};
use crate::snapshot::{self, CachePolicy, SnapshotError, DEFAULT_CHUNK_SIZE};

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
    m.add_function(wrap_pyfunction!(cached_pages, m)?)?;
    m.add_function(wrap_pyfunction!(memory_file_is_cold, m)?)?;
    m.add_function(wrap_pyfunction!(write_memory_file_live, m)?)?;
    m.add_class::<PyLiveCapture>()?;
    m.add_class::<LiveCopyStats>()?;
    m.add_function(wrap_pyfunction!(write_packed_pages, m)?)?;
    m.add_class::<MemoryFileWritten>()?;
    m.add_class::<MemoryFileRead>()?;
    m.add_class::<MemoryFileHashes>()?;
    m.add_class::<PackedPagesWritten>()?;
    Ok(())
}

result_class! {
    /// What writing a checkpoint memory file did: bytes and pages written, pages left as holes
    /// (all-zero, never touched), pwrite calls, the file's size, its chunk size and the xxh3-128 of
    /// each chunk (as ints), and the seconds it took.
    MemoryFileWritten as "MemoryFileWritten" {
        bytes_written: u64,
        data_pages: u64,
        zero_pages: u64,
        untouched_pages: u64,
        pwrite_calls: u64,
        file_size: u64,
        chunk_size: u64,
        chunk_hashes: Vec<u128>,
        seconds: f64,
    }
}

result_class! {
    /// What copy-before-write did during a live snapshot: pages a guest write copied out before
    /// writing, the most held at once, and how often and how long guest writes waited for room
    /// (the copy limit).
    LiveCopyStats as "LiveCopyStats" {
        copied_pages: u64,
        peak_held_pages: u64,
        throttled_writes: u64,
        throttled_seconds: f64,
    }
}

result_class! {
    /// What reading a checkpoint memory file did: bytes read, bytes of holes skipped, data
    /// extents, bytes read that the restore then asked the kernel to drop from the page cache (a
    /// file the read brought in from the disk is not left cached beside the guest; the kernel
    /// keeps dirty pages, and tmpfs all of them), whether every chunk was checked against its
    /// hash, and the seconds it took.
    MemoryFileRead as "MemoryFileRead" {
        bytes_read: u64,
        hole_bytes: u64,
        data_extents: u64,
        cache_released: u64,
        verified: bool,
        seconds: f64,
    }
}

result_class! {
    /// A memory file's chunk hashes (xxh3-128, as ints, in file order) and its size.
    MemoryFileHashes as "MemoryFileHashes" {
        chunk_hashes: Vec<u128>,
        file_size: u64,
    }
}

result_class! {
    /// What writing a diff's packed pages did: bytes written, pwritev/pwrite calls, the packed
    /// file's chunk hashes (xxh3-128, as ints) and the seconds it took.
    PackedPagesWritten as "PackedPagesWritten" {
        bytes_written: u64,
        pwrite_calls: u64,
        chunk_hashes: Vec<u128>,
        seconds: f64,
    }
}

pub(super) fn snapshot_error(err: SnapshotError) -> PyErr {
    match err {
        SnapshotError::Memory(e) => memory_error(e),
        other => MemoryFileError::new_err((other.errno(), other.to_string())),
    }
}

/// Write guest memory to `fd` (a regular file; truncated first) as a sparse checkpoint memory
/// image: lowmem, then highmem; never-touched and all-zero pages left as holes. Returns a
/// `MemoryFileWritten`. A `meter` (`ProgressMeter`) learns the image's pages, then advances as
/// they are written or skipped.
#[pyfunction]
#[pyo3(signature = (memory, fd, *, chunk_size = DEFAULT_CHUNK_SIZE, meter = None))]
fn write_memory_file(
    py: Python<'_>,
    memory: PyRef<'_, PyGuestMemory>,
    fd: RawFd,
    chunk_size: u64,
    meter: Option<PyRef<'_, PyProgressMeter>>,
) -> PyResult<MemoryFileWritten> {
    let mem = memory.inner.clone();
    let meter = meter_of(meter);
    let s = py.detach(move || snapshot::write_memory_file(&mem, fd, chunk_size, meter.as_deref())).map_err(snapshot_error)?;
    Ok(s.into())
}

impl From<snapshot::WriteStats> for MemoryFileWritten {
    fn from(s: snapshot::WriteStats) -> MemoryFileWritten {
        MemoryFileWritten {
            bytes_written: s.bytes_written,
            data_pages: s.data_pages,
            zero_pages: s.zero_pages,
            untouched_pages: s.untouched_pages,
            pwrite_calls: s.pwrite_calls,
            file_size: s.file_size,
            chunk_size: s.chunk_size,
            chunk_hashes: s.chunk_hashes,
            seconds: s.seconds,
        }
    }
}

/// Read the memory file at `fd` into fresh guest memory of the same layout, only its data
/// extents, without marking pages dirty. With `chunk_hashes`, every chunk is hashed and compared
/// before this returns; a mismatch raises MemoryFileError naming the chunk and its guest-physical
/// range, and the memory must be discarded. Returns a `MemoryFileRead`. A `meter` learns the
/// image's pages, then advances as they are read or passed over. `page_cache`: "auto" drops what
/// it read from the page cache when the file was cold, "release" always, "keep" never.
#[pyfunction]
#[pyo3(signature = (memory, fd, *, chunk_hashes = None, chunk_size = DEFAULT_CHUNK_SIZE, meter = None, page_cache = "auto"))]
fn read_memory_file(
    py: Python<'_>,
    memory: PyRef<'_, PyGuestMemory>,
    fd: RawFd,
    chunk_hashes: Option<Vec<u128>>,
    chunk_size: u64,
    meter: Option<PyRef<'_, PyProgressMeter>>,
    page_cache: &str,
) -> PyResult<MemoryFileRead> {
    let mem = memory.inner.clone();
    let meter = meter_of(meter);
    let cache = parse_page_cache(page_cache)?;
    let s = py
        .detach(move || {
            snapshot::read_memory_file_cached(&mem, fd, chunk_hashes.as_deref().map(|h| (h, chunk_size)), meter.as_deref(), cache)
        })
        .map_err(snapshot_error)?;
    Ok(MemoryFileRead {
        bytes_read: s.bytes_read,
        hole_bytes: s.hole_bytes,
        data_extents: s.data_extents,
        cache_released: s.cache_released,
        verified: s.verified,
        seconds: s.seconds,
    })
}

/// The chunk hashes guest memory has now, in memory-file order (what a write would record).
#[pyfunction]
#[pyo3(signature = (memory, *, chunk_size = DEFAULT_CHUNK_SIZE))]
fn memory_chunk_hashes(py: Python<'_>, memory: PyRef<'_, PyGuestMemory>, chunk_size: u64) -> PyResult<Vec<u128>> {
    let mem = memory.inner.clone();
    py.detach(move || snapshot::memory_chunk_hashes(&mem, chunk_size)).map_err(snapshot_error)
}

/// The chunk hashes of a memory file, reading only its data extents (a `MemoryFileHashes`).
#[pyfunction]
#[pyo3(signature = (fd, *, chunk_size = DEFAULT_CHUNK_SIZE))]
fn hash_memory_file(py: Python<'_>, fd: RawFd, chunk_size: u64) -> PyResult<MemoryFileHashes> {
    let (chunk_hashes, file_size) = py.detach(move || snapshot::hash_memory_file(fd, chunk_size)).map_err(snapshot_error)?;
    Ok(MemoryFileHashes { chunk_hashes, file_size })
}

/// What a restore does with the page cache: "auto", "release" or "keep" (`rust/snapshot/pagecache.rs`).
pub(super) fn parse_page_cache(name: &str) -> PyResult<CachePolicy> {
    CachePolicy::parse(name)
        .ok_or_else(|| pyo3::exceptions::PyValueError::new_err(format!("page_cache must be 'auto', 'release' or 'keep', not {name:?}")))
}

/// Whether a restore of the memory file at `fd` would bring it in from the disk: fewer than half
/// of its data pages are in the page cache now (False where the kernel cannot say). A caller
/// that reads the file before restoring it (to verify it) asks first and passes
/// page_cache="release" or "keep" to the restore.
#[pyfunction]
fn memory_file_is_cold(py: Python<'_>, fd: RawFd) -> PyResult<bool> {
    py.detach(move || snapshot::memory_file_is_cold(fd)).map_err(snapshot_error)
}

/// Pages of the file at `fd` in `offset..offset+length` (0: to its end) that are in the page
/// cache now, or None where the kernel cannot say (`cachestat(2)`, Linux 6.5).
#[pyfunction]
#[pyo3(signature = (fd, offset = 0, length = 0))]
fn cached_pages(fd: RawFd, offset: u64, length: u64) -> Option<u64> {
    snapshot::cached_pages(fd, offset, length)
}

/// A live snapshot's copy-before-write on a guest's memory, armed by `LiveCapture(memory,
/// limit_pages)` with the guest paused: from then on the first write to each page saves its old
/// bytes (at most `limit_pages` held at once; a writer waits for room beyond that), so
/// `write_memory_file_live` writes memory as it was at this moment while the guest runs on.
/// `cancel()` stops a write under way; `finish()` (and dropping it) lifts the protection.
#[pyclass(frozen, name = "LiveCapture", module = "vmmpy._core")]
pub struct PyLiveCapture {
    memory: Arc<GuestMemory>,
    capture: LiveCapture,
    cancelled: AtomicBool,
}

#[pymethods]
impl PyLiveCapture {
    #[new]
    fn new(memory: PyRef<'_, PyGuestMemory>, limit_pages: usize) -> PyResult<PyLiveCapture> {
        let capture = memory.inner.arm_live_capture(limit_pages).map_err(memory_error)?;
        Ok(PyLiveCapture { memory: memory.inner.clone(), capture, cancelled: AtomicBool::new(false) })
    }

    /// Stop a write under way at its next buffer (it then fails saying it was cancelled).
    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// Lift the protection now (idempotent).
    fn finish(&self) {
        self.capture.finish();
    }

    /// Copied-out pages held right now.
    #[getter]
    fn held_pages(&self) -> usize {
        self.capture.held_pages()
    }

    /// What copy-before-write did so far (a `LiveCopyStats`).
    fn stats(&self) -> LiveCopyStats {
        let s = self.capture.stats();
        LiveCopyStats {
            copied_pages: s.copied_pages,
            peak_held_pages: s.peak_held_pages,
            throttled_writes: s.throttled_writes,
            throttled_seconds: s.throttled_seconds,
        }
    }
}

/// Write the memory `capture` holds (as it was when armed) to `fd` as `write_memory_file` would
/// have then, while the guest runs; the capture is lifted when this returns, whatever happened
/// (`capture.stats()` then says what copy-before-write did). Returns a `MemoryFileWritten`.
#[pyfunction]
#[pyo3(signature = (capture, fd, *, chunk_size = DEFAULT_CHUNK_SIZE, meter = None))]
fn write_memory_file_live(
    py: Python<'_>,
    capture: Py<PyLiveCapture>,
    fd: RawFd,
    chunk_size: u64,
    meter: Option<PyRef<'_, PyProgressMeter>>,
) -> PyResult<MemoryFileWritten> {
    let meter = meter_of(meter);
    let held = capture.clone_ref(py);
    let s = py
        .detach(move || {
            let c = held.get();
            snapshot::write_memory_file_live(&c.memory, &c.capture, fd, chunk_size, meter.as_deref(), &c.cancelled)
        })
        .map_err(snapshot_error)?;
    Ok(s.into())
}

/// Write the memory-file pages of `runs` (`[first page, count]` pairs, ascending; lowmem then
/// highmem) packed back to back into `fd` from offset 0, straight from guest memory in large
/// page-aligned pwritev batches (O_DIRECT works), hashing them as they go into the packed
/// file's `chunk_size` chunk hashes: a diff checkpoint's memory, with no read of the file. The
/// guest must be stopped. Returns a `PackedPagesWritten`.
#[pyfunction]
#[pyo3(signature = (memory, fd, runs, *, chunk_size = DEFAULT_CHUNK_SIZE))]
fn write_packed_pages(
    py: Python<'_>,
    memory: PyRef<'_, PyGuestMemory>,
    fd: RawFd,
    runs: Vec<(u64, u64)>,
    chunk_size: u64,
) -> PyResult<PackedPagesWritten> {
    let mem = memory.inner.clone();
    let s = py.detach(move || snapshot::write_packed_pages(&mem, fd, &runs, chunk_size)).map_err(snapshot_error)?;
    Ok(PackedPagesWritten {
        bytes_written: s.bytes_written,
        pwrite_calls: s.pwrite_calls,
        chunk_hashes: s.chunk_hashes,
        seconds: s.seconds,
    })
}
