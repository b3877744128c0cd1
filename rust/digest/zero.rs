//! Zero-page detection: is a page all zero bytes, and which pages of a bitmap are.
//!
//! The check is memory-bandwidth bound (about 15 GB/s here whatever the method, see
//! reference/ecosystem.md section 4), so it is the simple one: OR-fold 256-byte blocks as u64
//! words and stop at the first block that is not zero. A zero page is then sent as a flag, not as
//! 4 KiB. Skipping pages without reading them at all is `resident`'s job.

use super::{check_bitmap, page_span, PageError};
use crate::memory::{Segment, PAGE_SIZE};

const BLOCK_WORDS: usize = 32; // 256 bytes: early exit often enough, long enough to vectorise

/// Whether the `len` bytes at `ptr` are all zero.
///
/// # Safety
/// `ptr..ptr+len` must be readable for the whole call, `ptr` 8-byte aligned and `len` a multiple
/// of 256 (every page qualifies).
#[inline]
pub(crate) unsafe fn is_zero_raw(ptr: *const u8, len: usize) -> bool {
    debug_assert!((ptr as usize).is_multiple_of(8) && len.is_multiple_of(BLOCK_WORDS * 8));
    let words = ptr as *const [u64; BLOCK_WORDS];
    for block in 0..len / (BLOCK_WORDS * 8) {
        // SAFETY: the caller guarantees the bytes are readable and aligned; the block lies inside.
        // An unaligned-free plain read of a local copy lets the compiler fold it with SIMD.
        let words = unsafe { words.add(block).read() };
        if words.iter().fold(0u64, |acc, w| acc | w) != 0 {
            return false;
        }
    }
    true
}

/// Whether page `page` of `seg` is all zero.
pub fn is_zero_page(seg: &Segment, page: u64) -> Result<bool, PageError> {
    let off = page_span(seg, page, 1)?;
    // SAFETY: page_span checked the page lies inside the mapping, which `seg` keeps alive; pages
    // are 4 KiB aligned.
    Ok(unsafe { is_zero_raw(seg.as_ptr().add(off), PAGE_SIZE) })
}

/// The pages of a bitmap, split by content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZeroSplit {
    /// Bit per page: set where the page was in the input and is all zero.
    pub zero: Vec<u64>,
    /// Bit per page: set where the page was in the input and holds some non-zero byte.
    pub nonzero: Vec<u64>,
    pub zero_pages: u64,
    pub nonzero_pages: u64,
}

/// Read every page marked in `words` (bit i = page i of `seg`) and split them into zero and
/// non-zero pages.
pub fn split_zero_pages(seg: &Segment, words: &[u64]) -> Result<ZeroSplit, PageError> {
    check_bitmap(seg, words, "page bitmap")?;
    let mut split = ZeroSplit { zero: vec![0; words.len()], nonzero: vec![0; words.len()], zero_pages: 0, nonzero_pages: 0 };
    for (w, &word) in words.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let bit = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let page = w * 64 + bit;
            // SAFETY: check_bitmap proved every marked page is inside the mapping `seg` keeps alive.
            if unsafe { is_zero_raw(seg.as_ptr().add(page * PAGE_SIZE), PAGE_SIZE) } {
                split.zero[w] |= 1 << bit;
                split.zero_pages += 1;
            } else {
                split.nonzero[w] |= 1 << bit;
                split.nonzero_pages += 1;
            }
        }
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestAddress, GuestMemory, MemoryOptions};

    #[test]
    fn a_single_byte_anywhere_makes_a_page_nonzero() {
        let mem = GuestMemory::new(&MemoryOptions::new(1 << 20)).unwrap();
        let seg = &mem.segments()[0];
        assert!(is_zero_page(seg, 0).unwrap(), "untouched memory reads as zero");
        for (page, at) in [(1u64, 0usize), (2, 255), (3, 256), (4, 4095), (5, 2048)] {
            mem.write(GuestAddress(page * 4096 + at as u64), &[1]).unwrap();
            assert!(!is_zero_page(seg, page).unwrap(), "page {page} byte {at}");
        }
        mem.write(GuestAddress(6 * 4096), &[0; 4096]).unwrap();
        assert!(is_zero_page(seg, 6).unwrap(), "explicitly written zeros are zero");
        assert!(matches!(is_zero_page(seg, 256), Err(PageError::PagesOutsideSegment { .. })));
    }

    #[test]
    fn split_sorts_marked_pages_by_content() {
        let mem = GuestMemory::new(&MemoryOptions::new(1 << 20)).unwrap();
        let seg = &mem.segments()[0];
        for page in [1u64, 70, 200] {
            mem.write(GuestAddress(page * 4096 + 100), &[7]).unwrap();
        }
        let mut words = vec![0u64; 4];
        for page in [0usize, 1, 2, 70, 71, 200] {
            words[page / 64] |= 1 << (page % 64);
        }
        let split = split_zero_pages(seg, &words).unwrap();
        assert_eq!((split.zero_pages, split.nonzero_pages), (3, 3));
        assert_eq!(split.nonzero, vec![0b10, 1 << 6, 0, 1 << 8]);
        assert_eq!(split.zero, vec![0b101, 1 << 7, 0, 0]);
    }

    #[test]
    fn bitmaps_that_do_not_fit_the_segment_are_refused() {
        let mem = GuestMemory::new(&MemoryOptions::new(100 * 4096)).unwrap();
        let seg = &mem.segments()[0];
        assert!(split_zero_pages(seg, &[0, 0, 0, 0]).is_ok(), "extra clean words are fine");
        let err = split_zero_pages(seg, &[0]).unwrap_err();
        assert_eq!(err.to_string(), "page bitmap has 1 words but segment 'lowmem' needs 2");
        let err = split_zero_pages(seg, &[0, 0, 1 << 3]).unwrap_err();
        assert_eq!(err.to_string(), "page bitmap marks page 131 but segment 'lowmem' has only 100 pages");
        let err = split_zero_pages(seg, &[0, 1 << 40]).unwrap_err();
        assert_eq!(err.to_string(), "page bitmap marks page 104 but segment 'lowmem' has only 100 pages");
    }
}
