//! The commit digest, kept current as pages change so that taking it costs what changed, not
//! what the guest has.
//!
//! The digest is a function of memory alone, defined so it can be kept up to date piece by piece:
//!
//! - each 4 KiB page has a *page hash*: 0 if the page is all zero, otherwise its xxh3-64 (with
//!   1 standing in for the one-in-2^64 non-zero page whose hash is 0);
//! - each 64-page *chunk* (one word of the tracker's bitmap; the last chunk of a segment may be
//!   short) has a *chunk hash*: 0 if all its page hashes are 0, otherwise the xxh3-128 of its page
//!   hashes as little-endian u64s;
//! - the digest is the xxh3-128 over, for each segment in order, `b"C" gpa pages` (u64 LE)
//!   followed by the segment's chunk hashes as little-endian u128s.
//!
//! [`commit_digest`] computes it from scratch. A [`DigestTracker`] keeps every page hash and
//! chunk hash it has computed and a *stale* bit per page; pages start stale. Whoever changes a
//! page either marks it stale again ([`DigestTracker::mark_pages`]) or hashes it on the spot
//! ([`DigestTracker::hash_now`], while it is in the cache); [`DigestTracker::refresh`] rehashes
//! only the stale pages, and [`DigestTracker::digest`] refreshes and combines. The result equals
//! [`commit_digest`] of the memory as it is, as long as every page changed since the tracker was
//! made has been marked or hashed since: on a migration's destination the receiver hashes what it
//! writes; on the source the sender hashes what it sends, which is every page in the first round
//! and then every page the dirty harvest says the guest wrote.
//!
//! Refreshing may run while pages are being changed and marked (a running guest on the source,
//! the receiver on the destination). A writer marks after it writes; `refresh` takes the stale
//! bits (swap to zero) before it learns anything about the pages: their bytes, and whether they
//! were ever touched. So a mark either comes before the take, and what refresh reads includes the
//! write, or after it, and the page is stale again for the next refresh.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::digest::xxh3::{xxh3_128, xxh3_64_page, xxh3_64_page_streamed, Xxh3};

use super::zero::is_zero_raw;
use super::{each_page_ahead, PageError};
use crate::memory::{stream_fence, stream_page, GuestMemory, MemoryError, Segment, PAGE_SIZE};

/// Pages per chunk: one word of the stale bitmap.
pub const DIGEST_CHUNK_PAGES: usize = 64;

/// Above this many stale chunks in a segment, refresh asks mincore which pages were ever touched
/// instead of reading every stale page (reading an untouched page maps the zero page).
const RESIDENCY_THRESHOLD_CHUNKS: usize = 1024;

/// The page hash the digest uses (see the module doc).
///
/// # Safety
/// `ptr` must point at a readable, 4 KiB-aligned page.
unsafe fn page_hash(ptr: *const u8) -> u64 {
    // SAFETY: the caller's contract.
    if unsafe { is_zero_raw(ptr, PAGE_SIZE) } {
        return 0;
    }
    // SAFETY: as above (a running guest may change the bytes meanwhile, which only makes this
    // hash a snapshot of some moment, see the module doc).
    nonzero(unsafe { xxh3_64_page(ptr) })
}

/// A non-zero page's hash: its xxh3-64, with 1 standing in for 0 (see the module doc).
#[inline]
fn nonzero(hash: u64) -> u64 {
    hash.max(1)
}

fn check_run(seg: &Segment, first: usize, count: usize) -> Result<(), PageError> {
    if first.checked_add(count).is_none_or(|end| end > seg.pages()) {
        return Err(PageError::PagesOutsideSegment {
            first: first as u64,
            count: count as u64,
            segment: seg.name().to_string(),
            pages: seg.pages() as u64,
        });
    }
    Ok(())
}

/// Call `f(word, mask)` for each stale-bitmap word that pages `first..first+count` fall in, with
/// the bits of those pages.
fn for_each_word(first: usize, count: usize, mut f: impl FnMut(usize, u64)) {
    let mut page = first;
    let end = first + count;
    while page < end {
        let bit = page % 64;
        let n = (64 - bit).min(end - page);
        f(page / 64, if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit });
        page += n;
    }
}

fn chunk_hash(page_hashes: &[u64]) -> u128 {
    if page_hashes.iter().all(|&h| h == 0) {
        return 0;
    }
    let mut bytes = [0u8; DIGEST_CHUNK_PAGES * 8];
    for (out, h) in bytes.chunks_exact_mut(8).zip(page_hashes) {
        out.copy_from_slice(&h.to_le_bytes());
    }
    xxh3_128(&bytes[..page_hashes.len() * 8])
}

/// The hashes of one segment, changed only under this lock (by a refresh or `hash_now`).
struct Hashes {
    pages: Vec<u64>,
    chunks: Vec<u128>,
}

struct SegmentTrack {
    seg: Arc<Segment>,
    /// One bit per page: set when the page may differ from its stored hash.
    stale: Vec<AtomicU64>,
    hashes: Mutex<Hashes>,
}

/// Page and chunk hashes of guest memory, refreshed where pages were marked stale.
pub struct DigestTracker {
    segments: Vec<SegmentTrack>,
    /// Serialises refreshes (and digests) with each other; marking never waits for it.
    refresh_lock: Mutex<()>,
}

/// What one refresh did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefreshStats {
    /// Stale pages rehashed (read, or known untouched).
    pub pages: u64,
    /// Chunks whose hash was recomputed.
    pub chunks: u64,
}

impl DigestTracker {
    /// A tracker over `mem` with every page stale: the first refresh hashes everything.
    pub fn new(mem: &GuestMemory) -> Result<DigestTracker, PageError> {
        let mut segments = Vec::with_capacity(mem.segments().len());
        for seg in mem.segments() {
            if seg.is_closed() {
                return Err(MemoryError::Closed { segment: seg.name().to_string() }.into());
            }
            let pages = seg.pages();
            let words = pages.div_ceil(DIGEST_CHUNK_PAGES);
            let stale = (0..words)
                .map(|w| {
                    let n = (pages - w * DIGEST_CHUNK_PAGES).min(DIGEST_CHUNK_PAGES);
                    AtomicU64::new(if n == 64 { u64::MAX } else { (1u64 << n) - 1 })
                })
                .collect();
            // Zeroed allocations: for a large sparse guest the kernel hands these out untouched,
            // and pages that stay zero are never written (see refresh).
            let hashes = Hashes { pages: vec![0u64; pages], chunks: vec![0u128; words] };
            segments.push(SegmentTrack { seg: seg.clone(), stale, hashes: Mutex::new(hashes) });
        }
        Ok(DigestTracker { segments, refresh_lock: Mutex::new(()) })
    }

    fn track(&self, seg: &Segment) -> Result<&SegmentTrack, PageError> {
        self.segments.iter().find(|t| t.seg.gpa() == seg.gpa()).ok_or(PageError::NoSuchSegment { gpa: seg.gpa() })
    }

    /// Mark pages `first..first+count` of `seg` stale.
    pub fn mark_pages(&self, seg: &Segment, first: usize, count: usize) -> Result<(), PageError> {
        let track = self.track(seg)?;
        check_run(seg, first, count)?;
        for_each_word(first, count, |word, mask| {
            track.stale[word].fetch_or(mask, Ordering::Release);
        });
        Ok(())
    }

    /// Hash the pages of `runs` (`(first page, count)` in `seg`) now, on the calling thread, and
    /// store their hashes: for whoever just wrote them (the receiver, right after a read, while
    /// they are still in the CPU's cache) or sends them (the sender of a plain batch right after
    /// the socket copied them, from the cache that copy left them in; over TLS, or a compressed
    /// batch, right before the records or the compressor read them). Pages of `Zero` runs
    /// (`zero`) are known to read as zero and are stored as hash 0 without being read.
    ///
    /// Same discipline as [`refresh`](Self::refresh): the pages' stale bits are taken before
    /// their bytes are read, so a write marked after the take leaves them stale for the next
    /// refresh. Hashes are stored under the lock a refresh holds while it reads pages, so when
    /// both hash a page the later store is of bytes at least as new, unless the page is written
    /// again in between, which only a running guest does, and then the dirty bit that write set
    /// sends (and hashes) the page again in a later round; the final round runs with the guest
    /// stopped.
    pub fn hash_now(&self, seg: &Segment, runs: &[(usize, usize)], zero: bool) -> Result<(), PageError> {
        self.take_and_store(seg, runs, zero, |run, count, found| {
            // SAFETY: `take_and_store` passes a run inside the segment's mapping, which `seg` keeps
            // alive; each page is 4 KiB-aligned.
            each_page_ahead(run, count, |i| found.push(unsafe { page_hash(run.add(i * PAGE_SIZE)) }));
        })
    }

    /// Put `bytes`, the pages of `runs` (`(first page, count)` in `seg`) in order, in place, and
    /// store their hashes, each taken from `bytes` right before the page is written. For a
    /// receiver that reads page data into a staging buffer that stays in the cache: each page is
    /// read from there once, into the hash and on into guest memory with stores that bypass the
    /// cache ([`crate::memory::stream_page`]), instead of being written into guest memory by the
    /// socket's copy (which first reads every line it writes) and read back for the hash.
    ///
    /// The pages' stale bits are taken before they are written, as [`hash_now`](Self::hash_now)
    /// takes them before it reads: a mark by another writer after the take leaves the page stale.
    /// `bytes` must hold exactly the runs' pages and be page-aligned (as a staging buffer is); the
    /// runs must not be written by anyone else meanwhile (a receiver's are not), or what is stored
    /// is the hash of what this call wrote.
    pub fn place(&self, seg: &Segment, runs: &[(usize, usize)], bytes: &[u8]) -> Result<(), PageError> {
        let pages: usize = runs.iter().map(|r| r.1).sum();
        assert!(
            bytes.len() == pages * PAGE_SIZE && (bytes.as_ptr() as usize).is_multiple_of(PAGE_SIZE),
            "place: bytes must be the runs' pages, page-aligned"
        );
        let mut from = bytes.as_ptr();
        self.take_and_store(seg, runs, false, |run, count, found| {
            for i in 0..count {
                // SAFETY: `from` walks `bytes` a page at a time, one page per page of the runs,
                // whose total is checked above; the page it reads is aligned (so is `bytes`) and
                // readable; `run` is as in `hash_now`, and writable (a receiver's segment).
                unsafe {
                    let to = run.add(i * PAGE_SIZE) as *mut u8;
                    // One pass over a non-zero page for its hash and its copy (the zero check
                    // stops at the first non-zero byte).
                    found.push(if is_zero_raw(from, PAGE_SIZE) {
                        stream_page(to, from);
                        0
                    } else {
                        nonzero(xxh3_64_page_streamed(to, from))
                    });
                    from = from.add(PAGE_SIZE);
                }
            }
            // Before the hashes are stored (and the lock a refresh reads pages under is taken),
            // so whoever reads these pages next sees what was written.
            stream_fence();
        })
    }

    /// Check `runs` against `seg`, take their stale bits and, unless they are `zero` (known to
    /// read as zero, stored as hash 0 without a look), have `hash_run(start, count, found)` push
    /// the hash of each page of each run onto `found`, in order; then store the hashes and rehash
    /// the chunks they are in, under the lock (the common part of `hash_now` and `place`).
    fn take_and_store(
        &self,
        seg: &Segment,
        runs: &[(usize, usize)],
        zero: bool,
        mut hash_run: impl FnMut(*const u8, usize, &mut Vec<u64>),
    ) -> Result<(), PageError> {
        let track = self.track(seg)?;
        let mut found = Vec::with_capacity(if zero { 0 } else { runs.iter().map(|r| r.1).sum() });
        for &(first, count) in runs {
            check_run(seg, first, count)?;
            if !zero {
                seg.ensure(first * PAGE_SIZE, count * PAGE_SIZE)?;
            }
            for_each_word(first, count, |word, mask| {
                // Only words with a bit to take are written (a big zero run's are mostly clear).
                if track.stale[word].load(Ordering::Relaxed) & mask != 0 {
                    track.stale[word].fetch_and(!mask, Ordering::Acquire);
                }
            });
            if !zero {
                hash_run(seg.as_ptr().wrapping_add(first * PAGE_SIZE), count, &mut found);
            }
        }
        let mut hashes = track.hashes.lock().unwrap_or_else(|e| e.into_inner());
        let Hashes { pages, chunks } = &mut *hashes;
        let mut found = found.into_iter();
        // Store the page hashes, one chunk's share of a run at a time, noting the chunks to
        // rehash once each (runs are ascending, as batches hold them).
        let mut rehash: Vec<usize> = Vec::new();
        for &(first, count) in runs {
            let (mut page, end) = (first, first + count);
            while page < end {
                let chunk = page / DIGEST_CHUNK_PAGES;
                let chunk_end = ((chunk + 1) * DIGEST_CHUNK_PAGES).min(pages.len());
                let stop = chunk_end.min(end);
                if zero && page == chunk * DIGEST_CHUNK_PAGES && stop == chunk_end {
                    // A whole chunk of zeros. A chunk hash of 0 means its page hashes are all 0
                    // already, so a sparse guest's untouched chunks cost a look at one entry.
                    if chunks[chunk] != 0 {
                        pages[page..stop].fill(0);
                        chunks[chunk] = 0;
                    }
                } else {
                    for slot in &mut pages[page..stop] {
                        let h = found.next().unwrap_or(0);
                        // As in refresh: a zero hash over a zero hash is not written (nor allocated).
                        if *slot != h {
                            *slot = h;
                        }
                    }
                    if rehash.last() != Some(&chunk) {
                        rehash.push(chunk);
                    }
                }
                page = stop;
            }
        }
        for chunk in rehash {
            let end = ((chunk + 1) * DIGEST_CHUNK_PAGES).min(pages.len());
            let c = chunk_hash(&pages[chunk * DIGEST_CHUNK_PAGES..end]);
            if chunks[chunk] != c {
                chunks[chunk] = c;
            }
        }
        Ok(())
    }

    /// Mark every page stale (the next refresh rehashes all memory).
    pub fn mark_all(&self) {
        for track in &self.segments {
            let pages = track.seg.pages();
            for (w, word) in track.stale.iter().enumerate() {
                let n = (pages - w * DIGEST_CHUNK_PAGES).min(DIGEST_CHUNK_PAGES);
                word.fetch_or(if n == 64 { u64::MAX } else { (1u64 << n) - 1 }, Ordering::Release);
            }
        }
    }

    /// Stale pages right now.
    pub fn stale_pages(&self) -> u64 {
        self.segments.iter().flat_map(|t| t.stale.iter()).map(|w| w.load(Ordering::Relaxed).count_ones() as u64).sum()
    }

    /// Rehash the stale pages and the chunks they are in.
    pub fn refresh(&self) -> Result<RefreshStats, PageError> {
        let _serial = self.refresh_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut stats = RefreshStats::default();
        for track in &self.segments {
            refresh_segment(track, &mut stats, RESIDENCY_THRESHOLD_CHUNKS, default_threads())?;
        }
        Ok(stats)
    }

    /// Refresh, then combine: the commit digest of memory as it is now (see the module doc).
    pub fn digest(&self) -> Result<u128, PageError> {
        self.digest_with(RESIDENCY_THRESHOLD_CHUNKS, default_threads())
    }

    fn digest_with(&self, residency_threshold: usize, threads: usize) -> Result<u128, PageError> {
        let _serial = self.refresh_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut stats = RefreshStats::default();
        let mut hasher = Xxh3::new();
        for track in &self.segments {
            refresh_segment(track, &mut stats, residency_threshold, threads)?;
            let hashes = track.hashes.lock().unwrap_or_else(|e| e.into_inner());
            hasher.update(b"C");
            hasher.update(&track.seg.gpa().0.to_le_bytes());
            hasher.update(&(track.seg.pages() as u64).to_le_bytes());
            // SAFETY: u128 has no padding; viewing the slice's memory as bytes reads it only.
            let bytes = unsafe { std::slice::from_raw_parts(hashes.chunks.as_ptr() as *const u8, hashes.chunks.len() * 16) };
            if cfg!(target_endian = "little") {
                hasher.update(bytes);
            } else {
                for c in &hashes.chunks {
                    hasher.update(&c.to_le_bytes());
                }
            }
        }
        Ok(hasher.digest128())
    }
}

/// Rehash `track`'s stale pages; above `residency_threshold` stale chunks, mincore first; from
/// PARALLEL_MIN_CHUNKS on, on `big_threads` threads.
fn refresh_segment(
    track: &SegmentTrack,
    stats: &mut RefreshStats,
    residency_threshold: usize,
    big_threads: usize,
) -> Result<(), PageError> {
    let seg = &track.seg;
    if seg.is_closed() {
        return Err(MemoryError::Closed { segment: seg.name().to_string() }.into());
    }
    seg.ensure_all()?;
    // Take the stale bits before anything about the pages is read: a mark after this is for the
    // next refresh, and a write marked before it is visible to what follows, mincore included
    // (residency asked before the take could call a page untouched that was written since).
    let mut stale_chunks = 0;
    let taken: Vec<u64> = track
        .stale
        .iter()
        .map(|w| {
            if w.load(Ordering::Relaxed) == 0 {
                return 0;
            }
            stale_chunks += 1;
            w.swap(0, Ordering::Acquire)
        })
        .collect();
    if stale_chunks == 0 {
        return Ok(());
    }
    let mut hashes = track.hashes.lock().unwrap_or_else(|e| e.into_inner());
    // For many stale chunks, one mincore pass finds the pages never touched (zero, unread). Asked
    // under the lock: a writer that hashed a page (`hash_now`, `place`) after the take above and
    // stored its hash before this lock would otherwise see it overwritten with the 0 of a page
    // the residency, asked before that write, called untouched.
    let resident = if stale_chunks > residency_threshold { Some(super::resident_bitmap(seg)?.0) } else { None };
    let Hashes { pages, chunks } = &mut *hashes;
    // Many stale chunks (a first refresh, a warm migration's) are split among a few threads, each
    // with its own words and hashes; they only read guest memory.
    let threads = if stale_chunks >= PARALLEL_MIN_CHUNKS { big_threads.max(1) } else { 1 };
    let words_per = taken.len().div_ceil(threads);
    let parts: Vec<RefreshStats> = std::thread::scope(|scope| {
        let handles: Vec<_> = taken
            .chunks(words_per)
            .zip(pages.chunks_mut(words_per * DIGEST_CHUNK_PAGES))
            .zip(chunks.chunks_mut(words_per))
            .enumerate()
            .map(|(i, ((stale, pages), chunks))| {
                let first_word = i * words_per;
                let resident = resident.as_deref().map(|r| &r[first_word..first_word + stale.len()]);
                let part = Part { seg, first_page: first_word * DIGEST_CHUNK_PAGES, stale, pages, chunks, resident };
                if threads == 1 {
                    Ok(part.refresh())
                } else {
                    Err(scope.spawn(move || part.refresh()))
                }
            })
            .collect();
        handles.into_iter().map(|h| h.unwrap_or_else(|j| j.join().expect("digest refresh thread panicked"))).collect()
    });
    for p in parts {
        stats.pages += p.pages;
        stats.chunks += p.chunks;
    }
    Ok(())
}

/// At least this many stale chunks (128 MiB) before a refresh uses more than one thread.
const PARALLEL_MIN_CHUNKS: usize = 512;
const MAX_THREADS: usize = 4;

/// Threads for a big refresh on a machine with `cpus` CPUs: half of them, up to MAX_THREADS.
/// A refresh runs beside a transfer (the pages it hashes are still arriving or leaving), and
/// taking every core slowed that transfer more than the hashing gained: on 2 CPUs running both
/// ends of a warm 1 GiB migration, one hashing thread finished about 5 % sooner than two.
fn refresh_threads(cpus: usize) -> usize {
    (cpus / 2).clamp(1, MAX_THREADS)
}

fn default_threads() -> usize {
    refresh_threads(crate::sched::usable_cpus())
}

/// A run of whole chunks of one segment, refreshed by one thread.
struct Part<'a> {
    seg: &'a Segment,
    first_page: usize,
    /// The stale bits taken for these chunks.
    stale: &'a [u64],
    pages: &'a mut [u64],
    chunks: &'a mut [u128],
    resident: Option<&'a [u64]>,
}

impl Part<'_> {
    fn refresh(self) -> RefreshStats {
        let mut stats = RefreshStats::default();
        for (w, &bits) in self.stale.iter().enumerate() {
            if bits == 0 {
                continue;
            }
            let mut bits = bits;
            let base = w * DIGEST_CHUNK_PAGES;
            let end = (base + DIGEST_CHUNK_PAGES).min(self.pages.len());
            stats.pages += bits.count_ones() as u64;
            stats.chunks += 1;
            let maybe_data = self.resident.map_or(u64::MAX, |r| r[w]);
            if maybe_data == 0 {
                // Nothing in the chunk was ever touched: all zero. A chunk hash of 0 means every
                // page hash is 0 already, so a sparse guest's hashes are never even read.
                if self.chunks[w] != 0 {
                    self.pages[base..end].fill(0);
                    self.chunks[w] = 0;
                }
                continue;
            }
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let h = if maybe_data >> bit & 1 == 0 {
                    0
                } else {
                    // SAFETY: the page lies in the segment (stale bits are only set for its pages),
                    // so inside the mapping `seg` keeps alive.
                    unsafe { page_hash(self.seg.as_ptr().add((self.first_page + base + bit) * PAGE_SIZE)) }
                };
                // Untouched pages keep hash 0: don't write (and so allocate) them.
                if self.pages[base + bit] != h {
                    self.pages[base + bit] = h;
                }
            }
            let c = chunk_hash(&self.pages[base..end]);
            if self.chunks[w] != c {
                self.chunks[w] = c;
            }
        }
        stats
    }
}

/// The commit digest of `mem` computed from scratch (the same value a current tracker gives).
pub fn commit_digest(mem: &GuestMemory) -> Result<u128, PageError> {
    DigestTracker::new(mem)?.digest()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::xxh3::xxh3_64;
    use crate::memory::{page_bytes_mut, zeroed_pages, GuestAddress, MemoryOptions, HIGHMEM_BASE};

    fn two_segment_guest() -> GuestMemory {
        let mut opts = MemoryOptions::new(8 << 20);
        opts.lowmem_limit = 4 << 20;
        GuestMemory::new(&opts).unwrap()
    }

    #[test]
    fn a_fresh_tracker_agrees_with_the_definition() {
        let mem = two_segment_guest();
        mem.write(GuestAddress(4096 * 3), b"hello").unwrap();
        mem.write(GuestAddress(HIGHMEM_BASE + 4096 * 70), &[7u8; 4096]).unwrap();
        // Spelled out by hand from the module doc.
        let mut hasher = Xxh3::new();
        for seg in mem.segments() {
            hasher.update(b"C");
            hasher.update(&seg.gpa().0.to_le_bytes());
            hasher.update(&(seg.pages() as u64).to_le_bytes());
            for chunk in 0..seg.pages().div_ceil(64) {
                let mut page_hashes = Vec::new();
                for page in chunk * 64..((chunk + 1) * 64).min(seg.pages()) {
                    let mut buf = vec![0u8; 4096];
                    mem.read(GuestAddress(seg.gpa().0 + (page * 4096) as u64), &mut buf).unwrap();
                    page_hashes.push(if buf.iter().all(|&b| b == 0) { 0 } else { xxh3_64(&buf).max(1) });
                }
                let c = if page_hashes.iter().all(|&h| h == 0) {
                    0u128
                } else {
                    xxh3_128(&page_hashes.iter().flat_map(|h| h.to_le_bytes()).collect::<Vec<u8>>())
                };
                hasher.update(&c.to_le_bytes());
            }
        }
        assert_eq!(commit_digest(&mem).unwrap(), hasher.digest128());
    }

    #[test]
    fn marked_changes_are_seen_and_unmarked_ones_are_not() {
        let mem = two_segment_guest();
        mem.write(GuestAddress(0), &[1u8; 100]).unwrap();
        let tracker = DigestTracker::new(&mem).unwrap();
        let first = tracker.digest().unwrap();
        assert_eq!(first, commit_digest(&mem).unwrap());
        assert_eq!(tracker.stale_pages(), 0);
        assert_eq!(tracker.refresh().unwrap(), RefreshStats::default(), "nothing stale, nothing done");

        // An unmarked write is invisible to the tracker: that is the contract, marks are the input.
        mem.write(GuestAddress(4096 * 5), &[9u8; 10]).unwrap();
        assert_eq!(tracker.digest().unwrap(), first);
        assert_ne!(commit_digest(&mem).unwrap(), first);

        let seg = mem.segments()[0].clone();
        tracker.mark_pages(&seg, 5, 1).unwrap();
        assert_eq!(tracker.stale_pages(), 1);
        let after = tracker.digest().unwrap();
        assert_eq!(after, commit_digest(&mem).unwrap());
        assert_ne!(after, first);

        // Writing zeros back makes the page zero again, equal to the start.
        mem.write(GuestAddress(4096 * 5), &[0u8; 10]).unwrap();
        tracker.mark_pages(&seg, 4, 3).unwrap();
        let stats = tracker.refresh().unwrap();
        assert_eq!(stats, RefreshStats { pages: 3, chunks: 1 });
        assert_eq!(tracker.digest().unwrap(), first);
    }

    #[test]
    fn marks_are_checked_and_every_page_of_a_short_chunk_is_covered() {
        let mem = GuestMemory::new(&MemoryOptions::new(70 * 4096)).unwrap();
        let seg = mem.segments()[0].clone();
        let tracker = DigestTracker::new(&mem).unwrap();
        assert_eq!(tracker.stale_pages(), 70);
        tracker.digest().unwrap();
        assert!(matches!(tracker.mark_pages(&seg, 69, 2), Err(PageError::PagesOutsideSegment { .. })));
        assert!(matches!(tracker.mark_pages(&seg, usize::MAX, 2), Err(PageError::PagesOutsideSegment { .. })));
        mem.write(GuestAddress(69 * 4096), &[5]).unwrap();
        tracker.mark_pages(&seg, 60, 10).unwrap();
        assert_eq!(tracker.stale_pages(), 10);
        assert_eq!(tracker.digest().unwrap(), commit_digest(&mem).unwrap());
        tracker.mark_all();
        assert_eq!(tracker.stale_pages(), 70);
    }

    #[test]
    fn one_byte_anywhere_changes_the_digest_and_position_matters() {
        let mem = two_segment_guest();
        let base = commit_digest(&mem).unwrap();
        mem.write(GuestAddress(HIGHMEM_BASE + (4 << 20) - 1), &[1]).unwrap();
        let high = commit_digest(&mem).unwrap();
        assert_ne!(high, base);
        let other = two_segment_guest();
        other.write(GuestAddress(HIGHMEM_BASE + (4 << 20) - 4097), &[1]).unwrap();
        assert_ne!(commit_digest(&other).unwrap(), high);
        // A page of zeros written is the same memory as a page never touched.
        let zeros = two_segment_guest();
        zeros.write(GuestAddress(8192), &[0u8; 4096]).unwrap();
        assert_eq!(commit_digest(&zeros).unwrap(), base);
    }

    /// A writer fills the never-touched pages of a 32 MiB guest `step` at a time and then
    /// `record`s each group (marks or hashes it), while refreshes run on another thread, asking
    /// mincore (threshold 0) so the residency they see races the writes. Returns the tracker and
    /// the memory for the caller to check.
    fn race_writes_with_refreshes(
        step: usize,
        record: impl Fn(&DigestTracker, &Segment, usize, usize) + Sync,
    ) -> (DigestTracker, GuestMemory) {
        let mem = GuestMemory::new(&MemoryOptions::new(32 << 20)).unwrap();
        let tracker = DigestTracker::new(&mem).unwrap();
        let seg = mem.segments()[0].clone();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                for first in (0..seg.pages()).step_by(step) {
                    for page in first..first + step {
                        mem.write(GuestAddress((page * 4096) as u64), &(page as u64 + 1).to_le_bytes()).unwrap();
                    }
                    record(&tracker, &seg, first, step);
                }
                done.store(true, Ordering::Release);
            });
            let mut refreshes = 0;
            while !done.load(Ordering::Acquire) && refreshes < 100_000 {
                tracker.digest_with(0, 1).unwrap();
                refreshes += 1;
            }
        });
        (tracker, mem)
    }

    #[test]
    fn refreshing_while_pages_are_written_and_marked_misses_nothing() {
        // Each page marked after it is written, as the dirty harvest does.
        let (tracker, mem) = race_writes_with_refreshes(1, |t, seg, first, count| t.mark_pages(seg, first, count).unwrap());
        assert_eq!(tracker.digest_with(0, 1).unwrap(), commit_digest(&mem).unwrap());
    }

    #[test]
    fn hashing_pages_as_they_move_agrees_with_the_definition() {
        let mem = GuestMemory::new(&MemoryOptions::new(256 * 4096)).unwrap();
        let seg = mem.segments()[0].clone();
        let tracker = DigestTracker::new(&mem).unwrap();
        tracker.digest().unwrap();
        for page in [3u64, 4, 10, 70, 71, 72, 200] {
            mem.write(GuestAddress(page * 4096 + 9), &(page + 1).to_le_bytes()).unwrap();
        }
        // Several runs in one chunk and one across a chunk boundary, in one call.
        tracker.hash_now(&seg, &[(3, 2), (10, 1), (62, 11)], false).unwrap();
        assert_ne!(tracker.digest().unwrap(), commit_digest(&mem).unwrap(), "page 200 was neither hashed nor marked");
        tracker.hash_now(&seg, &[(200, 1)], false).unwrap();
        assert_eq!(tracker.digest().unwrap(), commit_digest(&mem).unwrap());
        // Known-zero runs are stored as zero without being read.
        mem.write(GuestAddress(71 * 4096), &[0u8; 4096]).unwrap();
        tracker.hash_now(&seg, &[(71, 1)], true).unwrap();
        assert_eq!(tracker.digest().unwrap(), commit_digest(&mem).unwrap());
        // A zero run over part of a chunk, a whole chunk with data in it, and part of the next.
        for page in 60..200u64 {
            mem.write(GuestAddress(page * 4096), &[0u8; 4096]).unwrap();
        }
        tracker.hash_now(&seg, &[(60, 140)], true).unwrap();
        assert_eq!(tracker.stale_pages(), 0);
        assert_eq!(tracker.digest().unwrap(), commit_digest(&mem).unwrap());
        tracker.hash_now(&seg, &[(0, 256)], true).unwrap(); // pages 3, 4 and 10 still hold data
        assert_ne!(tracker.digest().unwrap(), commit_digest(&mem).unwrap(), "the caller vouches for zero runs");
        tracker.hash_now(&seg, &[(0, 256)], false).unwrap();
        assert_eq!(tracker.digest().unwrap(), commit_digest(&mem).unwrap());
        // A stale mark is taken by the hash: nothing is left for the next refresh.
        tracker.mark_pages(&seg, 100, 5).unwrap();
        mem.write(GuestAddress(102 * 4096), &[1]).unwrap();
        tracker.hash_now(&seg, &[(100, 5)], false).unwrap();
        assert_eq!(tracker.stale_pages(), 0);
        assert_eq!(tracker.digest().unwrap(), commit_digest(&mem).unwrap());
        assert!(matches!(tracker.hash_now(&seg, &[(250, 7)], false), Err(PageError::PagesOutsideSegment { .. })));
    }

    #[test]
    fn hashing_as_pages_arrive_while_refreshes_run_misses_nothing() {
        // As on a destination: the receiver writes pages and hashes them right away, while
        // refreshes of the pages still stale from the start run on another thread.
        let (tracker, mem) = race_writes_with_refreshes(16, |t, seg, first, count| t.hash_now(seg, &[(first, count)], false).unwrap());
        assert_eq!(tracker.stale_pages(), 0);
        assert_eq!(tracker.digest().unwrap(), commit_digest(&mem).unwrap());
    }

    #[test]
    fn placing_pages_writes_them_and_stores_their_hashes() {
        let mem = GuestMemory::new(&MemoryOptions::new(256 * 4096)).unwrap();
        let seg = mem.segments()[0].clone();
        let tracker = DigestTracker::new(&mem).unwrap();
        mem.write(GuestAddress(11 * 4096), &[7u8; 4096]).unwrap(); // overwritten with zeros below
        tracker.digest().unwrap();
        // Several runs in one chunk and one across a chunk boundary, as a receive window holds
        // them; page 11 (the fourth page of the bytes) comes as all zeros.
        let runs = [(3usize, 2usize), (10, 2), (62, 11)];
        let mut buf = zeroed_pages(15);
        let bytes = page_bytes_mut(&mut buf);
        for (i, page) in bytes.chunks_mut(4096).enumerate() {
            if i != 3 {
                page.iter_mut().enumerate().for_each(|(j, b)| *b = (i * 31 + j * 7 + 1) as u8);
            }
        }
        tracker.mark_pages(&seg, 3, 2).unwrap(); // taken by the place
        tracker.mark_pages(&seg, 100, 5).unwrap(); // left alone
        tracker.place(&seg, &runs, bytes).unwrap();
        let mut at = 0;
        for &(first, count) in &runs {
            let mut back = vec![0u8; count * 4096];
            mem.read(GuestAddress((first * 4096) as u64), &mut back).unwrap();
            assert_eq!(back, bytes[at..at + count * 4096], "run at page {first}");
            at += count * 4096;
        }
        assert_eq!(tracker.stale_pages(), 5, "the placed pages' stale bits were taken, the others' kept");
        assert_eq!(tracker.digest().unwrap(), commit_digest(&mem).unwrap());
        assert!(matches!(tracker.place(&seg, &[(250, 7)], &bytes[..7 * 4096]), Err(PageError::PagesOutsideSegment { .. })));
    }

    #[test]
    #[should_panic(expected = "the runs' pages, page-aligned")]
    fn placing_bytes_that_are_not_the_runs_pages_is_refused() {
        let mem = GuestMemory::new(&MemoryOptions::new(16 * 4096)).unwrap();
        let tracker = DigestTracker::new(&mem).unwrap();
        let mut buf = zeroed_pages(2);
        tracker.place(&mem.segments()[0], &[(0, 3)], page_bytes_mut(&mut buf)).unwrap();
    }

    #[test]
    fn placing_pages_while_refreshes_run_misses_nothing() {
        // As on a destination that reads into a staging buffer: each group is put in place from
        // there, other bytes than the helper wrote, while refreshes of the still stale pages run.
        let staged = |page: usize| (page as u64 * 7 + 3).to_le_bytes();
        let (tracker, mem) = race_writes_with_refreshes(16, |t, seg, first, count| {
            let mut buf = zeroed_pages(count);
            for (i, page) in buf.iter_mut().enumerate() {
                page.0[8..16].copy_from_slice(&staged(first + i));
            }
            t.place(seg, &[(first, count)], page_bytes_mut(&mut buf)).unwrap();
        });
        for page in [0usize, 17, 4095, 8191] {
            let mut back = [0u8; 16];
            mem.read(GuestAddress((page * 4096) as u64), &mut back).unwrap();
            assert_eq!(back[..8], [0u8; 8], "page {page}: the placed page replaced the helper's bytes");
            assert_eq!(back[8..], staged(page), "page {page}");
        }
        assert_eq!(tracker.stale_pages(), 0);
        assert_eq!(tracker.digest().unwrap(), commit_digest(&mem).unwrap());
    }

    #[test]
    fn a_big_refresh_leaves_half_the_cpus_to_the_transfer() {
        assert_eq!([1, 2, 3, 4, 8, 64].map(refresh_threads), [1, 1, 1, 2, 4, 4]);
    }

    #[test]
    fn reading_pages_and_asking_mincore_agree_on_one_thread_or_several() {
        // 768 chunks: past PARALLEL_MIN_CHUNKS, so the first refresh splits among threads.
        let mem = GuestMemory::new(&MemoryOptions::new(192 << 20)).unwrap();
        for page in [0u64, 1, 4097, 10_000, 16_383, 49_151] {
            mem.write(GuestAddress(page * 4096 + 17), &page.to_le_bytes()).unwrap();
        }
        let read = DigestTracker::new(&mem).unwrap().digest_with(usize::MAX, 1).unwrap();
        let asked = DigestTracker::new(&mem).unwrap().digest_with(0, 1).unwrap();
        let split = DigestTracker::new(&mem).unwrap().digest_with(0, 3).unwrap();
        assert_eq!(read, asked);
        assert_eq!(split, asked, "three threads, each its own share of the chunks");
        assert_eq!(commit_digest(&mem).unwrap(), read);
        // A single stale chunk is refreshed on the calling thread and must agree too.
        let tracker = DigestTracker::new(&mem).unwrap();
        tracker.digest().unwrap();
        mem.write(GuestAddress(49_151 * 4096), &[0xee; 64]).unwrap();
        tracker.mark_pages(&mem.segments()[0], 49_151, 1).unwrap();
        assert_eq!(tracker.refresh().unwrap(), RefreshStats { pages: 1, chunks: 1 });
        assert_eq!(tracker.digest().unwrap(), commit_digest(&mem).unwrap());
    }
}
