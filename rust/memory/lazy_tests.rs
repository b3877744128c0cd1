//! Lazily restored memory with a source in memory: what loads when, what a bad chunk does, and
//! that a chunk nobody asked for is not even mapped readable.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::*;
use crate::dirty::TrackingChoice;

const MIB: u64 = 1 << 20;
const CHUNK: usize = 1 << 20;

/// An image whose byte i is (i / 4096 % 251 + 1) on every third page and zero elsewhere; chunks
/// listed in `bad` fail as a hash mismatch would. Counts its loads.
struct Pattern {
    bad: Vec<usize>,
    loads: Arc<AtomicUsize>,
}

fn byte_at(image_offset: u64) -> u8 {
    let page = image_offset / 4096;
    if page.is_multiple_of(3) {
        (page % 251 + 1) as u8
    } else {
        0
    }
}

impl ChunkSource for Pattern {
    fn name(&self) -> &str {
        "pattern"
    }
    unsafe fn load(&self, index: usize, parts: &[ChunkPart]) -> Result<(), ChunkFault> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        for part in parts {
            for i in 0..part.len {
                let b = byte_at((index * CHUNK + part.chunk_offset + i) as u64);
                if b != 0 {
                    // SAFETY: inside the part, writable by the contract.
                    unsafe { *part.ptr.add(i) = b };
                }
            }
        }
        if self.bad.contains(&index) {
            return Err(ChunkFault::Mismatch);
        }
        Ok(())
    }
}

/// 8 MiB: lowmem 2.5 MiB (so chunk 2 spans lowmem and highmem), highmem 5.5 MiB.
fn try_lazy(bad: &[usize], tracking: TrackingChoice) -> Result<(GuestMemory, Arc<AtomicUsize>), MemoryError> {
    let loads = Arc::new(AtomicUsize::new(0));
    let opts = MemoryOptions { memsize: 8 * MIB, wired: false, lowmem_limit: 2 * MIB + MIB / 2, tracking, backing: Backing::Anonymous };
    let mem = GuestMemory::lazy(&opts, CHUNK, Box::new(Pattern { bad: bad.to_vec(), loads: loads.clone() }))?;
    Ok((mem, loads))
}

fn lazy(bad: &[usize], tracking: TrackingChoice) -> (GuestMemory, Arc<AtomicUsize>) {
    try_lazy(bad, tracking).unwrap()
}

fn read(mem: &GuestMemory, gpa: u64) -> Result<u8, MemoryError> {
    let mut b = [0u8];
    mem.read(GuestAddress(gpa), &mut b).map(|_| b[0])
}

/// The protection /proc/self/maps shows for the mapping holding `ptr`, e.g. "---p".
fn protection_at(ptr: *const u8) -> String {
    let addr = ptr as u64;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let (range, rest) = line.split_once(' ').unwrap();
        let (a, b) = range.split_once('-').unwrap();
        if (u64::from_str_radix(a, 16).unwrap()..u64::from_str_radix(b, 16).unwrap()).contains(&addr) {
            return rest[..4].to_string();
        }
    }
    panic!("{addr:#x} is not mapped");
}

#[test]
fn chunks_load_once_when_first_needed_and_not_before() {
    let (mem, loads) = lazy(&[], TrackingChoice::Soft);
    let low = &mem.segments()[0];
    assert_eq!(protection_at(low.as_ptr()), "---p", "an unloaded chunk cannot be read by anyone who forgets to ask");
    assert_eq!(read(&mem, 3 * 4096).unwrap(), 4);
    assert_eq!(read(&mem, 6 * 4096 + 17).unwrap(), 7);
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(protection_at(low.as_ptr()), "rw-p");
    assert_eq!(protection_at(low.as_ptr().wrapping_add(CHUNK)), "---p");
    // Chunk 2 spans both segments: one load fills both parts.
    let high_page0 = (2 * MIB + MIB / 2) / 4096; // image page of highmem's first byte
    assert_eq!(read(&mem, HIGHMEM_BASE).unwrap(), byte_at(high_page0 * 4096));
    assert_eq!(read(&mem, 2 * MIB + 4096 * 2).unwrap(), byte_at(2 * MIB + 4096 * 2));
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    assert_eq!(mem.lazy_image().unwrap().counts(), (2, 0));
    assert!(!mem.is_complete());
    mem.ensure_all().unwrap();
    assert!(mem.is_complete());
    assert_eq!(loads.load(Ordering::SeqCst), 8);
    for gpa in [0, 4096 * 300, MIB * 2 + 4096 * 100, HIGHMEM_BASE + 4096 * 1000] {
        let image = if gpa >= HIGHMEM_BASE { gpa - HIGHMEM_BASE + 2 * MIB + MIB / 2 } else { gpa };
        assert_eq!(read(&mem, gpa).unwrap(), byte_at(image), "gpa {gpa:#x}");
    }
}

#[test]
fn the_loaded_prefix_grows_only_over_chunks_loaded_from_zero_on() {
    let (mem, _) = lazy(&[], TrackingChoice::Soft);
    assert_eq!(mem.loaded_prefix(), 0);
    read(&mem, 1 << 20).unwrap(); // chunk 1: not a prefix while chunk 0 is not loaded
    assert_eq!(mem.loaded_prefix(), 0);
    read(&mem, HIGHMEM_BASE + MIB / 2).unwrap(); // chunk 3 (in highmem)
    read(&mem, 0).unwrap();
    assert_eq!(mem.loaded_prefix(), 2 * CHUNK as u64);
    read(&mem, 2 * (1 << 20)).unwrap(); // chunk 2 closes the gap: 0..4 are all loaded
    assert_eq!(mem.loaded_prefix(), 4 * CHUNK as u64);
    mem.ensure_all().unwrap();
    assert_eq!(mem.loaded_prefix(), u64::MAX, "complete memory needs no check anywhere");
}

#[test]
fn threads_racing_for_one_chunk_load_it_once() {
    let (mem, loads) = lazy(&[], TrackingChoice::Soft);
    let mem = Arc::new(mem);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let mem = mem.clone();
            std::thread::spawn(move || read(&mem, 4096 * 3 * (t + 1)).unwrap())
        })
        .collect();
    let got: Vec<u8> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(got, vec![4, 7, 10, 13]);
    assert_eq!(loads.load(Ordering::SeqCst), 1);
}

#[test]
fn a_bad_chunk_fails_every_access_names_its_range_and_rings_once() {
    let (mem, loads) = lazy(&[2], TrackingChoice::Soft);
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two fresh fds into the array we own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are ours alone from here on.
    let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    mem.lazy_image().unwrap().notify_on_failure(tx);
    let expected = "pattern: memory chunk 2 (file bytes 0x200000..0x300000, guest-physical 0x200000..0x280000 and \
                    0x100000000..0x100080000) does not match its recorded hash; the guest may not use it";
    for gpa in [2 * MIB, HIGHMEM_BASE + 100, 2 * MIB + 4096 * 3] {
        let err = read(&mem, gpa).unwrap_err();
        assert_eq!(err.to_string(), expected);
        assert!(matches!(err, MemoryError::ChunkUnavailable { chunk: 2, errno: libc::EBADMSG, .. }));
    }
    assert!(mem.write(GuestAddress(2 * MIB), &[1]).is_err());
    assert_eq!(loads.load(Ordering::SeqCst), 1, "a failed chunk is not tried again");
    let seg = &mem.segments()[0];
    assert_eq!(protection_at(seg.as_ptr().wrapping_add(2 * CHUNK)), "---p", "nor left readable");
    let mut buf = [0u8; 8];
    // SAFETY: reading into our own buffer from our own pipe.
    let n = unsafe { libc::read(std::os::fd::AsRawFd::as_raw_fd(&rx), buf.as_mut_ptr() as *mut libc::c_void, 8) };
    assert_eq!(n, 1, "the notifier is written once");
    assert_eq!(read(&mem, 4096 * 3).unwrap(), 4, "other chunks still load");
    assert_eq!(mem.ensure_all().unwrap_err().to_string(), expected);
    assert!(!mem.is_complete(), "memory with a bad chunk is never complete");
}

#[test]
fn loading_is_not_a_guest_write_for_either_dirty_backend() {
    for tracking in [TrackingChoice::Soft, TrackingChoice::Kernel] {
        let (mem, _) = match try_lazy(&[], tracking) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("{tracking:?}: {e}");
                continue; // the kernel backend is not available here
            }
        };
        assert_eq!(read(&mem, 3 * 4096).unwrap(), 4);
        mem.ensure_all().unwrap();
        let mut words = vec![0u64; mem.segments()[0].pages().div_ceil(64)];
        assert_eq!(mem.get_and_clear_dirty_segment(0, &mut words).unwrap(), 0, "{tracking:?}");
        mem.write(GuestAddress(4096 * 9), &[1]).unwrap();
        assert_eq!(mem.get_and_clear_dirty_segment(0, &mut words).unwrap(), 1, "{tracking:?}");
    }
}

#[test]
fn wired_memory_cannot_be_lazy() {
    let opts =
        MemoryOptions { memsize: 8 * MIB, wired: true, lowmem_limit: 4 * MIB, tracking: TrackingChoice::Soft, backing: Backing::Anonymous };
    let source = Pattern { bad: vec![], loads: Arc::new(AtomicUsize::new(0)) };
    let err = GuestMemory::lazy(&opts, CHUNK, Box::new(source)).err().unwrap();
    assert!(err.to_string().contains("cannot be restored lazily"), "{err}");
}
