//! The software dirty bitmap: one atomic bit per page.
//!
//! Writers copy their data first and set the bit after, with a read-modify-write that orders the
//! data before the bit. A harvest swaps each word to zero before the pages are read. So a write
//! racing a harvest lands either in this round (its bit was seen) or the next (its bit is set again
//! after the swap): never lost.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Backend, DirtyLog, DirtyLogError};

/// The `soft` backend: one atomic bit per page. A page index past the end panics (the word index
/// is checked); it never touches memory outside the bitmap.
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    pages: usize,
}

impl AtomicBitmap {
    pub fn new(pages: usize) -> AtomicBitmap {
        // A zeroed allocation (calloc: fresh pages, not written here), so a 64 GiB guest's 2 MiB
        // bitmap costs nothing until pages are marked.
        let zeroed: Box<[u64]> = vec![0u64; pages.div_ceil(64)].into_boxed_slice();
        // SAFETY: AtomicU64 has the same size, alignment and bit validity as u64 (std documents
        // it), so the allocation is a valid [AtomicU64] of the same length, owned by the new Box.
        let words = unsafe { Box::from_raw(Box::into_raw(zeroed) as *mut [AtomicU64]) };
        AtomicBitmap { words, pages }
    }

    pub fn pages(&self) -> usize {
        self.pages
    }

    pub fn words(&self) -> usize {
        self.words.len()
    }

    #[inline]
    pub fn set(&self, page: usize) {
        debug_assert!(page < self.pages);
        self.words[page / 64].fetch_or(1 << (page % 64), Ordering::AcqRel);
    }

    /// Set pages `first..end`.
    pub fn set_range(&self, first: usize, end: usize) {
        debug_assert!(end <= self.pages);
        let mut page = first;
        while page < end {
            let bit = page % 64;
            let n = (64 - bit).min(end - page);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            self.words[page / 64].fetch_or(mask, Ordering::AcqRel);
            page += n;
        }
    }

    #[inline]
    pub fn is_set(&self, page: usize) -> bool {
        self.words[page / 64].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }

    /// OR the set bits into `out` (one u64 per 64 pages) and clear them, word by word atomically.
    /// Clean words are only read, never written, so harvesting a clean map costs a read of the
    /// bitmap. Returns the number of pages harvested.
    pub fn get_and_clear_into(&self, out: &mut [u64]) -> usize {
        debug_assert!(out.len() >= self.words.len());
        let mut count = 0usize;
        for (word, slot) in self.words.iter().zip(out.iter_mut()) {
            if word.load(Ordering::Relaxed) != 0 {
                let bits = word.swap(0, Ordering::AcqRel);
                count += bits.count_ones() as usize;
                *slot |= bits;
            }
        }
        count
    }

    /// Pages currently set, without clearing.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.load(Ordering::Relaxed).count_ones() as usize).sum()
    }

    /// Copy the bits into `out` without clearing.
    pub fn peek_into(&self, out: &mut [u64]) {
        for (word, slot) in self.words.iter().zip(out.iter_mut()) {
            *slot |= word.load(Ordering::Acquire);
        }
    }

    /// The set pages as (first page, count) runs from `first_page`, ascending, without clearing
    /// them or allocating a copy of the bitmap: words are read 512 at a time and all-zero stretches
    /// skipped.
    pub fn peek_runs_into(&self, first_page: u64, out: &mut Vec<(u64, u64)>) {
        const CHUNK: usize = 512;
        let mut chunk = [0u64; CHUNK];
        for (index, words) in self.words.chunks(CHUNK).enumerate() {
            let mut any = 0u64;
            for (slot, word) in chunk.iter_mut().zip(words) {
                *slot = word.load(Ordering::Acquire);
                any |= *slot;
            }
            if any == 0 {
                continue;
            }
            let before = out.len();
            super::bitmap_to_runs(&chunk[..words.len()], first_page + (index * CHUNK * 64) as u64, out);
            // A run that crosses the chunk boundary arrives as two: join them.
            if before > 0 && out.len() > before && out[before - 1].0 + out[before - 1].1 == out[before].0 {
                out[before - 1].1 += out[before].1;
                out.remove(before);
            }
        }
    }

    /// Clear pages `first..end` (restore/receive load pages that must not count as written).
    pub fn clear_range(&self, first: usize, end: usize) {
        let mut page = first;
        while page < end {
            let bit = page % 64;
            let n = (64 - bit).min(end - page);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            self.words[page / 64].fetch_and(!mask, Ordering::AcqRel);
            page += n;
        }
    }
}

impl DirtyLog for AtomicBitmap {
    fn backend(&self) -> Backend {
        Backend::Soft
    }

    fn pages(&self) -> usize {
        self.pages
    }

    #[inline]
    fn mark(&self, first: usize, end: usize) {
        self.set_range(first, end);
    }

    #[inline]
    fn mark_page(&self, page: usize) {
        self.set(page);
    }

    fn get_and_clear(&self, words: &mut [u64]) -> Result<usize, DirtyLogError> {
        Ok(self.get_and_clear_into(words))
    }

    fn peek(&self, words: &mut [u64]) -> Result<(), DirtyLogError> {
        self.peek_into(words);
        Ok(())
    }

    fn peek_runs(&self, first_page: u64, out: &mut Vec<(u64, u64)>) -> Result<(), DirtyLogError> {
        self.peek_runs_into(first_page, out);
        Ok(())
    }

    fn count(&self) -> Result<usize, DirtyLogError> {
        Ok(AtomicBitmap::count(self))
    }

    /// The soft bitmap holds only marks: nothing to forget.
    fn forget_unmarked(&self, _first: usize, _end: usize) -> Result<(), DirtyLogError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn peek_runs_match_peek_read_as_runs_across_chunk_boundaries() {
        let map = AtomicBitmap::new(512 * 64 * 3 + 100);
        for (first, end) in [
            (0, 3),
            (100, 101),
            (512 * 64 - 5, 512 * 64 + 7),
            (2 * 512 * 64 - 64, 2 * 512 * 64 + 64),
            (512 * 64 * 3 + 99, 512 * 64 * 3 + 100),
        ] {
            map.mark(first, end);
        }
        let mut words = vec![0u64; map.pages().div_ceil(64)];
        map.peek_into(&mut words);
        let mut expected = Vec::new();
        crate::dirty::bitmap_to_runs(&words, 7, &mut expected);
        let mut runs = Vec::new();
        map.peek_runs_into(7, &mut runs);
        assert_eq!(runs, expected);
        assert_eq!(runs[2], (7 + 512 * 64 - 5, 12), "a run across a chunk boundary is one run");
        assert_eq!(map.count(), 3 + 1 + 12 + 128 + 1, "peeking clears nothing");
    }

    use super::*;
    use std::sync::Arc;

    #[test]
    fn set_range_sets_exactly_the_range() {
        let bm = AtomicBitmap::new(300);
        bm.set_range(5, 200);
        assert_eq!(bm.count(), 195);
        assert!(!bm.is_set(4) && bm.is_set(5) && bm.is_set(199) && !bm.is_set(200));
        bm.clear_range(63, 129);
        assert_eq!(bm.count(), 195 - 66);
    }

    #[test]
    fn harvest_clears_and_reports() {
        let bm = AtomicBitmap::new(130);
        bm.set(0);
        bm.set(129);
        let mut out = vec![0u64; bm.words()];
        assert_eq!(bm.get_and_clear_into(&mut out), 2);
        assert_eq!(out, vec![1, 0, 2]);
        assert_eq!(bm.count(), 0);
    }

    #[test]
    fn concurrent_sets_are_never_lost() {
        let bm = Arc::new(AtomicBitmap::new(1 << 16));
        let writer = {
            let bm = bm.clone();
            std::thread::spawn(move || {
                for round in 0..20 {
                    for p in 0..(1 << 16) {
                        if (p + round) % 7 == 0 {
                            bm.set(p);
                        }
                    }
                }
            })
        };
        let mut seen = vec![0u64; bm.words()];
        while !writer.is_finished() {
            bm.get_and_clear_into(&mut seen);
        }
        writer.join().unwrap();
        bm.get_and_clear_into(&mut seen);
        for p in 0..(1usize << 16) {
            let expected = (0..20).any(|r| (p + r) % 7 == 0);
            assert_eq!(seen[p / 64] >> (p % 64) & 1 == 1, expected, "page {p}");
        }
    }
}
