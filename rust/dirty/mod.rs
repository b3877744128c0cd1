//! EPT-like dirty tracking: one dirty bit per 4 KiB page, read and cleared atomically per round.
//!
//! Every backend is a [`DirtyLog`]: one log per guest memory segment, asked the same questions
//! (mark, harvest, peek, count, forget) by the same callers, so a new backend is one more
//! implementation of the trait and nothing else changes. Three exist:
//! - `soft` ([`AtomicBitmap`]): an atomic bitmap, set by every write made through vmmpy (API
//!   writes, device DMA, vCPU stores). Always available.
//! - `kernel` ([`KernelLog`]): userfaultfd write-protect in async mode plus the PAGEMAP_SCAN ioctl
//!   (Linux 6.7+), which sees every write to the mapping, whoever makes it. A soft bitmap is still
//!   kept for the marks and OR'ed in, so the two backends report the same pages for writes made
//!   through vmmpy (a test runs one workload against both and compares).
//!
//! - `kvm` (`crate::kvm::KvmSlotLog`): one per KVM memory slot, for guests run by the KVM vCPU:
//!   `KVM_GET_DIRTY_LOG` with manual protect and `KVM_CLEAR_DIRTY_LOG` for what the guest wrote
//!   (EPT/NPT dirty logging), a soft bitmap for what the VMM wrote (KVM does not see those).
//!
//! This module knows nothing of segments' layout or of Python; `memory` owns the mappings and
//! gives each segment its log.

mod bitmap;
mod kernel;

pub use bitmap::AtomicBitmap;
#[cfg(test)]
pub(crate) use kernel::kernel_offers_tracking;
pub use kernel::{KernelLog, KernelTracker, KernelTrackerError};

use std::fmt;

/// The dirty log of one range of guest memory (a segment): which of its pages were written since
/// the last harvest. Pages are numbered from 0 at the start of the range.
///
/// What every backend must guarantee:
/// - **Nothing lost.** A write that completes before a harvest starts is reported by that harvest;
///   a write racing a harvest is reported by that harvest or by the next one, never by neither.
///   (A write made through vmmpy copies its bytes first and marks after, so a harvest that misses
///   the mark sees it next round.)
/// - **Marks are reported.** Pages passed to [`DirtyLog::mark`] are reported, whether or not the
///   backend also sees the write by itself; so every backend reports at least what `soft` does.
/// - **Harvest clears atomically per page**: a page reported by a harvest is clean afterwards
///   unless written again, and two harvests never both report one write.
/// - **Peek and count change nothing.**
/// - **`forget_unmarked` forgets only what the backend saw by itself** (a restore filling memory
///   with read(2), which the kernel counts as a write), never marks; it is for memory that no
///   guest is writing at the time.
/// - Page indices passed in are within [`DirtyLog::pages`] (callers check; a backend may panic
///   otherwise, never touch memory outside its own state).
pub trait DirtyLog: Send + Sync {
    /// Which backend this is.
    fn backend(&self) -> Backend;

    /// How many pages the log covers.
    fn pages(&self) -> usize;

    /// Record that vmmpy wrote pages `first..end` (after the bytes were copied in).
    fn mark(&self, first: usize, end: usize);

    /// Record that vmmpy wrote page `page`: the vCPU's stores, one per instruction.
    #[inline]
    fn mark_page(&self, page: usize) {
        self.mark(page, page + 1);
    }

    /// OR the dirty pages into `words` (bit i of word w = page w*64+i; `words` zeroed by the
    /// caller, at least `pages().div_ceil(64)` long) and clear them. Returns how many pages.
    fn get_and_clear(&self, words: &mut [u64]) -> Result<usize, DirtyLogError>;

    /// OR the dirty pages into `words`, as [`DirtyLog::get_and_clear`], without clearing them.
    fn peek(&self, words: &mut [u64]) -> Result<(), DirtyLogError>;

    /// The dirty pages as (first page, count) runs numbered from `first_page`, ascending, without
    /// clearing them ([`DirtyLog::peek`] read as runs; a backend may do it without a copy).
    fn peek_runs(&self, first_page: u64, out: &mut Vec<(u64, u64)>) -> Result<(), DirtyLogError> {
        let mut words = vec![0u64; self.pages().div_ceil(64)];
        self.peek(&mut words)?;
        bitmap_to_runs(&words, first_page, out);
        Ok(())
    }

    /// How many pages are dirty now, without clearing them.
    fn count(&self) -> Result<usize, DirtyLogError> {
        let mut words = vec![0u64; self.pages().div_ceil(64)];
        self.peek(&mut words)?;
        Ok(words.iter().map(|w| w.count_ones() as usize).sum())
    }

    /// Forget writes to pages `first..end` that the backend saw by itself rather than through
    /// [`DirtyLog::mark`]: restore and receive paths fill memory with read(2)/readv(2) or drop
    /// pages with madvise, which the kernel counts as writes. Only while no guest writes the range
    /// (a guest write meanwhile would be forgotten too).
    fn forget_unmarked(&self, first: usize, end: usize) -> Result<(), DirtyLogError>;
}

/// A backend failed while harvesting or forgetting: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyLogError {
    pub backend: Backend,
    pub why: String,
}

impl fmt::Display for DirtyLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dirty tracking backend '{}' failed: {}", self.backend, self.why)
    }
}

impl std::error::Error for DirtyLogError {}

/// Which backend a guest's memory uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Soft,
    Kernel,
    Kvm,
    /// KVM's dirty ring (one per vCPU) in place of its bitmap.
    KvmRing,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Soft => "soft",
            Backend::Kernel => "kernel",
            Backend::Kvm => "kvm",
            Backend::KvmRing => "kvm-ring",
        })
    }
}

/// What the caller asked for: a backend, or "the best that works here".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrackingChoice {
    Auto,
    Soft,
    Kernel,
    /// KVM's dirty log: the memory becomes a KVM VM's memory slots (the KVM vCPU's guests).
    Kvm,
    /// KVM's dirty ring instead of its bitmap (same memory slots, same guests).
    KvmRing,
}

impl TrackingChoice {
    pub fn parse(s: &str) -> Option<TrackingChoice> {
        match s {
            "auto" => Some(TrackingChoice::Auto),
            "soft" => Some(TrackingChoice::Soft),
            "kernel" => Some(TrackingChoice::Kernel),
            "kvm" => Some(TrackingChoice::Kvm),
            "kvm-ring" => Some(TrackingChoice::KvmRing),
            _ => None,
        }
    }
}

/// Turn a dirty bitmap (bit i of word w = page w*64+i) into sorted page indices.
pub fn bitmap_to_pages(words: &[u64], first_page: u64, out: &mut Vec<u64>) {
    for (w, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let bit = bits.trailing_zeros() as u64;
            out.push(first_page + (w as u64) * 64 + bit);
            bits &= bits - 1;
        }
    }
}

/// Turn a dirty bitmap into (first_page, page_count) runs, in ascending order.
pub fn bitmap_to_runs(words: &[u64], first_page: u64, out: &mut Vec<(u64, u64)>) {
    let mut run: Option<(u64, u64)> = None;
    for (w, &word) in words.iter().enumerate() {
        if word == 0 {
            continue;
        }
        let base = first_page + (w as u64) * 64;
        let mut bits = word;
        while bits != 0 {
            let start = bits.trailing_zeros() as u64;
            let len = (!(bits >> start)).trailing_zeros() as u64; // ones from `start` upwards
            let page = base + start;
            match run.as_mut() {
                Some((first, count)) if *first + *count == page => *count += len,
                _ => {
                    if let Some(done) = run.take() {
                        out.push(done);
                    }
                    run = Some((page, len));
                }
            }
            bits = if start + len >= 64 { 0 } else { bits & !(((1u64 << len) - 1) << start) };
        }
    }
    if let Some(done) = run {
        out.push(done);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_runs_agree_with_the_bits() {
        let mut words = vec![0u64; 3];
        for p in [0u64, 1, 2, 63, 64, 65, 100, 191] {
            words[(p / 64) as usize] |= 1 << (p % 64);
        }
        let mut pages = Vec::new();
        bitmap_to_pages(&words, 1000, &mut pages);
        assert_eq!(pages, vec![1000, 1001, 1002, 1063, 1064, 1065, 1100, 1191]);
        let mut runs = Vec::new();
        bitmap_to_runs(&words, 1000, &mut runs);
        assert_eq!(runs, vec![(1000, 3), (1063, 3), (1100, 1), (1191, 1)]);
    }

    #[test]
    fn full_words_make_one_run() {
        let words = vec![u64::MAX; 4];
        let mut runs = Vec::new();
        bitmap_to_runs(&words, 0, &mut runs);
        assert_eq!(runs, vec![(0, 256)]);
    }
}
