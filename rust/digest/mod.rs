//! Reading guest pages for what they hold: page and chunk hashes, the commit digest and the
//! tracker that keeps it current, zero-page and residency detection.
//!
//! Also the checks every bulk page operation starts with (pages inside a segment, a bitmap that
//! covers it) and [`PageError`], the error all bulk page work reports, this module's and the
//! wire's (`crate::wire`, which sits on top of this one and hashes what it moves into a
//! [`DigestTracker`]). Nothing here knows the batch format or a file descriptor.
//!
//! Every function takes `&Segment`/`&GuestMemory` and never touches Python, so the bindings can
//! call them with the GIL released. Guest memory may be written by a running guest while these
//! functions read it, as DMA races a CPU on real hardware: a hash is then a snapshot of some
//! moment, and the dirty bit that write set makes the next round fix it. Digests meant to verify
//! a migration or a checkpoint must be taken with the guest stopped.

mod error;
mod hash;
mod resident;
mod tracker;
pub mod xxh3;
mod zero;

pub use error::{Direction, PageError};
pub use hash::{chunk_hashes, chunk_hashes_resident, hash_page_list, hash_pages, memory_digest, ranges_digest};
pub(crate) use resident::swap_active;
pub use resident::{resident_bitmap, ResidencySource};
pub use tracker::{commit_digest, DigestTracker, RefreshStats, DIGEST_CHUNK_PAGES};
pub(crate) use zero::is_zero_raw;
pub use zero::{is_zero_page, split_zero_pages, ZeroSplit};

use crate::memory::{Segment, PAGE_SIZE};

/// How many pages ahead of the one being read a run of cold pages is asked for: far enough that
/// a page has arrived from memory when its turn comes, near enough that it is still in the cache
/// then. The hardware's prefetchers stop at every 4 KiB page, so without this a hash of a run
/// waits on memory at each page. A/B in docs/performance.md (session 25); `cargo bench --bench
/// memory -- page_hash` times hashing 256 MiB with and without.
const PREFETCH_PAGES: usize = 2;

/// Call `read(i)` for each page `i` of the `count` pages from `ptr`, in order, having asked for
/// page `i + PREFETCH_PAGES`'s cache lines first (the pages of the run only). For a first read of
/// guest memory: the source's hash of what it sends, a checkpoint's hash of what it writes.
#[inline(always)]
pub(crate) fn each_page_ahead(ptr: *const u8, count: usize, mut read: impl FnMut(usize)) {
    for i in 0..count {
        if i + PREFETCH_PAGES < count {
            prefetch_page(ptr.wrapping_add((i + PREFETCH_PAGES) * PAGE_SIZE));
        }
        read(i);
    }
}

/// Ask for the 64 cache lines of the page at `ptr`: a hint, which never faults.
#[inline(always)]
fn prefetch_page(ptr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..PAGE_SIZE).step_by(64) {
        // SAFETY: a prefetch reads nothing the program sees and cannot fault.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(ptr.wrapping_add(line).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

/// Check that pages `first..first+count` lie in `seg` and make them ready to read (a lazily
/// restored chunk is loaded and checked first); return the byte offset of `first`.
fn page_span(seg: &Segment, first: u64, count: u64) -> Result<usize, PageError> {
    match first.checked_add(count) {
        Some(end) if end <= seg.pages() as u64 => {
            seg.ensure(first as usize * PAGE_SIZE, count as usize * PAGE_SIZE)?;
            Ok(first as usize * PAGE_SIZE)
        }
        _ => Err(PageError::PagesOutsideSegment { first, count, segment: seg.name().to_string(), pages: seg.pages() as u64 }),
    }
}

/// Check that a bitmap covers `seg` and marks no page past its end, and make the marked pages
/// ready to read (on lazily restored memory not loaded whole yet, their chunks are loaded).
pub(crate) fn check_bitmap(seg: &Segment, words: &[u64], what: &'static str) -> Result<(), PageError> {
    let pages = seg.pages();
    let needed = pages.div_ceil(64);
    if words.len() < needed {
        return Err(PageError::BitmapSize { what, words: words.len(), needed, segment: seg.name().to_string() });
    }
    let past_end = |page: u64| PageError::BitmapPastEnd { what, page, segment: seg.name().to_string(), pages: pages as u64 };
    let tail = pages % 64;
    if tail != 0 && words[needed - 1] >> tail != 0 {
        return Err(past_end(((needed - 1) * 64 + tail) as u64 + (words[needed - 1] >> tail).trailing_zeros() as u64));
    }
    if let Some(i) = words[needed..].iter().position(|&w| w != 0) {
        return Err(past_end(((needed + i) * 64) as u64 + words[needed + i].trailing_zeros() as u64));
    }
    if seg.lazy_image().is_some_and(|image| !image.is_complete()) {
        let mut runs = Vec::new();
        crate::dirty::bitmap_to_runs(&words[..needed], 0, &mut runs);
        for (first, count) in runs {
            seg.ensure(first as usize * PAGE_SIZE, count as usize * PAGE_SIZE)?;
        }
    }
    Ok(())
}
