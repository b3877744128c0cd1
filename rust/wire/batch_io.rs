//! Moving batches over file descriptors: `send_batch` writes header, table and page bytes
//! straight from guest memory with scatter-gather I/O; `recv_batch` validates a batch completely
//! before it writes guest memory, then reads the page bytes straight into the mapping.
//!
//! Both take a blocking fd (socket, pipe or file) that the caller owns and keeps open for the
//! call. Neither allocates per page: the only allocations are the encoded header and table and
//! one iovec per DATA range. Received pages are not marked dirty (the guest did not write them):
//! the soft bitmap is left alone and the kernel backend's protection is restored afterwards.
//!
//! ZERO ranges on the receiver: on unwired memory the pages are dropped with
//! madvise(MADV_DONTNEED), which on private anonymous memory makes them read as zero again and
//! costs nothing for pages never touched (a fresh destination stays unpopulated). Wired memory is
//! mlock'ed, where MADV_DONTNEED is refused, so it is cleared with a memset. Lazily restored
//! memory is anonymous too; the chunks a batch touches are loaded (and checked) before it is
//! sent from or written into (`ready_ranges`).
//!
//! If a receive fails part way (the stream ends, the peer breaks), pages already read stay written
//! and may count as dirty with the kernel backend: the destination of a failed transfer is thrown
//! away, so that is harmless, and nothing at all is written before the header and table check out.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::batch::{
    decode_header, decode_table, encode_batch, validate_ranges, BatchHeader, PageRange, RangeKind, BATCH_FLAG_LZ4, BATCH_HEADER_SIZE,
    MAX_RANGES, RANGE_ENTRY_SIZE,
};
use super::ready_ranges;
use super::stall::{poll_ms, socket_timeout, timed_out, would_block, SendDeadline};
use crate::digest::DigestTracker;
use crate::digest::Direction;
use crate::digest::PageError;
use crate::memory::{GuestMemory, MemoryError, Segment, PAGE_SIZE};

/// What one batch moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    pub ranges: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
    /// Page bytes carried (4096 per DATA page).
    pub data_bytes: u64,
    /// Everything on the wire: header, table and page bytes.
    pub wire_bytes: u64,
    /// Batches whose DATA pages went as an LZ4 block (`compress`), and what that saved:
    /// `data_bytes` minus the compressed payloads, summed over those batches.
    pub compressed_batches: u64,
    pub saved_bytes: u64,
}

impl BatchStats {
    pub(super) fn of(ranges: &[PageRange]) -> BatchStats {
        let mut s = BatchStats { ranges: ranges.len() as u64, ..Default::default() };
        for r in ranges {
            match r.kind {
                RangeKind::Data => s.data_pages += r.pages as u64,
                RangeKind::Zero => s.zero_pages += r.pages as u64,
            }
        }
        s.data_bytes = s.data_pages * PAGE_SIZE as u64;
        s.wire_bytes = (BATCH_HEADER_SIZE + ranges.len() * RANGE_ENTRY_SIZE) as u64 + s.data_bytes;
        s
    }
}

/// What a run of batches carried: their count and the sum of their stats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchTotals {
    pub batches: u64,
    pub stats: BatchStats,
}

impl BatchTotals {
    /// Count one more batch.
    pub fn add(&mut self, s: BatchStats) {
        self.batches += 1;
        self.add_stats(&s);
    }

    /// Fold in another run's totals (the streams of one round).
    pub fn merge(&mut self, other: &BatchTotals) {
        self.batches += other.batches;
        self.add_stats(&other.stats);
    }

    fn add_stats(&mut self, s: &BatchStats) {
        self.stats.ranges += s.ranges;
        self.stats.data_pages += s.data_pages;
        self.stats.zero_pages += s.zero_pages;
        self.stats.data_bytes += s.data_bytes;
        self.stats.wire_bytes += s.wire_bytes;
        self.stats.compressed_batches += s.compressed_batches;
        self.stats.saved_bytes += s.saved_bytes;
    }
}

/// Batches with at least this much page data get their pages populated ahead of the reader.
const POPULATE_AHEAD_MIN: u64 = 4 << 20;

/// At most this many iovecs per call (Linux's UIO_MAXIOV).
const IOV_MAX: usize = 1024;

/// With a digest tracker, page bytes are hashed and moved this much at a time: small enough to
/// stay in a core's L2 cache between the hash and the copy, so the sender's copy to the socket
/// and the receiver's hash read the cache instead of memory.
const HASH_WINDOW_PAGES: usize = 64;

/// The DATA pages of a batch as runs of `(first page in the segment, pages)`, in order, cut into
/// windows of at most `HASH_WINDOW_PAGES` pages.
fn data_windows(ranges: &[PageRange], offsets: &[usize]) -> Vec<Vec<(usize, usize)>> {
    let mut windows = Vec::new();
    let mut window: Vec<(usize, usize)> = Vec::new();
    let mut room = HASH_WINDOW_PAGES;
    for (mut first, mut left) in runs_of(RangeKind::Data, ranges, offsets) {
        while left > 0 {
            let n = left.min(room);
            window.push((first, n));
            (first, left, room) = (first + n, left - n, room - n);
            if room == 0 {
                windows.push(std::mem::take(&mut window));
                room = HASH_WINDOW_PAGES;
            }
        }
    }
    if !window.is_empty() {
        windows.push(window);
    }
    windows
}

/// A batch's ranges of one `kind` as runs of `(first page in the segment, pages)`.
pub(super) fn runs_of(kind: RangeKind, ranges: &[PageRange], offsets: &[usize]) -> Vec<(usize, usize)> {
    ranges.iter().zip(offsets).filter(|(r, _)| r.kind == kind).map(|(r, &off)| (off / PAGE_SIZE, r.pages as usize)).collect()
}

fn run_iovec(seg: &Segment, (first, pages): (usize, usize)) -> libc::iovec {
    libc::iovec { iov_base: seg.as_ptr().wrapping_add(first * PAGE_SIZE) as *mut libc::c_void, iov_len: pages * PAGE_SIZE }
}

/// Drop the first `n` bytes from `iovs[*idx..]`.
fn advance(iovs: &mut [libc::iovec], idx: &mut usize, mut n: usize) {
    while n > 0 && *idx < iovs.len() {
        let iov = &mut iovs[*idx];
        if n >= iov.iov_len {
            n -= iov.iov_len;
            *idx += 1;
        } else {
            iov.iov_base = (iov.iov_base as *mut u8).wrapping_add(n) as *mut libc::c_void;
            iov.iov_len -= n;
            n = 0;
        }
    }
    while *idx < iovs.len() && iovs[*idx].iov_len == 0 {
        *idx += 1;
    }
}

/// Write every byte the iovecs describe. Sockets get sendmsg(MSG_NOSIGNAL), so a closed peer is
/// an EPIPE error rather than a SIGPIPE; anything else (pipe, file) gets writev. A socket with a
/// send timeout is written without sleeping in the kernel, waiting for room in poll(), so the
/// timeout counts from the last byte the peer took ([`SendDeadline`]).
///
/// # Safety
/// Every iovec must describe memory readable for the whole call.
pub(super) unsafe fn write_all(fd: RawFd, iovs: &mut [libc::iovec], what: &str) -> Result<(), PageError> {
    let mut idx = 0;
    advance(iovs, &mut idx, 0);
    let mut socket = true;
    let mut deadline = SendDeadline::new(fd);
    while idx < iovs.len() {
        let count = (iovs.len() - idx).min(IOV_MAX);
        let n = if socket {
            // SAFETY: an all-zero msghdr is valid (no name, no control data).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iovs[idx..].as_mut_ptr();
            msg.msg_iovlen = count as _;
            let flags = libc::MSG_NOSIGNAL | if deadline.is_some() { libc::MSG_DONTWAIT } else { 0 };
            // SAFETY: the iovecs describe readable memory (the caller's contract); the kernel only reads them.
            unsafe { libc::sendmsg(fd, &msg, flags) }
        } else {
            // SAFETY: as above.
            unsafe { libc::writev(fd, iovs[idx..].as_ptr(), count as libc::c_int) }
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ENOTSOCK) if socket => {
                    socket = false;
                    deadline = None;
                    continue;
                }
                Some(libc::EAGAIN) => match deadline.as_mut() {
                    Some(d) => {
                        d.wait(what)?;
                        continue;
                    }
                    None => return Err(would_block(fd, what, Direction::Send)),
                },
                _ => return Err(PageError::io(format!("{what} (fd {fd})"), err)),
            }
        }
        if n == 0 {
            return Err(PageError::io(format!("{what} (fd {fd})"), io::Error::from(io::ErrorKind::WriteZero)));
        }
        if let Some(d) = deadline.as_mut() {
            d.progressed();
        }
        advance(iovs, &mut idx, n as usize);
    }
    Ok(())
}

/// Fill every byte the iovecs describe from `fd`; returns how many bytes arrived before the
/// stream ended (the total when it did not).
///
/// # Safety
/// Every iovec must describe memory writable for the whole call and not referenced as `&`/`&mut`.
pub(super) unsafe fn read_all(fd: RawFd, iovs: &mut [libc::iovec], what: &str) -> Result<u64, PageError> {
    // SAFETY: the caller's contract.
    unsafe { read_all_with(fd, iovs, what, None) }
}

/// [`read_all`], with readv; or with `whole`, a poll for everything still missing and then a
/// non-blocking recvmsg, until the iovecs are full (see [`WholeReads`]).
///
/// # Safety
/// As for [`read_all`].
unsafe fn read_all_with(fd: RawFd, iovs: &mut [libc::iovec], what: &str, mut whole: Option<&mut WholeReads>) -> Result<u64, PageError> {
    let mut idx = 0;
    let mut got = 0u64;
    advance(iovs, &mut idx, 0);
    while idx < iovs.len() {
        let count = (iovs.len() - idx).min(IOV_MAX);
        let n = match whole.as_deref_mut() {
            None => {
                // SAFETY: the iovecs describe writable memory (the caller's contract).
                unsafe { libc::readv(fd, iovs[idx..].as_ptr(), count as libc::c_int) }
            }
            Some(w) => {
                if !w.wait(iovs[idx..].iter().map(|v| v.iov_len).sum(), what)? {
                    continue; // interrupted
                }
                // SAFETY: an all-zero msghdr is valid (no name, no control data).
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = iovs[idx..].as_mut_ptr();
                msg.msg_iovlen = count as _;
                // SAFETY: as for readv.
                unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) }
            }
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) if whole.is_some() => continue, // woken early: wait again
                Some(libc::EAGAIN) => return Err(would_block(fd, what, Direction::Receive)),
                _ => return Err(PageError::io(format!("{what} (fd {fd})"), err)),
            }
        }
        if n == 0 {
            break;
        }
        got += n as u64;
        advance(iovs, &mut idx, n as usize);
    }
    Ok(got)
}

fn read_exact(fd: RawFd, buf: &mut [u8], what: &'static str) -> Result<(), PageError> {
    let mut iov = [libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() }];
    // SAFETY: the iovec describes `buf`, which we borrow mutably for the call.
    let got = unsafe { read_all(fd, &mut iov, &format!("receiving the {what}"))? };
    if got < buf.len() as u64 {
        return Err(PageError::Truncated { what, expected: buf.len() as u64, got });
    }
    Ok(())
}

/// The segment the batch's ranges lie in: the one holding the first range, or the first
/// segment for an empty batch.
pub(super) fn batch_segment<'a>(mem: &'a GuestMemory, ranges: &[PageRange]) -> Result<&'a Segment, PageError> {
    let seg = match ranges.first() {
        Some(r) => mem.translate(r.gpa, PAGE_SIZE)?.0,
        None => mem.segments().first().ok_or(PageError::BadSendRanges { why: "guest memory has no segments".into() })?,
    };
    if seg.is_closed() {
        return Err(MemoryError::Closed { segment: seg.name().to_string() }.into());
    }
    Ok(seg)
}

/// Write one batch of `ranges` (at most `MAX_RANGES`, ascending, all in one segment, as
/// `build_ranges_*` make them) to `fd`: header and table, then the DATA pages straight from guest
/// memory. The ranges are checked exactly as the receiver will check them.
pub fn send_batch(fd: RawFd, mem: &GuestMemory, ranges: &[PageRange]) -> Result<BatchStats, PageError> {
    send_batch_tracked(fd, mem, ranges, None)
}

/// [`send_batch`], and with a `tracker` every page of the batch hashed into it as it goes: each
/// window of DATA pages is hashed right before it is written (see [`DigestTracker::hash_now`]),
/// ZERO pages are stored as zero.
pub fn send_batch_tracked(
    fd: RawFd,
    mem: &GuestMemory,
    ranges: &[PageRange],
    tracker: Option<&DigestTracker>,
) -> Result<BatchStats, PageError> {
    if ranges.len() > MAX_RANGES as usize {
        return Err(PageError::BadSendRanges {
            why: format!(
                "{} ranges, more than the {MAX_RANGES} a batch may hold; send ranges.chunks({MAX_RANGES}) as separate batches",
                ranges.len()
            ),
        });
    }
    let seg = batch_segment(mem, ranges)?;
    let stats = BatchStats::of(ranges);
    let header =
        BatchHeader { segment_gpa: seg.gpa(), flags: 0, range_count: ranges.len() as u32, payload_len: stats.data_bytes, checksum: 0 };
    let offsets = validate_ranges(seg, &header, ranges)?;
    ready_ranges(seg, ranges, &offsets)?;
    let encoded = encode_batch(seg.gpa(), ranges);
    let encoded_iov = libc::iovec { iov_base: encoded.as_ptr() as *mut libc::c_void, iov_len: encoded.len() };
    let Some(tracker) = tracker else {
        let mut iovs: Vec<libc::iovec> = std::iter::once(encoded_iov)
            .chain(runs_of(RangeKind::Data, ranges, &offsets).into_iter().map(|run| run_iovec(seg, run)))
            .collect();
        // SAFETY: the first iovec is `encoded`, alive until the end of this function; the others
        // lie inside the segment's mapping (validate_ranges checked each range), which `mem`
        // keeps mapped. The kernel only reads through them; `*mut` is the iovec type's.
        unsafe { write_all(fd, &mut iovs, "sending a page batch")? };
        return Ok(stats);
    };
    tracker.hash_now(seg, &runs_of(RangeKind::Zero, ranges, &offsets), true)?;
    let mut header_iov = Some(encoded_iov);
    for window in data_windows(ranges, &offsets) {
        tracker.hash_now(seg, &window, false)?;
        let mut iovs: Vec<libc::iovec> = header_iov.take().into_iter().chain(window.iter().map(|&run| run_iovec(seg, run))).collect();
        // SAFETY: as above.
        unsafe { write_all(fd, &mut iovs, "sending a page batch")? };
    }
    if let Some(iov) = header_iov {
        // SAFETY: as above: `encoded` is alive until the end of this function.
        unsafe { write_all(fd, &mut [iov], "sending a page batch")? };
    }
    Ok(stats)
}

/// Make `len` bytes at `off` of `seg` read as zero (see the module doc for why each way).
fn zero_pages(seg: &Segment, off: usize, len: usize) -> Result<(), PageError> {
    if seg.wired() {
        // SAFETY: validate_ranges checked the range lies inside the mapping; nothing holds a Rust
        // reference into it.
        unsafe { std::ptr::write_bytes(seg.as_ptr().add(off), 0, len) };
        return Ok(());
    }
    // SAFETY: the range lies inside the mapping (validate_ranges); the guest is not running while
    // a batch is received. On private anonymous memory MADV_DONTNEED replaces the pages with
    // zero-fill-on-demand ones.
    let dropped = unsafe { libc::madvise(seg.as_ptr().add(off) as *mut libc::c_void, len, libc::MADV_DONTNEED) } == 0;
    if !dropped {
        // SAFETY: as for the wired case.
        unsafe { std::ptr::write_bytes(seg.as_ptr().add(off), 0, len) };
    }
    Ok(())
}

/// Read one batch from `fd` into guest memory. The header, table, checksum, every range and the
/// payload length are checked before any guest byte is written; then DATA pages are read straight
/// into the mapping (a compressed batch's block is read, checked and decompressed whole into a
/// scratch buffer first, see `compress`) and ZERO pages cleared, none of them marked dirty.
pub fn recv_batch(fd: RawFd, mem: &GuestMemory) -> Result<BatchStats, PageError> {
    recv_batch_tracked(fd, mem, None)
}

/// [`recv_batch`], and then every page the batch wrote marked stale in `tracker`, so the commit
/// digest it keeps stays current (marked after the writes, as the tracker requires).
pub fn recv_batch_tracked(fd: RawFd, mem: &GuestMemory, tracker: Option<&DigestTracker>) -> Result<BatchStats, PageError> {
    let mut header_bytes = [0u8; BATCH_HEADER_SIZE];
    read_exact(fd, &mut header_bytes, "batch header")?;
    let header = decode_header(&header_bytes)?;
    // Bounded by MAX_RANGES in decode_header: at most 1 MiB whatever the stream says.
    let mut table = vec![0u8; header.range_count as usize * RANGE_ENTRY_SIZE];
    read_exact(fd, &mut table, "range table")?;
    let ranges = decode_table(&header_bytes, &header, &table)?;
    let seg = mem.segments().iter().find(|s| s.gpa() == header.segment_gpa).ok_or(PageError::NoSuchSegment { gpa: header.segment_gpa })?;
    if seg.is_closed() {
        return Err(MemoryError::Closed { segment: seg.name().to_string() }.into());
    }
    let offsets = validate_ranges(seg, &header, &ranges)?;
    ready_ranges(seg, &ranges, &offsets)?;
    let mut stats = BatchStats::of(&ranges);
    if header.flags & BATCH_FLAG_LZ4 != 0 {
        super::compress::recv_lz4_payload(fd, seg, &header, &ranges, &offsets)?;
        stats.compressed_batches = 1;
        stats.saved_bytes = stats.data_bytes - header.payload_len;
        stats.wire_bytes -= stats.saved_bytes;
        if let Some(tracker) = tracker {
            // A block is at most a few MiB, just copied into place: still in the cache.
            tracker.hash_now(seg, &runs_of(RangeKind::Data, &ranges, &offsets), false)?;
        }
    } else {
        read_data_pages(fd, seg, &header, &ranges, &offsets, tracker)?;
    }
    for (r, &off) in ranges.iter().zip(&offsets) {
        if r.kind == RangeKind::Zero {
            zero_pages(seg, off, r.bytes() as usize)?;
        }
    }
    if let Some(tracker) = tracker {
        tracker.hash_now(seg, &runs_of(RangeKind::Zero, &ranges, &offsets), true)?;
    }
    if let (Some(first), Some(last)) = (ranges.first(), ranges.last()) {
        let end = last.gpa.0 + last.bytes();
        mem.mark_clean_range(first.gpa, (end - first.gpa.0) as usize)?;
    }
    Ok(stats)
}

/// The most a socket reader asks to be woken for (SO_RCVLOWAT): one hash window.
const RCVLOWAT_MAX: usize = HASH_WINDOW_PAGES * PAGE_SIZE;

/// Reads from a socket that sleep until everything asked for (up to `RCVLOWAT_MAX`) has arrived,
/// instead of being woken for every segment.
///
/// Loopback TCP wakes a sleeping reader for each 64 KiB segment, and on a VM each wake-up of an
/// idle CPU costs the sender an IPI: a warm 1 GiB migration between two processes on 2 vCPUs took
/// 0.2 s in most runs and 0.5-0.7 s in about one of four, with the sender busy waking the
/// receiver. With SO_RCVLOWAT the kernel wakes the reader once the bytes it needs are queued.
///
/// SO_RCVLOWAT counts only bytes not yet read, so a read that copies part of what it needs and
/// then sleeps would wait for a whole low-water mark of *new* bytes, which may never come at the
/// end of a stream. So the reader never sleeps inside a read: it sets the mark to exactly what is
/// still missing, waits in poll() (woken when that much is queued, or on EOF, error, shutdown or
/// memory pressure) and then reads without blocking, until the iovecs are full.
struct WholeReads {
    fd: RawFd,
    /// The socket's SO_RCVTIMEO (None: it has none).
    timeout: Option<Duration>,
    lowat: libc::c_int,
}

impl WholeReads {
    /// For a socket `fd`, None for anything else (which is read with plain readv).
    fn new(fd: RawFd) -> Option<WholeReads> {
        let mut kind: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the c_int we own; it fails for a non-socket.
        if unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, (&mut kind as *mut libc::c_int).cast(), &mut len) } != 0 {
            return None;
        }
        Some(WholeReads { fd, timeout: socket_timeout(fd, Direction::Receive), lowat: 1 })
    }

    fn set_lowat(&mut self, bytes: usize) {
        let bytes = bytes.clamp(1, RCVLOWAT_MAX) as libc::c_int;
        if bytes != self.lowat {
            // SAFETY: the option value is a c_int on our stack, passed with its size. A refusal
            // only means the reader is woken earlier (poll then returns sooner; nothing hangs).
            unsafe {
                libc::setsockopt(
                    self.fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVLOWAT,
                    (&bytes as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            self.lowat = bytes;
        }
    }

    /// Bytes queued on the socket, not yet read (FIONREAD).
    fn queued(&self) -> libc::c_int {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int into ours.
        if unsafe { libc::ioctl(self.fd, libc::FIONREAD, &mut n) } != 0 {
            return 0;
        }
        n
    }

    /// Sleep until `missing` bytes (at most `RCVLOWAT_MAX`) are queued, or the stream ends,
    /// fails or is shut down; false if a signal interrupted the wait. The socket's SO_RCVTIMEO
    /// without a byte arriving is a [`PageError::TimedOut`]. Bytes trickling in below the
    /// low-water mark are the peer sending: the wait looks at the queue every quarter timeout, so
    /// the timeout counts from (at most a quarter after) the last byte that arrived.
    fn wait(&mut self, missing: usize, what: &str) -> Result<bool, PageError> {
        self.set_lowat(missing);
        let mut queued = self.queued();
        let mut since = Instant::now();
        loop {
            let ms = self.timeout.map_or(-1, |t| poll_ms((t / 4).min(t.saturating_sub(since.elapsed()))));
            let mut pfd = libc::pollfd { fd: self.fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one pollfd of ours.
            match unsafe { libc::poll(&mut pfd, 1, ms) } {
                0 => {
                    let (now, timeout) = (self.queued(), self.timeout.unwrap_or_default());
                    if now != queued {
                        (queued, since) = (now, Instant::now());
                    } else if since.elapsed() >= timeout {
                        return Err(timed_out(self.fd, what, Direction::Receive, timeout));
                    }
                }
                n if n < 0 => {
                    let err = io::Error::last_os_error();
                    return match err.raw_os_error() {
                        Some(libc::EINTR) => Ok(false),
                        _ => Err(PageError::io(format!("{what} (fd {})", self.fd), err)),
                    };
                }
                _ => return Ok(true),
            }
        }
    }
}

impl Drop for WholeReads {
    /// Back to the default mark for whatever reads the socket next (the frames after a batch).
    fn drop(&mut self) {
        self.set_lowat(1);
    }
}

/// Read a plain batch's DATA pages straight into the segment; with a `tracker`, a window at a
/// time, each hashed into it right after it arrives. A socket's reads wait for whole windows
/// ([`WholeReads`]).
fn read_data_pages(
    fd: RawFd,
    seg: &Segment,
    header: &BatchHeader,
    ranges: &[PageRange],
    offsets: &[usize],
    tracker: Option<&DigestTracker>,
) -> Result<(), PageError> {
    let windows = match tracker {
        Some(_) => data_windows(ranges, offsets),
        None => vec![runs_of(RangeKind::Data, ranges, offsets)],
    };
    // First touch of fresh anonymous memory costs as much as receiving into it on some hosts: a
    // second thread populates the DATA ranges ahead of the reader (MADV_POPULATE_WRITE, advisory,
    // failures ignored), so the socket reads mostly land in pages that already exist. Only for
    // a batch big enough to pay for the thread, and never for wired memory.
    let populate = !seg.wired() && header.payload_len >= POPULATE_AHEAD_MIN;
    let got = std::thread::scope(|scope| -> Result<u64, PageError> {
        if populate {
            scope.spawn(move || {
                for (r, &off) in ranges.iter().zip(offsets).filter(|(r, _)| r.kind == RangeKind::Data) {
                    // SAFETY: validate_ranges keeps the range inside the mapping; POPULATE_WRITE
                    // only faults pages in and never changes their bytes.
                    unsafe { libc::madvise(seg.as_ptr().add(off) as *mut libc::c_void, r.bytes() as usize, libc::MADV_POPULATE_WRITE) };
                }
            });
        }
        let mut whole = WholeReads::new(fd);
        let mut got = 0;
        for window in &windows {
            let mut iovs: Vec<libc::iovec> = window.iter().map(|&run| run_iovec(seg, run)).collect();
            let want: u64 = iovs.iter().map(|v| v.iov_len as u64).sum();
            // SAFETY: every iovec lies inside the segment's mapping (validate_ranges), which the
            // caller's `mem` keeps mapped; guest memory is never behind a Rust reference, so the
            // kernel writing it aliases nothing.
            let n = unsafe { read_all_with(fd, &mut iovs, "receiving page data", whole.as_mut())? };
            got += n;
            if n < want {
                break;
            }
            if let Some(tracker) = tracker {
                tracker.hash_now(seg, window, false)?;
            }
        }
        Ok(got)
    })?;
    if got < header.payload_len {
        return Err(PageError::Truncated { what: "page data", expected: header.payload_len, got });
    }
    Ok(())
}
