//! Post-copy page requests and replies: the destination of a post-copy migration runs the guest
//! before all its memory has arrived, and asks the source for each chunk it lacks; the source
//! answers with the chunk's pages the destination does not have current.
//!
//! Which pages those are was settled at the switch ([`ChunkNeeds`]: the pages the source did
//! not send, or that changed since it sent them, as page runs both sides hold). A chunk is
//! `chunk_pages` (1 to 64) pages of the image (lowmem then highmem, as a lazy restore cuts it); its
//! needed pages are a 64-bit mask. Pages already current on the destination are never asked for
//! or sent again.
//!
//! The exchange is strictly one request then its reply, on one connection, all little-endian:
//!
//! ```text
//! request (16 bytes)                      reply (40 bytes, then the data pages)
//! 0  4 magic "VMPQ"                       0  4 magic "VMPA"
//! 4  2 version (1)                        4  2 version (1)
//! 6  2 kind: 1 demand, 2 background,      6  2 kind (as the request's)
//!          3 done                         8  8 chunk index (0 for done)
//! 8  8 chunk index (0 for done)           16 8 data mask: pages sent, in order, 4096 bytes each
//!                                         24 8 zero mask: pages that are all zero (no bytes)
//!                                         32 8 xxh3-64 of bytes 0..32 then the data pages
//! ```
//!
//! The two masks must be disjoint and together exactly the chunk's needed pages; a reply for
//! another chunk, of another kind, with other pages, or whose hash does not match is refused
//! ([`PostcopyFault`]) and the link is given up (a new one resumes: the source still holds
//! every page). "done" ends the exchange: the destination has every page, the connection goes
//! back to the migration's frames.
//!
//! The destination's side is a [`ChunkSource`] ([`PostcopyLink`]) under the guest's
//! [`LazyImage`](crate::memory::LazyImage): every access path (vCPU, device DMA, views) asks for
//! the chunk first and waits for it. Demand loads go before background ones: a background load
//! waits while any demand load does, so an urgent page waits at most for the one reply in flight.
//! When the link fails (an error, a stall past the socket's receive timeout, a refused reply)
//! loads wait, with the guest, until a new connection is attached ([`PostcopyLink::attach`]) or
//! the memory is torn down; nothing already here is discarded.
//!
//! The source's side is [`serve_pages`]: read requests, answer from the paused guest's memory
//! (straight from it: the reply's pages are written from the mapping), until "done" or the link
//! fails.
//!
//! Either side's connection is a plain socket or the connection's TLS session ([`Link`],
//! [`PageConn`]): the exchange then goes through the same session as the migration's frames
//! before and after it, so plaintext that session already opened (a request that arrived with the
//! last frame) is read first, and its receive timeout counts as the socket's does.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::digest::xxh3::Xxh3Short;

use super::fdio::{read_all, write_all, Link};
use super::tls::TlsStream;
use crate::digest::PageError;
use crate::memory::{ChunkFault, ChunkPart, ChunkSource, GuestMemory, LoadOrigin, MemoryError, Segment, PAGE_SIZE};

pub const REQUEST_MAGIC: &[u8; 4] = b"VMPQ";
pub const REPLY_MAGIC: &[u8; 4] = b"VMPA";
pub const POSTCOPY_VERSION: u16 = 1;
pub const REQUEST_SIZE: usize = 16;
pub const REPLY_HEADER_SIZE: usize = 40;
/// The most pages a post-copy chunk may have (its masks are 64 bits).
pub const MAX_CHUNK_PAGES: usize = 64;
/// The chunk post-copy uses unless told otherwise: 64 KiB, so a remote fault moves little.
pub const DEFAULT_CHUNK_SIZE: usize = 16 * PAGE_SIZE;

pub const KIND_DEMAND: u16 = 1;
pub const KIND_BACKGROUND: u16 = 2;
pub const KIND_DONE: u16 = 3;

/// The pages a post-copy destination lacks at the switch, per chunk.
#[derive(Clone, Debug)]
pub struct ChunkNeeds {
    chunk_pages: usize,
    masks: Vec<u64>,
}

impl ChunkNeeds {
    /// From page runs (first page frame number, count), over `mem`'s image: a run outside guest
    /// memory is refused, naming it.
    pub fn from_runs(mem: &GuestMemory, chunk_size: usize, runs: &[(u64, u64)]) -> Result<ChunkNeeds, String> {
        if chunk_size == 0 || !chunk_size.is_multiple_of(PAGE_SIZE) || chunk_size / PAGE_SIZE > MAX_CHUNK_PAGES {
            return Err(format!("post-copy chunk size {chunk_size} is not 4 KiB to {} KiB in whole pages", MAX_CHUNK_PAGES * 4));
        }
        let chunk_pages = chunk_size / PAGE_SIZE;
        let total_pages: usize = mem.segments().iter().map(|s| s.pages()).sum();
        let mut masks = vec![0u64; total_pages.div_ceil(chunk_pages)];
        for &(pfn, count) in runs {
            let mut image_page = None;
            let mut before = 0usize;
            for seg in mem.segments() {
                let first = seg.gpa().pfn();
                if pfn >= first && pfn.saturating_add(count) <= first + seg.pages() as u64 {
                    image_page = Some(before + (pfn - first) as usize);
                    break;
                }
                before += seg.pages();
            }
            let Some(start) = image_page else {
                return Err(format!("the page run at page frame {pfn:#x} ({count} pages) is not inside one segment of guest memory"));
            };
            for page in start..start + count as usize {
                masks[page / chunk_pages] |= 1 << (page % chunk_pages);
            }
        }
        Ok(ChunkNeeds { chunk_pages, masks })
    }

    pub fn chunk_size(&self) -> usize {
        self.chunk_pages * PAGE_SIZE
    }
    pub fn chunks(&self) -> usize {
        self.masks.len()
    }
    /// The chunk's needed pages (bit i: page i of the chunk); 0 for a chunk past the end.
    pub fn mask(&self, chunk: usize) -> u64 {
        self.masks.get(chunk).copied().unwrap_or(0)
    }
    /// How many pages are needed in all.
    pub fn pages(&self) -> u64 {
        self.masks.iter().map(|m| m.count_ones() as u64).sum()
    }
}

/// A reply the destination refuses, or a request the source refuses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostcopyFault(pub String);

fn encode_request(kind: u16, chunk: u64) -> [u8; REQUEST_SIZE] {
    let mut out = [0u8; REQUEST_SIZE];
    out[..4].copy_from_slice(REQUEST_MAGIC);
    out[4..6].copy_from_slice(&POSTCOPY_VERSION.to_le_bytes());
    out[6..8].copy_from_slice(&kind.to_le_bytes());
    out[8..16].copy_from_slice(&chunk.to_le_bytes());
    out
}

fn decode_request(b: &[u8; REQUEST_SIZE]) -> Result<(u16, u64), PostcopyFault> {
    if &b[..4] != REQUEST_MAGIC {
        return Err(PostcopyFault(format!("a page request starts with {:02x?}, not \"VMPQ\"", &b[..4])));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != POSTCOPY_VERSION {
        return Err(PostcopyFault(format!("a page request of version {version}; this side speaks {POSTCOPY_VERSION}")));
    }
    let kind = u16::from_le_bytes([b[6], b[7]]);
    if !(KIND_DEMAND..=KIND_DONE).contains(&kind) {
        return Err(PostcopyFault(format!("a page request of unknown kind {kind}")));
    }
    Ok((kind, u64::from_le_bytes(b[8..16].try_into().unwrap())))
}

fn reply_header(kind: u16, chunk: u64, data: u64, zero: u64) -> [u8; REPLY_HEADER_SIZE] {
    let mut out = [0u8; REPLY_HEADER_SIZE];
    out[..4].copy_from_slice(REPLY_MAGIC);
    out[4..6].copy_from_slice(&POSTCOPY_VERSION.to_le_bytes());
    out[6..8].copy_from_slice(&kind.to_le_bytes());
    out[8..16].copy_from_slice(&chunk.to_le_bytes());
    out[16..24].copy_from_slice(&data.to_le_bytes());
    out[24..32].copy_from_slice(&zero.to_le_bytes());
    out
}

/// Check a reply's header against the request it answers: (data mask, zero mask, hash).
fn check_reply(h: &[u8; REPLY_HEADER_SIZE], kind: u16, chunk: u64, needed: u64) -> Result<(u64, u64, u64), PostcopyFault> {
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
    if &h[..4] != REPLY_MAGIC {
        return Err(PostcopyFault(format!("a page reply starts with {:02x?}, not \"VMPA\"", &h[..4])));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != POSTCOPY_VERSION {
        return Err(PostcopyFault(format!("a page reply of version {version}; this side speaks {POSTCOPY_VERSION}")));
    }
    let (got_kind, got_chunk, data, zero) = (u16::from_le_bytes([h[6], h[7]]), u64_at(8), u64_at(16), u64_at(24));
    if got_kind != kind || got_chunk != chunk {
        return Err(PostcopyFault(format!(
            "a page reply for chunk {got_chunk} (kind {got_kind}) when chunk {chunk} (kind {kind}) was asked for"
        )));
    }
    if data & zero != 0 || data | zero != needed {
        return Err(PostcopyFault(format!(
            "the page reply for chunk {chunk} carries pages {data:#x} and zero pages {zero:#x}; the pages this side lacks are {needed:#x}"
        )));
    }
    Ok((data, zero, u64_at(32)))
}

fn pages_of(mask: u64) -> impl Iterator<Item = usize> {
    (0..64).filter(move |i| mask & (1 << i) != 0)
}

fn hash_of(header: &[u8], pages: &[*const u8]) -> u64 {
    let mut h = Xxh3Short::new();
    h.update(&header[..32]);
    for &p in pages {
        // SAFETY: each pointer is a whole readable page the caller holds (see the call sites).
        h.update(unsafe { std::slice::from_raw_parts(p, PAGE_SIZE) });
    }
    h.digest()
}

/// Where image page `page` (lowmem then highmem) lives in `mem`: the segment and offset.
fn image_page(mem: &GuestMemory, mut page: usize) -> Option<(&Arc<Segment>, usize)> {
    for seg in mem.segments() {
        if page < seg.pages() {
            return Some((seg, page * PAGE_SIZE));
        }
        page -= seg.pages();
    }
    None
}

/// What the source sent, by kind.
#[derive(Debug, Default)]
pub struct ServeStats {
    pub demand_requests: AtomicU64,
    pub demand_pages: AtomicU64,
    pub background_requests: AtomicU64,
    pub background_pages: AtomicU64,
    pub zero_pages: AtomicU64,
    pub bytes: AtomicU64,
}

/// The source's side: answer page requests on `link` (a socket, or its TLS session) from `mem`
/// (the paused guest) until the destination says "done" (Ok) or the link fails or sends something
/// this side refuses (Err, naming it). Blocking; the caller sets the socket's timeouts.
pub fn serve_pages<'a>(mem: &GuestMemory, link: impl Into<Link<'a>>, needs: &ChunkNeeds, stats: &ServeStats) -> Result<(), PageError> {
    let link = link.into();
    let bad = |why: String| PageError::BadSendRanges { why };
    loop {
        let mut req = [0u8; REQUEST_SIZE];
        let mut iov = [libc::iovec { iov_base: req.as_mut_ptr().cast(), iov_len: REQUEST_SIZE }];
        // SAFETY: the iovec describes `req`, ours for the call.
        let got = unsafe { read_all(link, &mut iov, "waiting for the destination's page requests")? };
        if got < REQUEST_SIZE as u64 {
            return Err(PageError::Truncated { what: "post-copy page request", expected: REQUEST_SIZE as u64, got });
        }
        let (kind, chunk) = decode_request(&req).map_err(|f| bad(f.0))?;
        if kind == KIND_DONE {
            let mut header = reply_header(KIND_DONE, 0, 0, 0);
            let hash = hash_of(&header, &[]);
            header[32..].copy_from_slice(&hash.to_le_bytes());
            let mut iov = [libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: REPLY_HEADER_SIZE }];
            // SAFETY: the iovec describes `header`, ours for the call.
            unsafe { write_all(link, &mut iov, "answering the destination's done")? };
            return Ok(());
        }
        let index = usize::try_from(chunk).unwrap_or(usize::MAX);
        if index >= needs.chunks() || needs.mask(index) == 0 {
            return Err(bad(format!(
                "the destination asked for chunk {chunk}, which holds no page it lacks (of {} chunks)",
                needs.chunks()
            )));
        }
        let mask = needs.mask(index);
        let (mut data, mut zero) = (0u64, 0u64);
        let mut pages = Vec::with_capacity(MAX_CHUNK_PAGES);
        for p in pages_of(mask) {
            let (seg, off) =
                image_page(mem, index * needs.chunk_pages + p).ok_or_else(|| bad(format!("chunk {chunk} is past guest memory")))?;
            seg.ensure(off, PAGE_SIZE)?; // a source restored lazily loads it first
            let ptr = seg.as_ptr().wrapping_add(off) as *const u8;
            if crate::digest::is_zero_page(seg, (off / PAGE_SIZE) as u64)? {
                zero |= 1 << p;
            } else {
                data |= 1 << p;
                pages.push(ptr);
            }
        }
        let mut header = reply_header(kind, chunk, data, zero);
        let hash = hash_of(&header, &pages);
        header[32..].copy_from_slice(&hash.to_le_bytes());
        let mut iovs = Vec::with_capacity(1 + pages.len());
        iovs.push(libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: REPLY_HEADER_SIZE });
        iovs.extend(pages.iter().map(|&p| libc::iovec { iov_base: p as *mut libc::c_void, iov_len: PAGE_SIZE }));
        // SAFETY: the header is ours and each page a readable page of the paused guest.
        unsafe { write_all(link, &mut iovs, "sending a post-copy page reply")? };
        let (n, counter) = if kind == KIND_DEMAND {
            (&stats.demand_pages, &stats.demand_requests)
        } else {
            (&stats.background_pages, &stats.background_requests)
        };
        counter.fetch_add(1, Ordering::Relaxed);
        n.fetch_add(mask.count_ones() as u64, Ordering::Relaxed);
        stats.zero_pages.fetch_add(zero.count_ones() as u64, Ordering::Relaxed);
        stats.bytes.fetch_add((REPLY_HEADER_SIZE + pages.len() * PAGE_SIZE) as u64, Ordering::Relaxed);
    }
}

/// The destination's figures so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkStats {
    pub demand_chunks: u64,
    pub demand_pages: u64,
    pub background_chunks: u64,
    pub background_pages: u64,
    pub zero_pages: u64,
    /// Remote fault latency (a demand request to its reply checked and in place), in microseconds.
    pub fault_p50_us: u64,
    pub fault_p99_us: u64,
    pub fault_max_us: u64,
    /// Times the link failed, and why it last did (None while it works).
    pub link_failures: u64,
    pub down: Option<String>,
}

/// A destination's connection for the page exchange: a connected socket (a descriptor of its own,
/// which `stop` shuts down to wake a load) and, over TLS, the connection's session, whose socket
/// the caller keeps open while it is attached (it detaches the session before closing it).
pub struct PageConn {
    fd: OwnedFd,
    tls: Option<Arc<TlsStream>>,
}

impl PageConn {
    /// A plain socket, ours from now on.
    pub fn plain(fd: OwnedFd) -> PageConn {
        PageConn { fd, tls: None }
    }

    /// The TLS session `tls`, with `fd` a descriptor of its socket that is ours (a duplicate).
    pub fn tls(fd: OwnedFd, tls: Arc<TlsStream>) -> PageConn {
        PageConn { fd, tls: Some(tls) }
    }

    fn link(&self) -> Link<'_> {
        match &self.tls {
            Some(tls) => Link::Tls(tls),
            None => Link::Fd(self.fd.as_raw_fd()),
        }
    }
}

impl From<OwnedFd> for PageConn {
    fn from(fd: OwnedFd) -> PageConn {
        PageConn::plain(fd)
    }
}

/// The destination's side of the page exchange (see the module's text).
pub struct PostcopyLink {
    name: String,
    needs: ChunkNeeds,
    conn: Mutex<Option<PageConn>>,
    conn_cv: Condvar,
    /// The fd a load is using now (-1: none), so `stop` can cut it.
    busy_fd: AtomicI32,
    urgent: AtomicUsize,
    stopped: AtomicBool,
    down: Mutex<Option<String>>,
    failures: AtomicU64,
    notify: Mutex<Option<OwnedFd>>,
    counts: [AtomicU64; 5], // demand chunks, demand pages, background chunks, background pages, zero pages
    latencies_us: Mutex<Vec<u32>>,
}

impl PostcopyLink {
    pub fn new(name: impl Into<String>, needs: ChunkNeeds) -> PostcopyLink {
        PostcopyLink {
            name: name.into(),
            needs,
            conn: Mutex::new(None),
            conn_cv: Condvar::new(),
            busy_fd: AtomicI32::new(-1),
            urgent: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            down: Mutex::new(Some("no connection attached yet".into())),
            failures: AtomicU64::new(0),
            notify: Mutex::new(None),
            counts: Default::default(),
            latencies_us: Mutex::new(Vec::new()),
        }
    }

    pub fn needs(&self) -> &ChunkNeeds {
        &self.needs
    }

    /// Use `conn` (a connected socket, ours from now on, or its TLS session) for the page
    /// exchange: the first one, or a new one after the last failed. Loads waiting for a link go on
    /// at once.
    pub fn attach(&self, new: impl Into<PageConn>) {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        *conn = Some(new.into());
        *self.down.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.conn_cv.notify_all();
    }

    /// Write one byte to `fd` (kept) each time the link fails.
    pub fn notify_on_failure(&self, fd: OwnedFd) {
        *self.notify.lock().unwrap_or_else(|p| p.into_inner()) = Some(fd);
    }

    /// Why the link is down, or None while it works.
    pub fn down(&self) -> Option<String> {
        self.down.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Tell the source every page is here ("done"), wait for its answer, and give the connection
    /// up (the caller's own socket goes on carrying the migration's frames).
    pub fn finish(&self) -> Result<(), String> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = conn.as_ref() else {
            return Err(self.down().unwrap_or_else(|| "no connection".into()));
        };
        let mut header = [0u8; REPLY_HEADER_SIZE];
        let result = exchange(c.link(), KIND_DONE, 0, 0, &mut header, &[]);
        *conn = None;
        result.map(|_| ()).map_err(|e| e.0)
    }

    pub fn stats(&self) -> LinkStats {
        let c = |i: usize| self.counts[i].load(Ordering::Relaxed);
        let mut lat = self.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).clone();
        lat.sort_unstable();
        let pct = |q: f64| if lat.is_empty() { 0 } else { lat[((lat.len() - 1) as f64 * q).round() as usize] as u64 };
        LinkStats {
            demand_chunks: c(0),
            demand_pages: c(1),
            background_chunks: c(2),
            background_pages: c(3),
            zero_pages: c(4),
            fault_p50_us: pct(0.5),
            fault_p99_us: pct(0.99),
            fault_max_us: lat.last().copied().unwrap_or(0) as u64,
            link_failures: self.failures.load(Ordering::Relaxed),
            down: self.down(),
        }
    }

    fn link_failed(&self, conn: &mut Option<PageConn>, why: String) {
        *conn = None; // closes our descriptor
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.down.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        if let Some(fd) = self.notify.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            // SAFETY: a one-byte write from a local; a full pipe or a closed reader is fine to ignore.
            unsafe { libc::write(fd.as_raw_fd(), b"!".as_ptr().cast(), 1) };
        }
        self.conn_cv.notify_all();
    }

    fn load_chunk(&self, index: usize, parts: &[ChunkPart], origin: LoadOrigin) -> Result<(), ChunkFault> {
        let kind = if origin == LoadOrigin::Demand { KIND_DEMAND } else { KIND_BACKGROUND };
        let needed = self.needs.mask(index);
        // Each needed page's address: page i of the chunk is in the part that covers its offset.
        let mut ptrs = [std::ptr::null_mut::<u8>(); MAX_CHUNK_PAGES];
        for p in pages_of(needed) {
            let off = p * PAGE_SIZE;
            let part = parts.iter().find(|q| off >= q.chunk_offset && off < q.chunk_offset + q.len);
            let Some(part) = part else {
                return Err(ChunkFault::Io { errno: libc::EINVAL, detail: format!("page {p} of chunk {index} is outside guest memory") });
            };
            ptrs[p] = part.ptr.wrapping_add(off - part.chunk_offset);
        }
        let urgent = kind == KIND_DEMAND;
        if urgent {
            self.urgent.fetch_add(1, Ordering::AcqRel);
        }
        let _urgent = urgent.then(|| Urgent(self));
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.stopped.load(Ordering::Acquire) {
                return Err(ChunkFault::Io { errno: libc::ECANCELED, detail: format!("{}: the guest's memory is going away", self.name) });
            }
            let ready = conn.is_some() && (urgent || self.urgent.load(Ordering::Acquire) == 0);
            if !ready {
                conn = self.conn_cv.wait_timeout(conn, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
                continue;
            }
            let Some(c) = conn.as_ref() else { continue };
            self.busy_fd.store(c.fd.as_raw_fd(), Ordering::Release);
            let start = Instant::now();
            let mut header = [0u8; REPLY_HEADER_SIZE];
            let result = exchange(c.link(), kind, index as u64, needed, &mut header, &ptrs);
            self.busy_fd.store(-1, Ordering::Release);
            match result {
                Ok((data, zero)) => {
                    let us = start.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    let (chunks, pages) = if urgent { (0, 1) } else { (2, 3) };
                    self.counts[chunks].fetch_add(1, Ordering::Relaxed);
                    self.counts[pages].fetch_add((data | zero).count_ones() as u64, Ordering::Relaxed);
                    self.counts[4].fetch_add(zero.count_ones() as u64, Ordering::Relaxed);
                    if urgent {
                        self.latencies_us.lock().unwrap_or_else(|p| p.into_inner()).push(us);
                    }
                    drop(conn);
                    if !urgent {
                        self.conn_cv.notify_all();
                    }
                    return Ok(());
                }
                Err(fault) => self.link_failed(&mut conn, fault.0),
            }
        }
    }
}

/// A demand load in progress: background loads wait while any is. Ending it wakes them, under
/// the connection's lock so that one checking the count just then is already waiting.
struct Urgent<'a>(&'a PostcopyLink);

impl Drop for Urgent<'_> {
    fn drop(&mut self) {
        self.0.urgent.fetch_sub(1, Ordering::AcqRel);
        let _conn = self.0.conn.lock().unwrap_or_else(|p| p.into_inner());
        self.0.conn_cv.notify_all();
    }
}

/// One request and its reply on `link`: the data pages go to `ptrs` (by page index), the zero pages
/// are cleared, and the reply is checked before Ok((data mask, zero mask)).
fn exchange(
    link: Link<'_>,
    kind: u16,
    chunk: u64,
    needed: u64,
    header: &mut [u8; REPLY_HEADER_SIZE],
    ptrs: &[*mut u8],
) -> Result<(u64, u64), PostcopyFault> {
    let io = |e: PageError| PostcopyFault(format!("the page link failed: {e}"));
    let mut req = encode_request(kind, chunk);
    let mut iov = [libc::iovec { iov_base: req.as_mut_ptr().cast(), iov_len: REQUEST_SIZE }];
    // SAFETY: the iovec describes `req`, ours for the call.
    unsafe { write_all(link, &mut iov, "sending a post-copy page request") }.map_err(io)?;
    let mut hiov = [libc::iovec { iov_base: header.as_mut_ptr().cast(), iov_len: REPLY_HEADER_SIZE }];
    // SAFETY: the iovec describes `header`, borrowed mutably for the call.
    let got = unsafe { read_all(link, &mut hiov, "receiving a post-copy page reply") }.map_err(io)?;
    if got < REPLY_HEADER_SIZE as u64 {
        return Err(PostcopyFault(format!("the page link ended {got} bytes into a reply's header")));
    }
    let (data, zero, hash) = check_reply(header, kind, chunk, needed)?;
    let pages: Vec<*mut u8> = pages_of(data).map(|p| ptrs[p]).collect();
    let mut iovs: Vec<libc::iovec> = pages.iter().map(|&p| libc::iovec { iov_base: p.cast(), iov_len: PAGE_SIZE }).collect();
    // SAFETY: each pointer is a whole writable page of a chunk the caller loads (nothing else
    // touches it until the load ends).
    let got = unsafe { read_all(link, &mut iovs, "receiving a post-copy page reply's pages") }.map_err(io)?;
    if got < (pages.len() * PAGE_SIZE) as u64 {
        return Err(PostcopyFault(format!("the page link ended {got} bytes into chunk {chunk}'s pages")));
    }
    let readable: Vec<*const u8> = pages.iter().map(|&p| p as *const u8).collect();
    if hash_of(header, &readable) != hash {
        return Err(PostcopyFault(format!("the page reply for chunk {chunk} does not match its hash: refused (corrupted on the way?)")));
    }
    for p in pages_of(zero) {
        // SAFETY: as above.
        unsafe { std::ptr::write_bytes(ptrs[p], 0, PAGE_SIZE) };
    }
    Ok((data, zero))
}

/// The [`ChunkSource`] a post-copy destination's memory loads from.
pub struct LinkSource(pub Arc<PostcopyLink>);

impl ChunkSource for LinkSource {
    fn name(&self) -> &str {
        &self.0.name
    }

    unsafe fn load(&self, index: usize, parts: &[ChunkPart]) -> Result<(), ChunkFault> {
        self.0.load_chunk(index, parts, LoadOrigin::Fill)
    }

    unsafe fn load_for(&self, index: usize, parts: &[ChunkPart], origin: LoadOrigin) -> Result<(), ChunkFault> {
        self.0.load_chunk(index, parts, origin)
    }

    fn stop(&self) {
        self.0.stopped.store(true, Ordering::Release);
        let fd = self.0.busy_fd.load(Ordering::Acquire);
        if fd >= 0 {
            // SAFETY: shutdown on a descriptor a load holds open; it only wakes that load's read.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        self.0.conn_cv.notify_all();
    }
}

/// Make `mem` load the chunks `link` says it lacks through it, from now on (the guest paused).
pub fn make_postcopy(mem: &GuestMemory, link: Arc<PostcopyLink>) -> Result<(), MemoryError> {
    let chunk_size = link.needs.chunk_size();
    let needs = link.needs.clone();
    mem.make_lazy(chunk_size, Box::new(LinkSource(link)), move |i| needs.mask(i) != 0)
}
