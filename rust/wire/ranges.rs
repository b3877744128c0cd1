//! Turn a round's dirty bitmap into the range table of a batch: runs of dirty pages, split into
//! DATA runs (send the bytes) and ZERO runs (send a flag), optionally skipping never-touched
//! pages without reading them.
//!
//! This file decides nothing about which pages are dirty (`dirty`, `memory`) or how ranges are
//! cut into batches of at most `MAX_RANGES` (the caller: `ranges.chunks(MAX_RANGES as usize)`).

use super::batch::{PageRange, RangeKind};
use crate::digest::is_zero_raw;
use crate::digest::{check_bitmap, PageError};
use crate::dirty::bitmap_to_runs;
use crate::memory::{GuestAddress, Segment, PAGE_SIZE};

/// Appends pages one run at a time, merging a run into the previous range when they touch and
/// are of the same kind.
struct RangeBuilder<'a> {
    seg: &'a Segment,
    out: Vec<PageRange>,
}

impl RangeBuilder<'_> {
    fn push(&mut self, first_page: usize, count: usize, kind: RangeKind) {
        let mut page = first_page;
        let mut left = count;
        while left > 0 {
            let gpa = GuestAddress(self.seg.gpa().0 + (page * PAGE_SIZE) as u64);
            if let Some(last) = self.out.last_mut() {
                if last.kind == kind && last.gpa.0 + last.bytes() == gpa.0 && last.pages < u32::MAX {
                    let n = left.min((u32::MAX - last.pages) as usize);
                    last.pages += n as u32;
                    page += n;
                    left -= n;
                    continue;
                }
            }
            let n = left.min(u32::MAX as usize);
            self.out.push(PageRange { gpa, pages: n as u32, kind });
            page += n;
            left -= n;
        }
    }
}

fn build(seg: &Segment, words: &[u64], resident: Option<&[u64]>, detect_zero: bool) -> Result<Vec<PageRange>, PageError> {
    check_bitmap(seg, words, "dirty bitmap")?;
    if let Some(r) = resident {
        check_bitmap(seg, r, "residency bitmap")?;
    }
    let mut runs = Vec::new();
    bitmap_to_runs(words, 0, &mut runs);
    let mut builder = RangeBuilder { seg, out: Vec::with_capacity(runs.len()) };
    let touched = |page: usize| resident.is_none_or(|r| r[page / 64] >> (page % 64) & 1 != 0);
    let kind_of = |page: usize| {
        // SAFETY: check_bitmap proved every page of the dirty bitmap lies inside the mapping.
        let zero = !touched(page) || (detect_zero && unsafe { is_zero_raw(seg.as_ptr().add(page * PAGE_SIZE), PAGE_SIZE) });
        if zero {
            RangeKind::Zero
        } else {
            RangeKind::Data
        }
    };
    for (first, count) in runs {
        let (first, count) = (first as usize, count as usize);
        if resident.is_none() && !detect_zero {
            builder.push(first, count, RangeKind::Data);
            continue;
        }
        let end = first + count;
        let mut page = first;
        while page < end {
            let kind = kind_of(page);
            let mut next = page + 1;
            while next < end {
                // 64 never-touched pages at once: a sparse guest costs its touched memory.
                if let (RangeKind::Zero, Some(r), 0) = (kind, resident, next % 64) {
                    if r[next / 64] == 0 && next + 64 <= end {
                        next += 64;
                        continue;
                    }
                }
                if kind_of(next) != kind {
                    break;
                }
                next += 1;
            }
            builder.push(page, next - page, kind);
            page = next;
        }
    }
    Ok(builder.out)
}

/// The range table for the pages set in `words` (bit i = page i of `seg`), ascending. With
/// `detect_zero`, each page is read and all-zero pages become ZERO ranges.
pub fn build_ranges_from_bitmap(seg: &Segment, words: &[u64], detect_zero: bool) -> Result<Vec<PageRange>, PageError> {
    build(seg, words, None, detect_zero)
}

/// As [`build_ranges_from_bitmap`], and pages not set in `resident` (from `resident_bitmap`:
/// never touched, so zero) become ZERO ranges without being read.
pub fn build_ranges_with_residency(seg: &Segment, words: &[u64], resident: &[u64], detect_zero: bool) -> Result<Vec<PageRange>, PageError> {
    build(seg, words, Some(resident), detect_zero)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestMemory, MemoryOptions, HIGHMEM_BASE};

    fn bits(pages: &[usize], words: usize) -> Vec<u64> {
        let mut w = vec![0u64; words];
        for &p in pages {
            w[p / 64] |= 1 << (p % 64);
        }
        w
    }

    #[test]
    fn runs_split_into_data_and_zero_by_content() {
        let mut opts = MemoryOptions::new(8 << 20);
        opts.lowmem_limit = 4 << 20;
        let mem = GuestMemory::new(&opts).unwrap();
        let seg = &mem.segments()[1];
        for page in [10u64, 11, 13, 64] {
            mem.write(GuestAddress(HIGHMEM_BASE + page * 4096 + 1), &[9]).unwrap();
        }
        let words = bits(&[10, 11, 12, 13, 14, 63, 64, 65], 16);
        let at = |p: u64| GuestAddress(HIGHMEM_BASE + p * 4096);
        let plain = build_ranges_from_bitmap(seg, &words, false).unwrap();
        assert_eq!(
            plain,
            vec![PageRange { gpa: at(10), pages: 5, kind: RangeKind::Data }, PageRange { gpa: at(63), pages: 3, kind: RangeKind::Data }]
        );
        let zeroed = build_ranges_from_bitmap(seg, &words, true).unwrap();
        let kinds: Vec<(u64, u32, RangeKind)> = zeroed.iter().map(|r| ((r.gpa.0 - HIGHMEM_BASE) / 4096, r.pages, r.kind)).collect();
        use RangeKind::{Data, Zero};
        assert_eq!(kinds, vec![(10, 2, Data), (12, 1, Zero), (13, 1, Data), (14, 1, Zero), (63, 1, Zero), (64, 1, Data), (65, 1, Zero)]);
    }

    #[test]
    fn untouched_pages_become_zero_without_detection() {
        let mem = GuestMemory::new(&MemoryOptions::new(1 << 20)).unwrap();
        let seg = &mem.segments()[0];
        mem.write(GuestAddress(2 * 4096), &[0; 4096]).unwrap(); // touched, zero content
        mem.write(GuestAddress(3 * 4096), &[5]).unwrap();
        let words = bits(&[0, 1, 2, 3], 4);
        let resident = bits(&[2, 3], 4);
        let ranges = build_ranges_with_residency(seg, &words, &resident, false).unwrap();
        let kinds: Vec<(u64, u32, RangeKind)> = ranges.iter().map(|r| (r.gpa.0 / 4096, r.pages, r.kind)).collect();
        assert_eq!(kinds, vec![(0, 2, RangeKind::Zero), (2, 2, RangeKind::Data)]);
        let ranges = build_ranges_with_residency(seg, &words, &resident, true).unwrap();
        let kinds: Vec<(u64, u32, RangeKind)> = ranges.iter().map(|r| (r.gpa.0 / 4096, r.pages, r.kind)).collect();
        assert_eq!(kinds, vec![(0, 3, RangeKind::Zero), (3, 1, RangeKind::Data)]);
    }
}
