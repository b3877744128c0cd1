//! Not leaving a second copy of the guest's memory in the page cache.
//!
//! An eager restore reads each page of the memory file once, into guest memory. Read through the
//! page cache, the file then stays cached beside the guest: a second copy of the guest's memory
//! that the kernel must reclaim, page by page, when anything else needs memory, and a restore
//! that takes fresh memory twice (cache and guest): on a 24 GiB VM restoring an 8 GiB guest from
//! the disk that took 11-17 s against 3.7-4.7 s dropping as it goes (docs/performance.md). The
//! checkpoint is written with O_DIRECT for the same reason: it leaves nothing cached.
//!
//! So a restore that finds the file cold (fewer than half of its data pages cached) asks the
//! kernel to drop what it has read once it is in guest memory (`POSIX_FADV_DONTNEED`, which never
//! drops a dirty page or one in use). A file found cached (one another program keeps reading) is
//! left alone, and a caller can ask to keep the cache whatever it finds ([`CachePolicy::Keep`]).
//! Whether the file is cached is asked with `cachestat(2)` (Linux 6.5); where the kernel cannot
//! say (older kernels, a file the caller neither owns nor may write on kernels that restrict
//! `cachestat`, overlayfs, which answers for its own empty cache while advice goes to the file
//! beneath) the cache is kept. A file on tmpfs (or ramfs, hugetlbfs) is never asked about: its
//! pages are the file, so nothing can be dropped. `cachestat` walks every cached page of the range
//! it is asked about (9 ms a GiB here), which a lazy restore, constant time, cannot afford: it
//! judges the file from [`SAMPLES`] samples of its data instead. (Asking chunk by chunk as each
//! loads does not work: the readahead of one chunk's read makes the next look cached.)
//!
//! The kernel drops only whole folios, and the cache holds files in folios of up to 2 MiB, so
//! what is dropped while reading ends on [`RELEASE_ALIGN`] boundaries behind the reader, and the
//! rest of the file goes when the read is done.

use std::os::fd::RawFd;

use super::memfile::next_data_extent;
use crate::memory::PAGE_SIZE;

/// `cachestat(2)`'s number on x86_64 and aarch64 (the unified syscall table from 424 up);
/// elsewhere the cache is kept.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const SYS_CACHESTAT: Option<libc::c_long> = Some(451);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const SYS_CACHESTAT: Option<libc::c_long> = None;

/// overlayfs's `f_type`: its `cachestat` counts its own (empty) cache, not the real file's.
const OVERLAYFS_SUPER_MAGIC: libc::c_long = 0x794c_7630;
/// The `f_type`s of filesystems whose files live in memory (tmpfs, ramfs, hugetlbfs): their
/// pages are the file, so there is no copy to drop.
const MEMORY_FS_MAGIC: [libc::c_long; 3] = [0x0102_1994, 0x8584_58f6, 0x9584_58f6];

/// Drops while reading end on multiples of this: the largest folio the page cache uses on
/// x86_64 and aarch64 with 4 KiB pages (a PMD, 2 MiB), so no folio straddles a boundary.
pub(super) const RELEASE_ALIGN: u64 = 2 << 20;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// The `f_type` of the filesystem `fd` is on, None where `fstatfs` fails.
fn fs_type(fd: RawFd) -> Option<libc::c_long> {
    // SAFETY: fstatfs fills the struct we hand it.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; a bad fd is reported as an error.
    (unsafe { libc::fstatfs(fd, &mut fs) } == 0).then_some(fs.f_type as libc::c_long)
}

/// Pages of `fd` in `off..off+len` (`len` 0: to the end) that are in the page cache now, or None
/// where the kernel cannot say (no `cachestat`, not permitted, not a file, overlayfs). Costs
/// time in proportion to the pages cached in the range.
pub fn cached_pages(fd: RawFd, off: u64, len: u64) -> Option<u64> {
    if fs_type(fd)? == OVERLAYFS_SUPER_MAGIC {
        return None;
    }
    cachestat(fd, off, len)
}

/// `cachestat(2)` of `off..off+len`, for a file already known to be on a filesystem it answers
/// for.
fn cachestat(fd: RawFd, off: u64, len: u64) -> Option<u64> {
    let nr = SYS_CACHESTAT?;
    let range = CachestatRange { off, len };
    let mut stat = Cachestat::default();
    // SAFETY: both structs are ours, laid out as the kernel's, and live across the call.
    let rc = unsafe { libc::syscall(nr, fd, &range as *const CachestatRange, &mut stat as *mut Cachestat, 0u32) };
    (rc == 0).then_some(stat.nr_cache)
}

/// Whether the kernel can say what is cached of the file at `fd` and a restore could drop it: a
/// file on a filesystem neither in memory nor overlayfs, on a kernel with `cachestat`.
fn judgeable(fd: RawFd) -> bool {
    SYS_CACHESTAT.is_some() && fs_type(fd).is_some_and(|t| t != OVERLAYFS_SUPER_MAGIC && !MEMORY_FS_MAGIC.contains(&t))
}

/// How many places of a file a lazy restore looks at to judge it ([`sampled_cold`]), and how
/// much of each: at most 64 x 16 pages for `cachestat` to walk, however big the file.
const SAMPLES: u64 = 64;
const SAMPLE_BYTES: u64 = 64 << 10;

/// What a restore does with the page cache it reads the memory file through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachePolicy {
    /// Drop what is read when the file was cold as the restore began (decided by [`is_cold`],
    /// which a caller that reads the file first, to verify it, asks before that read; a lazy
    /// restore judges from samples, [`sampled_cold`]).
    Auto,
    /// Drop what is read: the caller found the file cold before it read it itself.
    Release,
    /// Leave the cache as the reads leave it (what every restore did before).
    Keep,
}

impl CachePolicy {
    /// "auto", "release" or "keep", as the Python API spells them.
    pub fn parse(name: &str) -> Option<CachePolicy> {
        match name {
            "auto" => Some(CachePolicy::Auto),
            "release" => Some(CachePolicy::Release),
            "keep" => Some(CachePolicy::Keep),
            _ => None,
        }
    }
}

/// Whether fewer than half of the `data_bytes` the file at `fd` holds are in the page cache (a
/// file a restore would bring in from the disk). False where the kernel cannot say, and for a
/// file in memory (tmpfs), without asking. (A sparse file read in full caches its holes too, so
/// a file some program read whole counts as cached.)
pub fn is_cold(fd: RawFd, data_bytes: u64) -> bool {
    let pages = data_bytes / PAGE_SIZE as u64;
    judgeable(fd) && pages > 0 && cachestat(fd, 0, 0).is_some_and(|cached| cached.saturating_mul(2) < pages)
}

/// [`is_cold`] judged from samples, in constant time: the file of `size` bytes is cut into
/// [`SAMPLES`] strata, and in each that holds data up to [`SAMPLE_BYTES`] of its first data are
/// looked at (two `lseek`s and one `cachestat` a stratum; strata of holes are skipped).
pub(super) fn sampled_cold(fd: RawFd, size: u64) -> bool {
    if !judgeable(fd) {
        return false;
    }
    let page = PAGE_SIZE as u64;
    let stride = size.div_ceil(SAMPLES).div_ceil(page).max(1) * page;
    let (mut pages, mut cached) = (0u64, 0u64);
    let mut pos = 0;
    while pos < size {
        // None too for data past the size judged (the file grew since): not the checkpoint's.
        let Ok(Some((data, hole))) = next_data_extent(fd, pos, size) else { break };
        let stratum_end = (pos + stride).min(size);
        if data >= stratum_end {
            pos = data / stride * stride; // the stratum the data is in, after this one
            continue;
        }
        let (first, end) = (data / page * page, hole.min(data + SAMPLE_BYTES).min(stratum_end).div_ceil(page) * page);
        let Some(c) = cachestat(fd, first, end - first) else { return false };
        pages += (end - first) / page;
        cached += c;
        pos = stratum_end;
    }
    pages > 0 && cached.saturating_mul(2) < pages
}

/// One restore's dropping of what it has read.
pub(super) struct CacheRelease {
    fd: RawFd,
    release: bool,
}

impl CacheRelease {
    /// The policy applied to the file at `fd`; `cold` judges it, for `Auto`, now.
    pub(super) fn new(fd: RawFd, policy: CachePolicy, cold: impl FnOnce() -> bool) -> CacheRelease {
        let release = match policy {
            CachePolicy::Auto => cold(),
            CachePolicy::Release => true,
            CachePolicy::Keep => false,
        };
        CacheRelease { fd, release }
    }

    /// Whether this restore drops what it reads.
    pub(super) fn releases(&self) -> bool {
        self.release
    }

    /// Ask the kernel to drop `off..end` of the file from the cache (advice: a failure changes
    /// nothing the restore needs, so it is ignored). `end` 0: to the end of the file.
    pub(super) fn drop_range(&self, off: u64, end: u64) {
        if !self.release || (end != 0 && end <= off) {
            return;
        }
        let len = if end == 0 { 0 } else { end - off };
        // SAFETY: advice on our own descriptor; no memory is passed.
        unsafe { libc::posix_fadvise(self.fd, off as libc::off_t, len as libc::off_t, libc::POSIX_FADV_DONTNEED) };
    }

    /// A lazily loaded chunk, `start..end`, is in guest memory: drop it, rounded out to whole
    /// [`RELEASE_ALIGN`] blocks so no folio across its edges stays. Chunks are whole blocks (lazy
    /// restores of smaller chunks keep the cache), so this only reaches past the file's last
    /// chunk.
    pub(super) fn drop_chunk(&self, start: u64, end: u64) {
        self.drop_range(start / RELEASE_ALIGN * RELEASE_ALIGN, end.div_ceil(RELEASE_ALIGN) * RELEASE_ALIGN);
    }
}

/// An eager read's dropping: what lies behind the reader, on [`RELEASE_ALIGN`] boundaries, as it
/// goes; the whole file at the end.
pub(super) struct ReleaseBehind {
    cache: CacheRelease,
    done: u64,
    /// Bytes read once the restore had decided to drop them (not what the kernel dropped: it
    /// keeps dirty pages and pages in use).
    pub(super) released: u64,
}

impl ReleaseBehind {
    pub(super) fn new(cache: CacheRelease) -> ReleaseBehind {
        ReleaseBehind { cache, done: 0, released: 0 }
    }

    /// The file has been read up to `end` (reads go in file order), `len` bytes of it just now.
    pub(super) fn read_up_to(&mut self, end: u64, len: u64) {
        if !self.cache.releases() {
            return;
        }
        self.released += len;
        let aligned = end / RELEASE_ALIGN * RELEASE_ALIGN;
        if aligned > self.done {
            self.cache.drop_range(self.done, aligned);
            self.done = aligned;
        }
    }
}

impl Drop for ReleaseBehind {
    /// The read is over, however it ended: drop the rest of the file (its last partial block,
    /// and whatever the kernel read ahead into holes).
    fn drop(&mut self) {
        self.cache.drop_range(self.done, 0);
    }
}
