//! Bindings for bulk page work: send pages to a file descriptor as framed batches (optionally
//! LZ4-compressed, `compress=`), receive them straight into guest memory, hash and digest memory.
//! All of it runs with the GIL released.

use std::os::fd::RawFd;

use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use super::errors::memory_error;
use super::memory::PyGuestMemory;
use crate::memory::{GuestAddress, GuestMemory, PAGE_SHIFT};
use crate::pages::{self, BatchStats, CompressMode, Compressor, PageError, PageRange, MAX_RANGES};

create_exception!(_core, PageBatchError, PyOSError, "Sending or receiving a page batch failed; errno and the message say why.");

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PageBatchError", m.py().get_type::<PageBatchError>())?;
    m.add("MAX_BATCH_RANGES", MAX_RANGES)?;
    m.add("MAX_COMPRESSED_BATCH_DATA", pages::MAX_COMPRESSED_DATA)?;
    m.add("COMPRESS_BLOCK_PAGES", pages::COMPRESS_BLOCK_PAGES)?;
    m.add_function(wrap_pyfunction!(send_dirty_pages, m)?)?;
    m.add_function(wrap_pyfunction!(send_all_pages, m)?)?;
    m.add_function(wrap_pyfunction!(send_page_list, m)?)?;
    m.add_function(wrap_pyfunction!(recv_pages, m)?)?;
    m.add_function(wrap_pyfunction!(memory_digest, m)?)?;
    m.add_function(wrap_pyfunction!(hash_pages, m)?)?;
    m.add_function(wrap_pyfunction!(chunk_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(xxh3_64, m)?)?;
    Ok(())
}

fn page_error(err: PageError) -> PyErr {
    match err {
        PageError::Memory(e) => memory_error(e),
        other => PageBatchError::new_err((other.errno(), other.to_string())),
    }
}

/// Totals over every batch one call sent or received.
#[derive(Default)]
struct Totals {
    batches: u64,
    stats: BatchStats,
    /// Sender with compression: batches compressed to see whether they shrink, and the link
    /// speed its time rule ended with (None when unknown).
    compress_attempts: u64,
    link_rate: Option<f64>,
}

impl Totals {
    fn add(&mut self, s: BatchStats) {
        self.batches += 1;
        self.stats.ranges += s.ranges;
        self.stats.data_pages += s.data_pages;
        self.stats.zero_pages += s.zero_pages;
        self.stats.data_bytes += s.data_bytes;
        self.stats.wire_bytes += s.wire_bytes;
        self.stats.compressed_batches += s.compressed_batches;
        self.stats.saved_bytes += s.saved_bytes;
    }

    fn add_compressor(&mut self, c: &Option<Compressor>) {
        if let Some(c) = c {
            self.compress_attempts = c.attempts;
            self.link_rate = c.link_rate();
        }
    }

    fn into_dict(self, py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("batches", self.batches)?;
        d.set_item("ranges", self.stats.ranges)?;
        d.set_item("data_pages", self.stats.data_pages)?;
        d.set_item("zero_pages", self.stats.zero_pages)?;
        d.set_item("data_bytes", self.stats.data_bytes)?;
        d.set_item("wire_bytes", self.stats.wire_bytes)?;
        d.set_item("compressed_batches", self.stats.compressed_batches)?;
        d.set_item("saved_bytes", self.stats.saved_bytes)?;
        d.set_item("compress_attempts", self.compress_attempts)?;
        d.set_item("link_rate", self.link_rate)?;
        Ok(d)
    }
}

/// The sender's compressor for `compress` ("off", "lz4", "auto"; None for off) and a link
/// speed hint in bytes/s.
fn compressor(compress: &str, link_rate: Option<f64>) -> PyResult<Option<Compressor>> {
    let mode = CompressMode::parse(compress).map_err(PyValueError::new_err)?;
    Ok((mode != CompressMode::Off).then(|| Compressor::new(mode, link_rate)))
}

/// Send one segment's ranges as batches of at most MAX_RANGES ranges (through the compressor,
/// which cuts them smaller, when there is one); a segment with nothing to send sends nothing.
fn send_segment(fd: RawFd, mem: &GuestMemory, ranges: &[PageRange], totals: &mut Totals, compressor: &mut Option<Compressor>) -> Result<(), PageError> {
    if let Some(c) = compressor {
        return c.send_ranges(fd, mem, ranges, |s| totals.add(s));
    }
    for chunk in ranges.chunks(MAX_RANGES as usize) {
        totals.add(pages::send_batch(fd, mem, chunk)?);
    }
    Ok(())
}

/// Harvest and clear the dirty pages, and send them (zero pages as ranges without data, if
/// `detect_zero`). The order is the one pre-copy needs: clear the bits, then read the pages, so a
/// write during the send is caught by the next round. `compress` ("off", "lz4", "auto") and
/// `link_rate` (bytes/s the link is believed to carry) as in `pages::compress`.
#[pyfunction]
#[pyo3(signature = (memory, fd, *, detect_zero = true, compress = "off", link_rate = None))]
fn send_dirty_pages<'py>(
    py: Python<'py>,
    memory: PyRef<'py, PyGuestMemory>,
    fd: RawFd,
    detect_zero: bool,
    compress: &str,
    link_rate: Option<f64>,
) -> PyResult<Bound<'py, PyDict>> {
    let mem = memory.inner.clone();
    let mut compressor = compressor(compress, link_rate)?;
    let totals = py
        .detach(move || -> Result<Totals, PageError> {
            let mut totals = Totals::default();
            for (i, seg) in mem.segments().iter().enumerate() {
                let mut words = vec![0u64; seg.pages().div_ceil(64)];
                mem.get_and_clear_dirty_segment(i, &mut words).map_err(PageError::Memory)?;
                let ranges = pages::build_ranges_from_bitmap(seg, &words, detect_zero)?;
                send_segment(fd, &mem, &ranges, &mut totals, &mut compressor)?;
            }
            totals.add_compressor(&compressor);
            Ok(totals)
        })
        .map_err(page_error)?;
    totals.into_dict(py)
}

/// Send every page of guest memory: pages never touched (mincore) as zero ranges without reading
/// them, all-zero pages as zero ranges if `detect_zero`, the rest with their data (`compress`
/// and `link_rate` as for `send_dirty_pages`).
#[pyfunction]
#[pyo3(signature = (memory, fd, *, detect_zero = true, compress = "off", link_rate = None))]
fn send_all_pages<'py>(
    py: Python<'py>,
    memory: PyRef<'py, PyGuestMemory>,
    fd: RawFd,
    detect_zero: bool,
    compress: &str,
    link_rate: Option<f64>,
) -> PyResult<Bound<'py, PyDict>> {
    let mem = memory.inner.clone();
    let mut compressor = compressor(compress, link_rate)?;
    let totals = py
        .detach(move || -> Result<Totals, PageError> {
            let mut totals = Totals::default();
            for seg in mem.segments() {
                let pages_in = seg.pages();
                let mut all = vec![u64::MAX; pages_in.div_ceil(64)];
                if pages_in % 64 != 0 {
                    *all.last_mut().unwrap() = (1u64 << (pages_in % 64)) - 1;
                }
                let (resident, _) = pages::resident_bitmap(seg)?;
                let ranges = pages::build_ranges_with_residency(seg, &all, &resident, detect_zero)?;
                send_segment(fd, &mem, &ranges, &mut totals, &mut compressor)?;
            }
            totals.add_compressor(&compressor);
            Ok(totals)
        })
        .map_err(page_error)?;
    totals.into_dict(py)
}

/// Send the pages whose frame numbers (little-endian u64, ascending) are in `pfns`.
#[pyfunction]
#[pyo3(signature = (memory, fd, pfns, *, detect_zero = true, compress = "off", link_rate = None))]
fn send_page_list<'py>(
    py: Python<'py>,
    memory: PyRef<'py, PyGuestMemory>,
    fd: RawFd,
    pfns: &[u8],
    detect_zero: bool,
    compress: &str,
    link_rate: Option<f64>,
) -> PyResult<Bound<'py, PyDict>> {
    if pfns.len() % 8 != 0 {
        return Err(PyValueError::new_err(format!("pfns must be little-endian u64s; {} bytes is not a multiple of 8", pfns.len())));
    }
    let list: Vec<u64> = pfns.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
    let mem = memory.inner.clone();
    let mut compressor = compressor(compress, link_rate)?;
    let totals = py
        .detach(move || -> Result<Totals, PageError> {
            let mut totals = Totals::default();
            for seg in mem.segments() {
                let first_pfn = seg.gpa().pfn();
                let end_pfn = first_pfn + seg.pages() as u64;
                let mut words = vec![0u64; seg.pages().div_ceil(64)];
                for &pfn in list.iter().filter(|&&p| p >= first_pfn && p < end_pfn) {
                    let page = (pfn - first_pfn) as usize;
                    words[page / 64] |= 1 << (page % 64);
                }
                let ranges = pages::build_ranges_from_bitmap(seg, &words, detect_zero)?;
                send_segment(fd, &mem, &ranges, &mut totals, &mut compressor)?;
            }
            totals.add_compressor(&compressor);
            let outside = list.iter().find(|&&p| mem.translate(GuestAddress(p << PAGE_SHIFT), 1).is_err());
            if let Some(&pfn) = outside {
                return Err(PageError::Memory(mem.translate(GuestAddress(pfn << PAGE_SHIFT), 1).err().unwrap()));
            }
            Ok(totals)
        })
        .map_err(page_error)?;
    totals.into_dict(py)
}

/// Receive one batch from `fd` straight into guest memory (without marking pages dirty).
/// Everything is checked before a byte is written; a compressed batch is decompressed whole into
/// a bounded scratch buffer first.
#[pyfunction]
fn recv_pages<'py>(py: Python<'py>, memory: PyRef<'py, PyGuestMemory>, fd: RawFd) -> PyResult<Bound<'py, PyDict>> {
    let mem = memory.inner.clone();
    let totals = py
        .detach(move || -> Result<Totals, PageError> {
            let mut totals = Totals::default();
            totals.add(pages::recv_batch(fd, &mem)?);
            Ok(totals)
        })
        .map_err(page_error)?;
    totals.into_dict(py)
}

/// An xxh3-128 digest of all guest memory, segments in order. With `skip_untouched`, pages
/// never touched are hashed as zeros without being read (same value).
#[pyfunction]
#[pyo3(signature = (memory, *, skip_untouched = true))]
fn memory_digest(py: Python<'_>, memory: PyRef<'_, PyGuestMemory>, skip_untouched: bool) -> PyResult<u128> {
    let mem = memory.inner.clone();
    py.detach(move || pages::memory_digest(&mem, skip_untouched)).map_err(page_error)
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
            pages::hash_pages(seg, (off / crate::memory::PAGE_SIZE) as u64, count)
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
        let (resident, _) = pages::resident_bitmap(&seg)?;
        pages::chunk_hashes_resident(&seg, chunk_size, &resident)
    })
    .map_err(page_error)
}

/// xxh3-64 of a bytes-like object (state sections and frames use it as their checksum).
#[pyfunction]
pub fn xxh3_64(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}
