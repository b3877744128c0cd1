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
//! costs nothing for pages never touched (a fresh destination stays unpopulated); memfd-backed
//! memory gets madvise(MADV_REMOVE) instead, which frees the pages from the memfd (MADV_DONTNEED
//! would only unmap them from this process and leave their bytes). Wired memory is
//! mlock'ed, where MADV_DONTNEED is refused, so it is cleared with a memset. Lazily restored
//! memory is anonymous too; the chunks a batch touches are loaded (and checked) before it is
//! sent from or written into (`ready_ranges`).
//!
//! If a receive fails part way (the stream ends, the peer breaks), pages already read stay written
//! (those of whole windows, where a window is read into a staging buffer first) and may count as
//! dirty with the kernel backend: the destination of a failed transfer is thrown away, so that is
//! harmless, and nothing at all is written before the header and table check out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::batch::{
    decode_header, decode_table, encode_batch, validate_ranges, BatchHeader, PageRange, RangeKind, BATCH_FLAG_LZ4, BATCH_HEADER_SIZE,
    MAX_RANGES, RANGE_ENTRY_SIZE,
};
use super::decompress::recv_lz4_payload;
use super::fdio::{
    read_all_with, read_exact, write_all, write_all_more, Link, HASH_WINDOW_PAGES, RECV_WINDOW_PAGES, SHARED_RECV_WINDOW_PAGES,
};
use super::ready_ranges;
use super::stall::WholeReads;
use crate::digest::{DigestTracker, PageError};
use crate::memory::{page_bytes, zeroed_pages, AlignedPage, GuestMemory, InstallGuard, MemoryError, Segment, PAGE_SIZE};
use crate::progress::{self, Meter};

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
    /// What `ranges` carry as one plain batch (a caller totting up a round uses its page counts).
    pub fn of(ranges: &[PageRange]) -> BatchStats {
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

/// Page data that pays for installing pages without zeroing (a registration and a thread cost
/// about what 64 KiB of first touches do): a batch this big begins it, and so does any batch of a
/// stream's round once this much has arrived on it.
pub(super) const INSTALL_MIN: u64 = 4 << 20;

/// A batch with at least this much page data installs in a pipeline: this thread reads the next
/// slot from the socket while others install and hash the ones before (the install, the first
/// write of fresh pages, is most of an unwired destination's work). Smaller batches (a live
/// migration's later rounds) are not worth a thread and go one window at a time, and so do
/// batches over TLS (see `read_data_pages`).
const PIPELINE_MIN: u64 = 4 << 20;

/// A pipeline slot: what one read fills and one hand-over moves (1 MiB: a few wake-ups per MiB at
/// most, and still in the cache when it is installed and hashed).
const SLOT_PAGES: usize = 256;

/// The install window of one of a round's several streams, when there are no more of them than
/// CPUs (1 MiB): each window is read into staging and installed from there, so every receiving
/// thread keeps one window of staging hot, and with a stream per CPU a 1 MiB window still fits a
/// core's L2 (1 MiB on the EPYC measured). With more streams than CPUs, threads share a core and
/// its L2, and they keep the sender's 512 KiB windows. A/B, warm 1 GiB into an unwired
/// destination on 2 CPUs, 6 alternated sets of 5 a side (medians of each set): `--streams 2`
/// 2.39-2.57 GiB/s and 0.76-0.80 CPU-s with 512 KiB against 2.56-2.74 and 0.62-0.68 with 1 MiB
/// (1 MiB ahead in 5 sets of 6, one even); `--streams 4` 2.32-2.55 with 512 KiB against
/// 2.21-2.54 with 1 MiB (512 KiB ahead in all 6) (session 20).
const SHARED_INSTALL_WINDOW_PAGES: usize = 256;

/// The window a batch that is not pipelined installs at a time, for a round of `streams`
/// streams: the sender's hash window, or [`SHARED_INSTALL_WINDOW_PAGES`] for one of several
/// streams with a CPU each.
pub(crate) fn install_window_pages(streams: usize) -> usize {
    if streams > 1 && streams <= crate::sched::usable_cpus() {
        SHARED_INSTALL_WINDOW_PAGES
    } else {
        HASH_WINDOW_PAGES
    }
}

/// Slots in flight: the reader can run this far ahead of the installers.
const SLOTS: usize = 4;

/// The most threads that install a lone stream's pipelined batch. Where installing is slow, it
/// is the first touch of memory this VM's host took back (free page reporting), which faults
/// on the host as well; two threads populated 8 GiB of such memory 1.6-2.0 x faster than one
/// (C, 2 CPUs), and the reader and the sender leave most of a second CPU idle. A/B, warm
/// migration into an unwired destination on 2 CPUs: 8 GiB random, 0.62 / 0.77 GiB/s with one
/// installer against 1.28 / 1.39 with two, and less CPU (1.92 / 1.61 CPU-s per GiB against 1.29 /
/// 1.21); 1 GiB, 6 alternated sets of 5 (medians of each set), 1.52-2.28 GiB/s against
/// 1.88-2.40 (two ahead in 5 of 6); with a neighbour spinning on CPU 1, 4 sets, 1.04-1.26 against
/// 1.01-1.41 (ahead in 3 of 4) (session 21). More than two is unmeasured.
const PIPELINE_INSTALLERS: usize = 2;

/// The threads that install a pipelined batch: [`PIPELINE_INSTALLERS`], or one per CPU where
/// there are fewer.
pub(crate) fn pipeline_installers() -> usize {
    #[cfg(test)]
    if let Some(n) = FORCE_INSTALLERS.with(|n| n.get()) {
        return n;
    }
    crate::sched::usable_cpus().min(PIPELINE_INSTALLERS)
}

/// Staging pages a pipeline needs: one per page of every slot.
const PIPELINE_STAGING_PAGES: usize = SLOT_PAGES * SLOTS;

#[cfg(test)]
thread_local! {
    /// Batches this thread received through the pipeline (tests check it was taken).
    pub(super) static PIPELINED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// The widest receive window this thread read page data in, straight into guest memory or
    /// through its staging buffer (tests check the window a stream used).
    pub(super) static WIDEST_READ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// The installers this thread's pipelines start, when a test chooses (both counts are tested
    /// whatever the machine's CPUs).
    pub(super) static FORCE_INSTALLERS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

thread_local! {
    /// Where received pages land before they are put in place, allocated once per receiving
    /// thread: one install window, a receive window (a tracker's reader, `read_data_pages`), or a
    /// pipeline's slots once the thread first runs one.
    static STAGING: std::cell::RefCell<Box<[AlignedPage]>> = std::cell::RefCell::new(Box::new([]));
}

/// `staging`, grown to at least `pages` zeroed pages (the allocator clears them: 512 KiB for a
/// thread that installs a window at a time, 1 or 2 MiB for a tracker's reader, 4 MiB once for one
/// that pipelines).
fn staging_at_least(staging: &mut Box<[AlignedPage]>, pages: usize) {
    if staging.len() < pages {
        *staging = zeroed_pages(pages);
    }
}

/// The DATA pages of a batch as runs of `(first page in the segment, pages)`, in order, cut into
/// windows of at most `window_pages` pages.
fn data_windows(ranges: &[PageRange], offsets: &[usize], window_pages: usize) -> Vec<Vec<(usize, usize)>> {
    let mut windows = Vec::new();
    let mut window: Vec<(usize, usize)> = Vec::new();
    let mut room = window_pages;
    for (mut first, mut left) in runs_of(RangeKind::Data, ranges, offsets) {
        while left > 0 {
            let n = left.min(room);
            window.push((first, n));
            (first, left, room) = (first + n, left - n, room - n);
            if room == 0 {
                windows.push(std::mem::take(&mut window));
                room = window_pages;
            }
        }
    }
    if !window.is_empty() {
        windows.push(window);
    }
    windows
}

/// With a meter alone, page data moves this much at a time: each window is one progress step
/// (1 MiB: a few steps a second on a slow link, one more syscall per MiB on a fast one).
const METER_WINDOW_PAGES: usize = 256;

/// How a batch's DATA pages move: `hash_pages` at a time with a tracker (the sender's hash
/// window, or the receiver's larger one), a meter window at a time with a meter alone, all in one
/// call otherwise.
fn windows(
    ranges: &[PageRange],
    offsets: &[usize],
    (tracker, meter): (Option<&DigestTracker>, Option<&Meter>),
    hash_pages: usize,
) -> Vec<Vec<(usize, usize)>> {
    match (tracker, meter) {
        (Some(_), _) => data_windows(ranges, offsets, hash_pages),
        (None, Some(_)) => data_windows(ranges, offsets, METER_WINDOW_PAGES),
        (None, None) => vec![runs_of(RangeKind::Data, ranges, offsets)],
    }
}

/// A batch's ranges of one `kind` as runs of `(first page in the segment, pages)`.
pub(super) fn runs_of(kind: RangeKind, ranges: &[PageRange], offsets: &[usize]) -> Vec<(usize, usize)> {
    ranges.iter().zip(offsets).filter(|(r, _)| r.kind == kind).map(|(r, &off)| (off / PAGE_SIZE, r.pages as usize)).collect()
}

fn run_iovec(seg: &Segment, (first, pages): (usize, usize)) -> libc::iovec {
    libc::iovec { iov_base: seg.as_ptr().wrapping_add(first * PAGE_SIZE) as *mut libc::c_void, iov_len: pages * PAGE_SIZE }
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
pub fn send_batch<'a>(link: impl Into<Link<'a>>, mem: &GuestMemory, ranges: &[PageRange]) -> Result<BatchStats, PageError> {
    send_batch_tracked(link, mem, ranges, None)
}

/// [`send_batch`], and with a `tracker` every page of the batch hashed into it as it goes: each
/// window of DATA pages is hashed right after it is written (over TLS, right before; see
/// `send_batch_metered`, and [`DigestTracker::hash_now`]), ZERO pages are stored as zero.
pub fn send_batch_tracked<'a>(
    link: impl Into<Link<'a>>,
    mem: &GuestMemory,
    ranges: &[PageRange],
    tracker: Option<&DigestTracker>,
) -> Result<BatchStats, PageError> {
    send_batch_metered(link, mem, ranges, tracker, None)
}

/// [`send_batch_tracked`], advancing `meter` as the batch goes: its ZERO pages and header once
/// they are written, then each window of DATA pages (a window at a time, as with a tracker).
pub fn send_batch_metered<'a>(
    link: impl Into<Link<'a>>,
    mem: &GuestMemory,
    ranges: &[PageRange],
    tracker: Option<&DigestTracker>,
    meter: Option<&Meter>,
) -> Result<BatchStats, PageError> {
    let link = link.into();
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
    if let Some(tracker) = tracker {
        tracker.hash_now(seg, &runs_of(RangeKind::Zero, ranges, &offsets), true)?;
    }
    let windows = windows(ranges, &offsets, (tracker, meter), HASH_WINDOW_PAGES);
    let mut header_iov = Some(encoded_iov);
    let mut header_pages = stats.zero_pages; // counted with the header: they go in its table
    let last = windows.len();
    // Where the window is first read from memory, see below.
    let hash_first = matches!(link, Link::Tls(_));
    for (i, window) in windows.into_iter().enumerate() {
        if let (Some(tracker), true) = (tracker, hash_first) {
            tracker.hash_now(seg, &window, false)?;
        }
        let header_bytes = header_iov.map_or(0, |iov| iov.iov_len as u64);
        let mut iovs: Vec<libc::iovec> = header_iov.take().into_iter().chain(window.iter().map(|&run| run_iovec(seg, run))).collect();
        // SAFETY: the first iovec may be `encoded`, alive until the end of this function; the others
        // lie inside the segment's mapping (validate_ranges checked each range), which `mem` keeps
        // mapped. The kernel only reads through them; `*mut` is the iovec type's.
        // The next window follows at once: a TLS link may keep what does not fill its write.
        unsafe { write_all_more(link, &mut iovs, "sending a page batch", i + 1 < last)? };
        // On a plain socket, hashed once the socket has copied the window, from the cache that
        // copy left it in. The first read of a window from memory is the one that waits on it,
        // and the kernel's copy costs the same whether it is first or second: hashed before, the
        // window's hash took three times the CPU on the sender, which is the slower side. Over
        // TLS the first read would be the copy into a record, in user space, which pays for it
        // as the hash does without asking for the next pages ahead: there the hash comes first
        // (two alternated sets, 3-4 % faster). A page the guest writes between the copy and the
        // hash is dirty again, so a later round sends and hashes it; the last round runs with
        // the guest stopped. A/B in docs/performance.md (session 32).
        if let (Some(tracker), false) = (tracker, hash_first) {
            tracker.hash_now(seg, &window, false)?;
        }
        let data_pages: u64 = window.iter().map(|&(_, pages)| pages as u64).sum();
        progress::advance(meter, data_pages + std::mem::take(&mut header_pages), data_pages, header_bytes + data_pages * PAGE_SIZE as u64);
    }
    if let Some(iov) = header_iov {
        // SAFETY: as above: `encoded` is alive until the end of this function.
        unsafe { write_all(link, &mut [iov], "sending a page batch")? };
        progress::advance(meter, header_pages, 0, iov.iov_len as u64);
    }
    Ok(stats)
}

/// Make `len` bytes at `off` of `seg` read as zero (see the module doc for why each way).
fn zero_pages(seg: &Segment, off: usize, len: usize) -> Result<(), PageError> {
    seg.before_write(off, len);
    if seg.wired() {
        // SAFETY: validate_ranges checked the range lies inside the mapping; nothing holds a Rust
        // reference into it.
        unsafe { std::ptr::write_bytes(seg.as_ptr().add(off), 0, len) };
        return Ok(());
    }
    // The guest is not running while a batch is received: its pages may be given back (private
    // anonymous memory: MADV_DONTNEED; a memfd: MADV_REMOVE, since its pages outlive a mapping).
    let dropped = seg.drop_pages(off, len);
    if !dropped {
        // SAFETY: as for the wired case.
        unsafe { std::ptr::write_bytes(seg.as_ptr().add(off), 0, len) };
    }
    Ok(())
}

/// Read one batch from `fd` into guest memory. The header, table, checksum, every range and the
/// payload length are checked before any guest byte is written; then DATA pages are read straight
/// into the mapping (a compressed batch's block is read, checked and decompressed whole into a
/// scratch buffer first, see `decompress`) and ZERO pages cleared, none of them marked dirty.
pub fn recv_batch<'a>(link: impl Into<Link<'a>>, mem: &GuestMemory) -> Result<BatchStats, PageError> {
    recv_batch_tracked(link, mem, None)
}

/// [`recv_batch`], and then every page the batch wrote marked stale in `tracker`, so the commit
/// digest it keeps stays current (marked after the writes, as the tracker requires).
pub fn recv_batch_tracked<'a>(
    link: impl Into<Link<'a>>,
    mem: &GuestMemory,
    tracker: Option<&DigestTracker>,
) -> Result<BatchStats, PageError> {
    recv_batch_admitted(
        link.into(),
        mem,
        tracker,
        None,
        Install { from: INSTALL_MIN, alone: true, window: install_window_pages(1), installers: pipeline_installers(), there: false },
        |_| Ok(()),
    )
}

/// Page data that pays for advising huge pages (two `madvise` calls, which split and merge the
/// mapping, and the populating thread `read_data_pages` starts at the same size).
const HUGE_MIN: u64 = POPULATE_AHEAD_MIN;

/// A batch's DATA runs, merged where they touch, advised for transparent huge pages while the
/// batch is read straight into them ([`Segment::receives_huge`]); advised back to small pages
/// when dropped, whether or not the batch arrived whole.
struct HugeReceive<'a> {
    seg: &'a Segment,
    runs: Vec<(usize, usize)>,
    whole: usize,
}

impl<'a> HugeReceive<'a> {
    /// Advise the batch's DATA runs when the segment takes huge pages (and the last population
    /// ahead did not find small pages cheaper: [`Segment::huge_cheaper`]), the batch carries at
    /// least [`HUGE_MIN`] bytes of page data, and at least half of it fills whole 2 MiB regions
    /// that are still fresh (only those are advised: a region is never put on a huge page unless
    /// all of it arrives here, so a sparse guest does not grow, and a region with a ZERO page is
    /// never advised; a run with any page already there, a later round's, is not either).
    /// None otherwise, and while pages are being installed into the segment with userfaultfd (a
    /// registered range sends every first touch to its handler, huge pages or not).
    fn advise(seg: &'a Segment, ranges: &[PageRange], offsets: &[usize], data_bytes: u64) -> Option<Self> {
        if data_bytes < HUGE_MIN || !seg.receives_huge() || !seg.huge_cheaper() || seg.install_open().is_some() {
            return None;
        }
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (r, &off) in ranges.iter().zip(offsets).filter(|(r, _)| r.kind == RangeKind::Data) {
            let len = r.bytes() as usize;
            match runs.last_mut() {
                Some((first, run)) if *first + *run == off => *run += len,
                _ => runs.push((off, len)),
            }
        }
        let mut whole = 0;
        runs.retain(|&(off, len)| {
            let bytes = seg.huge_bytes(off, len);
            whole += bytes;
            bytes > 0
        });
        if (whole as u64) * 2 < data_bytes {
            return None;
        }
        for &(off, len) in &runs {
            seg.advise_huge(off, len);
        }
        Some(HugeReceive { seg, runs, whole })
    }

    /// The pages of the whole regions advised.
    fn pages(&self) -> u64 {
        (self.whole / PAGE_SIZE) as u64
    }
}

impl Drop for HugeReceive<'_> {
    fn drop(&mut self) {
        for &(off, len) in &self.runs {
            self.seg.advise_small(off, len);
        }
    }
}

/// When a received batch installs its pages without zeroing (`memory::install`), and how.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Install {
    /// A batch with at least this many bytes of page data (and some) begins installing; a smaller
    /// one joins an installation already open.
    pub from: u64,
    /// The round's only receiver. Then a big batch installs in a pipeline, on a second thread
    /// while this one reads (`PIPELINE_MIN`), since a lone receiver leaves a CPU idle otherwise,
    /// and pages into memory already there are read `RECV_WINDOW_PAGES` at a time. One of a
    /// round's several streams installs on its own thread (the streams already keep the CPUs
    /// busy, and a thread more per stream only costs) and reads `SHARED_RECV_WINDOW_PAGES` at a
    /// time.
    pub alone: bool,
    /// Pages a batch that is not pipelined installs at a time ([`install_window_pages`]).
    pub window: usize,
    /// The threads a pipelined batch installs on ([`pipeline_installers`]). Like the window it
    /// is chosen once a share, not per batch: the CPU count is read from cgroup files.
    pub installers: usize,
    /// Set per batch: every DATA page of it is there already (a later round's, or memory
    /// populated while the destination waited), so it is read straight into place: installing
    /// would only be refused page by page, and populating ahead has nothing to do.
    pub there: bool,
}

/// [`recv_batch_tracked`], with `admit` asked about the batch (its ranges counted, `compressed_batches`
/// 1 when its payload is LZ4) once the header, table and ranges are checked and before any byte of
/// its payload is read or any guest byte written: a batch the receiver will not take (compression it
/// did not agree to, more pages than the round may carry) is refused there, unread. `meter`, when
/// given, advances with each window of DATA pages as it arrives and with the rest once it is in.
/// `install` says when its pages are installed without zeroing, and how ([`Install`]).
pub(crate) fn recv_batch_admitted(
    link: Link<'_>,
    mem: &GuestMemory,
    tracker: Option<&DigestTracker>,
    meter: Option<&Meter>,
    install: Install,
    admit: impl FnOnce(&BatchStats) -> Result<(), PageError>,
) -> Result<BatchStats, PageError> {
    let mut header_bytes = [0u8; BATCH_HEADER_SIZE];
    read_exact(link, &mut header_bytes, "batch header")?;
    let header = decode_header(&header_bytes)?;
    // Bounded by MAX_RANGES in decode_header: at most 1 MiB whatever the stream says.
    let mut table = vec![0u8; header.range_count as usize * RANGE_ENTRY_SIZE];
    read_exact(link, &mut table, "range table")?;
    let ranges = decode_table(&header_bytes, &header, &table)?;
    let seg = mem.segments().iter().find(|s| s.gpa() == header.segment_gpa).ok_or(PageError::NoSuchSegment { gpa: header.segment_gpa })?;
    if seg.is_closed() {
        return Err(MemoryError::Closed { segment: seg.name().to_string() }.into());
    }
    let offsets = validate_ranges(seg, &header, &ranges)?;
    let mut stats = BatchStats::of(&ranges);
    let lz4 = header.flags & BATCH_FLAG_LZ4 != 0;
    if lz4 {
        stats.compressed_batches = 1;
    }
    admit(&stats)?;
    ready_ranges(seg, &ranges, &offsets)?;
    let begin = stats.data_bytes > 0 && stats.data_bytes >= install.from;
    let huge = if lz4 { None } else { HugeReceive::advise(seg, &ranges, &offsets, stats.data_bytes) };
    // Asked only of a batch that would otherwise install or populate ahead (one mincore).
    let helped = begin || seg.install_open().is_some() || (!seg.wired() && stats.data_bytes >= POPULATE_AHEAD_MIN);
    let there = !lz4 && huge.is_none() && helped && seg.all_resident(&runs_of(RangeKind::Data, &ranges, &offsets));
    let plan = Install { there, ..install };
    let install = if huge.is_some() || there {
        None
    } else if begin {
        seg.begin_install()
    } else {
        seg.current_install()
    };
    let installer = install.as_ref().filter(|g| g.can_install());
    let mut windowed = 0; // DATA pages the meter has seen arrive window by window
    if lz4 {
        recv_lz4_payload(link, seg, &header, &ranges, &offsets, installer)?;
        stats.saved_bytes = stats.data_bytes - header.payload_len;
        stats.wire_bytes -= stats.saved_bytes;
        if let Some(tracker) = tracker {
            // A block is at most a few MiB, just copied into place: still in the cache.
            tracker.hash_now(seg, &runs_of(RangeKind::Data, &ranges, &offsets), false)?;
        }
    } else {
        windowed = read_data_pages(link, seg, &header, &ranges, &offsets, tracker, meter, installer, plan)?;
    }
    drop(install);
    if let Some(huge) = huge {
        seg.count_huge_received(huge.pages());
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
    let rest = stats.data_pages - windowed;
    progress::advance(meter, stats.zero_pages + rest, rest, stats.wire_bytes - windowed * PAGE_SIZE as u64);
    Ok(stats)
}

/// Read a plain batch's DATA pages into the segment: straight into place without a `tracker`;
/// with one, a window at a time into a staging buffer, each window then put in place and hashed
/// page by page ([`DigestTracker::place`]). A socket's reads wait for whole windows
/// ([`WholeReads`]). With a `meter`, a window at a time too, each counted in it as it arrives;
/// returns the DATA pages counted so. With an `installer`, each window is read into a staging
/// buffer (in the cache) and installed from there, `plan.window` pages at a time; when
/// `plan.alone` (the round's only receiver) and the batch is big enough, in a pipeline
/// ([`install_pipelined`]) on `plan.installers` threads. `plan.alone` also picks the window of
/// reads into memory already there ([`Install::alone`]).
#[allow(clippy::too_many_arguments)]
fn read_data_pages(
    link: Link<'_>,
    seg: &Segment,
    header: &BatchHeader,
    ranges: &[PageRange],
    offsets: &[usize],
    tracker: Option<&DigestTracker>,
    meter: Option<&Meter>,
    installer: Option<&InstallGuard<'_>>,
    plan: Install,
) -> Result<u64, PageError> {
    if let Some(installer) = installer {
        return STAGING.with(|cell| {
            let mut staging = cell.borrow_mut();
            // Not over TLS: there the receiving thread opens every record and the sender seals
            // them, which keeps both CPUs busy already (a third busy thread cost a sixth, A/B).
            if plan.alone && matches!(link, Link::Fd(_)) && header.payload_len >= PIPELINE_MIN {
                let slots = data_windows(ranges, offsets, SLOT_PAGES);
                staging_at_least(&mut staging, PIPELINE_STAGING_PAGES);
                let watch = (tracker, meter);
                if let Some(done) =
                    install_pipelined(link, seg, slots, header.payload_len, watch, (installer, plan.installers), &mut staging)
                {
                    return done;
                }
            }
            staging_at_least(&mut staging, plan.window);
            let windows = data_windows(ranges, offsets, plan.window);
            install_data_pages(link, seg, windows, header.payload_len, (tracker, meter), installer, &mut staging)
        });
    }
    // Read and hashed a receive window at a time (fewer, larger reads than the sender's writes).
    let window = if plan.alone { RECV_WINDOW_PAGES } else { SHARED_RECV_WINDOW_PAGES };
    let windows = windows(ranges, offsets, (tracker, meter), window);
    let mut counted = 0u64;
    // First touch of fresh anonymous memory costs as much as receiving into it on some hosts: a
    // second thread populates the DATA ranges ahead of the reader (MADV_POPULATE_WRITE, advisory,
    // failures ignored), so the socket reads mostly land in pages that already exist. Only for
    // a batch big enough to pay for the thread, and never for wired memory. (Where the kernel
    // lets pages be installed, that is done instead: `install_data_pages`.)
    let populate = !seg.wired() && !plan.there && header.payload_len >= POPULATE_AHEAD_MIN;
    // With a tracker, each window is read into a staging buffer that stays in the cache and put in
    // place from there, each page hashed on the way (`DigestTracker::place`): the socket's copy
    // into guest memory would read every line before writing it, and the hash would read the
    // window back. A/B in docs/performance.md (session 26).
    let mut staging = tracker.map(|_| {
        let mut staging = STAGING.take();
        staging_at_least(&mut staging, window);
        staging
    });
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
        let mut whole = WholeReads::new(link.fd(), window * PAGE_SIZE);
        let mut got = 0;
        for window in &windows {
            for &(first, pages) in window {
                seg.before_write(first * PAGE_SIZE, pages * PAGE_SIZE);
            }
            let want: u64 = window.iter().map(|&(_, pages)| (pages * PAGE_SIZE) as u64).sum();
            #[cfg(test)]
            WIDEST_READ.with(|w| w.set(w.get().max(want)));
            let n = match (tracker, staging.as_deref_mut()) {
                (Some(tracker), Some(staging)) => {
                    assert!(want as usize <= staging.len() * PAGE_SIZE, "a window fits the staging buffer");
                    let mut iov = [libc::iovec { iov_base: staging.as_mut_ptr() as *mut libc::c_void, iov_len: want as usize }];
                    // SAFETY: the iovec is the first `want` bytes of `staging` (a window is at most
                    // its length), borrowed mutably for the call.
                    let n = unsafe { read_all_with(link, &mut iov, "receiving page data", whole.as_mut())? };
                    if n == want {
                        tracker.place(seg, window, &page_bytes(staging)[..want as usize])?;
                    }
                    n
                }
                _ => {
                    let mut iovs: Vec<libc::iovec> = window.iter().map(|&run| run_iovec(seg, run)).collect();
                    // SAFETY: every iovec lies inside the segment's mapping (validate_ranges), which
                    // the caller's `mem` keeps mapped; guest memory is never behind a Rust
                    // reference, so the kernel writing it aliases nothing.
                    unsafe { read_all_with(link, &mut iovs, "receiving page data", whole.as_mut())? }
                }
            };
            got += n;
            if n < want {
                break;
            }
            if meter.is_some() {
                let pages = want / PAGE_SIZE as u64;
                progress::advance(meter, pages, pages, want);
                counted += pages;
            }
        }
        Ok(got)
    });
    if let Some(staging) = staging {
        STAGING.set(staging);
    }
    let got = got?;
    if got < header.payload_len {
        return Err(PageError::Truncated { what: "page data", expected: header.payload_len, got });
    }
    Ok(counted)
}

/// [`read_data_pages`] through `installer`: each of `windows` (of the `payload_len` bytes of
/// DATA) is read into `staging`, then put in place with [`InstallGuard::install`] (no zeroing
/// of fresh pages), then hashed into the tracker and counted in the meter of `watch`.
fn install_data_pages(
    link: Link<'_>,
    seg: &Segment,
    windows: Vec<Vec<(usize, usize)>>,
    payload_len: u64,
    watch: (Option<&DigestTracker>, Option<&Meter>),
    installer: &InstallGuard<'_>,
    staging: &mut [AlignedPage],
) -> Result<u64, PageError> {
    let most = windows.iter().map(|w| w.iter().map(|&(_, pages)| pages * PAGE_SIZE).sum()).max().unwrap_or(1);
    let mut whole = WholeReads::new(link.fd(), most);
    let (mut got, mut counted) = (0u64, 0u64);
    for window in windows {
        let want: usize = window.iter().map(|&(_, pages)| pages * PAGE_SIZE).sum();
        assert!(want <= staging.len() * PAGE_SIZE, "a window fits the staging buffer");
        let mut iov = [libc::iovec { iov_base: staging.as_mut_ptr() as *mut libc::c_void, iov_len: want }];
        // SAFETY: the iovec describes the first `want` bytes of `staging` (a window is at most its
        // length, asserted above), borrowed mutably for the call.
        let n = unsafe { read_all_with(link, &mut iov, "receiving page data", whole.as_mut())? };
        got += n;
        if n < want as u64 {
            break;
        }
        counted += install_window(seg, &window, &page_bytes(staging)[..want], watch, installer)?;
    }
    if got < payload_len {
        return Err(PageError::Truncated { what: "page data", expected: payload_len, got });
    }
    Ok(counted)
}

/// Put one window's `bytes` (its runs' pages, in order) in place through `installer`, then hash
/// them into the tracker and count them in the meter of `watch`; returns the pages counted.
fn install_window(
    seg: &Segment,
    window: &[(usize, usize)],
    bytes: &[u8],
    watch: (Option<&DigestTracker>, Option<&Meter>),
    installer: &InstallGuard<'_>,
) -> Result<u64, PageError> {
    let (tracker, meter) = watch;
    let mut at = 0;
    for &(first, pages) in window {
        let len = pages * PAGE_SIZE;
        seg.before_write(first * PAGE_SIZE, len);
        // SAFETY: validate_ranges keeps every run inside the segment's mapping, which the
        // installer has registered whole; guest memory is never behind a Rust reference.
        unsafe { installer.install(first * PAGE_SIZE, &bytes[at..at + len]) };
        at += len;
    }
    if let Some(tracker) = tracker {
        tracker.hash_now(seg, window, false)?;
    }
    if meter.is_none() {
        return Ok(0);
    }
    let pages = bytes.len() as u64 / PAGE_SIZE as u64;
    progress::advance(meter, pages, pages, bytes.len() as u64);
    Ok(pages)
}

/// The staging slots, handed between the reading and the installing thread (each slot is only
/// ever touched by the one thread that holds its index; the channels order the hand-overs).
#[derive(Clone, Copy)]
struct SlotBase(*mut AlignedPage);

// SAFETY: the pointer is only dereferenced for a slot whose index the thread holds (see above).
unsafe impl Send for SlotBase {}

impl SlotBase {
    /// Where `slot` begins.
    fn at(self, slot: usize) -> *mut u8 {
        self.0.wrapping_add(slot * SLOT_PAGES) as *mut u8
    }
}

/// Sets its flag when dropped by a panicking thread.
struct StopOnPanic<'a>(&'a AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

/// [`install_data_pages`] as a pipeline: this thread reads each of `slots` (windows of at most
/// `SLOT_PAGES` pages) into a free staging slot and hands it over; `installers` scoped threads
/// (at least one) take the full slots in turn, each installing, hashing and counting one
/// (`install_window`) and handing it back, so windows may be put in place out of order (each
/// window's pages are its own, and the tracker and meter take them in any order). Whichever side
/// fails first stops the others. What the stream did (an error, or its end inside the page data)
/// is returned before an install error: it is what the peer or the link did, and a reader
/// stopped by the installers reports nothing of its own. None, before anything is read, when no
/// installing thread can be started (the caller then receives the batch on this thread alone).
fn install_pipelined(
    link: Link<'_>,
    seg: &Segment,
    slots: Vec<Vec<(usize, usize)>>,
    payload_len: u64,
    watch: (Option<&DigestTracker>, Option<&Meter>),
    (installer, installers): (&InstallGuard<'_>, usize),
    staging: &mut [AlignedPage],
) -> Option<Result<u64, PageError>> {
    debug_assert!(staging.len() >= PIPELINE_STAGING_PAGES);
    let base = SlotBase(staging.as_mut_ptr());
    let slot_ptr = move |slot: usize| base.at(slot);
    let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(usize, Vec<(usize, usize)>, usize)>(SLOTS);
    let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<usize>(SLOTS);
    for slot in 0..SLOTS {
        free_tx.send(slot).expect("the receiver is alive");
    }
    // The installers share the full slots: whichever is free takes the next one.
    let full_rx = Mutex::new(full_rx);
    let failed = AtomicBool::new(false);
    let (full_rx, failed) = (&full_rx, &failed);
    std::thread::scope(|scope| {
        let mut workers = Vec::new();
        for _ in 0..installers.max(1) {
            let free_tx = free_tx.clone();
            let work = move || -> Result<u64, PageError> {
                // A panicking installer stops the others too (join then re-raises its panic).
                let _stop_on_panic = StopOnPanic(failed);
                let mut counted = 0;
                loop {
                    // Held while waiting: the other installers wait for the lock instead.
                    let next = full_rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok((slot, window, len)) = next else { break }; // the reader is done
                    if failed.load(Ordering::Relaxed) {
                        break; // another installer failed: stop without touching the slot
                    }
                    // SAFETY: the reader filled `len` bytes of this slot and handed it over to this
                    // thread alone (a channel delivers each message once); neither it nor another
                    // installer touches the slot again until it is handed back below.
                    let bytes = unsafe { std::slice::from_raw_parts(slot_ptr(slot) as *const u8, len) };
                    match install_window(seg, &window, bytes, watch, installer) {
                        Ok(pages) => counted += pages,
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            return Err(e);
                        }
                    }
                    if free_tx.send(slot).is_err() {
                        break; // the reader stopped
                    }
                }
                Ok(counted)
            };
            match std::thread::Builder::new().name("vmm-recv-install".into()).spawn_scoped(scope, work) {
                Ok(worker) => workers.push(worker),
                Err(_) => break, // fewer installers, or none (below)
            }
        }
        // The reader learns that every installer stopped when their senders of free slots are gone.
        drop(free_tx);
        if workers.is_empty() {
            return None;
        }
        #[cfg(test)]
        PIPELINED.with(|n| n.set(n.get() + 1));
        let mut whole = WholeReads::new(link.fd(), SLOT_PAGES * PAGE_SIZE);
        let mut got = 0u64;
        let mut stream = Ok(()); // what the stream did: an error, or its end inside the page data
        for window in slots {
            let Ok(slot) = free_rx.recv() else { break }; // every installer stopped (one failed)
            let want: usize = window.iter().map(|&(_, pages)| pages * PAGE_SIZE).sum();
            let mut iov = [libc::iovec { iov_base: slot_ptr(slot) as *mut libc::c_void, iov_len: want }];
            // SAFETY: the iovec describes the first `want` bytes of a slot this thread holds (a
            // window is at most SLOT_PAGES pages); no installer touches it until handed over.
            let n = match unsafe { read_all_with(link, &mut iov, "receiving page data", whole.as_mut()) } {
                Ok(n) => n,
                Err(e) => {
                    stream = Err(e);
                    break;
                }
            };
            got += n;
            if n < want as u64 {
                stream = Err(PageError::Truncated { what: "page data", expected: payload_len, got });
                break;
            }
            if full_tx.send((slot, window, want)).is_err() {
                break; // cannot happen: the receiver outlives this scope
            }
        }
        drop(full_tx);
        let mut installed = Ok(0u64);
        for worker in workers {
            let done = match worker.join() {
                Ok(done) => done,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            // The first error found stands; otherwise the pages each installer counted add up.
            installed = installed.and_then(|sum| done.map(|pages| sum + pages));
        }
        let done = stream.and(installed).and_then(|counted| {
            if got < payload_len {
                return Err(PageError::Truncated { what: "page data", expected: payload_len, got });
            }
            Ok(counted)
        });
        Some(done)
    })
}
