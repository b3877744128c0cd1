//! `_core.PostcopyLink` and `_core.PostcopyServer`: the two sides of a post-copy migration's page
//! exchange (`wire::postcopy`), with the GIL released while they wait on the network.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use super::errors::memory_error;
use super::memory::{dup_fd, PyGuestMemory};
use super::pages::page_error;
use super::tls::Endpoint;
use crate::wire::{make_postcopy, serve_pages, ChunkNeeds, PageConn, PostcopyLink, ServeStats};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyPostcopyLink>()?;
    m.add_class::<PyPostcopyServer>()?;
    m.add_class::<PostcopyLinkStats>()?;
    m.add_class::<PostcopyServeStats>()?;
    m.add("POSTCOPY_CHUNK_SIZE", crate::wire::POSTCOPY_CHUNK)?;
    m.add("POSTCOPY_MAX_CHUNK_PAGES", crate::wire::POSTCOPY_MAX_CHUNK_PAGES)?;
    Ok(())
}

result_class! {
    /// The destination's figures: chunks and pages fetched on demand (an access waited) and in
    /// the background, zero pages among them, remote fault latency in microseconds (p50, p99,
    /// max, over demand fetches), how often the link failed, and why it is down now (None: up).
    PostcopyLinkStats as "PostcopyLinkStats" {
        demand_chunks: u64,
        demand_pages: u64,
        background_chunks: u64,
        background_pages: u64,
        zero_pages: u64,
        fault_p50_us: u64,
        fault_p99_us: u64,
        fault_max_us: u64,
        link_failures: u64,
        down: Option<String>,
    }
}

result_class! {
    /// The source's figures: requests and pages answered on demand and in the background, zero
    /// pages among them (sent as a bit), reply bytes.
    PostcopyServeStats as "PostcopyServeStats" {
        demand_requests: u64,
        demand_pages: u64,
        background_requests: u64,
        background_pages: u64,
        zero_pages: u64,
        bytes: u64,
    }
}

/// Page runs as `peek_dirty_runs` gives them (little-endian u64 pairs: first page frame, count).
fn parse_runs(runs: &[u8]) -> PyResult<Vec<(u64, u64)>> {
    if !runs.len().is_multiple_of(16) {
        return Err(PyValueError::new_err(format!("page runs are 16-byte pairs; got {} bytes", runs.len())));
    }
    Ok(runs
        .chunks_exact(16)
        .map(|c| (u64::from_le_bytes(c[..8].try_into().unwrap()), u64::from_le_bytes(c[8..].try_into().unwrap())))
        .collect())
}

fn needs_of(mem: &PyGuestMemory, runs: &[u8], chunk_size: usize) -> PyResult<ChunkNeeds> {
    ChunkNeeds::from_runs(&mem.inner, chunk_size, &parse_runs(runs)?).map_err(PyValueError::new_err)
}

/// The destination's side: made by `PostcopyLink(memory, runs, chunk_size, name)`, which makes the
/// (paused) guest's memory load the chunks holding the pages `runs` names through this link from
/// then on, and only those pages of them.
#[pyclass(frozen, name = "PostcopyLink", module = "vmmpy._core")]
pub struct PyPostcopyLink {
    link: Arc<PostcopyLink>,
}

#[pymethods]
impl PyPostcopyLink {
    #[new]
    fn new(memory: &PyGuestMemory, runs: &[u8], chunk_size: usize, name: String) -> PyResult<Self> {
        let link = Arc::new(PostcopyLink::new(name, needs_of(memory, runs, chunk_size)?));
        make_postcopy(&memory.inner, link.clone()).map_err(memory_error)?;
        Ok(PyPostcopyLink { link })
    }

    /// Pages the destination lacked at the switch.
    #[getter]
    fn pages(&self) -> u64 {
        self.link.needs().pages()
    }

    /// Use the connected socket `fd` (a duplicate is kept), or a `TlsStream` (its socket kept
    /// open by the caller while attached), for page requests from now on.
    fn attach(&self, conn: Endpoint) -> PyResult<()> {
        let conn = match conn {
            Endpoint::Fd(fd) => PageConn::plain(dup_fd(fd)?),
            Endpoint::Tls(tls) => {
                let tls = tls.get().inner.clone();
                PageConn::tls(dup_fd(tls.fd())?, tls)
            }
        };
        self.link.attach(conn);
        Ok(())
    }

    /// Have one byte written to `fd` (a duplicate is kept) each time the link fails.
    fn notify_on_failure(&self, fd: i32) -> PyResult<()> {
        self.link.notify_on_failure(dup_fd(fd)?);
        Ok(())
    }

    /// Why the link is down, or None while it works.
    #[getter]
    fn down(&self) -> Option<String> {
        self.link.down()
    }

    /// Tell the source every page is here and wait for its answer (GIL released); OSError if
    /// the link fails first.
    fn finish(&self, py: Python<'_>) -> PyResult<()> {
        let link = self.link.clone();
        py.detach(move || link.finish()).map_err(PyOSError::new_err)
    }

    fn stats(&self) -> PostcopyLinkStats {
        let s = self.link.stats();
        PostcopyLinkStats {
            demand_chunks: s.demand_chunks,
            demand_pages: s.demand_pages,
            background_chunks: s.background_chunks,
            background_pages: s.background_pages,
            zero_pages: s.zero_pages,
            fault_p50_us: s.fault_p50_us,
            fault_p99_us: s.fault_p99_us,
            fault_max_us: s.fault_max_us,
            link_failures: s.link_failures,
            down: s.down,
        }
    }
}

/// The source's side: `PostcopyServer(memory, runs, chunk_size)` answers page requests for the
/// pages `runs` names from the paused guest's memory.
#[pyclass(frozen, name = "PostcopyServer", module = "vmmpy._core")]
pub struct PyPostcopyServer {
    memory: Arc<crate::memory::GuestMemory>,
    needs: ChunkNeeds,
    stats: Arc<ServeStats>,
}

#[pymethods]
impl PyPostcopyServer {
    #[new]
    fn new(memory: &PyGuestMemory, runs: &[u8], chunk_size: usize) -> PyResult<Self> {
        Ok(PyPostcopyServer {
            needs: needs_of(memory, runs, chunk_size)?,
            memory: memory.inner.clone(),
            stats: Arc::new(ServeStats::default()),
        })
    }

    /// Pages the destination lacked at the switch.
    #[getter]
    fn pages(&self) -> u64 {
        self.needs.pages()
    }

    /// Answer requests on the socket `fd`, or a `TlsStream`, until the destination says it has
    /// every page (returns) or the link fails or misbehaves (PageBatchError naming it). GIL released.
    fn serve(&self, py: Python<'_>, conn: Endpoint) -> PyResult<()> {
        let (memory, needs, stats, conn) = (self.memory.clone(), self.needs.clone(), self.stats.clone(), conn.owned());
        py.detach(move || serve_pages(&memory, conn.link(), &needs, &stats)).map_err(page_error)
    }

    fn stats(&self) -> PostcopyServeStats {
        let s = &self.stats;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        PostcopyServeStats {
            demand_requests: n(&s.demand_requests),
            demand_pages: n(&s.demand_pages),
            background_requests: n(&s.background_requests),
            background_pages: n(&s.background_pages),
            zero_pages: n(&s.zero_pages),
            bytes: n(&s.bytes),
        }
    }
}
