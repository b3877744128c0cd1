//! Residency: which pages of a segment may hold data, so never-touched memory is skipped
//! without being read (reading it would map the shared zero page into every PTE and cost page
//! tables for nothing).
//!
//! Uses mincore(2). For private anonymous memory a page mincore calls non-resident is either
//! never touched (or dropped with MADV_DONTNEED), and so reads as zero, or swapped out, and then
//! it holds data. mincore cannot tell those apart, so when any swap is active this module answers
//! "every page may hold data" rather than risk sending a swapped page as zero. Pages with only a
//! userfaultfd write-protect marker (the kernel dirty backend) count as untouched, as they should.
//!
//! A lazily restored segment holds data in chunks it has not loaded yet, which mincore cannot
//! see: it is loaded (and checked) whole before it is asked.
//!
//! This module does not decide what to do with untouched pages; `ranges` and `hash` do.

use super::PageError;
use crate::memory::{Segment, PAGE_SIZE};

/// How the answer was obtained, for statistics and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResidencySource {
    /// From mincore: unset bits are pages that were never touched and read as zero.
    Mincore,
    /// Swap is active, so every page was reported as possibly holding data.
    AllPagesSwapActive,
}

/// mincore on this many pages per call: a 64 KiB scratch vector whatever the segment's size.
const MINCORE_CHUNK_PAGES: usize = 64 * 1024;

/// A bitmap (bit i of word i/64 = page i of `seg`) of the pages that may hold data.
pub fn resident_bitmap(seg: &Segment) -> Result<(Vec<u64>, ResidencySource), PageError> {
    seg.ensure_all()?;
    let pages = seg.pages();
    let mut words = vec![0u64; pages.div_ceil(64)];
    if swap_active() {
        for page in 0..pages {
            words[page / 64] |= 1 << (page % 64);
        }
        return Ok((words, ResidencySource::AllPagesSwapActive));
    }
    let mut vec = vec![0u8; MINCORE_CHUNK_PAGES.min(pages)];
    let mut first = 0;
    while first < pages {
        let n = MINCORE_CHUNK_PAGES.min(pages - first);
        // SAFETY: `first..first+n` pages lie inside the mapping `seg` keeps alive (page-aligned
        // start), and `vec` has at least one byte per page asked about.
        let rc = unsafe { libc::mincore(seg.as_ptr().add(first * PAGE_SIZE) as *mut libc::c_void, n * PAGE_SIZE, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(PageError::io(format!("mincore on segment '{}'", seg.name()), std::io::Error::last_os_error()));
        }
        for (i, &b) in vec[..n].iter().enumerate() {
            let page = first + i;
            words[page / 64] |= ((b & 1) as u64) << (page % 64);
        }
        first += n;
    }
    Ok((words, ResidencySource::Mincore))
}

/// Whether any swap area is in use; if /proc/swaps cannot be read, assume it is (the safe side).
pub(crate) fn swap_active() -> bool {
    match std::fs::read_to_string("/proc/swaps") {
        Ok(text) => text.lines().skip(1).any(|l| !l.trim().is_empty()),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestAddress, GuestMemory, MemoryOptions};

    #[test]
    fn only_touched_pages_are_resident() {
        let mem = GuestMemory::new(&MemoryOptions::new(8 << 20)).unwrap();
        let seg = &mem.segments()[0];
        for page in [0u64, 63, 64, 1000, 2047] {
            mem.write(GuestAddress(page * 4096 + 5), &[1]).unwrap();
        }
        let (words, source) = resident_bitmap(seg).unwrap();
        assert_eq!(words.len(), 2048 / 64);
        if source == ResidencySource::AllPagesSwapActive {
            assert!(words.iter().all(|&w| w == u64::MAX));
            return;
        }
        let mut pages = Vec::new();
        crate::dirty::bitmap_to_pages(&words, 0, &mut pages);
        assert_eq!(pages, vec![0, 63, 64, 1000, 2047]);
    }
}
