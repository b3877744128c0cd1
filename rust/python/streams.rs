//! Bindings for a round's page streams: harvest a round once and send it over several fds at
//! once, and receive one stream's share of a round, each with the GIL released for the whole call.

use std::sync::Arc;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::memory::PyGuestMemory;
use super::pages::{all_page_ranges, page_error, totals_dict, tracker_of, PyDigestTracker};
use super::progress::{meter_of, PyProgressMeter};
use super::tls::{Endpoint, OwnedEndpoint};
use crate::digest::PageError;
use crate::wire::{self, BatchTotals, PageRange, MAX_STREAMS};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("MAX_STREAMS", MAX_STREAMS)?;
    m.add_function(wrap_pyfunction!(send_pages_multi, m)?)?;
    m.add_function(wrap_pyfunction!(recv_share, m)?)?;
    m.add_class::<PyPageBudget>()?;
    Ok(())
}

/// The pages a round may carry over all its streams together; shared by their receivers.
#[pyclass(name = "PageBudget", module = "vmmpy._core", frozen)]
pub struct PyPageBudget {
    inner: Arc<wire::PageBudget>,
}

#[pymethods]
impl PyPageBudget {
    #[new]
    fn new(max_pages: u64) -> PyPageBudget {
        PyPageBudget { inner: Arc::new(wire::PageBudget::new(max_pages)) }
    }

    /// Pages charged so far.
    #[getter]
    fn carried(&self) -> u64 {
        self.inner.carried()
    }
}

/// Receive one stream's share of a round from `fd` (until its empty end batch) straight into
/// guest memory, hashing into `tracker` when given, charging every batch's pages to `budget`;
/// a compressed batch is refused unless `compressed`. Returns the totals of its non-empty
/// batches, `wire_bytes` including the end marker. A `meter` advances as the pages arrive.
/// `streams`: how many streams the round has; its only stream installs big batches into fresh
/// memory on a second thread, one of several reads and installs in windows sized for them.
#[pyfunction]
#[pyo3(signature = (memory, fd, *, budget, compressed, tracker = None, meter = None, streams = 1))]
#[allow(clippy::too_many_arguments)]
fn recv_share<'py>(
    py: Python<'py>,
    memory: PyRef<'py, PyGuestMemory>,
    fd: Endpoint,
    budget: PyRef<'py, PyPageBudget>,
    compressed: bool,
    tracker: Option<PyRef<'py, PyDigestTracker>>,
    meter: Option<PyRef<'py, PyProgressMeter>>,
    streams: usize,
) -> PyResult<Bound<'py, PyDict>> {
    if streams == 0 || streams > MAX_STREAMS {
        return Err(PyValueError::new_err(format!("streams is {streams}; a round has 1 to {MAX_STREAMS}")));
    }
    let tracker = tracker_of(&memory, tracker)?;
    let mem = memory.inner.clone();
    let budget = budget.inner.clone();
    let meter = meter_of(meter);
    let end = fd.owned();
    let totals = py
        .detach(move || wire::recv_share(end.link(), &mem, tracker.as_deref(), &budget, compressed, meter.as_deref(), streams))
        .map_err(page_error)?;
    totals_dict(py, &totals)
}

/// One round over every fd in `fds` at once. With `all_pages`, every page (never-touched ones as
/// zero ranges without reading them, as `send_all_pages`); otherwise harvest-and-clear the dirty
/// pages first (as `send_dirty_pages`, hashing them into `tracker` on the way when given). The round is
/// cut into chunks of at most `chunk_pages` DATA pages (and 65,536 ranges), each sent as one
/// batch on whichever fd is free, and every fd's share ends with an empty batch. Returns the
/// totals over all fds (end markers not counted) and `streams`, the same per fd. A `meter` learns
/// the round's pages once harvested, then advances as every stream writes. `compress` ("off",
/// "lz4", "auto") gives each stream a compressor of its own, believing its stream carries an even
/// share of `link_rate`; then `compress_attempts` and `link_rate` (the streams' measured rates
/// added) are returned too, as `send_dirty_pages` returns them. `at_once`: how many fds may have a
/// chunk going at a time (default all; the caller's policy, `wire::Sending::at_once`).
#[pyfunction]
#[pyo3(signature = (memory, fds, *, all_pages, detect_zero = true, chunk_pages = wire::BATCH_DATA_PAGES, tracker = None, meter = None,
                    compress = "off", link_rate = None, at_once = None))]
#[allow(clippy::too_many_arguments)]
fn send_pages_multi<'py>(
    py: Python<'py>,
    memory: PyRef<'py, PyGuestMemory>,
    fds: Vec<Endpoint>,
    all_pages: bool,
    detect_zero: bool,
    chunk_pages: u32,
    tracker: Option<PyRef<'py, PyDigestTracker>>,
    meter: Option<PyRef<'py, PyProgressMeter>>,
    compress: &str,
    link_rate: Option<f64>,
    at_once: Option<usize>,
) -> PyResult<Bound<'py, PyDict>> {
    let mode = wire::CompressMode::parse(compress).map_err(PyValueError::new_err)?;
    if fds.is_empty() || fds.len() > MAX_STREAMS {
        return Err(PyValueError::new_err(format!("{} fds given; 1 to {MAX_STREAMS} streams may be used", fds.len())));
    }
    if chunk_pages == 0 {
        return Err(PyValueError::new_err("chunk_pages must be at least 1"));
    }
    if at_once == Some(0) {
        return Err(PyValueError::new_err("at_once must be at least 1"));
    }
    let tracker = tracker_of(&memory, tracker)?;
    let mem = memory.inner.clone();
    let meter = meter_of(meter);
    let ends: Vec<OwnedEndpoint> = fds.iter().map(Endpoint::owned).collect();
    let per_stream = py
        .detach(move || -> Result<Vec<(BatchTotals, Option<wire::Compressor>)>, PageError> {
            let mut chunks: Vec<Vec<PageRange>> = Vec::new();
            for (i, seg) in mem.segments().iter().enumerate() {
                let ranges = if all_pages {
                    all_page_ranges(seg, detect_zero)?
                } else {
                    let mut words = vec![0u64; seg.pages().div_ceil(64)];
                    mem.get_and_clear_dirty_segment(i, &mut words).map_err(PageError::Memory)?;
                    wire::build_ranges_from_bitmap(seg, &words, detect_zero)?
                };
                chunks.extend(wire::split_batches(&ranges, chunk_pages));
            }
            let links: Vec<wire::Link<'_>> = ends.iter().map(OwnedEndpoint::link).collect();
            let share = link_rate.map(|r| r / links.len() as f64);
            let how = wire::Sending { compress: mode, link_hint: share, at_once: at_once.unwrap_or(links.len()) };
            wire::send_chunks_compressed(&links, &mem, &chunks, tracker.as_deref(), meter.as_deref(), how)
        })
        .map_err(page_error)?;
    let mut total = BatchTotals::default();
    let (mut attempts, mut rate) = (0u64, None::<f64>);
    let list = PyList::empty(py);
    for (t, compressor) in &per_stream {
        total.merge(t);
        list.append(totals_dict(py, t)?)?;
        if let Some(c) = compressor {
            attempts += c.attempts;
            rate = c.link_rate().map(|r| r + rate.unwrap_or(0.0)).or(rate);
        }
    }
    let d = totals_dict(py, &total)?;
    d.set_item("streams", list)?;
    if mode != wire::CompressMode::Off {
        d.set_item("compress_attempts", attempts)?;
        d.set_item("link_rate", rate)?;
    }
    Ok(d)
}
