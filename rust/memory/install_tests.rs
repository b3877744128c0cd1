//! Installing pages without zeroing (`install.rs`): the bytes land exactly, over present pages
//! too; other touches of pages not installed see zeros and never hang; the registration lives
//! exactly as long as its guards; segments that cannot take it say so and are left alone.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::*;
use crate::dirty::{kernel_offers_tracking, TrackingChoice};

const MIB: u64 = 1 << 20;

fn memory(tracking: TrackingChoice, wired: bool, backing: Backing) -> GuestMemory {
    GuestMemory::new(&MemoryOptions { memsize: 8 * MIB, wired, lowmem_limit: 8 * MIB, tracking, backing }).unwrap()
}

fn pattern(pages: usize, seed: u8) -> Vec<u8> {
    (0..pages * PAGE_SIZE).map(|i| (i / 7) as u8 ^ seed).collect()
}

fn bytes_at(seg: &Segment, off: usize, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    seg.read(off, &mut out).unwrap();
    out
}

#[test]
fn installed_pages_hold_exactly_the_bytes_given_fresh_or_present() {
    let mem = memory(TrackingChoice::Soft, false, Backing::Anonymous);
    let seg = &mem.segments()[0];
    let guard = seg.begin_install().unwrap_or_else(|| panic!("refused: {:?}", seg.install_refused()));
    assert!(guard.can_install(), "begin_install registers");
    let installer = &guard;
    // Fresh pages.
    let first = pattern(64, 1);
    unsafe { installer.install(16 * PAGE_SIZE, &first) };
    // A run that starts on fresh pages and runs into present ones (written the plain way), then
    // fresh ones again: each page ends with the new bytes.
    seg.write(100 * PAGE_SIZE, &pattern(3, 9)).unwrap();
    seg.write(104 * PAGE_SIZE, &pattern(1, 9)).unwrap();
    let second = pattern(10, 2);
    unsafe { installer.install(98 * PAGE_SIZE, &second) };
    // A later round over the very same pages (all present).
    let third = pattern(64, 3);
    unsafe { installer.install(16 * PAGE_SIZE, &third) };
    drop(guard);
    assert_eq!(seg.install_open(), None, "the last guard ends the registration");
    // 64 fresh; then 98 and 99 fresh, 100 and 101 present, and after two present pages in a row
    // the rest of the run copied plainly; then none fresh over the 64 present.
    assert_eq!(seg.installed_pages(), 64 + 2);
    assert_eq!(bytes_at(seg, 16 * PAGE_SIZE, third.len()), third);
    assert_eq!(bytes_at(seg, 98 * PAGE_SIZE, second.len()), second);
    assert_eq!(bytes_at(seg, 15 * PAGE_SIZE, PAGE_SIZE), vec![0; PAGE_SIZE], "a page never written reads zero");
    let resident = seg.resident().unwrap();
    assert!(resident[16..80].iter().all(|&r| r) && resident[98..108].iter().all(|&r| r));
    assert!(!resident[200], "nothing else was populated");
}

#[test]
fn other_touches_of_missing_pages_see_zeros_while_installing_and_never_hang() {
    let mem = memory(TrackingChoice::Soft, false, Backing::Anonymous);
    let seg = &mem.segments()[0];
    let guard = seg.begin_install().expect("installation");
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let toucher = s.spawn(|| {
            // A device or a view reading and writing pages nobody installed: answered by the
            // handler thread with zeros, then written as usual.
            let read = bytes_at(seg, 300 * PAGE_SIZE, PAGE_SIZE);
            seg.write(301 * PAGE_SIZE + 5, b"guest").unwrap();
            done.store(true, Ordering::SeqCst);
            read
        });
        for _ in 0..500 {
            if done.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(done.load(Ordering::SeqCst), "a touch of a missing page waited more than 5 s");
        assert_eq!(toucher.join().unwrap(), vec![0; PAGE_SIZE]);
    });
    assert!(seg.install_open().unwrap() >= 2, "the handler answered both touches");
    // Installing over the page the other thread wrote replaces it whole.
    let page = pattern(1, 4);
    unsafe { guard.install(301 * PAGE_SIZE, &page) };
    drop(guard);
    assert_eq!(bytes_at(seg, 301 * PAGE_SIZE, PAGE_SIZE), page);
    let mut after = [0u8; 5];
    seg.read(302 * PAGE_SIZE, &mut after).unwrap();
    assert_eq!(after, [0; 5], "after the registration a fresh page faults in as ever");
}

#[test]
fn the_registration_lasts_while_any_guard_holds_it_and_comes_back_after() {
    let mem = memory(TrackingChoice::Soft, false, Backing::Anonymous);
    let seg = &mem.segments()[0];
    assert!(seg.current_install().is_none(), "nothing open: nothing to join");
    let hold = seg.hold_install().expect("a hold on an eligible segment");
    assert!(!hold.can_install() && seg.install_open().is_none(), "a hold registers nothing");
    let batch = seg.begin_install().expect("begin");
    let small = seg.current_install().expect("a small batch joins the open one");
    assert!(small.can_install());
    drop(batch);
    drop(small);
    assert!(seg.install_open().is_some(), "the hold keeps it open between batches");
    drop(hold);
    assert!(seg.install_open().is_none(), "closed with the last guard");
    for seed in 0..3 {
        let again = seg.begin_install().expect("registers again after it was closed");
        let data = pattern(2, seed);
        unsafe { again.install(500 * PAGE_SIZE, &data) };
        drop(again);
        assert_eq!(bytes_at(seg, 500 * PAGE_SIZE, data.len()), data);
    }
    assert_eq!(seg.install_refused(), None);
}

#[test]
fn segments_that_cannot_take_it_are_left_alone() {
    let wired = memory(TrackingChoice::Soft, true, Backing::Anonymous);
    assert!(wired.segments()[0].begin_install().is_none(), "wired memory is populated up front");
    let memfd = memory(TrackingChoice::Soft, false, Backing::Memfd);
    assert!(memfd.segments()[0].begin_install().is_none(), "a memfd's pages live in the file");
    if kernel_offers_tracking().is_ok() {
        // The kernel dirty backend registered the range on its own userfaultfd first: the kernel
        // refuses a second registration, which is remembered and named; writes go on as before.
        let kernel = memory(TrackingChoice::Kernel, false, Backing::Anonymous);
        let seg = &kernel.segments()[0];
        assert!(seg.begin_install().is_none());
        let why = seg.install_refused().expect("the refusal is kept");
        assert!(why.contains("UFFDIO_REGISTER"), "{why}");
        assert!(seg.begin_install().is_none(), "not asked again");
        seg.write(0, b"still writable").unwrap();
    }
}
