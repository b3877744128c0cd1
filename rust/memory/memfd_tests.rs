//! memfd-backed guest memory: the same layout and accessors as anonymous memory, its pages shared
//! with a second mapping of the same descriptors (what a local migration's destination makes),
//! zero ranges that really read as zero, and dirty tracking on shared pages.

use std::os::fd::OwnedFd;

use super::*;
use crate::dirty::{kernel_offers_tracking, TrackingChoice};

const MIB: u64 = 1 << 20;

fn opts(tracking: TrackingChoice, wired: bool) -> MemoryOptions {
    MemoryOptions { memsize: 8 * MIB, wired, lowmem_limit: 4 * MIB, tracking, backing: Backing::Memfd }
}

fn dup_fds(mem: &GuestMemory) -> Vec<OwnedFd> {
    mem.segments().iter().map(|s| s.memfd().expect("a memfd segment").try_clone_to_owned().unwrap()).collect()
}

fn read_vec(mem: &GuestMemory, gpa: GuestAddress, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    mem.read(gpa, &mut out).unwrap();
    out
}

fn harvest(mem: &GuestMemory) -> Vec<(usize, u64)> {
    let mut pages = Vec::new();
    for (i, seg) in mem.segments().iter().enumerate() {
        let mut words = vec![0u64; seg.pages().div_ceil(64)];
        mem.get_and_clear_dirty_segment(i, &mut words).unwrap();
        let mut out = Vec::new();
        crate::dirty::bitmap_to_pages(&words, 0, &mut out);
        pages.extend(out.into_iter().map(|p| (i, p)));
    }
    pages
}

#[test]
fn memfd_memory_has_lowmem_and_highmem_wired_or_not_and_costs_nothing_untouched() {
    for wired in [false, true] {
        let mem = GuestMemory::new(&opts(TrackingChoice::Soft, wired)).unwrap();
        assert_eq!(mem.backing(), Backing::Memfd);
        assert_eq!(mem.segments().len(), 2);
        for seg in mem.segments() {
            assert_eq!(seg.backing(), Backing::Memfd);
            assert!(seg.memfd().is_some());
            assert_eq!(seg.wired(), wired);
        }
        let resident = mem.segments()[1].resident().unwrap().iter().filter(|&&r| r).count();
        assert_eq!(resident, if wired { 1024 } else { 0 }, "wired={wired}");
        mem.write(GuestAddress(HIGHMEM_BASE + 4096), b"high").unwrap();
        assert_eq!(read_vec(&mem, GuestAddress(HIGHMEM_BASE + 4096), 4), b"high");
    }
    let anon = GuestMemory::new(&MemoryOptions { backing: Backing::Anonymous, ..opts(TrackingChoice::Soft, false) }).unwrap();
    assert!(anon.segments().iter().all(|s| s.memfd().is_none() && s.backing() == Backing::Anonymous));
}

#[test]
fn a_second_mapping_of_the_descriptors_shares_every_page() {
    let src = GuestMemory::new(&opts(TrackingChoice::Soft, false)).unwrap();
    src.write(GuestAddress(3 * 4096), b"before").unwrap();
    let dst = GuestMemory::from_fds(&opts(TrackingChoice::Soft, false), dup_fds(&src)).unwrap();
    assert_eq!(read_vec(&dst, GuestAddress(3 * 4096), 6), b"before");
    assert!(harvest(&dst).is_empty(), "a new mapping starts with nothing dirty");
    dst.write(GuestAddress(HIGHMEM_BASE + 7 * 4096), b"after").unwrap();
    assert_eq!(read_vec(&src, GuestAddress(HIGHMEM_BASE + 7 * 4096), 5), b"after");
    assert_eq!(harvest(&dst), vec![(1, 7)]);
    for (a, b) in src.segments().iter().zip(dst.segments()) {
        assert_eq!(a.memfd_identity(), b.memfd_identity());
    }
    // Touched pages are the memfd's, so the new mapping sees them as resident before it maps them.
    assert!(dst.segments()[0].resident().unwrap()[3]);
}

#[test]
fn descriptors_of_the_wrong_size_or_count_are_refused_by_segment() {
    let src = GuestMemory::new(&opts(TrackingChoice::Soft, false)).unwrap();
    let mut fds = dup_fds(&src);
    fds.swap(0, 1);
    let mut o = opts(TrackingChoice::Soft, false);
    o.lowmem_limit = 2 * MIB;
    let Err(err) = GuestMemory::from_fds(&o, dup_fds(&src)) else { panic!("accepted") };
    assert!(err.to_string().contains("the memfd received for segment 'lowmem' of 4 MiB"), "{err}");
    assert!(err.to_string().contains("does not match the segment's size of 2 MiB"), "{err}");
    let Err(err) = GuestMemory::from_fds(&opts(TrackingChoice::Soft, false), fds.into_iter().take(1).collect()) else { panic!("accepted") };
    assert!(err.to_string().contains("1 memory descriptor(s)") && err.to_string().contains("lowmem, highmem"), "{err}");
    let file = std::fs::File::open("/proc/self/stat").unwrap();
    let not_memfd = vec![OwnedFd::from(file), dup_fds(&src).pop().unwrap()];
    let Err(err) = GuestMemory::from_fds(&opts(TrackingChoice::Soft, false), not_memfd) else { panic!("accepted") };
    assert!(err.to_string().contains("segment 'lowmem'"), "{err}");
}

#[test]
fn dropped_pages_read_as_zero_on_every_mapping() {
    let src = GuestMemory::new(&opts(TrackingChoice::Soft, false)).unwrap();
    let dst = GuestMemory::from_fds(&opts(TrackingChoice::Soft, false), dup_fds(&src)).unwrap();
    src.write(GuestAddress(5 * 4096), &[0xAB; 4096]).unwrap();
    assert!(src.segments()[0].drop_pages(5 * 4096, 4096));
    assert_eq!(read_vec(&src, GuestAddress(5 * 4096), 4096), vec![0; 4096]);
    assert_eq!(read_vec(&dst, GuestAddress(5 * 4096), 4096), vec![0; 4096]);
}

#[test]
fn the_kernel_backend_sees_raw_writes_to_shared_pages_in_each_mapping() {
    if let Err(why) = kernel_offers_tracking() {
        eprintln!("skipped: {why}");
        return;
    }
    let src = GuestMemory::new(&opts(TrackingChoice::Kernel, false)).unwrap();
    let low = &src.segments()[0];
    // SAFETY: pages 2 and 9 lie inside lowmem, mapped read-write.
    unsafe {
        low.as_ptr().add(2 * 4096).write_volatile(1);
        low.as_ptr().add(9 * 4096 + 8).write_volatile(2);
    }
    assert_eq!(harvest(&src), vec![(0, 2), (0, 9)]);
    assert!(harvest(&src).is_empty());
    let dst = GuestMemory::from_fds(&opts(TrackingChoice::Kernel, false), dup_fds(&src)).unwrap();
    assert!(harvest(&dst).is_empty(), "pages the source touched are not dirty in a new mapping");
    let dlow = &dst.segments()[0];
    // SAFETY: as above, in the second mapping: page 2 (touched before) and page 30 (never).
    unsafe {
        dlow.as_ptr().add(2 * 4096).write_volatile(3);
        dlow.as_ptr().add(30 * 4096).write_volatile(4);
    }
    assert_eq!(harvest(&dst), vec![(0, 2), (0, 30)]);
}
