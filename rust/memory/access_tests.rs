//! Guest bytes through the checked accessors, and dirty logging through the `DirtyLog` trait: one
//! workload run against every backend this kernel offers, which must all report the same pages.

use super::*;
use crate::dirty::{kernel_offers_tracking, Backend, TrackingChoice};

const MIB: u64 = 1 << 20;

/// 8 MiB: lowmem 4 MiB, highmem 4 MiB at 4 GiB.
fn memory(tracking: TrackingChoice) -> GuestMemory {
    let opts = MemoryOptions { memsize: 8 * MIB, wired: false, lowmem_limit: 4 * MIB, tracking, backing: Backing::Anonymous };
    GuestMemory::new(&opts).unwrap()
}

#[test]
fn every_safe_accessor_refuses_a_range_outside_its_segment() {
    let mem = memory(TrackingChoice::Soft);
    let seg = &mem.segments()[0];
    let size = seg.size();
    let mut out = [0u8; 16];
    let err = seg.read(size - 8, &mut out).unwrap_err();
    assert_eq!(err.to_string(), "access at offset 0x3ffff8 of 16 bytes does not fit segment 'lowmem' (0x400000 bytes)");
    assert_eq!(err.errno(), libc::EFAULT);
    assert!(matches!(seg.write(usize::MAX, &[1]), Err(MemoryError::OutOfSegment { .. })), "an offset that overflows");
    assert!(matches!(seg.write(size, &[1]), Err(MemoryError::OutOfSegment { .. })));
    assert!(matches!(seg.write_untracked(size - 1, &[1, 2]), Err(MemoryError::OutOfSegment { .. })));
    assert!(matches!(seg.load::<8>(size - 4), Err(MemoryError::OutOfSegment { .. })));
    assert!(matches!(seg.store::<8>(size - 7, [9; 8]), Err(MemoryError::OutOfSegment { .. })));
    assert_eq!(seg.dirty_log().count().unwrap(), 0, "a refused write marks nothing");
    // The last bytes of the segment are fine, and an empty access at its very end too.
    seg.store::<8>(size - 8, 0x1122_3344_5566_7788u64.to_le_bytes()).unwrap();
    assert_eq!(u64::from_le_bytes(seg.load::<8>(size - 8).unwrap()), 0x1122_3344_5566_7788);
    seg.read(size, &mut []).unwrap();
    assert_eq!(seg.dirty_log().count().unwrap(), 1);
}

/// What the workload below writes through vmmpy, as (segment, page) pairs.
const EXPECTED: [(usize, u64); 9] = [(0, 0), (0, 1), (0, 10), (0, 20), (0, 21), (0, 40), (0, 41), (0, 42), (1, 5)];

/// Dirty pages as (segment, page) pairs.
type Pages = Vec<(usize, u64)>;

/// Writes of every kind vmmpy makes, then a harvest; returns the pages harvested, the count
/// before the harvest, and what a second harvest found.
fn workload(mem: &GuestMemory) -> (Pages, u64, Pages) {
    let (low, high) = (&mem.segments()[0], &mem.segments()[1]);
    mem.write(GuestAddress(4095), &[1, 2]).unwrap(); // straddles pages 0 and 1
    mem.write(GuestAddress(10 * 4096), &[7; 4096]).unwrap();
    low.store::<8>(20 * 4096 + 4092, [3; 8]).unwrap(); // a vCPU store straddling pages 20 and 21
    low.write(40 * 4096 + 1, &[5; 2 * 4096]).unwrap(); // pages 40..42
    mem.write(GuestAddress(HIGHMEM_BASE + 5 * 4096 + 100), b"high").unwrap();
    mem.write_untracked(GuestAddress(30 * 4096), &[9; 64]).unwrap(); // restore: not a guest write
                                                                     // A restore path filling memory behind the log's back (read(2) does this), then forgetting it.
                                                                     // SAFETY: page 50 lies inside lowmem, which is mapped and accessible.
    unsafe { low.as_ptr().add(50 * 4096).write_volatile(1) };
    mem.mark_clean_range(GuestAddress(50 * 4096), 4096).unwrap();
    let count = mem.dirty_count().unwrap();
    let harvest = |mem: &GuestMemory| {
        let mut pages = Vec::new();
        for (i, seg) in [low, high].into_iter().enumerate() {
            let mut words = vec![0u64; seg.pages().div_ceil(64)];
            let n = mem.get_and_clear_dirty_segment(i, &mut words).unwrap();
            let mut found = Vec::new();
            crate::dirty::bitmap_to_pages(&words, 0, &mut found);
            assert_eq!(n, found.len(), "segment {i}: the count returned and the bits set");
            pages.extend(found.into_iter().map(|p| (i, p)));
        }
        pages
    };
    let first = harvest(mem);
    (first, count, harvest(mem))
}

#[test]
fn every_backend_on_this_kernel_reports_the_same_pages() {
    let mut choices = vec![(TrackingChoice::Soft, Backend::Soft)];
    match kernel_offers_tracking() {
        Ok(()) => choices.push((TrackingChoice::Kernel, Backend::Kernel)),
        Err(why) => eprintln!("skipping the kernel backend: the kernel does not offer it: {why}"),
    }
    for (choice, backend) in choices {
        let mem = memory(choice);
        assert_eq!(mem.backend(), backend);
        assert!(mem.segments().iter().all(|s| s.dirty_log().backend() == backend), "every segment logs with {backend}");
        let (first, count, second) = workload(&mem);
        assert_eq!(first, EXPECTED.to_vec(), "{backend}: the first harvest");
        assert_eq!(count, EXPECTED.len() as u64, "{backend}: the count before it");
        assert!(second.is_empty(), "{backend}: a second harvest with no writes: {second:?}");
    }
}
