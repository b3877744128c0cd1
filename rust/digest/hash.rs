//! Page and memory hashes: xxh3-64 per 4 KiB page (change detection, dedup hints), and xxh3-128
//! over whole chunks or ranges in order (checkpoint chunk hashes, the verified memory digest a
//! migration commits on).
//!
//! xxh3 is not a cryptographic hash: it detects damage and bugs, not an attacker who controls the
//! pages. A 64-bit page hash is a hint; anything that skips sending a page because two hashes
//! match must use 128 bits. Untouched pages can be hashed without reading them (they are zero),
//! and the result is the same as if they had been read: the digest does not depend on residency.

use crate::digest::xxh3::{xxh3_64_page, Xxh3};

use super::{check_bitmap, each_page_ahead, page_span, PageError};
use crate::memory::{GuestAddress, GuestMemory, Segment, PAGE_SIZE};

/// Zeros fed to the hasher in place of untouched pages.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// The bytes at `off..off+len` of `seg` as a slice, for the length of one hash call.
///
/// # Safety
/// The range must lie inside the mapping. The mapping lives as long as `seg`. A running guest
/// may write these bytes meanwhile, as DMA races a CPU; the hashers only read each byte and make
/// no assumption that it stays put, and the slice never outlives the borrow of `seg`.
unsafe fn guest_bytes(seg: &Segment, off: usize, len: usize) -> &[u8] {
    debug_assert!(off + len <= seg.size());
    // SAFETY: see the function's contract.
    unsafe { std::slice::from_raw_parts(seg.as_ptr().add(off), len) }
}

/// xxh3-64 of each page `first_page..first_page+count` of `seg`.
pub fn hash_pages(seg: &Segment, first_page: u64, count: u64) -> Result<Vec<u64>, PageError> {
    let off = page_span(seg, first_page, count)?;
    let count = count as usize;
    let mut hashes = Vec::with_capacity(count);
    // SAFETY: page_span checked every page is inside the mapping.
    each_page_ahead(seg.as_ptr().wrapping_add(off), count, |i| hashes.push(unsafe { xxh3_64_page(seg.as_ptr().add(off + i * PAGE_SIZE)) }));
    Ok(hashes)
}

/// xxh3-64 of each listed page (indices within `seg`), in the list's order.
pub fn hash_page_list(seg: &Segment, pages: &[u64]) -> Result<Vec<u64>, PageError> {
    pages
        .iter()
        .map(|&page| {
            let off = page_span(seg, page, 1)?;
            // SAFETY: page_span checked the page is inside the mapping.
            Ok(unsafe { xxh3_64_page(seg.as_ptr().add(off)) })
        })
        .collect()
}

/// Feed pages `first..first+count` of `seg` to `hasher`, with zeros in place of pages the
/// residency bitmap says were never touched. The caller has checked the span and the bitmap.
fn feed_pages(hasher: &mut Xxh3, seg: &Segment, first: usize, count: usize, resident: Option<&[u64]>) {
    let is_resident = |page: usize| resident.is_none_or(|r| r[page / 64] >> (page % 64) & 1 != 0);
    let end = first + count;
    let mut page = first;
    while page < end {
        let touched = is_resident(page);
        let mut run_end = page + 1;
        while run_end < end && is_resident(run_end) == touched {
            run_end += 1;
        }
        let mut len = (run_end - page) * PAGE_SIZE;
        if touched {
            // SAFETY: the caller checked the span lies inside the mapping.
            hasher.update(unsafe { guest_bytes(seg, page * PAGE_SIZE, len) });
        } else {
            while len > 0 {
                let n = len.min(ZEROS.len());
                hasher.update(&ZEROS[..n]);
                len -= n;
            }
        }
        page = run_end;
    }
}

fn chunk_pages(chunk_size: u64) -> Result<usize, PageError> {
    if chunk_size == 0 || !chunk_size.is_multiple_of(PAGE_SIZE as u64) || usize::try_from(chunk_size).is_err() {
        return Err(PageError::BadChunkSize { chunk_size });
    }
    Ok(chunk_size as usize / PAGE_SIZE)
}

fn chunk_hashes_inner(seg: &Segment, chunk_size: u64, resident: Option<&[u64]>) -> Result<Vec<u128>, PageError> {
    let per_chunk = chunk_pages(chunk_size)?;
    let pages = seg.pages();
    let mut out = Vec::with_capacity(pages.div_ceil(per_chunk));
    let mut first = 0;
    while first < pages {
        let count = per_chunk.min(pages - first);
        let mut hasher = Xxh3::new();
        feed_pages(&mut hasher, seg, first, count, resident);
        out.push(hasher.digest128());
        first += count;
    }
    Ok(out)
}

/// xxh3-128 of each `chunk_size`-byte chunk of `seg`, in order; the last chunk may be shorter.
pub fn chunk_hashes(seg: &Segment, chunk_size: u64) -> Result<Vec<u128>, PageError> {
    seg.ensure_all()?;
    chunk_hashes_inner(seg, chunk_size, None)
}

/// The same hashes as [`chunk_hashes`], reading only pages set in `resident` (from
/// `resident_bitmap`); the others are hashed as the zeros they are.
pub fn chunk_hashes_resident(seg: &Segment, chunk_size: u64, resident: &[u64]) -> Result<Vec<u128>, PageError> {
    check_bitmap(seg, resident, "residency bitmap")?;
    chunk_hashes_inner(seg, chunk_size, Some(resident))
}

/// xxh3-128 over the bytes of `ranges` (gpa, length in bytes) in the order given. Both sides of a
/// migration must hash the same list; the list itself is not part of the digest.
pub fn ranges_digest(mem: &GuestMemory, ranges: &[(GuestAddress, u64)]) -> Result<u128, PageError> {
    let mut hasher = Xxh3::new();
    for &(gpa, len) in ranges {
        let len = usize::try_from(len).map_err(|_| PageError::BadSendRanges { why: format!("range at {gpa} of {len} bytes") })?;
        let (seg, off) = mem.translate(gpa, len)?;
        // SAFETY: translate checked the range lies inside the segment's mapping.
        hasher.update(unsafe { guest_bytes(seg, off, len) });
    }
    Ok(hasher.digest128())
}

/// The guest's memory digest: xxh3-128 over a description of every segment in order (lowmem,
/// then highmem) that is unique for its contents and cheap for sparse guests. Each segment
/// contributes `b"S" gpa pages` (u64 LE), then its pages in order as runs: a run of all-zero pages
/// as `b"Z" count`, a run of pages holding data as `b"D" count` followed by their bytes. Pages
/// never touched (mincore) are zero without being read, so the cost follows touched memory, not
/// guest size. With `skip_untouched` false every page is read; the digest is the same.
pub fn memory_digest(mem: &GuestMemory, skip_untouched: bool) -> Result<u128, PageError> {
    mem.ensure_all()?;
    let mut hasher = Xxh3::new();
    for seg in mem.segments() {
        if seg.is_closed() {
            return Err(crate::memory::MemoryError::Closed { segment: seg.name().to_string() }.into());
        }
        let resident = if skip_untouched { Some(super::resident_bitmap(seg)?.0) } else { None };
        hasher.update(b"S");
        hasher.update(&seg.gpa().0.to_le_bytes());
        hasher.update(&(seg.pages() as u64).to_le_bytes());
        feed_runs(&mut hasher, seg, resident.as_deref());
    }
    Ok(hasher.digest128())
}

/// Feed a segment's pages as zero runs and data runs (see [`memory_digest`]).
fn feed_runs(hasher: &mut Xxh3, seg: &Segment, resident: Option<&[u64]>) {
    let is_zero = |page: usize| {
        if let Some(r) = resident {
            if r[page / 64] >> (page % 64) & 1 == 0 {
                return true;
            }
        }
        // SAFETY: page < seg.pages(), so the page lies inside the mapping; pages are 4 KiB aligned.
        unsafe { super::zero::is_zero_raw(seg.as_ptr().add(page * PAGE_SIZE), PAGE_SIZE) }
    };
    let pages = seg.pages();
    let mut page = 0;
    while page < pages {
        let zero = is_zero(page);
        let mut end = page + 1;
        while end < pages {
            // A whole untouched word of the residency bitmap is 64 zero pages: skip it unread.
            if let (true, Some(r), 0) = (zero, resident, end % 64) {
                if r[end / 64] == 0 {
                    end = (end + 64).min(pages);
                    continue;
                }
            }
            if is_zero(end) != zero {
                break;
            }
            end += 1;
        }
        hasher.update(if zero { b"Z" } else { b"D" });
        hasher.update(&((end - page) as u64).to_le_bytes());
        if !zero {
            // SAFETY: pages page..end lie inside the mapping.
            hasher.update(unsafe { guest_bytes(seg, page * PAGE_SIZE, (end - page) * PAGE_SIZE) });
        }
        page = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::xxh3::{xxh3_128, xxh3_64};
    use crate::memory::MemoryOptions;

    fn guest_with_pattern() -> GuestMemory {
        let mem = GuestMemory::new(&MemoryOptions::new(4 << 20)).unwrap();
        for page in [0u64, 1, 5, 300, 1023] {
            let fill: Vec<u8> = (0..4096).map(|i| (i as u64 * 31 + page * 7) as u8).collect();
            mem.write(GuestAddress(page * 4096), &fill).unwrap();
        }
        mem
    }

    fn read_all(mem: &GuestMemory, gpa: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read(GuestAddress(gpa), &mut buf).unwrap();
        buf
    }

    #[test]
    fn page_hashes_are_xxh3_of_the_page_bytes() {
        let mem = guest_with_pattern();
        let seg = &mem.segments()[0];
        let hashes = hash_pages(seg, 0, 6).unwrap();
        for (i, h) in hashes.iter().enumerate() {
            assert_eq!(*h, xxh3_64(&read_all(&mem, i as u64 * 4096, 4096)), "page {i}");
        }
        assert_eq!(hashes[2], xxh3_64(&[0u8; 4096]), "an untouched page hashes as zeros");
        assert_eq!(hash_pages(seg, 0, 6).unwrap(), hashes, "stable across calls");
        assert_eq!(hash_page_list(seg, &[5, 0]).unwrap(), vec![hashes[5], hashes[0]]);
        assert!(matches!(hash_pages(seg, 1020, 5), Err(PageError::PagesOutsideSegment { .. })));
        assert!(matches!(hash_pages(seg, u64::MAX, 2), Err(PageError::PagesOutsideSegment { .. })));
    }

    #[test]
    fn known_answers_match_the_python_xxhash_package() {
        // Pinned against python-xxhash 4.x (xxhash.xxh3_64_intdigest(bytes(4096)) and
        // xxh3_128_intdigest(bytes(1 << 20))), so a change of hash function, seed or byte order
        // fails here instead of as checkpoints that no longer verify.
        assert_eq!(xxh3_64(&[0u8; 4096]), 10653106456947493306);
        let mem = GuestMemory::new(&MemoryOptions::new(2 << 20)).unwrap();
        let seg = &mem.segments()[0];
        assert_eq!(hash_pages(seg, 7, 1).unwrap(), vec![10653106456947493306]);
        let expected: u128 = 243160933612861138194559460025337691956;
        assert_eq!(chunk_hashes(seg, 1 << 20).unwrap(), vec![expected, expected]);
        let (resident, _) = super::super::resident_bitmap(seg).unwrap();
        assert_eq!(chunk_hashes_resident(seg, 1 << 20, &resident).unwrap(), vec![expected, expected]);
    }

    #[test]
    fn chunk_hashes_match_one_shot_hashes_and_ignore_residency() {
        let mem = guest_with_pattern();
        let seg = &mem.segments()[0];
        let chunk = 1536 * 1024; // 384 pages: the last of 3 chunks is short
        let hashes = chunk_hashes(seg, chunk).unwrap();
        assert_eq!(hashes.len(), 3);
        assert_eq!(hashes[0], xxh3_128(&read_all(&mem, 0, chunk as usize)));
        assert_eq!(hashes[2], xxh3_128(&read_all(&mem, 2 * chunk, (4 << 20) - 2 * chunk as usize)));
        let (resident, _) = super::super::resident_bitmap(seg).unwrap();
        assert_eq!(chunk_hashes_resident(seg, chunk, &resident).unwrap(), hashes);
        assert!(matches!(chunk_hashes(seg, 1000), Err(PageError::BadChunkSize { .. })));
    }

    #[test]
    fn memory_digest_covers_every_segment_and_sees_one_byte() {
        let mut opts = MemoryOptions::new(8 << 20);
        opts.lowmem_limit = 4 << 20;
        let mem = GuestMemory::new(&opts).unwrap();
        mem.write(GuestAddress(4096), &[1, 2, 3]).unwrap();
        let digest = memory_digest(&mem, false).unwrap();
        assert_eq!(memory_digest(&mem, true).unwrap(), digest, "skipping untouched pages changes nothing");
        // A touched page that holds zeros is the same memory as an untouched one.
        mem.write(GuestAddress(9 * 4096), &[0u8; 4096]).unwrap();
        assert_eq!(memory_digest(&mem, true).unwrap(), digest);
        mem.write(GuestAddress(crate::memory::HIGHMEM_BASE + (3 << 20)), &[1]).unwrap();
        let with_high = memory_digest(&mem, true).unwrap();
        assert_ne!(with_high, digest, "one byte in highmem changes the digest");

        // The same bytes one page further on are different memory.
        let moved = GuestMemory::new(&opts).unwrap();
        moved.write(GuestAddress(2 * 4096), &[1, 2, 3]).unwrap();
        moved.write(GuestAddress(crate::memory::HIGHMEM_BASE + (3 << 20)), &[1]).unwrap();
        assert_ne!(memory_digest(&moved, true).unwrap(), with_high);
        assert_eq!(memory_digest(&moved, true).unwrap(), memory_digest(&moved, false).unwrap());
    }
}
