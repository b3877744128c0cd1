//! Bindings for bulk page work: send pages to a file descriptor as framed batches (optionally
//! LZ4-compressed, `compress=`), receive them straight into guest memory, hash and digest memory.
//! All of it runs with the GIL released.

use std::sync::Arc;

use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::errors::memory_error;
use super::memory::PyGuestMemory;
use super::progress::{meter_of, PyProgressMeter};
use super::tls::Endpoint;
use crate::digest::{self, DigestTracker, PageError};
use crate::memory::{GuestAddress, GuestMemory, Segment, PAGE_SHIFT};
use crate::progress::{self, Meter};
use crate::wire::{self, BatchTotals, CompressMode, Compressor, PageRange, MAX_RANGES};

create_exception!(_core, PageBatchError, PyOSError, "Sending or receiving a page batch failed; errno and the message say why.");

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PageBatchError", m.py().get_type::<PageBatchError>())?;
    m.add("MAX_BATCH_RANGES", MAX_RANGES)?;
    m.add("BATCH_HEADER_SIZE", wire::BATCH_HEADER_SIZE)?;
    m.add("BATCH_RANGE_ENTRY_SIZE", wire::RANGE_ENTRY_SIZE)?;
    m.add("BATCH_FLAG_LZ4", wire::BATCH_FLAG_LZ4)?;
    m.add_function(wrap_pyfunction!(end_of_round_batch, m)?)?;
    m.add_function(wrap_pyfunction!(decode_batch_header, m)?)?;
    m.add("MAX_COMPRESSED_BATCH_DATA", wire::MAX_COMPRESSED_DATA)?;
    m.add("COMPRESS_BLOCK_PAGES", wire::COMPRESS_BLOCK_PAGES)?;
    m.add_function(wrap_pyfunction!(send_dirty_pages, m)?)?;
    m.add_function(wrap_pyfunction!(send_all_pages, m)?)?;
    m.add_function(wrap_pyfunction!(send_page_list, m)?)?;
    m.add_function(wrap_pyfunction!(recv_pages, m)?)?;
    m.add_function(wrap_pyfunction!(memory_digest, m)?)?;
    m.add_function(wrap_pyfunction!(commit_digest, m)?)?;
    m.add_class::<PyDigestTracker>()?;
    m.add("DIGEST_CHUNK_PAGES", digest::DIGEST_CHUNK_PAGES)?;
    m.add_function(wrap_pyfunction!(hash_pages, m)?)?;
    m.add_function(wrap_pyfunction!(chunk_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(xxh3_64, m)?)?;
    Ok(())
}

/// A `PageBatchError` (or the memory error inside). A timeout also carries `timeout` (seconds)
/// and `peer` (the TCP peer's address, or None), so the caller can say who stopped in its own terms.
pub(super) fn page_error(err: PageError) -> PyErr {
    match err {
        PageError::Memory(e) => memory_error(e),
        PageError::TimedOut { timeout, ref peer, .. } => Python::attach(|py| {
            let made = py.get_type::<PageBatchError>().call1((err.errno(), err.to_string())).and_then(|exc| {
                exc.setattr("timeout", timeout.as_secs_f64())?;
                exc.setattr("peer", peer.clone())?;
                Ok(PyErr::from_value(exc))
            });
            made.unwrap_or_else(|e| e)
        }),
        other => PageBatchError::new_err((other.errno(), other.to_string())),
    }
}

/// A call's totals as the dict Python gets: batches, ranges, data_pages, zero_pages,
/// data_bytes, wire_bytes, compressed_batches, saved_bytes.
pub(super) fn totals_dict<'py>(py: Python<'py>, t: &BatchTotals) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("batches", t.batches)?;
    d.set_item("ranges", t.stats.ranges)?;
    d.set_item("data_pages", t.stats.data_pages)?;
    d.set_item("zero_pages", t.stats.zero_pages)?;
    d.set_item("data_bytes", t.stats.data_bytes)?;
    d.set_item("wire_bytes", t.stats.wire_bytes)?;
    d.set_item("compressed_batches", t.stats.compressed_batches)?;
    d.set_item("saved_bytes", t.stats.saved_bytes)?;
    Ok(d)
}

/// A send's totals, and with a compressor the batches it tried (`compress_attempts`) and the
/// link speed its time rule ended with (`link_rate`, None when unknown).
fn sent_dict<'py>(py: Python<'py>, t: &BatchTotals, compressor: &Option<(u64, Option<f64>)>) -> PyResult<Bound<'py, PyDict>> {
    let d = totals_dict(py, t)?;
    let (attempts, rate) = compressor.unwrap_or((0, None));
    d.set_item("compress_attempts", attempts)?;
    d.set_item("link_rate", rate)?;
    Ok(d)
}

/// The sender's compressor for `compress` ("off", "lz4", "auto"; None for off) and a link
/// speed hint in bytes/s.
fn compressor(compress: &str, link_rate: Option<f64>) -> PyResult<Option<Compressor>> {
    let mode = CompressMode::parse(compress).map_err(PyValueError::new_err)?;
    Ok((mode != CompressMode::Off).then(|| Compressor::new(mode, link_rate)))
}

/// What a compressor reports after a send: attempts and link rate.
fn compressor_report(c: &Option<Compressor>) -> Option<(u64, Option<f64>)> {
    c.as_ref().map(|c| (c.attempts, c.link_rate()))
}

/// Send one segment's ranges as batches of at most MAX_RANGES ranges and BATCH_DATA_PAGES data
/// pages (through the compressor, which cuts them smaller, when there is one); a segment with
/// nothing to send sends nothing. `meter` advances a window at a time, or a batch at a time
/// through the compressor.
fn send_segment(
    link: wire::Link<'_>,
    mem: &GuestMemory,
    ranges: &[PageRange],
    totals: &mut BatchTotals,
    compressor: &mut Option<Compressor>,
    tracker: Option<&DigestTracker>,
    meter: Option<&Meter>,
) -> Result<(), PageError> {
    if let Some(c) = compressor {
        return c.send_ranges(link, mem, ranges, tracker, |s| {
            progress::advance(meter, s.data_pages + s.zero_pages, s.data_pages, s.wire_bytes);
            totals.add(s)
        });
    }
    for batch in wire::split_batches(ranges, wire::BATCH_DATA_PAGES) {
        totals.add(wire::send_batch_metered(link, mem, &batch, tracker, meter)?);
    }
    Ok(())
}

/// Every page of `seg` as ranges: never-touched pages (mincore) as ZERO without reading them,
/// all-zero ones as ZERO too if `detect_zero`.
pub(super) fn all_page_ranges(seg: &Segment, detect_zero: bool) -> Result<Vec<PageRange>, PageError> {
    let pages_in = seg.pages();
    let mut all = vec![u64::MAX; pages_in.div_ceil(64)];
    if !pages_in.is_multiple_of(64) {
        *all.last_mut().unwrap() = (1u64 << (pages_in % 64)) - 1;
    }
    let (resident, _) = digest::resident_bitmap(seg)?;
    wire::build_ranges_with_residency(seg, &all, &resident, detect_zero)
}

/// The tracker of `memory`, or an error if it was made over other memory.
pub(super) fn tracker_of(memory: &PyGuestMemory, tracker: Option<PyRef<'_, PyDigestTracker>>) -> PyResult<Option<Arc<DigestTracker>>> {
    match tracker {
        Some(t) if !Arc::ptr_eq(&t.memory, &memory.inner) => Err(PyValueError::new_err("the digest tracker belongs to other guest memory")),
        Some(t) => Ok(Some(t.inner.clone())),
        None => Ok(None),
    }
}

/// How a send goes: through the compressor for `compress`/`link_rate` when there is one,
/// hashing into `tracker` and advancing `meter` when given.
struct SendWith<'a> {
    tracker: Option<Arc<DigestTracker>>,
    compress: &'a str,
    link_rate: Option<f64>,
    meter: Option<Arc<Meter>>,
}

/// Send each segment's ranges, as `ranges_of(memory, segment index, segment)` builds them (every
/// segment's first, so a meter knows the call's total before the first batch), with the GIL
/// released, as `with` says. Returns the totals as Python's dict.
fn send_segments<'py>(
    py: Python<'py>,
    memory: &PyGuestMemory,
    fd: Endpoint,
    with: SendWith<'_>,
    ranges_of: impl Fn(&GuestMemory, usize, &Segment) -> Result<Vec<PageRange>, PageError> + Send,
) -> PyResult<Bound<'py, PyDict>> {
    let mem = memory.inner.clone();
    let mut compressor = compressor(with.compress, with.link_rate)?;
    let (tracker, meter) = (with.tracker, with.meter);
    let end = fd.owned();
    let (totals, report) = py
        .detach(move || -> Result<_, PageError> {
            let mut totals = BatchTotals::default();
            let per_segment: Vec<Vec<PageRange>> =
                mem.segments().iter().enumerate().map(|(i, seg)| ranges_of(&mem, i, seg)).collect::<Result<_, _>>()?;
            if let Some(m) = meter.as_deref() {
                for ranges in &per_segment {
                    let s = wire::BatchStats::of(ranges);
                    m.add_total(s.data_pages + s.zero_pages, s.data_pages);
                }
            }
            for ranges in &per_segment {
                send_segment(end.link(), &mem, ranges, &mut totals, &mut compressor, tracker.as_deref(), meter.as_deref())?;
            }
            Ok((totals, compressor_report(&compressor)))
        })
        .map_err(page_error)?;
    sent_dict(py, &totals, &report)
}

/// Harvest and clear the dirty pages, and send them (zero pages as ranges without data, if
/// `detect_zero`). The order is the one pre-copy needs: clear the bits, then read the pages, so a
/// write during the send is caught by the next round. With a `tracker`, every page sent is hashed
/// into it on the way (`DigestTracker::hash_now`). `compress` ("off", "lz4", "auto") and
/// `link_rate` (bytes/s the link is believed to carry) as in `wire::compress`. A `meter`
/// (`ProgressMeter`) learns the pages harvested, then advances as they go.
#[pyfunction]
#[pyo3(signature = (memory, fd, *, detect_zero = true, tracker = None, compress = "off", link_rate = None, meter = None))]
#[allow(clippy::too_many_arguments)]
fn send_dirty_pages<'py>(
    py: Python<'py>,
    memory: PyRef<'py, PyGuestMemory>,
    fd: Endpoint,
    detect_zero: bool,
    tracker: Option<PyRef<'py, PyDigestTracker>>,
    compress: &str,
    link_rate: Option<f64>,
    meter: Option<PyRef<'py, PyProgressMeter>>,
) -> PyResult<Bound<'py, PyDict>> {
    let tracker = tracker_of(&memory, tracker)?;
    let with = SendWith { tracker, compress, link_rate, meter: meter_of(meter) };
    send_segments(py, &memory, fd, with, |mem, i, seg| {
        let mut words = vec![0u64; seg.pages().div_ceil(64)];
        mem.get_and_clear_dirty_segment(i, &mut words).map_err(PageError::Memory)?;
        wire::build_ranges_from_bitmap(seg, &words, detect_zero)
    })
}

/// Send every page of guest memory: pages never touched (mincore) as zero ranges without reading
/// them, all-zero pages as zero ranges if `detect_zero`, the rest with their data (`tracker`,
/// `compress`, `link_rate` and `meter` as for `send_dirty_pages`).
#[pyfunction]
#[pyo3(signature = (memory, fd, *, detect_zero = true, tracker = None, compress = "off", link_rate = None, meter = None))]
#[allow(clippy::too_many_arguments)]
fn send_all_pages<'py>(
    py: Python<'py>,
    memory: PyRef<'py, PyGuestMemory>,
    fd: Endpoint,
    detect_zero: bool,
    tracker: Option<PyRef<'py, PyDigestTracker>>,
    compress: &str,
    link_rate: Option<f64>,
    meter: Option<PyRef<'py, PyProgressMeter>>,
) -> PyResult<Bound<'py, PyDict>> {
    let tracker = tracker_of(&memory, tracker)?;
    let with = SendWith { tracker, compress, link_rate, meter: meter_of(meter) };
    send_segments(py, &memory, fd, with, |_, _, seg| all_page_ranges(seg, detect_zero))
}

/// Send the pages whose frame numbers (little-endian u64, ascending) are in `pfns`.
#[pyfunction]
#[pyo3(signature = (memory, fd, pfns, *, detect_zero = true, compress = "off", link_rate = None))]
fn send_page_list<'py>(
    py: Python<'py>,
    memory: PyRef<'py, PyGuestMemory>,
    fd: Endpoint,
    pfns: &[u8],
    detect_zero: bool,
    compress: &str,
    link_rate: Option<f64>,
) -> PyResult<Bound<'py, PyDict>> {
    if !pfns.len().is_multiple_of(8) {
        return Err(PyValueError::new_err(format!("pfns must be little-endian u64s; {} bytes is not a multiple of 8", pfns.len())));
    }
    let list: Vec<u64> = pfns.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    let with = SendWith { tracker: None, compress, link_rate, meter: None };
    let sent = send_segments(py, &memory, fd, with, |_, _, seg| {
        let first_pfn = seg.gpa().pfn();
        let end_pfn = first_pfn + seg.pages() as u64;
        let mut words = vec![0u64; seg.pages().div_ceil(64)];
        for &pfn in list.iter().filter(|&&p| p >= first_pfn && p < end_pfn) {
            let page = (pfn - first_pfn) as usize;
            words[page / 64] |= 1 << (page % 64);
        }
        wire::build_ranges_from_bitmap(seg, &words, detect_zero)
    })?;
    // A frame outside guest memory is an error once the others have gone, as before.
    if let Some(err) = list.iter().find_map(|&p| memory.inner.translate(GuestAddress(p << PAGE_SHIFT), 1).err()) {
        return Err(memory_error(err));
    }
    Ok(sent)
}

/// Receive one batch from `fd` straight into guest memory (without marking pages dirty).
/// Everything is checked before a byte is written; a compressed batch is decompressed whole into
/// a bounded scratch buffer first. With a `tracker`, the pages written are hashed into it as they
/// arrive.
#[pyfunction]
#[pyo3(signature = (memory, fd, *, tracker = None))]
fn recv_pages<'py>(
    py: Python<'py>,
    memory: PyRef<'py, PyGuestMemory>,
    fd: Endpoint,
    tracker: Option<PyRef<'py, PyDigestTracker>>,
) -> PyResult<Bound<'py, PyDict>> {
    let tracker = tracker_of(&memory, tracker)?;
    let mem = memory.inner.clone();
    let end = fd.owned();
    let totals = py
        .detach(move || -> Result<BatchTotals, PageError> {
            let mut totals = BatchTotals::default();
            totals.add(wire::recv_batch_tracked(end.link(), &mem, tracker.as_deref())?);
            Ok(totals)
        })
        .map_err(page_error)?;
    totals_dict(py, &totals)
}

/// An xxh3-128 digest of all guest memory, segments in order. With `skip_untouched`, pages
/// never touched are hashed as zeros without being read (same value).
#[pyfunction]
#[pyo3(signature = (memory, *, skip_untouched = true))]
fn memory_digest(py: Python<'_>, memory: PyRef<'_, PyGuestMemory>, skip_untouched: bool) -> PyResult<u128> {
    let mem = memory.inner.clone();
    py.detach(move || digest::memory_digest(&mem, skip_untouched)).map_err(page_error)
}

/// The commit digest of all guest memory, computed from scratch (see `DigestTracker`).
#[pyfunction]
fn commit_digest(py: Python<'_>, memory: PyRef<'_, PyGuestMemory>) -> PyResult<u128> {
    let mem = memory.inner.clone();
    py.detach(move || digest::commit_digest(&mem)).map_err(page_error)
}

/// Page and chunk hashes of guest memory kept current by marks, so the commit digest costs
/// what changed. Every page starts stale.
#[pyclass(frozen, name = "DigestTracker", module = "vmmpy._core")]
pub struct PyDigestTracker {
    pub(super) memory: Arc<GuestMemory>,
    pub(super) inner: Arc<DigestTracker>,
}

#[pymethods]
impl PyDigestTracker {
    #[new]
    fn new(memory: PyRef<'_, PyGuestMemory>) -> PyResult<Self> {
        let inner = DigestTracker::new(&memory.inner).map_err(page_error)?;
        Ok(PyDigestTracker { memory: memory.inner.clone(), inner: Arc::new(inner) })
    }

    /// Mark `count` pages from page-aligned `gpa` stale (they changed, or may have).
    fn mark(&self, gpa: u64, count: u64) -> PyResult<()> {
        let (seg, off) = self.memory.translate(GuestAddress(gpa), 1).map_err(memory_error)?;
        if off % crate::memory::PAGE_SIZE != 0 {
            return Err(PyValueError::new_err(format!("gpa {gpa:#x} is not page-aligned")));
        }
        let count = usize::try_from(count).map_err(|_| PyValueError::new_err(format!("{count} pages is too many")))?;
        self.inner.mark_pages(seg, off / crate::memory::PAGE_SIZE, count).map_err(page_error)
    }

    /// Mark every page stale.
    fn mark_all(&self) {
        self.inner.mark_all();
    }

    /// Pages stale right now.
    fn stale_pages(&self) -> u64 {
        self.inner.stale_pages()
    }

    /// Rehash the stale pages (GIL released); returns (pages, chunks) rehashed.
    fn refresh(&self, py: Python<'_>) -> PyResult<(u64, u64)> {
        let inner = self.inner.clone();
        let stats = py.detach(move || inner.refresh()).map_err(page_error)?;
        Ok((stats.pages, stats.chunks))
    }

    /// Refresh and combine: the commit digest (GIL released).
    fn digest(&self, py: Python<'_>) -> PyResult<u128> {
        let inner = self.inner.clone();
        py.detach(move || inner.digest()).map_err(page_error)
    }
}

/// xxh3-64 of each of `count` pages from `gpa`, as little-endian u64 bytes.
#[pyfunction]
fn hash_pages<'py>(py: Python<'py>, memory: PyRef<'py, PyGuestMemory>, gpa: u64, count: u64) -> PyResult<Bound<'py, PyBytes>> {
    let mem = memory.inner.clone();
    let hashes = py
        .detach(move || -> Result<Vec<u64>, PageError> {
            let (seg, off) = mem.translate(GuestAddress(gpa), 1).map_err(PageError::Memory)?;
            if off % crate::memory::PAGE_SIZE != 0 {
                return Err(PageError::BadSendRanges { why: format!("gpa {gpa:#x} is not page-aligned") });
            }
            digest::hash_pages(seg, (off / crate::memory::PAGE_SIZE) as u64, count)
        })
        .map_err(page_error)?;
    Ok(PyBytes::new(py, &hashes.iter().flat_map(|h| h.to_le_bytes()).collect::<Vec<u8>>()))
}

/// xxh3-128 of each `chunk_size`-byte chunk of segment `index` (the last may be short).
#[pyfunction]
fn chunk_hashes(py: Python<'_>, memory: PyRef<'_, PyGuestMemory>, index: usize, chunk_size: u64) -> PyResult<Vec<u128>> {
    let mem = memory.inner.clone();
    let seg = mem
        .segments()
        .get(index)
        .cloned()
        .ok_or_else(|| PyValueError::new_err(format!("segment index {index} out of range ({} segments)", mem.segments().len())))?;
    py.detach(move || {
        let (resident, _) = digest::resident_bitmap(&seg)?;
        digest::chunk_hashes_resident(&seg, chunk_size, &resident)
    })
    .map_err(page_error)
}

/// The bytes of the end-of-round marker: an empty page batch for the segment at `segment_gpa`.
#[pyfunction]
fn end_of_round_batch<'py>(py: Python<'py>, segment_gpa: u64) -> Bound<'py, PyBytes> {
    PyBytes::new(py, &wire::end_of_round_batch(GuestAddress(segment_gpa)))
}

/// A page batch's fixed header (its first `BATCH_HEADER_SIZE` bytes) as a dict: segment_gpa,
/// flags, range_count, payload_len. Magic, version, flags, reserved bits and the range count
/// limit are checked (a PageBatchError names what is wrong); the checksum, which also covers the
/// range table, is not.
#[pyfunction]
fn decode_batch_header<'py>(py: Python<'py>, header: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let bytes: &[u8; wire::BATCH_HEADER_SIZE] = header.try_into().map_err(|_| {
        PageBatchError::new_err((libc::EINVAL, format!("a page batch header is {} bytes, got {}", wire::BATCH_HEADER_SIZE, header.len())))
    })?;
    let h = wire::decode_batch_header(bytes).map_err(page_error)?;
    let d = PyDict::new(py);
    d.set_item("segment_gpa", h.segment_gpa.0)?;
    d.set_item("flags", h.flags)?;
    d.set_item("range_count", h.range_count)?;
    d.set_item("payload_len", h.payload_len)?;
    Ok(d)
}

/// xxh3-64 of a bytes-like object (state sections and frames use it as their checksum).
#[pyfunction]
pub fn xxh3_64(data: &[u8]) -> u64 {
    crate::digest::xxh3::xxh3_64(data)
}
