//! Round trips of the memory file through eager and lazy restore, and what damage looks like.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};

use super::*;
use crate::dirty::TrackingChoice;
use crate::memory::{Backing, GuestAddress, GuestMemory, MemoryOptions, HIGHMEM_BASE, PAGE_SIZE};
use crate::progress::{Meter, Reading};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = MIB;

fn opts(tracking: TrackingChoice) -> MemoryOptions {
    // lowmem of 6.5 MiB, so one 1 MiB chunk of the image spans lowmem and highmem.
    MemoryOptions { memsize: 13 * MIB, wired: false, lowmem_limit: 6 * MIB + 512 * 1024, tracking, backing: Backing::Anonymous }
}

/// Pages with data in both segments, a touched-but-zero page, and a run across a chunk boundary.
fn guest(tracking: TrackingChoice) -> GuestMemory {
    let mem = GuestMemory::new(&opts(tracking)).unwrap();
    for (i, gpa) in [0u64, 5 * 4096, 255 * 4096, 256 * 4096, 6 * MIB + 500 * 1024, HIGHMEM_BASE, HIGHMEM_BASE + 6 * MIB].iter().enumerate()
    {
        let fill: Vec<u8> = (0..4096).map(|b| (b as u64 * 13 + i as u64 * 101 + 1) as u8 | 1).collect();
        mem.write(GuestAddress(*gpa), &fill).unwrap();
    }
    mem.write(GuestAddress(40 * 4096), &[0u8; 4096]).unwrap();
    mem
}

fn temp_file(tag: &str) -> std::fs::File {
    let path = std::env::temp_dir().join(format!("vmm-snap-{}-{tag}", std::process::id()));
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

fn digest(mem: &GuestMemory) -> u128 {
    crate::digest::memory_digest(mem, true).unwrap()
}

#[test]
fn the_file_is_sparse_and_hashes_agree_three_ways() {
    let mem = guest(TrackingChoice::Soft);
    let f = temp_file("sparse");
    let meter = Meter::new();
    let stats = write_memory_file(&mem, f.as_raw_fd(), CHUNK, Some(&meter)).unwrap();
    assert_eq!(stats.file_size, 13 * MIB);
    let pages = 13 * MIB / 4096;
    assert_eq!(
        meter.read(),
        Reading { pages_total: pages, data_pages_total: 0, pages_done: pages, data_pages_done: 7, bytes_done: 7 * 4096 }
    );
    assert_eq!(f.metadata().unwrap().len(), 13 * MIB);
    assert_eq!((stats.data_pages, stats.zero_pages), (7, 1));
    assert_eq!(stats.bytes_written, 7 * 4096);
    assert_eq!(stats.pwrite_calls, 6, "pages 255 and 256 go out in one write");
    assert!(f.metadata().unwrap().blocks() * 512 <= 64 * 4096, "holes where nothing was written");
    assert_eq!(stats.chunk_hashes.len(), 13);
    assert_eq!(memory_chunk_hashes(&mem, CHUNK).unwrap(), stats.chunk_hashes);
    assert_eq!(hash_memory_file(f.as_raw_fd(), CHUNK).unwrap(), (stats.chunk_hashes.clone(), 13 * MIB));
    // highmem starts right after lowmem in the file.
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, 6 * MIB + 512 * 1024).unwrap();
    assert_eq!(&b, &mem_bytes(&mem, HIGHMEM_BASE, 4)[..]);
}

fn mem_bytes(mem: &GuestMemory, gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read(GuestAddress(gpa), &mut v).unwrap();
    v
}

#[test]
fn eager_restore_is_bit_exact_verified_and_clean() {
    for tracking in [TrackingChoice::Soft, TrackingChoice::Auto] {
        let mem = guest(tracking);
        let f = temp_file("eager");
        let stats = write_memory_file(&mem, f.as_raw_fd(), CHUNK, None).unwrap();
        let fresh = GuestMemory::new(&opts(tracking)).unwrap();
        let meter = Meter::new();
        let read = read_memory_file(&fresh, f.as_raw_fd(), Some((&stats.chunk_hashes, CHUNK)), Some(&meter)).unwrap();
        assert!(read.verified);
        let (r, pages) = (meter.read(), stats.file_size / 4096);
        assert_eq!((r.pages_total, r.pages_done, r.bytes_done), (pages, pages, read.bytes_read), "{r:?}");
        assert_eq!((r.data_pages_total, r.data_pages_done), (read.bytes_read / 4096, read.bytes_read / 4096));
        assert_eq!(digest(&fresh), digest(&mem));
        assert!(read.bytes_read < 64 * 4096, "only the data extents are read: {read:?}");
        for i in 0..fresh.segments().len() {
            let mut words = vec![0u64; fresh.segments()[i].pages().div_ceil(64)];
            assert_eq!(fresh.get_and_clear_dirty_segment(i, &mut words).unwrap(), 0, "restored pages are clean ({:?})", fresh.backend());
        }
        fresh.write(GuestAddress(HIGHMEM_BASE + 4096), &[1]).unwrap();
        let mut words = vec![0u64; fresh.segments()[1].pages().div_ceil(64)];
        assert_eq!(fresh.get_and_clear_dirty_segment(1, &mut words).unwrap(), 1, "and tracking works after it");
    }
}

/// The test guest saved to a fresh file named after `tag`.
fn saved(tag: &str) -> (GuestMemory, std::fs::File, WriteStats) {
    let mem = guest(TrackingChoice::Soft);
    let f = temp_file(tag);
    let stats = write_memory_file(&mem, f.as_raw_fd(), CHUNK, None).unwrap();
    (mem, f, stats)
}

/// Where a byte of chunk 6 lies in the file: the chunk spans lowmem's last half MiB and
/// highmem's first half MiB.
const IN_CHUNK_6: u64 = 6 * MIB + 512 * 1024 + 100;

/// The test guest saved to a fresh file, then the file's byte at `IN_CHUNK_6` inverted; returns
/// the byte as it was.
fn saved_with_chunk_6_damaged(tag: &str) -> (GuestMemory, std::fs::File, WriteStats, u8) {
    let (mem, f, stats) = saved(tag);
    let mut original = [0u8; 1];
    f.read_exact_at(&mut original, IN_CHUNK_6).unwrap();
    f.write_all_at(&[!original[0]], IN_CHUNK_6).unwrap();
    (mem, f, stats, original[0])
}

#[test]
fn a_damaged_chunk_is_named_with_its_guest_physical_range() {
    let (_, f, stats, original) = saved_with_chunk_6_damaged("damaged");
    let fresh = GuestMemory::new(&opts(TrackingChoice::Soft)).unwrap();
    let err = read_memory_file(&fresh, f.as_raw_fd(), Some((&stats.chunk_hashes, CHUNK)), None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "memory chunk 6 (file bytes 0x600000..0x700000, guest-physical 0x600000..0x680000 and 0x100000000..0x100080000) does not match its recorded hash"
    );
    // A byte written into a hole is caught too.
    f.write_all_at(&[original], IN_CHUNK_6).unwrap();
    f.write_all_at(&[1], 12 * MIB + 7).unwrap();
    let fresh = GuestMemory::new(&opts(TrackingChoice::Soft)).unwrap();
    let err = read_memory_file(&fresh, f.as_raw_fd(), Some((&stats.chunk_hashes, CHUNK)), None).unwrap_err();
    assert!(err.to_string().starts_with("memory chunk 12 "), "{err}");
    let err = read_memory_file(&fresh, f.as_raw_fd(), Some((&stats.chunk_hashes[..3], CHUNK)), None).unwrap_err();
    assert_eq!(err.to_string(), "3 chunk hashes given, but the memory image has 13 chunks of 1048576 bytes");
    f.set_len(MIB).unwrap();
    let err = read_memory_file(&fresh, f.as_raw_fd(), None, None).unwrap_err();
    assert_eq!(err.to_string(), "memory file is 1048576 bytes (1 MiB), the guest's memory is 13631488 bytes (13 MiB)");
}

/// A guest whose every page holds data, with lowmem ending 13 pages past a MiB: a restore's
/// 256 KiB reads cut its one long extent at every piece, and the segment boundary falls inside
/// a piece.
fn dense_guest() -> (GuestMemory, MemoryOptions) {
    let opts = MemoryOptions { lowmem_limit: 6 * MIB + 13 * 4096, ..opts(TrackingChoice::Soft) };
    let mem = GuestMemory::new(&opts).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for seg in mem.segments() {
        let bytes: Vec<u8> = (0..seg.size() / 8)
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()
            })
            .collect();
        mem.write(seg.gpa(), &bytes).unwrap();
    }
    (mem, opts)
}

#[test]
fn an_image_read_in_pieces_is_exact_and_a_byte_either_side_of_a_piece_boundary_is_caught() {
    let (mem, opts) = dense_guest();
    let piece = 256 * 1024u64;
    // Chunks smaller than a read and ending where it does, not dividing it, straddling reads,
    // and larger than many reads.
    for chunk in [64 * 1024, 3 * 4096, MIB + 4096, 8 * MIB] {
        let f = temp_file(&format!("dense-{chunk}"));
        let stats = write_memory_file(&mem, f.as_raw_fd(), chunk, None).unwrap();
        let fresh = GuestMemory::new(&opts).unwrap();
        let read = read_memory_file(&fresh, f.as_raw_fd(), Some((&stats.chunk_hashes, chunk)), None).unwrap();
        assert!(read.verified && read.bytes_read == 13 * MIB, "chunk {chunk}: {read:?}");
        assert_eq!(digest(&fresh), digest(&mem), "chunk {chunk}");
        // The last byte of the fifth read, the first of the sixth, and the byte where highmem
        // begins (inside the 25th read).
        for at in [5 * piece - 1, 5 * piece, 6 * MIB + 13 * 4096] {
            let mut original = [0u8; 1];
            f.read_exact_at(&mut original, at).unwrap();
            f.write_all_at(&[!original[0]], at).unwrap();
            let fresh = GuestMemory::new(&opts).unwrap();
            let err = read_memory_file(&fresh, f.as_raw_fd(), Some((&stats.chunk_hashes, chunk)), None).unwrap_err();
            let index = at / chunk;
            assert!(
                err.to_string().starts_with(&format!("memory chunk {index} (file bytes {:#x}..", index * chunk)),
                "byte {at:#x}, chunk {chunk}: {err}"
            );
            f.write_all_at(&original, at).unwrap();
        }
    }
}

fn lazy(f: &std::fs::File, hashes: &[u128]) -> GuestMemory {
    lazy_memory(&opts(TrackingChoice::Auto), f.as_raw_fd(), hashes.to_vec(), CHUNK, "checkpoint 'test.ckp'").unwrap()
}

fn lazy_counts(mem: &GuestMemory) -> (usize, usize) {
    mem.lazy_image().unwrap().counts()
}

#[test]
fn lazy_memory_loads_chunks_on_touch_and_saves_again_exactly() {
    let (mem, f, stats) = saved("lazy");
    let lazy = lazy(&f, &stats.chunk_hashes);
    let mapped = |m: &GuestMemory| m.segments().iter().map(|s| s.mapped_pages().unwrap()).sum::<usize>();
    assert_eq!((mapped(&lazy), lazy_counts(&lazy)), (0, (0, 0)), "restoring reads nothing");
    assert_eq!(mem_bytes(&lazy, 5 * 4096, 8), mem_bytes(&mem, 5 * 4096, 8));
    assert_eq!(lazy_counts(&lazy), (1, 0), "one chunk loaded for one read");
    assert_eq!(mapped(&lazy), 3, "its data pages (0, 5, 255), not its holes");
    assert_eq!(memory_chunk_hashes(&lazy, CHUNK).unwrap(), stats.chunk_hashes);
    assert!(lazy.is_complete());
    assert_eq!(digest(&lazy), digest(&mem));
    let again = temp_file("lazy-again");
    let stats2 = write_memory_file(&lazy, again.as_raw_fd(), CHUNK, None).unwrap();
    assert_eq!((stats2.chunk_hashes, stats2.data_pages), (stats.chunk_hashes.clone(), 7));
    // Complete memory no longer needs its file: it may even be saved over it.
    let stats3 = write_memory_file(&lazy, f.as_raw_fd(), CHUNK, None).unwrap();
    assert_eq!(stats3.chunk_hashes, stats.chunk_hashes);
    let err = read_memory_file(&lazy, again.as_raw_fd(), None, None).unwrap_err();
    assert!(err.to_string().contains("is restored lazily; eager restore reads into fresh anonymous memory"), "{err}");
}

#[test]
fn a_damaged_lazy_chunk_is_refused_by_name_and_the_rest_still_loads() {
    let (mem, f, stats, _) = saved_with_chunk_6_damaged("lazy-damaged");
    let mut b = [0u8; 1];
    f.write_all_at(&[1], 12 * MIB + 7).unwrap(); // chunk 12: a byte where the file had a hole
    let lazy = lazy(&f, &stats.chunk_hashes);
    let expected = "checkpoint 'test.ckp': memory chunk 6 (file bytes 0x600000..0x700000, guest-physical 0x600000..0x680000 and \
                    0x100000000..0x100080000) does not match its recorded hash; the guest may not use it";
    for gpa in [6 * MIB + 500 * 1024, HIGHMEM_BASE + 7] {
        let err = lazy.read(GuestAddress(gpa), &mut b).unwrap_err();
        assert_eq!(err.to_string(), expected);
        assert_eq!(err.errno(), libc::EBADMSG);
    }
    assert!(lazy.write(GuestAddress(HIGHMEM_BASE), &[1]).is_err(), "nor written");
    let err = lazy.read(GuestAddress(HIGHMEM_BASE + 6 * MIB - 512 * 1024 + 7), &mut b).unwrap_err();
    assert!(err.to_string().contains("memory chunk 12 "), "{err}");
    assert_eq!(mem_bytes(&lazy, 0, 16), mem_bytes(&mem, 0, 16), "good chunks load");
    assert_eq!(lazy_counts(&lazy), (1, 2));
    assert!(!lazy.is_complete());
    assert_eq!(lazy.lazy_image().unwrap().first_failure().unwrap().to_string(), expected);
    let again = temp_file("lazy-damaged-again");
    assert!(
        write_memory_file(&lazy, again.as_raw_fd(), CHUNK, None).unwrap_err().to_string().contains("memory chunk 6 "),
        "nothing unverified is saved"
    );
}

#[test]
fn a_memory_file_truncated_under_lazy_memory_fails_the_chunks_not_yet_loaded() {
    let (mem, f, stats) = saved("lazy-truncated");
    let lazy = lazy(&f, &stats.chunk_hashes);
    assert_eq!(mem_bytes(&lazy, 5 * 4096, 8), mem_bytes(&mem, 5 * 4096, 8));
    f.set_len(4096).unwrap();
    let err = lazy.read(GuestAddress(HIGHMEM_BASE), &mut [0u8; 8]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "checkpoint 'test.ckp': memory chunk 6 (file bytes 0x600000..0x700000, guest-physical 0x600000..0x680000 and \
         0x100000000..0x100080000) cannot be read: the file was truncated to 4096 bytes; the guest may not use it"
    );
    assert_eq!(err.errno(), libc::EIO);
    assert_eq!(mem_bytes(&lazy, 5 * 4096, 8), mem_bytes(&mem, 5 * 4096, 8), "a chunk already loaded is the guest's own");
}

#[test]
fn zero_ranges_received_into_lazy_memory_read_as_zero() {
    use crate::wire::{build_ranges_from_bitmap, recv_batch, send_batch};
    let mem = guest(TrackingChoice::Soft);
    let f = temp_file("lazy-zero");
    let stats = write_memory_file(&mem, f.as_raw_fd(), CHUNK, None).unwrap();
    let lazy = lazy(&f, &stats.chunk_hashes);
    lazy.write(GuestAddress(7 * 4096), &[5u8; 4096]).unwrap(); // a guest write over a hole
                                                               // The sender's pages 0, 5, 7 and 255 are now zero: send them as ZERO ranges.
    let src = GuestMemory::new(&opts(TrackingChoice::Soft)).unwrap();
    let mut words = vec![0u64; src.segments()[0].pages().div_ceil(64)];
    for p in [0usize, 5, 7, 255] {
        words[p / 64] |= 1 << (p % 64);
    }
    let ranges = build_ranges_from_bitmap(&src.segments()[0], &words, true).unwrap();
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two fds into the array we own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let (rx, tx) = (fds[0], fds[1]);
    send_batch(tx, &src, &ranges).unwrap();
    let got = recv_batch(rx, &lazy).unwrap();
    assert_eq!(got.zero_pages, 4);
    for p in [0u64, 5, 7, 255] {
        assert!(mem_bytes(&lazy, p * 4096, 4096).iter().all(|&b| b == 0), "page {p} reads as zero");
    }
    assert_eq!(mem_bytes(&lazy, 256 * 4096, 1), mem_bytes(&mem, 256 * 4096, 1), "neighbours keep the file's bytes");
    // SAFETY: closing the pipe fds we opened.
    unsafe {
        libc::close(rx);
        libc::close(tx)
    };
    let _ = PAGE_SIZE;
}

/// The image bytes (lowmem then highmem) of pages `first..first+count`.
fn image_pages(mem: &GuestMemory, first: u64, count: u64) -> Vec<u8> {
    let low = mem.segments()[0].size() as u64;
    (first..first + count)
        .flat_map(|page| {
            let at = page * PAGE_SIZE as u64;
            mem_bytes(mem, if at < low { at } else { HIGHMEM_BASE + at - low }, PAGE_SIZE)
        })
        .collect()
}

#[test]
fn packed_pages_are_the_runs_back_to_back_hashed_as_the_file_reads() {
    let mem = guest(TrackingChoice::Soft);
    let low_pages = mem.segments()[0].size() as u64 / PAGE_SIZE as u64;
    // Every other page (more pieces than one pwritev takes), a run across the lowmem/highmem
    // boundary, and highmem's data page.
    let mut runs: Vec<(u64, u64)> = (0..800).map(|i| (2 * i, 1)).collect();
    runs.push((low_pages - 2, 4));
    runs.extend((0..700).map(|i| (low_pages + 4 + 2 * i, 1)));
    runs.push((low_pages + 6 * MIB / PAGE_SIZE as u64, 1));
    let f = temp_file("packed");
    let stats = write_packed_pages(&mem, f.as_raw_fd(), &runs, CHUNK).unwrap();
    let expected: Vec<u8> = runs.iter().flat_map(|&(first, count)| image_pages(&mem, first, count)).collect();
    assert_eq!(stats.bytes_written, expected.len() as u64);
    let mut got = vec![0u8; expected.len()];
    f.read_exact_at(&mut got, 0).unwrap();
    assert!(got == expected, "the file holds the runs' pages in order");
    assert!(stats.pwrite_calls >= 2, "more pieces than one pwritev takes");
    assert_eq!(stats.chunk_hashes, hash_memory_file(f.as_raw_fd(), CHUNK).unwrap().0, "hashed as the file reads back");
    for bad in [vec![(5, 2), (6, 1)], vec![(mem.memsize() / PAGE_SIZE as u64 - 1, 2)]] {
        let err = write_packed_pages(&mem, f.as_raw_fd(), &bad, CHUNK).unwrap_err().to_string();
        assert!(err.contains("is not inside the guest's 3328 pages after the previous run"), "{err}");
    }
}

/// A large guest's eager read takes seconds: an interrupt (Ctrl-C, through the embedder's check)
/// stops it at the first check, 64 MiB in, with an error that says how far it got; the caller
/// discards the memory. Not interrupted, the same file restores whole and verified.
#[test]
fn an_eager_restore_stops_at_its_first_check_when_the_process_is_interrupted_and_says_how_far_it_got() {
    use crate::memory::interrupts_for_tests::interrupt_this_thread;
    let size = 80 * MIB;
    let opts = MemoryOptions::new(size);
    let mem = GuestMemory::new(&opts).unwrap();
    let fill: Vec<u8> = (0..MIB).map(|b| (b % 251) as u8 + 1).collect();
    for at in (0..size).step_by(MIB as usize) {
        mem.write(GuestAddress(at), &fill).unwrap();
    }
    let f = temp_file("interrupted");
    let stats = write_memory_file(&mem, f.as_raw_fd(), CHUNK, None).unwrap();
    interrupt_this_thread(true);
    let fresh = GuestMemory::new(&opts).unwrap();
    let err = read_memory_file(&fresh, f.as_raw_fd(), Some((&stats.chunk_hashes, CHUNK)), None).map(|_| ()).unwrap_err();
    interrupt_this_thread(false);
    assert!(matches!(err, SnapshotError::Memory(crate::memory::MemoryError::Interrupted { .. })), "{err}");
    assert_eq!(err.to_string(), "reading 80 MiB of memory from the checkpoint was interrupted after 64 MiB");
    let fresh = GuestMemory::new(&opts).unwrap();
    let read = read_memory_file(&fresh, f.as_raw_fd(), Some((&stats.chunk_hashes, CHUNK)), None).unwrap();
    assert!(read.verified && read.bytes_read == size, "every chunk read and matching its hash: {read:?}");
}

#[test]
fn an_interrupted_eager_restore_stops_populating_memory_it_will_not_read() {
    use crate::memory::interrupts_for_tests::interrupt_this_thread;
    use std::io::Write;
    // Large enough that the thread populating ahead of the reader is far from done when the
    // reader stops at its first check (64 MiB): here 64-106 MiB of the 1 GiB were resident then,
    // and all of it when nothing told the thread to stop.
    let size = 1024 * MIB;
    let opts = MemoryOptions::new(size);
    let f = temp_file("stops-populating");
    let fill: Vec<u8> = (0..MIB).map(|b| (b % 241) as u8 + 1).collect();
    let mut out = std::io::BufWriter::new(&f);
    for _ in 0..size / MIB {
        out.write_all(&fill).unwrap();
    }
    drop(out);
    let fresh = GuestMemory::new(&opts).unwrap();
    interrupt_this_thread(true);
    let err = read_memory_file(&fresh, f.as_raw_fd(), None, None).map(|_| ()).unwrap_err();
    interrupt_this_thread(false);
    assert!(matches!(err, SnapshotError::Memory(crate::memory::MemoryError::Interrupted { .. })), "{err}");
    // What the populating thread touched is resident; had nothing stopped it, all of it would be.
    let mut resident = 0u64;
    for seg in fresh.segments() {
        let pages = seg.pages();
        let mut vec = vec![0u8; pages];
        // SAFETY: the segment's mapping covers `pages` pages from its page-aligned start, and
        // `vec` has a byte for each.
        let rc = unsafe { libc::mincore(seg.as_ptr() as *mut libc::c_void, pages * PAGE_SIZE, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        resident += vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE_SIZE as u64;
    }
    assert!(resident >= 64 * MIB, "the 64 MiB read are in place: {} MiB resident", resident / MIB);
    assert!(resident <= size / 2, "populating went on after the reader stopped: {} of {} MiB resident", resident / MIB, size / MIB);
}
