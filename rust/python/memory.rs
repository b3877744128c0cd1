//! `_core.GuestMemory` and `_core.Segment`: guest memory for Python, with zero-copy read-only
//! views through the buffer protocol.

use std::ffi::c_int;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::errors::memory_error;
use super::snapshot::snapshot_error;
use crate::dirty::{bitmap_to_pages, bitmap_to_runs, TrackingChoice};
use crate::memory::{
    Backing, GuestAddress, GuestMemory, LoadPlan, MemoryError, MemoryOptions, PrefaultStats, Segment, PAGE_SHIFT, PAGE_SIZE,
};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyGuestMemory>()?;
    m.add_class::<PySegment>()?;
    m.add_class::<LazyStatus>()?;
    m.add_class::<DirtyRange>()?;
    Ok(())
}

result_class! {
    /// Where a lazy restore stands: its source, chunk size and count, how many chunks are loaded
    /// and checked, how many failed, whether every chunk is loaded (`resident`) and nothing needs
    /// a check any more (`complete`: resident and no longer recording). Loads by origin
    /// (`demand_loads`: an access needed the chunk; `prefetched`: the working set loaded ahead;
    /// `filled`: the background fill or a whole-memory reader); accesses that waited for a load
    /// (`waits`) and the seconds they waited (`wait_seconds`, `first_second_wait_seconds` for
    /// waits that began in the first second after the restore, `max_wait_seconds`); seconds from
    /// the restore to resident (`resident_seconds`, None until then) and since it (`elapsed_seconds`);
    /// whether accesses are being recorded (`recording`) and how many chunks were (`recorded`).
    LazyStatus as "LazyStatus" {
        source: String,
        chunk_size: usize,
        chunks: usize,
        loaded: usize,
        failed: usize,
        resident: bool,
        complete: bool,
        demand_loads: u64,
        prefetched: u64,
        filled: u64,
        waits: u64,
        wait_seconds: f64,
        first_second_wait_seconds: f64,
        max_wait_seconds: f64,
        resident_seconds: Option<f64>,
        elapsed_seconds: f64,
        recording: bool,
        recorded: usize,
    }
}

result_class! {
    /// A run of dirty memory: `length` bytes (whole pages) from guest-physical `gpa`.
    DirtyRange as "DirtyRange" {
        gpa: u64,
        length: u64,
    }
}

#[pyclass(frozen, name = "GuestMemory", module = "vmmpy._core")]
pub struct PyGuestMemory {
    pub inner: Arc<GuestMemory>,
}

/// Borrow a C-contiguous byte buffer's memory for the duration of `f`.
fn with_bytes<R>(data: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> R) -> PyResult<R> {
    let buf = PyBuffer::<u8>::get(data)?;
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err("data must be a contiguous bytes-like object"));
    }
    // SAFETY: the buffer stays acquired (and its memory alive) until `buf` drops after `f`; we
    // only read from it. Python code could mutate it concurrently, as with any buffer.
    let slice = unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const u8, buf.len_bytes()) };
    let result = f(slice);
    drop(buf);
    Ok(result)
}

/// Run the write `f` holding the GIL, as usual, unless a live snapshot is armed on `mem`: then
/// the write may wait for room in its side store (`rust/memory/cow.rs`), which the snapshot's
/// writer makes only once Python has started it, so the GIL is let go meanwhile.
///
/// Likewise while memory is still loaded on demand (`is_complete` false): a load may wait on the
/// disk or, for a post-copy migration, on a network link that is down until it is recovered,
/// which the rest of the process (the control socket among it) must not wait for.
fn unless_live<R: Send>(py: Python<'_>, mem: &GuestMemory, f: impl FnOnce() -> R + Send) -> R {
    if !mem.is_complete() || mem.segments().iter().any(|s| s.live_armed()) {
        py.detach(f)
    } else {
        f()
    }
}

fn parse_tracking(dirty_tracking: &str) -> PyResult<TrackingChoice> {
    TrackingChoice::parse(dirty_tracking)
        .ok_or_else(|| PyValueError::new_err(format!("dirty_tracking must be 'auto', 'soft', 'kernel' or 'kvm', not {dirty_tracking:?}")))
}

fn parse_backing(backing: &str) -> PyResult<Backing> {
    Backing::parse(backing).ok_or_else(|| PyValueError::new_err(format!("backing must be 'anon' or 'memfd', not {backing:?}")))
}

/// A duplicate (close-on-exec) of the caller's descriptor `fd`, which stays the caller's.
pub(super) fn dup_fd(fd: i32) -> PyResult<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor number; a bad fd is an error return.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: fcntl returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

impl PyGuestMemory {
    fn harvest(&self, py: Python<'_>) -> PyResult<Vec<(u64, Vec<u64>)>> {
        let mem = self.inner.clone();
        py.detach(move || {
            let mut out = Vec::with_capacity(mem.segments().len());
            for (i, seg) in mem.segments().iter().enumerate() {
                let mut words = vec![0u64; seg.pages().div_ceil(64)];
                mem.get_and_clear_dirty_segment(i, &mut words)?;
                out.push((seg.gpa().pfn(), words));
            }
            Ok(out)
        })
        .map_err(memory_error)
    }
}

#[pymethods]
impl PyGuestMemory {
    #[new]
    #[pyo3(signature = (memsize, *, wired = false, lowmem_limit = crate::memory::LOWMEM_LIMIT_DEFAULT, dirty_tracking = "soft", backing = "anon"))]
    fn new(py: Python<'_>, memsize: u64, wired: bool, lowmem_limit: u64, dirty_tracking: &str, backing: &str) -> PyResult<Self> {
        let opts =
            MemoryOptions { memsize, wired, lowmem_limit, tracking: parse_tracking(dirty_tracking)?, backing: parse_backing(backing)? };
        // Wiring populates every page: release the GIL while the kernel does it.
        let mem = py.detach(move || GuestMemory::new(&opts)).map_err(memory_error)?;
        Ok(PyGuestMemory { inner: Arc::new(mem) })
    }

    /// Guest memory restored lazily from a checkpoint memory file open at `fd` (a duplicate is
    /// kept): lowmem from file offset 0, highmem right after it, cut into `chunk_size` chunks.
    /// Nothing is read now; each chunk is read and compared with `chunk_hashes[i]` the first time
    /// anything needs a byte of it, and cannot be seen before. A chunk that fails raises
    /// LazyMemoryError (naming `name`, the chunk and its guest-physical range) on every access.
    /// The file must be exactly `memsize` bytes. `wired=True` is refused. With
    /// `dirty_tracking="auto"` the soft backend is used (see `dirty_tracking_fallback`).
    /// `page_cache`: what loads do to the page cache ("auto": drop each loaded chunk when the
    /// file is cold now; "release"; "keep"; `rust/snapshot/pagecache.rs`).
    #[staticmethod]
    #[pyo3(signature = (fd, memsize, *, chunk_hashes, chunk_size = crate::snapshot::DEFAULT_CHUNK_SIZE, name = "checkpoint memory file".to_string(),
                        wired = false, lowmem_limit = crate::memory::LOWMEM_LIMIT_DEFAULT, dirty_tracking = "auto", backing = "anon",
                        page_cache = "auto"))]
    #[allow(clippy::too_many_arguments)]
    fn from_file(
        py: Python<'_>,
        fd: i32,
        memsize: u64,
        chunk_hashes: Vec<u128>,
        chunk_size: u64,
        name: String,
        wired: bool,
        lowmem_limit: u64,
        dirty_tracking: &str,
        backing: &str,
        page_cache: &str,
    ) -> PyResult<Self> {
        let opts =
            MemoryOptions { memsize, wired, lowmem_limit, tracking: parse_tracking(dirty_tracking)?, backing: parse_backing(backing)? };
        let cache = super::snapshot::parse_page_cache(page_cache)?;
        let mem = py
            .detach(move || crate::snapshot::lazy_memory_cached(&opts, fd, chunk_hashes, chunk_size, &name, cache))
            .map_err(snapshot_error)?;
        Ok(PyGuestMemory { inner: Arc::new(mem) })
    }

    /// Guest memory mapping the memfds `fds` (one per segment, lowmem first; duplicates are
    /// kept, the caller's stay its own) that another process's memfd-backed memory handed over:
    /// the same pages, shared, nothing read or written. Each descriptor's size is checked (fstat)
    /// against its segment of the layout `memsize` and `lowmem_limit` make. Nothing is dirty.
    #[staticmethod]
    #[pyo3(signature = (fds, memsize, *, wired = false, lowmem_limit = crate::memory::LOWMEM_LIMIT_DEFAULT, dirty_tracking = "soft"))]
    fn from_fds(py: Python<'_>, fds: Vec<i32>, memsize: u64, wired: bool, lowmem_limit: u64, dirty_tracking: &str) -> PyResult<Self> {
        let opts = MemoryOptions { memsize, wired, lowmem_limit, tracking: parse_tracking(dirty_tracking)?, backing: Backing::Memfd };
        let owned = fds.into_iter().map(dup_fd).collect::<PyResult<Vec<_>>>()?;
        let mem = py.detach(move || GuestMemory::from_fds(&opts, owned)).map_err(memory_error)?;
        Ok(PyGuestMemory { inner: Arc::new(mem) })
    }

    /// What backs the memory: "anon" (private anonymous) or "memfd" (shared, hand-over-able).
    #[getter]
    fn backing(&self) -> &'static str {
        self.inner.backing().name()
    }

    /// The dirty pages as runs, without clearing them: little-endian u64 pairs (first page frame
    /// number, page count), ascending. What a local migration hands over with the memory.
    fn peek_dirty_runs<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let mem = self.inner.clone();
        let runs = py
            .detach(move || {
                let mut runs = Vec::new();
                for seg in mem.segments() {
                    seg.dirty_log()
                        .peek_runs(seg.gpa().pfn(), &mut runs)
                        .map_err(|e| MemoryError::TrackerUnavailable { backend: e.backend.to_string(), why: e.why })?;
                }
                Ok::<_, MemoryError>(runs)
            })
            .map_err(memory_error)?;
        PyBytes::new_with(py, runs.len() * 16, |out| {
            for (chunk, (pfn, count)) in out.chunks_exact_mut(16).zip(&runs) {
                chunk[..8].copy_from_slice(&pfn.to_le_bytes());
                chunk[8..].copy_from_slice(&count.to_le_bytes());
            }
            Ok(())
        })
    }

    /// Mark dirty the runs `runs` (as `peek_dirty_runs` gives them); a run that is not inside
    /// one segment is refused (GuestMemoryError naming it) before any is marked.
    fn mark_dirty_runs(&self, runs: &[u8]) -> PyResult<()> {
        if !runs.len().is_multiple_of(16) {
            return Err(PyValueError::new_err(format!("dirty runs are 16-byte pairs; got {} bytes", runs.len())));
        }
        let pairs: Vec<(u64, u64)> = runs
            .chunks_exact(16)
            .map(|c| (u64::from_le_bytes(c[..8].try_into().unwrap()), u64::from_le_bytes(c[8..].try_into().unwrap())))
            .collect();
        let mut marks = Vec::with_capacity(pairs.len());
        for &(pfn, count) in &pairs {
            let len = count.checked_mul(PAGE_SIZE as u64).and_then(|l| usize::try_from(l).ok()).unwrap_or(usize::MAX);
            let gpa = pfn.saturating_mul(PAGE_SIZE as u64);
            let (seg, off) = self.inner.translate(GuestAddress(gpa), len).map_err(memory_error)?;
            marks.push((seg.clone(), off / PAGE_SIZE, off / PAGE_SIZE + count as usize));
        }
        for (seg, first, end) in marks {
            seg.dirty_log().mark(first, end);
        }
        Ok(())
    }

    /// Whether this memory was restored lazily (its chunks load and are checked on first use).
    #[getter]
    fn lazy(&self) -> bool {
        self.inner.lazy_image().is_some()
    }

    /// For lazily restored memory: where its loading stands (a `LazyStatus`); None for other
    /// memory.
    fn lazy_status(&self) -> Option<LazyStatus> {
        let image = self.inner.lazy_image()?;
        // Read in the reverse of the order a load writes them (its counts, then resident, then
        // complete), so that complete implies resident implies every load counted: read the
        // other way, a status said resident with the last chunk's load not counted yet.
        let complete = image.is_complete();
        let stats = image.stats();
        let (loaded, failed) = image.counts();
        Some(LazyStatus {
            source: image.source_name().to_string(),
            chunk_size: image.chunk_size(),
            chunks: image.chunks(),
            loaded,
            failed,
            resident: stats.resident_after.is_some(),
            complete,
            demand_loads: stats.demand_loads,
            prefetched: stats.prefetched,
            filled: stats.filled,
            waits: stats.waits,
            wait_seconds: stats.wait.as_secs_f64(),
            first_second_wait_seconds: stats.first_second_wait.as_secs_f64(),
            max_wait_seconds: stats.max_wait.as_secs_f64(),
            resident_seconds: stats.resident_after.map(|d| d.as_secs_f64()),
            elapsed_seconds: stats.elapsed.as_secs_f64(),
            recording: stats.recording,
            recorded: stats.recorded,
        })
    }

    /// For lazily restored memory: start `loaders` background threads (no GIL) that load the chunks
    /// `prefetch` first, in that order, then with `fill` every other chunk, each checked as any
    /// load is (a bad one fails and rings the notifier; the thread stops there); and, with
    /// `record_seconds`, records the chunks accessed in that time (at most `record_limit`), in
    /// the order first accessed (`wait_recorded`). Accessors needing another chunk meanwhile
    /// load it in parallel. Once per memory; nothing for other memory.
    /// With `follow_demand`, the fill goes on from just past the chunk an access last waited for.
    #[pyo3(signature = (*, prefetch = Vec::new(), fill = true, record_seconds = None, record_limit = 4096, loaders = 2, follow_demand = false))]
    fn start_loading(
        &self,
        prefetch: Vec<usize>,
        fill: bool,
        record_seconds: Option<f64>,
        record_limit: usize,
        loaders: usize,
        follow_demand: bool,
    ) -> PyResult<()> {
        let Some(image) = self.inner.lazy_image() else { return Ok(()) };
        let record_for = match record_seconds {
            Some(s) if !(s.is_finite() && s > 0.0) => return Err(PyValueError::new_err(format!("record_seconds {s} must be positive"))),
            s => s.map(std::time::Duration::from_secs_f64),
        };
        image.start_loading(LoadPlan { prefetch, fill, record_for, record_limit, loaders, follow_demand }).map_err(memory_error)
    }

    /// Stop the loading thread at its next chunk and end recording now (nothing for other memory).
    fn stop_loading(&self) {
        if let Some(image) = self.inner.lazy_image() {
            image.stop_loading();
        }
    }

    /// The chunks recorded after a lazy restore (`start_loading(record_seconds=...)`), in the
    /// order first accessed, once recording has ended; None while it goes on past `timeout`
    /// seconds, if it never started, or for other memory. Waits with the GIL released.
    fn wait_recorded(&self, py: Python<'_>, timeout: f64) -> Option<Vec<usize>> {
        let image = self.inner.lazy_image()?.clone();
        let timeout = std::time::Duration::from_secs_f64(timeout.clamp(0.0, 1e6));
        py.detach(move || image.wait_recorded(timeout))
    }

    /// The error of the first chunk of lazily restored memory that could not be loaded, or None.
    #[getter]
    fn lazy_failure(&self) -> Option<String> {
        self.inner.lazy_image().and_then(|image| image.first_failure()).map(|e| e.to_string())
    }

    /// Have one byte written to `fd` (a duplicate is kept) when the first chunk of lazily
    /// restored memory fails, or at once if one has; nothing for other memory.
    fn notify_lazy_failure(&self, fd: i32) -> PyResult<()> {
        let Some(image) = self.inner.lazy_image() else { return Ok(()) };
        image.notify_on_failure(dup_fd(fd)?);
        Ok(())
    }

    /// Populate this memory on a thread while a migration destination waits for its source
    /// (unwired, private anonymous, eager segments not tracked by the kernel backend; onto huge
    /// pages where the host offers them). Page bytes never change. Returns the bytes it will
    /// populate (0: none qualify, no thread). Stopped by ``stop_prefault`` and by ``close``.
    fn start_prefault(&self) -> PyResult<u64> {
        self.inner.start_prefault().map_err(memory_error)
    }

    /// Stop the population ``start_prefault`` began (at most one 2 MiB step later; GIL
    /// released) and say what it did: a dict with ``bytes``, ``target_bytes``, ``seconds``,
    /// ``cpu_seconds``, ``stopped`` (before the end), ``refused`` (the errno of a step the kernel
    /// refused, or None) and ``short_of_memory`` (the host's available bytes when it stopped for
    /// lack of them, or None), ``huge_bytes`` (of ``bytes``, those advised for transparent huge
    /// pages: the thread takes whichever of huge and small pages it times cheaper here) and
    /// ``huge_cheaper`` (its verdict at the end, which received pages follow).
    /// None when nothing was populating.
    fn stop_prefault<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let mem = self.inner.clone();
        let Some(s) = py.detach(move || mem.stop_prefault()) else { return Ok(None) };
        populated_dict(py, &s).map(Some)
    }

    /// What wiring this memory did (``wired=True``: ``vmmrun -S``; docs/memory.md), over its
    /// segments: a dict with the keys of ``stop_prefault``'s. ``bytes`` are those populated in
    /// steps; fewer than ``target_bytes`` where the kernel has no ``mlock2`` (0) or refused a
    /// step (``refused``; ``MADV_POPULATE_WRITE`` is Linux 5.14+), and ``mlock`` then populated
    /// the rest on small pages. None for unwired memory.
    fn wiring<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        self.inner.wiring().map(|s| populated_dict(py, &s)).transpose()
    }

    /// Load and check every chunk of lazily restored memory not loaded yet (GIL released);
    /// LazyMemoryError for the first that cannot be. Nothing for other memory.
    fn load_all(&self, py: Python<'_>) -> PyResult<()> {
        let mem = self.inner.clone();
        py.detach(move || mem.ensure_all()).map_err(memory_error)
    }

    #[getter]
    fn memsize(&self) -> u64 {
        self.inner.memsize()
    }

    #[getter]
    fn lowmem_limit(&self) -> u64 {
        self.inner.lowmem_limit()
    }

    /// The dirty-tracking backend in use: "soft", "kernel" or "kvm".
    #[getter]
    fn dirty_tracking(&self) -> String {
        self.inner.backend().to_string()
    }

    /// Why "auto" fell back to the soft backend, or None.
    #[getter]
    fn dirty_tracking_fallback(&self) -> Option<String> {
        self.inner.fallback_reason().map(str::to_string)
    }

    #[getter]
    fn segments(&self) -> Vec<PySegment> {
        self.inner.segments().iter().map(|s| PySegment { seg: s.clone() }).collect()
    }

    fn read<'py>(&self, py: Python<'py>, gpa: u64, size: usize) -> PyResult<Bound<'py, PyBytes>> {
        if !self.inner.is_complete() {
            // Memory loaded on demand may wait for a chunk: without the GIL (see `unless_live`).
            let mem = self.inner.clone();
            let data = py.detach(move || {
                let mut out = vec![0u8; size];
                mem.read(GuestAddress(gpa), &mut out).map(|_| out)
            });
            return Ok(PyBytes::new(py, &data.map_err(memory_error)?));
        }
        PyBytes::new_with(py, size, |out| self.inner.read(GuestAddress(gpa), out).map_err(memory_error))
    }

    /// Write bytes at `gpa` and mark the pages dirty, as a device's DMA would.
    fn write(&self, py: Python<'_>, gpa: u64, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let mem = &self.inner;
        with_bytes(data, |bytes| unless_live(py, mem, || mem.write(GuestAddress(gpa), bytes)))?.map_err(memory_error)
    }

    /// Write bytes without marking pages dirty (restore and migration receive).
    fn write_untracked(&self, py: Python<'_>, gpa: u64, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let mem = &self.inner;
        with_bytes(data, |bytes| unless_live(py, mem, || mem.write_untracked(GuestAddress(gpa), bytes)))?.map_err(memory_error)
    }

    /// Harvest and clear the dirty pages of every segment: page frame numbers (gpa >> 12),
    /// ascending, as little-endian u64 bytes (vmmpy.GuestMemory turns them into a numpy array).
    fn get_and_clear_dirty<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let harvested = self.harvest(py)?;
        let pfns = py.detach(move || {
            let mut pfns = Vec::new();
            for (first_pfn, words) in &harvested {
                bitmap_to_pages(words, *first_pfn, &mut pfns);
            }
            pfns
        });
        PyBytes::new_with(py, pfns.len() * 8, |out| {
            for (chunk, pfn) in out.chunks_exact_mut(8).zip(&pfns) {
                chunk.copy_from_slice(&pfn.to_le_bytes());
            }
            Ok(())
        })
    }

    /// Harvest and clear the dirty pages as `DirtyRange`s, ascending, runs merged.
    fn get_and_clear_dirty_ranges(&self, py: Python<'_>) -> PyResult<Vec<DirtyRange>> {
        let harvested = self.harvest(py)?;
        let mut runs = Vec::new();
        for (first_pfn, words) in &harvested {
            bitmap_to_runs(words, *first_pfn, &mut runs);
        }
        Ok(runs.into_iter().map(|(pfn, n)| DirtyRange { gpa: pfn << PAGE_SHIFT, length: n << PAGE_SHIFT }).collect())
    }

    /// How many pages are dirty now, without clearing them.
    fn dirty_count(&self, py: Python<'_>) -> PyResult<u64> {
        let mem = self.inner.clone();
        py.detach(move || mem.dirty_count()).map_err(memory_error)
    }

    /// Release guest memory. Refused with BufferError while memoryviews or numpy arrays over a
    /// segment exist, because they alias the mapping.
    fn close(&self) -> PyResult<()> {
        self.inner.close().map_err(|(name, n)| {
            PyBufferError::new_err(format!("cannot unmap guest memory: segment '{name}' has {n} exported view(s); release them first"))
        })
    }

    fn __repr__(&self) -> String {
        let segs: Vec<String> = self.inner.segments().iter().map(|s| format!("{}@{:#x}+{:#x}", s.name(), s.gpa().0, s.size())).collect();
        format!("<GuestMemory {} bytes [{}] dirty_tracking={}>", self.inner.memsize(), segs.join(", "), self.inner.backend())
    }
}

#[pyclass(frozen, name = "Segment", module = "vmmpy._core")]
pub struct PySegment {
    seg: Arc<Segment>,
}

#[pymethods]
impl PySegment {
    #[getter]
    fn name(&self) -> &str {
        self.seg.name()
    }
    #[getter]
    fn gpa(&self) -> u64 {
        self.seg.gpa().0
    }
    #[getter]
    fn size(&self) -> usize {
        self.seg.size()
    }
    #[getter]
    fn pages(&self) -> usize {
        self.seg.pages()
    }
    #[getter]
    fn wired(&self) -> bool {
        self.seg.wired()
    }
    /// "anon" or "memfd".
    #[getter]
    fn backing(&self) -> &'static str {
        self.seg.backing().name()
    }
    /// The memfd's descriptor number (the segment's own: duplicate it to keep it), or None for
    /// anonymous memory.
    #[getter]
    fn memfd(&self) -> Option<i32> {
        self.seg.memfd().map(|fd| fd.as_raw_fd())
    }
    /// The memfd's (device, inode), or None: two segments with the same one share their pages.
    #[getter]
    fn memfd_identity(&self) -> Option<(u64, u64)> {
        self.seg.memfd_identity()
    }
    /// How many memoryviews/arrays currently alias this segment.
    #[getter]
    fn exports(&self) -> usize {
        self.seg.exports()
    }

    /// How many pages have been touched (are resident), from mincore(2).
    fn resident_pages(&self, py: Python<'_>) -> PyResult<usize> {
        let seg = self.seg.clone();
        py.detach(move || seg.resident()).map(|r| r.into_iter().filter(|&p| p).count()).map_err(memory_error)
    }

    /// How many pages were put in place without the kernel zeroing them first (received into
    /// fresh memory through userfaultfd, see `memory::install`), over the segment's life.
    fn installed_pages(&self) -> u64 {
        self.seg.installed_pages()
    }

    /// Why installing received pages was refused for this segment (None when it was not).
    fn install_refused(&self) -> Option<String> {
        self.seg.install_refused()
    }

    /// How many received pages went into whole 2 MiB regions advised for transparent huge pages
    /// (read straight into place; see `Segment::receives_huge`), over the segment's life.
    fn huge_pages(&self) -> u64 {
        self.seg.huge_received_pages()
    }

    /// Whether huge pages came cheaper than small ones when this segment's memory was last
    /// populated ahead (True until one has measured): received pages go onto huge pages only
    /// where this and ``receives_huge`` say so (docs/memory.md).
    #[getter]
    fn huge_cheaper(&self) -> bool {
        self.seg.huge_cheaper()
    }

    /// Whether received pages go onto transparent huge pages where whole 2 MiB regions arrive
    /// together (the default where the host offers them, for unwired anonymous memory), rather
    /// than being installed with userfaultfd; where a population ahead timed small pages cheaper
    /// (`Segment::huge_cheaper`), they are installed anyway. Setting it chooses (True is ignored
    /// where the segment cannot take huge pages), and forgets that verdict.
    #[getter]
    fn receives_huge(&self) -> bool {
        self.seg.receives_huge()
    }

    #[setter]
    fn set_receives_huge(&self, on: bool) {
        self.seg.set_receives_huge(on)
    }

    /// How many pages this process has mapped in the segment (/proc/self/pagemap): what has been
    /// touched or, for lazily restored memory, loaded.
    fn mapped_pages(&self, py: Python<'_>) -> PyResult<usize> {
        let seg = self.seg.clone();
        py.detach(move || seg.mapped_pages()).map_err(memory_error)
    }

    /// Whether the segment was restored lazily (its chunks load and are checked on first use).
    #[getter]
    fn lazy(&self) -> bool {
        self.seg.lazy_image().is_some()
    }

    /// Whether a live checkpoint's copy-before-write is armed on this segment right now.
    #[getter]
    fn live_armed(&self) -> bool {
        self.seg.live_armed()
    }

    fn __len__(&self) -> usize {
        self.seg.size()
    }

    fn __repr__(&self) -> String {
        format!(
            "<Segment {} gpa={:#x} size={:#x} {}>",
            self.seg.name(),
            self.seg.gpa().0,
            self.seg.size(),
            if self.seg.wired() { "wired" } else { "unwired" }
        )
    }

    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        if view.is_null() {
            return Err(PyBufferError::new_err("View is null"));
        }
        if (flags & ffi::PyBUF_WRITABLE) == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err(
                "guest memory views are read-only: write through GuestMemory.write so the pages are marked dirty",
            ));
        }
        let seg = slf.get().seg.clone();
        // A view sees every byte at once: lazily restored memory is loaded and checked whole
        // first (GIL released), and a bad chunk refuses the view.
        let loading = seg.clone();
        slf.py().detach(move || loading.ensure_all()).map_err(memory_error)?;
        seg.add_export().map_err(|e| PyBufferError::new_err(e.to_string()))?;
        let len = seg.size() as ffi::Py_ssize_t;
        // SAFETY: `view` is a valid Py_buffer the interpreter handed us. `obj` takes a strong
        // reference to the segment object, which keeps the Arc<Segment> (and so the mapping)
        // alive until __releasebuffer__; shape/strides point into the view itself, which the
        // consumer keeps alive for as long as it uses them.
        unsafe {
            (*view).obj = slf.clone().into_any().into_ptr();
            (*view).buf = seg.as_ptr() as *mut std::ffi::c_void;
            (*view).len = len;
            (*view).readonly = 1;
            (*view).itemsize = 1;
            (*view).format = if (flags & ffi::PyBUF_FORMAT) == ffi::PyBUF_FORMAT { c"B".as_ptr() as *mut _ } else { std::ptr::null_mut() };
            (*view).ndim = 1;
            (*view).shape = if (flags & ffi::PyBUF_ND) == ffi::PyBUF_ND { &mut (*view).len } else { std::ptr::null_mut() };
            (*view).strides = if (flags & ffi::PyBUF_STRIDES) == ffi::PyBUF_STRIDES { &mut (*view).itemsize } else { std::ptr::null_mut() };
            (*view).suboffsets = std::ptr::null_mut();
            (*view).internal = std::ptr::null_mut();
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.seg.release_export();
    }
}

const _: () = assert!(PAGE_SIZE == 1 << PAGE_SHIFT);

/// A population's statistics (`stop_prefault`, `wiring`) as a dict.
fn populated_dict<'py>(py: Python<'py>, s: &PrefaultStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("bytes", s.bytes)?;
    d.set_item("target_bytes", s.target_bytes)?;
    d.set_item("seconds", s.seconds)?;
    d.set_item("cpu_seconds", s.cpu_seconds)?;
    d.set_item("stopped", s.stopped)?;
    d.set_item("refused", s.refused)?;
    d.set_item("short_of_memory", s.short_of_memory)?;
    d.set_item("huge_bytes", s.huge_bytes)?;
    d.set_item("huge_cheaper", s.huge_cheaper)?;
    Ok(d)
}
