//! Live snapshots: the file holds memory as it was when the capture was armed, whatever the guest
//! wrote meanwhile, through every write path; the capture lifts on success, failure and drop.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::dirty::TrackingChoice;
use crate::memory::{Backing, GuestAddress, GuestMemory, LiveStats, MemoryOptions, HIGHMEM_BASE, PAGE_SIZE};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = MIB;

fn guest(tracking: TrackingChoice) -> GuestMemory {
    let opts = MemoryOptions { memsize: 13 * MIB, wired: false, lowmem_limit: 6 * MIB + 512 * 1024, tracking, backing: Backing::Anonymous };
    let mem = GuestMemory::new(&opts).unwrap();
    // Every other page of lowmem holds data, and a few of highmem; the rest is untouched.
    for page in (0..1664u64).step_by(2) {
        mem.write(GuestAddress(page * 4096 + 8), &(page + 1).to_le_bytes()).unwrap();
    }
    mem.write(GuestAddress(HIGHMEM_BASE + 4096 * 7), &[7u8; 4096]).unwrap();
    mem
}

fn temp_file(tag: &str) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("vmm-live-{}-{tag}", std::process::id()));
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

fn image(mem: &GuestMemory) -> Vec<u8> {
    let mut out = Vec::new();
    for seg in mem.segments() {
        let mut bytes = vec![0u8; seg.size()];
        seg.read(0, &mut bytes).unwrap();
        out.extend_from_slice(&bytes);
    }
    out
}

fn file_bytes(f: &std::fs::File, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    f.read_exact_at(&mut out, 0).unwrap();
    out
}

/// The pages a writer thread stores to while the file is written: every page of both segments,
/// in an order that runs ahead of and behind the snapshot writer.
fn scribble(mem: &GuestMemory, round: u64) {
    let low = mem.segments()[0].pages() as u64;
    let high = mem.segments()[1].pages() as u64;
    for i in 0..low {
        let page = (i * 7919) % low;
        mem.write(GuestAddress(page * 4096 + 100), &(round << 32 | page).to_le_bytes()).unwrap();
    }
    for page in (0..high).rev() {
        mem.segments()[1].store::<8>(page as usize * PAGE_SIZE + 200, (round << 40 | page).to_le_bytes()).unwrap();
    }
}

fn live_write_while_scribbling(tracking: TrackingChoice, limit_pages: usize) -> (Vec<u8>, WriteStats, LiveStats, std::fs::File) {
    let mem = Arc::new(guest(tracking));
    let before = image(&mem);
    let hashes_before = memory_chunk_hashes(&mem, CHUNK).unwrap();
    let capture = mem.arm_live_capture(limit_pages).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (mem, stop) = (mem.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut round = 1;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && round < 1000 {
                scribble(&mem, round);
                round += 1;
            }
            round
        })
    };
    // The guest writes first, whatever the scheduler does: its writes are copying pages out, and
    // with a side store of a few pages it is already waiting for room (which only the snapshot
    // writer makes). Bounded: 10 s.
    let writing = |s: &LiveStats| if limit_pages <= 4 { s.throttled_writes > 0 } else { s.copied_pages > 0 };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !writing(&capture.stats()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(writing(&capture.stats()), "the writer thread never wrote: {:?}", capture.stats());
    let f = temp_file("race");
    let stats = write_memory_file_live(&mem, &capture, f.as_raw_fd(), CHUNK, None, &AtomicBool::new(false)).unwrap();
    stop.store(true, Ordering::Relaxed);
    assert!(writer.join().unwrap() > 1, "the writer thread made at least one round");
    assert_ne!(image(&mem), before, "the guest changed its memory during the write");
    assert_eq!(stats.chunk_hashes, hashes_before);
    assert!(!mem.segments()[0].live_armed(), "lifted when the write returned");
    (before, stats, capture.stats(), f)
}

#[test]
fn the_file_holds_memory_as_armed_while_a_writer_races_the_snapshot() {
    for tracking in [TrackingChoice::Soft, TrackingChoice::Auto] {
        let (before, stats, live, f) = live_write_while_scribbling(tracking, 1 << 20);
        assert_eq!(file_bytes(&f, before.len()), before);
        assert!(live.copied_pages > 0, "{live:?}");
        assert_eq!(stats.data_pages, 833, "{stats:?}");
    }
}

#[test]
fn a_small_copy_limit_throttles_the_writer_and_the_file_is_still_exact() {
    let (before, _, live, f) = live_write_while_scribbling(TrackingChoice::Soft, 4);
    assert_eq!(file_bytes(&f, before.len()), before);
    assert!(live.peak_held_pages <= 4, "{live:?}");
    assert!(live.throttled_writes > 0, "{live:?}");
}

#[test]
fn every_write_path_copies_before_writing() {
    let mem = guest(TrackingChoice::Soft);
    let before = image(&mem);
    let capture = mem.arm_live_capture(1024).unwrap();
    let low = &mem.segments()[0];
    mem.write(GuestAddress(0), &[0xaa; 16]).unwrap(); // API write
    mem.write_untracked(GuestAddress(4096), &[0xbb; 16]).unwrap(); // restore/receive write
    low.store::<8>(2 * 4096, [0xcc; 8]).unwrap(); // vCPU store
    assert!(low.drop_pages(4 * 4096, 4096)); // page given back
    assert_eq!(capture.stats().copied_pages, 4);
    assert_eq!(capture.held_pages(), 4);
    mem.write(GuestAddress(0), &[0xdd; 16]).unwrap(); // a second write copies nothing
    assert_eq!(capture.stats().copied_pages, 4);
    let f = temp_file("paths");
    write_memory_file_live(&mem, &capture, f.as_raw_fd(), CHUNK, None, &AtomicBool::new(false)).unwrap();
    assert_eq!(file_bytes(&f, before.len()), before);
    assert_eq!(capture.held_pages(), 0);
}

#[test]
fn a_cancelled_write_lifts_the_protection_and_a_new_capture_can_be_armed() {
    let mem = guest(TrackingChoice::Soft);
    let capture = mem.arm_live_capture(2).unwrap();
    assert!(mem.arm_live_capture(2).is_err(), "one capture at a time");
    mem.write(GuestAddress(0), &[1; 8]).unwrap();
    mem.write(GuestAddress(4096), &[1; 8]).unwrap();
    let f = temp_file("cancel");
    let err = write_memory_file_live(&mem, &capture, f.as_raw_fd(), CHUNK, None, &AtomicBool::new(true)).unwrap_err();
    assert!(err.to_string().contains("cancelled"), "{err}");
    // Lifted: writes past the limit go straight through, nothing is held.
    for page in 0..64u64 {
        mem.write(GuestAddress(page * 4096), &[2; 8]).unwrap();
    }
    assert_eq!(capture.held_pages(), 0);
    drop(capture);
    let again = mem.arm_live_capture(2).unwrap();
    drop(again); // dropping lifts too
    for page in 0..64u64 {
        mem.write(GuestAddress(page * 4096), &[3; 8]).unwrap();
    }
}

#[test]
fn a_writer_waiting_for_room_is_released_when_the_snapshot_fails() {
    let mem = Arc::new(guest(TrackingChoice::Soft));
    let capture = Arc::new(mem.arm_live_capture(1).unwrap());
    mem.write(GuestAddress(0), &[1; 8]).unwrap(); // fills the side store
    let waiter = {
        let mem = mem.clone();
        std::thread::spawn(move || mem.write(GuestAddress(4096), &[1; 8]).unwrap())
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!waiter.is_finished(), "the second first-write waits for room");
    capture.finish();
    waiter.join().unwrap();
    let mut back = [0u8; 8];
    mem.read(GuestAddress(4096), &mut back).unwrap();
    assert_eq!(back, [1; 8]);
}

#[test]
fn lazily_restored_memory_not_loaded_is_refused() {
    let mem = guest(TrackingChoice::Soft);
    let f = temp_file("lazy");
    let stats = write_memory_file(&mem, f.as_raw_fd(), CHUNK, None).unwrap();
    let opts = MemoryOptions::new(13 * MIB);
    let opts = MemoryOptions { lowmem_limit: 6 * MIB + 512 * 1024, ..opts };
    let lazy = lazy_memory(&opts, f.as_raw_fd(), stats.chunk_hashes, CHUNK, "test").unwrap();
    let err = lazy.arm_live_capture(16).err().expect("refused").to_string();
    assert!(err.contains("lazily restored"), "{err}");
    lazy.ensure_all().unwrap();
    drop(lazy.arm_live_capture(16).unwrap());
}
