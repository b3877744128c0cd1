//! A restore does not leave a memory file it read from the disk cached beside the guest; one
//! already cached stays cached, and `Keep` keeps it.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::*;
use crate::dirty::TrackingChoice;
use crate::memory::{Backing, GuestAddress, GuestMemory, MemoryOptions, PAGE_SIZE};

const MIB: u64 = 1 << 20;
/// Big enough for the page cache's large folios (up to 2 MiB) to sit across the pieces and
/// chunks a restore reads.
const SIZE: u64 = 96 * MIB;
const PAGES: u64 = SIZE / PAGE_SIZE as u64;
const PAGE: u64 = PAGE_SIZE as u64;
/// The chunk size of the saved file: the smallest lazy restores drop with.
const CHUNK: u64 = 2 * MIB;
/// Pages the kernel may evict on its own meanwhile (these VMs run DAMON's page-out, which
/// takes whole 2 MiB folios: one CI run lost 512 pages of a file no restore dropped). An
/// eighth, six folios, still tells a kept file from a dropped one (at most a sixteenth left).
const SLACK: u64 = PAGES / 8;

fn opts() -> MemoryOptions {
    MemoryOptions { memsize: SIZE, wired: false, lowmem_limit: SIZE, tracking: TrackingChoice::Soft, backing: Backing::Anonymous }
}

/// A guest whose every page but the first and the last holds data (so the one data extent, and
/// every piece an eager restore reads, starts one page off a 2 MiB boundary, and the data ends
/// one page before one), saved with `chunk` chunks to a file on the disk directory the tests
/// use; returns the file and its chunk hashes.
fn saved_with(tag: &str, chunk: u64) -> (std::fs::File, Vec<u128>) {
    let mem = GuestMemory::new(&opts()).unwrap();
    let fill: Vec<u8> = (PAGE..SIZE - PAGE).map(|b| (b.wrapping_mul(2654435761) >> 13) as u8 | 1).collect();
    mem.write(GuestAddress(PAGE), &fill).unwrap();
    let path = std::env::temp_dir().join(format!("vmm-pagecache-{}-{tag}", std::process::id()));
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let stats = write_memory_file(&mem, f.as_raw_fd(), chunk, None).unwrap();
    f.sync_all().unwrap();
    (f, stats.chunk_hashes)
}

fn saved(tag: &str) -> (std::fs::File, Vec<u128>) {
    saved_with(tag, CHUNK)
}

fn evict(f: &std::fs::File) {
    // SAFETY: advice on our own descriptor.
    assert_eq!(unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
}

fn restore(f: &std::fs::File, hashes: &[u128], cache: CachePolicy) -> ReadStats {
    let fresh = GuestMemory::new(&opts()).unwrap();
    read_memory_file_cached(&fresh, f.as_raw_fd(), Some((hashes, CHUNK)), None, cache).unwrap()
}

fn cached(f: &std::fs::File, off: u64, len: u64) -> u64 {
    cached_pages(f.as_raw_fd(), off, len).unwrap()
}

/// A saved file another program has just read whole (so it is cached), or None (with why)
/// where this kernel cannot say what is cached.
fn saved_and_read(tag: &str) -> Option<(std::fs::File, Vec<u128>)> {
    let (f, hashes) = saved(tag);
    let mut buf = vec![0u8; SIZE as usize];
    f.read_exact_at(&mut buf, 0).unwrap();
    let Some(before) = cached_pages(f.as_raw_fd(), 0, 0) else {
        eprintln!("skipped: this kernel has no cachestat(2) (Linux 6.5)");
        return None;
    };
    assert!(before + SLACK >= PAGES, "a file just read is cached: {before} of {PAGES}");
    Some((f, hashes))
}

/// The file's cached pages once evicted, or None (with why) where this kernel or filesystem
/// cannot show a cold file: no cachestat, or pages the filesystem keeps whatever it is told
/// (tmpfs).
fn cold(f: &std::fs::File) -> Option<u64> {
    evict(f);
    let Some(before) = cached_pages(f.as_raw_fd(), 0, 0) else {
        eprintln!("skipped: this kernel has no cachestat(2) (Linux 6.5), so the restore keeps the cache");
        return None;
    };
    if before * 2 >= PAGES {
        eprintln!("skipped: this filesystem keeps its pages cached ({before} of {PAGES} after POSIX_FADV_DONTNEED: tmpfs?)");
        return None;
    }
    Some(before)
}

#[test]
fn a_file_read_from_the_disk_is_not_left_cached() {
    let (f, hashes) = saved("cold");
    let Some(before) = cold(&f) else { return };
    let read = restore(&f, &hashes, CachePolicy::Auto);
    assert!(read.verified);
    assert_eq!(read.bytes_read, SIZE - 2 * PAGE);
    assert_eq!(read.cache_released, read.bytes_read, "every piece read is released: {read:?}");
    let after = cached(&f, 0, 0);
    assert!(after <= PAGES / 16, "{after} of {PAGES} pages still cached after the restore (before it: {before})");
    // The last 2 MiB block (the data ends a page short of it) goes only when the read is done.
    assert_eq!(cached(&f, SIZE - 2 * MIB, 2 * MIB), 0, "the file's tail is dropped at the end");
}

#[test]
fn chunks_loaded_lazily_from_the_disk_are_not_left_cached() {
    let (f, hashes) = saved("lazy-cold");
    let Some(before) = cold(&f) else { return };
    let opts = MemoryOptions { tracking: TrackingChoice::Auto, ..opts() };
    let lazy = lazy_memory(&opts, f.as_raw_fd(), hashes.clone(), CHUNK, "checkpoint 'test.ckp'").unwrap();
    let mut half = vec![0u8; (SIZE / 2) as usize];
    lazy.read(GuestAddress(0), &mut half).unwrap();
    assert_eq!(lazy.lazy_image().unwrap().counts(), ((SIZE / 2 / CHUNK) as usize, 0), "the first half's chunks loaded");
    let first_half = cached(&f, 0, SIZE / 2);
    assert!(first_half <= PAGES / 32, "loaded chunks are released: {first_half} of their {} pages cached", PAGES / 2);
    assert_eq!(memory_chunk_hashes(&lazy, CHUNK).unwrap(), hashes, "and all of it reads back exactly");
    let after = cached(&f, 0, 0);
    assert!(after <= PAGES / 16, "{after} of {PAGES} pages still cached once every chunk loaded (before: {before})");
}

#[test]
fn a_lazy_restore_leaves_a_file_already_cached_cached() {
    let Some((f, hashes)) = saved_and_read("lazy-warm") else { return };
    let opts = MemoryOptions { tracking: TrackingChoice::Auto, ..opts() };
    let lazy = lazy_memory(&opts, f.as_raw_fd(), hashes.clone(), CHUNK, "checkpoint 'test.ckp'").unwrap();
    assert_eq!(memory_chunk_hashes(&lazy, CHUNK).unwrap(), hashes);
    let after = cached(&f, 0, 0);
    assert!(after + SLACK >= PAGES, "{after} of {PAGES} cached after the restore");
}

#[test]
fn a_lazy_restore_judges_a_sparse_file_from_its_data() {
    // Data only in the last quarter: the samples skip the holes before it (strata of holes
    // would count nothing and call any file cold), so a file whose data is cached is kept and
    // one whose data is not is dropped.
    let mem = GuestMemory::new(&opts()).unwrap();
    let quarter = SIZE / 4;
    let fill: Vec<u8> = (0..quarter).map(|b| (b.wrapping_mul(2654435761) >> 13) as u8 | 1).collect();
    mem.write(GuestAddress(SIZE - quarter), &fill).unwrap();
    let path = std::env::temp_dir().join(format!("vmm-pagecache-{}-sparse", std::process::id()));
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let hashes = write_memory_file(&mem, f.as_raw_fd(), CHUNK, None).unwrap().chunk_hashes;
    f.sync_all().unwrap();
    let data_pages = quarter / PAGE;
    let opts = MemoryOptions { tracking: TrackingChoice::Auto, ..opts() };
    let restore_all = || {
        let lazy = lazy_memory(&opts, f.as_raw_fd(), hashes.clone(), CHUNK, "checkpoint 'test.ckp'").unwrap();
        assert_eq!(memory_chunk_hashes(&lazy, CHUNK).unwrap(), hashes);
    };
    evict(&f);
    let Some(before) = cached_pages(f.as_raw_fd(), 0, 0) else {
        eprintln!("skipped: this kernel has no cachestat(2) (Linux 6.5)");
        return;
    };
    if before * 2 >= data_pages {
        eprintln!("skipped: this filesystem keeps its pages cached ({before} after POSIX_FADV_DONTNEED: tmpfs?)");
        return;
    }
    // Cold: the data is dropped as its chunks load.
    restore_all();
    let left = cached(&f, 0, 0);
    assert!(left <= data_pages / 16, "cold: {left} of the {data_pages} data pages still cached");
    // Its data read by another program first: kept.
    let mut buf = vec![0u8; quarter as usize];
    f.read_exact_at(&mut buf, SIZE - quarter).unwrap();
    restore_all();
    let kept = cached(&f, SIZE - quarter, quarter);
    // An eighth of the data, as SLACK is of the whole file: 768 pages, one and a half folios.
    assert!(kept + data_pages / 8 >= data_pages, "cached: {kept} of the {data_pages} data pages kept");
}

#[test]
fn lazy_chunks_smaller_than_a_folio_keep_the_cache() {
    // Dropping a 1 MiB chunk would drop its neighbour's pages in the same 2 MiB folio, read
    // ahead and then read again from the disk: such a restore keeps the cache.
    let (f, hashes) = saved_with("lazy-small", MIB);
    if cold(&f).is_none() {
        return;
    }
    let opts = MemoryOptions { tracking: TrackingChoice::Auto, ..opts() };
    let lazy = lazy_memory(&opts, f.as_raw_fd(), hashes.clone(), MIB, "checkpoint 'test.ckp'").unwrap();
    assert_eq!(memory_chunk_hashes(&lazy, MIB).unwrap(), hashes);
    let kept = cached(&f, 0, 0);
    assert!(kept + SLACK >= PAGES - 2, "kept: {kept} of {PAGES} cached");
}

#[test]
fn keep_leaves_a_cold_file_cached_and_release_drops_a_cached_one() {
    let (f, hashes) = saved("policies");
    if cold(&f).is_none() {
        return;
    }
    assert!(memory_file_is_cold(f.as_raw_fd()).unwrap());
    let read = restore(&f, &hashes, CachePolicy::Keep);
    assert_eq!(read.cache_released, 0);
    let kept = cached(&f, 0, 0);
    assert!(kept + SLACK >= PAGES - 2, "kept: {kept} of {PAGES} cached");
    assert!(!memory_file_is_cold(f.as_raw_fd()).unwrap(), "and now it is cached");
    let read = restore(&f, &hashes, CachePolicy::Release);
    assert_eq!(read.cache_released, read.bytes_read);
    let left = cached(&f, 0, 0);
    assert!(left <= PAGES / 16, "released: {left} of {PAGES} still cached");
    assert!(memory_file_is_cold(f.as_raw_fd()).unwrap());
}

#[test]
fn a_file_already_cached_stays_cached() {
    let Some((f, hashes)) = saved_and_read("warm") else { return };
    let read = restore(&f, &hashes, CachePolicy::Auto);
    assert!(read.verified);
    assert_eq!(read.cache_released, 0, "{read:?}");
    let after = cached(&f, 0, 0);
    assert!(after + SLACK >= PAGES, "{after} of {PAGES} cached after the restore");
}

#[test]
fn judging_a_file_that_grew_past_the_size_given_ends() {
    // 65 pages judged (a last stratum shorter than the others), data only in page 65, past them:
    // the stratum jump sent the sampler back to the last stratum's start, for ever.
    let path = std::env::temp_dir().join(format!("vmm-pagecache-{}-grown", std::process::id()));
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    f.set_len(66 * PAGE).unwrap();
    f.write_all_at(&[9u8; PAGE_SIZE], 65 * PAGE).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let fd = f.as_raw_fd();
    std::thread::spawn(move || tx.send(super::pagecache::sampled_cold(fd, 65 * PAGE)).unwrap());
    let judged = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("sampled_cold ends");
    assert!(!judged, "no data within the size judged: nothing to drop");
    drop(f);
}

#[test]
fn cached_pages_says_nothing_of_a_descriptor_that_is_not_open() {
    assert_eq!(cached_pages(-1, 0, 0), None);
}
