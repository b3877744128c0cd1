//! Copy-before-write for a live snapshot: memory as it was at one moment, while the guest runs on.
//!
//! [`LiveCapture::arm`] (the guest paused) marks every page of every segment *protected*: its
//! bytes as of now have not been saved yet. From then on every write path of a segment
//! ([`Segment::before_write`](super::Segment::before_write): API writes, device DMA, vCPU stores,
//! page drops, receive paths) asks first; the first write to a protected page copies the page's
//! old bytes into the capture's side store and clears the bit, then writes. The snapshot writer
//! walks pages in order with [`LiveCapture::take`]: a page still protected is copied from live
//! memory (under the same lock, so no writer is between its check and its write), one that is
//! not comes out of the side store. So each page reaches the writer exactly once, with the bytes
//! it had when the capture was armed.
//!
//! The fast path when nothing is armed is one relaxed load per write (`Segment::before_write`).
//! While armed, a write to a page already saved costs one more atomic load.
//!
//! The side store is bounded ([`LiveCapture::arm`]'s `limit_pages`): a writer that would exceed it
//! waits until the snapshot writer has taken pages out (the guest is throttled to the disk's
//! speed rather than doubling its memory). The snapshot writer never waits on a guest writer, so
//! this cannot deadlock. [`LiveCapture::finish`] and dropping the capture (a failed or cancelled
//! snapshot) lift the protection and wake every waiting writer: the guest keeps all its memory.
//!
//! This module knows no files: `snapshot` decides what to do with the pages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::address::PAGE_SIZE;
use super::error::MemoryError;
use super::segment::Segment;

/// A segment's protection bits: allocated on its first live snapshot and kept (one bit per page:
/// 32 KiB per GiB), so arming costs a memset, not an allocation that grows with the guest.
pub(super) struct Protection {
    bits: Box<[AtomicU64]>,
    /// The armed capture's shared state and this segment's index in it, while one is armed.
    copies: Mutex<Option<(Arc<Copies>, usize)>>,
}

impl Protection {
    pub(super) fn new(pages: usize) -> Protection {
        Protection { bits: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(), copies: Mutex::new(None) }
    }

    #[inline]
    fn is_protected(&self, page: usize) -> bool {
        self.bits[page / 64].load(Ordering::Acquire) >> (page % 64) & 1 != 0
    }

    fn clear(&self, page: usize) {
        self.bits[page / 64].fetch_and(!(1 << (page % 64)), Ordering::Release);
    }

    /// Save the old bytes of every protected page of `first..end` of `seg` before a write to them.
    #[cold]
    #[inline(never)]
    pub(super) fn copy_before_write(&self, seg: &Segment, first: usize, end: usize) {
        for page in first..end {
            if self.is_protected(page) {
                let armed = self.copies.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some((copies, index)) = armed {
                    copies.save(seg, self, index, page);
                }
            }
        }
    }
}

/// The side store of one capture, shared by all its segments (so the limit is the guest's).
struct Copies {
    state: Mutex<Held>,
    taken: Condvar,
}

#[derive(Default)]
struct Held {
    /// (segment index, page) -> the page's bytes as armed.
    pages: HashMap<(usize, usize), Box<[u8]>>,
    limit_pages: usize,
    stats: LiveStats,
}

/// What copy-before-write did during one capture.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LiveStats {
    /// Pages a guest write copied out before writing (first writes to pages not yet saved).
    pub copied_pages: u64,
    /// The most copied-out pages held at once.
    pub peak_held_pages: u64,
    /// How many times a writer waited for room in the side store, and for how long in all.
    pub throttled_writes: u64,
    pub throttled_seconds: f64,
}

impl Copies {
    fn lock(&self) -> MutexGuard<'_, Held> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, seg: &Segment, prot: &Protection, index: usize, page: usize) {
        let mut held = self.lock();
        let mut waited: Option<Instant> = None;
        // Re-checked under the lock: the snapshot writer or another guest writer may have saved it.
        while prot.is_protected(page) {
            if held.pages.len() < held.limit_pages {
                let mut copy = vec![0u8; PAGE_SIZE].into_boxed_slice();
                // SAFETY: `page` is a page of the segment (callers pass pages of a checked range),
                // made accessible before this write was allowed; no write to it can start while
                // its bit is set and we hold the lock.
                unsafe { seg.read_unchecked(page * PAGE_SIZE, &mut copy) };
                held.pages.insert((index, page), copy);
                prot.clear(page);
                held.stats.copied_pages += 1;
                held.stats.peak_held_pages = held.stats.peak_held_pages.max(held.pages.len() as u64);
                break;
            }
            if waited.is_none() {
                waited = Some(Instant::now());
                held.stats.throttled_writes += 1;
            }
            // A timeout only so a lost wake-up cannot stall a writer forever; the loop re-checks.
            held = self.taken.wait_timeout(held, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
        }
        if let Some(t) = waited {
            held.stats.throttled_seconds += t.elapsed().as_secs_f64();
        }
    }
}

/// Where a page handed out by [`LiveCapture::take`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakenPage {
    /// Copied from live memory: no write had reached it since the capture was armed.
    Live,
    /// Never touched when the capture was armed (mincore said not resident), so zero; not read.
    Untouched,
    /// From the side store: a guest write copied it out first.
    Saved,
}

/// A live snapshot's hold on a guest's memory: armed with the guest paused, taken from page by
/// page while it runs, lifted by [`LiveCapture::finish`] or when dropped.
pub struct LiveCapture {
    segments: Vec<Arc<Segment>>,
    copies: Arc<Copies>,
    lifted: AtomicBool,
}

impl LiveCapture {
    /// Protect every page of `segments` (the guest must be paused: no write may be in flight)
    /// with a side store of at most `limit_pages` copied-out pages. Refused if a capture is
    /// already armed on any of them.
    pub fn arm(segments: &[Arc<Segment>], limit_pages: usize) -> Result<LiveCapture, MemoryError> {
        if limit_pages == 0 {
            return Err(MemoryError::BadSize {
                what: "the live snapshot's copy limit".into(),
                size: 0,
                why: "must be at least one page (4 KiB)".into(),
            });
        }
        let copies = Arc::new(Copies { state: Mutex::new(Held { limit_pages, ..Held::default() }), taken: Condvar::new() });
        let mut armed: Vec<Arc<Segment>> = Vec::new();
        for (index, seg) in segments.iter().enumerate() {
            let prot = seg.protection();
            let mut slot = prot.copies.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_some() {
                drop(slot);
                for done in &armed {
                    lift(done);
                }
                return Err(MemoryError::Unsupported {
                    what: format!("a live snapshot of segment '{}'", seg.name()),
                    why: "another live snapshot of this guest is still being written".into(),
                });
            }
            let pages = seg.pages();
            for (w, word) in prot.bits.iter().enumerate() {
                let valid = (pages - w * 64).min(64);
                word.store(if valid == 64 { u64::MAX } else { (1u64 << valid) - 1 }, Ordering::Relaxed);
            }
            *slot = Some((copies.clone(), index));
            seg.set_live_armed(true);
            armed.push(seg.clone());
        }
        Ok(LiveCapture { segments: armed, copies, lifted: AtomicBool::new(false) })
    }

    pub fn segments(&self) -> &[Arc<Segment>] {
        &self.segments
    }

    /// Hand out pages `first..first+count` of segment `index` as they were when armed, into
    /// `out` (`count` pages long), and say where each came from in `kinds`. `resident` says, per
    /// page, whether it may hold data (mincore, asked by the caller just before). Each page can
    /// be taken once; taking it again, or after the capture was lifted, is an error.
    pub fn take(&self, index: usize, first: usize, resident: &[bool], out: &mut [u8], kinds: &mut [TakenPage]) -> Result<(), MemoryError> {
        let seg = &self.segments[index];
        let prot = seg.protection();
        let count = resident.len();
        debug_assert!(out.len() == count * PAGE_SIZE && kinds.len() == count && first + count <= seg.pages());
        let mut held = self.copies.lock();
        if self.lifted.load(Ordering::Acquire) {
            return Err(self.gone(seg, first));
        }
        for i in 0..count {
            let page = first + i;
            let dst = &mut out[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            if prot.is_protected(page) {
                if resident[i] {
                    // SAFETY: the page is inside the segment (checked by the caller's range) and
                    // accessible; it is protected and we hold the lock, so no write is under way.
                    unsafe { seg.read_unchecked(page * PAGE_SIZE, dst) };
                    kinds[i] = TakenPage::Live;
                } else {
                    kinds[i] = TakenPage::Untouched;
                }
                prot.clear(page);
            } else if let Some(saved) = held.pages.remove(&(index, page)) {
                dst.copy_from_slice(&saved);
                kinds[i] = TakenPage::Saved;
            } else {
                return Err(self.gone(seg, page));
            }
        }
        drop(held);
        self.copies.taken.notify_all();
        Ok(())
    }

    fn gone(&self, seg: &Segment, page: usize) -> MemoryError {
        MemoryError::Unsupported {
            what: format!("page {page} of segment '{}' in a live snapshot", seg.name()),
            why: "was already handed out, or the snapshot was cancelled".into(),
        }
    }

    /// What copy-before-write did so far.
    pub fn stats(&self) -> LiveStats {
        self.copies.lock().stats.clone()
    }

    /// Copied-out pages held now.
    pub fn held_pages(&self) -> usize {
        self.copies.lock().pages.len()
    }

    /// Lift the protection (done, failed or cancelled): writes go straight through again, waiting
    /// writers are woken, the side store is freed. Idempotent.
    pub fn finish(&self) {
        if self.lifted.swap(true, Ordering::AcqRel) {
            return;
        }
        for seg in &self.segments {
            lift(seg);
        }
        self.copies.lock().pages = HashMap::new();
        self.copies.taken.notify_all();
    }
}

fn lift(seg: &Segment) {
    let prot = seg.protection();
    seg.set_live_armed(false);
    for word in prot.bits.iter() {
        word.store(0, Ordering::Release);
    }
    *prot.copies.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

impl Drop for LiveCapture {
    fn drop(&mut self) {
        self.finish();
    }
}
