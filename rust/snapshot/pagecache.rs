//! Leaving the page cache as an eager restore found it.
//!
//! An eager restore reads each page of the memory file once, into guest memory. Read through the
//! page cache, the file then stays cached beside the guest: a second copy of the guest's memory
//! that the kernel must reclaim, page by page, when anything else needs memory. On a 24 GiB
//! machine restoring an 8 GiB guest, that reclaim ran inside the next thing to allocate (a
//! migration destination's memory) and made it three times slower (docs/performance.md). The
//! checkpoint is written with O_DIRECT for the same reason: it leaves nothing cached.
//!
//! So a restore that finds the file not cached asks the kernel to drop each piece once it is in
//! guest memory (`POSIX_FADV_DONTNEED`, which never drops a dirty page). A file already mostly
//! cached when the restore starts (a golden image restored again and again, or one on tmpfs,
//! whose pages are the file) is left cached: dropping it would make the next restore read the
//! disk. Whether it is cached is asked with `cachestat(2)` (Linux 6.5); a kernel without it
//! keeps the cache, as before.

use std::os::fd::RawFd;

use crate::memory::PAGE_SIZE;

/// `cachestat(2)`'s number, the same on every architecture (the unified table from 424 up).
const SYS_CACHESTAT: libc::c_long = 451;

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

/// Pages of `fd` in `off..off+len` that are in the page cache now, or None where the kernel
/// cannot say (no `cachestat`, or a descriptor that is not a file).
pub fn cached_pages(fd: RawFd, off: u64, len: u64) -> Option<u64> {
    let range = CachestatRange { off, len };
    let mut stat = Cachestat::default();
    // SAFETY: both structs are ours, laid out as the kernel's, and live across the call.
    let rc = unsafe { libc::syscall(SYS_CACHESTAT, fd, &range as *const CachestatRange, &mut stat as *mut Cachestat, 0u32) };
    (rc == 0).then_some(stat.nr_cache)
}

/// Whether a restore drops what it reads from the page cache, decided once before it reads.
pub(super) struct CacheRelease {
    fd: RawFd,
    release: bool,
}

impl CacheRelease {
    /// Release as the read goes when fewer than half of the `data_bytes` the file holds are
    /// cached now (a file the restore itself brings in from the disk).
    pub(super) fn decide(fd: RawFd, data_bytes: u64) -> CacheRelease {
        let pages = data_bytes / PAGE_SIZE as u64;
        let release = pages > 0 && cached_pages(fd, 0, 0).is_some_and(|cached| cached.saturating_mul(2) < pages);
        CacheRelease { fd, release }
    }

    /// `off..off+len` of the file is in guest memory now: drop its cached pages if this restore
    /// releases. Returns the bytes it asked the kernel to drop (advice: a failure changes nothing
    /// the restore needs, so it is ignored).
    pub(super) fn after_read(&self, off: u64, len: u64) -> u64 {
        if !self.release || len == 0 {
            return 0;
        }
        // SAFETY: advice on our own descriptor; no memory is passed.
        let rc = unsafe { libc::posix_fadvise(self.fd, off as libc::off_t, len as libc::off_t, libc::POSIX_FADV_DONTNEED) };
        if rc == 0 {
            len
        } else {
            0
        }
    }
}
