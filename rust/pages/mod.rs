//! Bulk page work on guest memory: hashing, zero and residency detection, and the batch wire
//! format with its fd I/O (send pages straight from guest memory, receive straight into it),
//! optionally LZ4-compressed per batch (`compress`).
//!
//! This module owns the per-page codecs and the bytes of a page batch on the wire. It does not
//! own the mappings or the dirty bits (`memory`, `dirty`), nor decide which pages to send, when,
//! or how batches are framed inside a migration stream or a checkpoint (Python policy above).
//! Every function takes `&Segment`/`&GuestMemory` and raw fds and never touches Python, so the
//! bindings can call them with the GIL released.
//!
//! Guest memory may be written by a running guest while these functions read it, as DMA races a
//! CPU on real hardware: a hash or a sent page is then a snapshot of some moment, and the dirty
//! bit that write set makes the next round fix it. Digests meant to verify a migration or a
//! checkpoint must be taken with the guest stopped.

mod batch;
mod batch_io;
mod compress;
mod error;
mod hash;
mod ranges;
mod resident;
mod stall;
mod streams;
mod tracker;
mod zero;

pub use batch::{
    split_batches, BatchHeader, PageRange, RangeKind, BATCH_DATA_PAGES, BATCH_FLAG_LZ4, BATCH_HEADER_SIZE, BATCH_MAGIC, BATCH_VERSION,
    COMPRESSED_PREFIX, MAX_COMPRESSED_DATA, MAX_RANGES, RANGE_ENTRY_SIZE,
};
pub use batch_io::{recv_batch, recv_batch_tracked, send_batch, send_batch_tracked, BatchStats, BatchTotals};
pub use compress::{CompressMode, Compressor, COMPRESS_BLOCK_PAGES, LINK_SAMPLE_MIN, MAX_SKIP_PAGES, WORTH};
pub use error::PageError;
pub use hash::{chunk_hashes, chunk_hashes_resident, hash_page_list, hash_pages, memory_digest, ranges_digest};
pub use ranges::{build_ranges_from_bitmap, build_ranges_with_residency};
pub use resident::{resident_bitmap, ResidencySource};
pub use stall::Direction;
pub use streams::{send_chunks, MAX_STREAMS};
pub use tracker::{commit_digest, DigestTracker, RefreshStats, DIGEST_CHUNK_PAGES};
pub use zero::{is_zero_page, split_zero_pages, ZeroSplit};

use crate::memory::{Segment, PAGE_SIZE};

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

/// Make the ranges of a checked batch (`batch::validate_ranges` gave their offsets in `seg`) ready
/// to be read or written: on lazily restored memory, their chunks are loaded and checked first.
fn ready_ranges(seg: &Segment, ranges: &[PageRange], offsets: &[usize]) -> Result<(), PageError> {
    for (r, &off) in ranges.iter().zip(offsets) {
        seg.ensure(off, r.bytes() as usize)?;
    }
    Ok(())
}

/// Check that a bitmap covers `seg` and marks no page past its end, and make the marked pages
/// ready to read (on lazily restored memory not loaded whole yet, their chunks are loaded).
fn check_bitmap(seg: &Segment, words: &[u64], what: &'static str) -> Result<(), PageError> {
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

#[cfg(test)]
mod batch_tests;
#[cfg(test)]
mod compress_tests;
